"""See where the credit goes: the token advantages of a few sampled responses under two credit
settings (e.g. GRPO and HCA), side by side, as HTML and as a PNG.

:func:`sample_credit` samples ``G`` responses per problem from a policy, verifies them, scores them
with a step scorer and builds the RL batch (:func:`hca.rl.batch.build_rl_batch`) once per credit
setting -- the very tensors an RL step would train on. :func:`credit_html` colours every token by
its advantage (green: pushed up, red: pushed down; the same colour scale for every setting) and
labels every step with its predicted value and progress; :func:`credit_png` draws the same for a
report that cannot hold HTML.

Under GRPO every token of a response carries the same advantage. Under HCA the credit of a step
moves with its progress ``P_k = f(h_k) - f(h_{k-1})``, and within a step toward the tokens where
the policy's entropy was high: the places where it truly chose.
"""
from __future__ import annotations

import html
from dataclasses import dataclass


from hca.data.problems import Problem


@dataclass
class CreditRow:
    """One response under every credit setting."""

    problem: str  # the prompt
    tokens: list[str]  # [T] decoded response tokens (EOS shown as "⏎end")
    correct: bool  # verified outcome
    advantages: dict[str, list[float]]  # setting -> [T] token advantages A_t
    step_index: list[int]  # [T] step of each token
    values: list[float] | None  # [K] predicted f(h_0) .. f(h_{K-1}) (None without a scorer)
    progress: list[float] | None  # [K] P_k as trained on (grounded in R at the last step)
    entropy: list[float]  # [T] behaviour entropies


def sample_credit(engine, tokenizer, problems: list[Problem], credits: dict, scorer, delimiter: str, group_size: int = 8,
                  max_new_tokens: int = 64, seed: int = 0, per_problem: int = 2) -> list[CreditRow]:
    """``per_problem`` responses (a correct and a wrong one first) of each problem that has both."""
    from hca.verify import verify_responses
    from hca.rl.batch import build_rl_batch
    from hca.rollout import SamplingParams

    rollout = engine.generate([p.prompt for p in problems], SamplingParams(max_new_tokens=max_new_tokens, n=group_size,
                                                                           seed=seed))
    correct = verify_responses(rollout.texts, [problems[i] for i in rollout.prompt_index.tolist()])
    batches = {name: build_rl_batch(rollout, problems, correct, tokenizer, cfg, delimiter,
                                    scorer if cfg.progress_coef != 0 else None) for name, cfg in credits.items()}
    ref = next((b for b in batches.values() if b.progress is not None), next(iter(batches.values())))
    rows = []
    for p in range(len(problems)):
        idx = [i for i in range(len(correct)) if int(rollout.prompt_index[i]) == p]
        right = [i for i in idx if ref.outcome[i] > 0]
        wrong = [i for i in idx if ref.outcome[i] == 0 and not ref.truncated[i]]
        if not right or not wrong:
            continue
        for i in [right[0], wrong[0], *right[1:], *wrong[1:]][:per_problem]:
            n = int(ref.response_mask[i].sum())
            ids = rollout.response_ids[i, :n].tolist()
            toks = ["⏎end" if t == tokenizer.eos_token_id else tokenizer.decode([t]) for t in ids]
            k = int(ref.num_steps[i])
            rows.append(CreditRow(
                problem=problems[p].prompt.strip(), tokens=toks, correct=bool(ref.outcome[i] > 0),
                advantages={name: b.advantages[i, :n].tolist() for name, b in batches.items()},
                step_index=ref.step_index[i, :n].tolist(),
                values=None if ref.values is None else ref.values[i, :k].tolist(),
                progress=None if ref.progress is None else ref.progress[i, :k].tolist(),
                entropy=ref.entropy[i, :n].tolist()))
    return rows


def _scale(rows: list[CreditRow]) -> float:
    """Full colour at the 95th percentile of |A_t| over every setting (a few entropy-weighted tokens
    reach ``w_max`` times the outcome advantage and would leave everything else pale)."""
    mags = sorted(abs(a) for r in rows for adv in r.advantages.values() for a in adv)
    return max(mags[int(0.95 * (len(mags) - 1))] if mags else 0.0, 1e-6)


def _rgb(a: float, scale: float) -> tuple[float, float, float]:
    x = max(-1.0, min(1.0, a / scale))
    return (1.0, 1.0 - abs(x), 1.0 - abs(x)) if x < 0 else (1.0 - x, 1.0, 1.0 - x)  # red <- white -> green


def credit_html(rows: list[CreditRow], title: str = "Where the credit goes") -> str:
    """A self-contained HTML fragment: one block per response, one line per credit setting."""
    scale = _scale(rows)
    out = [f"<h3>{html.escape(title)}</h3>",
           f"<p>Token colour = advantage A<sub>t</sub> (green: probability pushed up, red: pushed down; full colour at "
           f"|A<sub>t</sub>| &ge; {scale:.2f}, the 95th percentile). Step labels: predicted value f(h<sub>k</sub>) before the step and its "
           "progress P<sub>k</sub> (the last step is grounded in the verified outcome). Hover a token for its numbers.</p>"]
    for r in rows:
        verdict = "correct" if r.correct else "wrong"
        out.append(f'<div class="resp"><div class="q">{html.escape(r.problem)} &rarr; <b class="{verdict}">{verdict}</b></div>')
        for name, adv in r.advantages.items():
            cells, prev = [], None
            for t, (tok, a, s, h) in enumerate(zip(r.tokens, adv, r.step_index, r.entropy)):
                if r.progress is not None and s != prev and 0 <= s < len(r.progress) and name != "grpo":
                    cells.append(f'<span class="step">[f={r.values[s]:.2f} P={r.progress[s]:+.2f}]</span>')
                prev = s
                red, green, blue = (int(255 * c) for c in _rgb(a, scale))
                shown = html.escape(tok).replace("\n", "↵")
                cells.append(f'<span class="tok" style="background:rgb({red},{green},{blue})" '
                             f'title="A={a:+.3f} H={h:.3f} step {s}">{shown}</span>')
                if tok == "\n":
                    cells.append("<br>")
            out.append(f'<div class="line"><span class="name">{html.escape(name)}</span><code>{"".join(cells)}</code></div>')
        out.append("</div>")
    return "\n".join(out)


CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}img{max-width:100%}
.resp{border:1px solid #ddd;border-radius:6px;padding:8px;margin:10px 0}.q{font-family:monospace;margin-bottom:4px}
.line{display:flex;gap:8px;align-items:flex-start;margin:3px 0}.name{width:70px;font-weight:bold;flex:none}
.tok{padding:1px 0;font-size:14px}.step{color:#555;font-size:11px;margin:0 3px}
.correct{color:#080}.wrong{color:#b00}code{white-space:normal;line-height:1.9}
"""


def credit_png(rows: list[CreditRow], path: str, max_rows: int = 6) -> None:
    """The same picture as :func:`credit_html` for ``max_rows`` responses, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows[:max_rows]
    scale = _scale(rows)
    names = list(rows[0].advantages) if rows else []
    lines = sum(1 + len(names) * (1 + sum(t == "\n" for t in r.tokens)) for r in rows)
    fig, ax = plt.subplots(figsize=(12, 0.28 * lines + 0.8))
    ax.set_xlim(0, 80)
    ax.set_ylim(lines + 1, 0)
    ax.axis("off")
    y = 0.5
    for r in rows:
        ax.text(0, y, f"{r.problem}  ->  {'correct' if r.correct else 'wrong'}", fontsize=9, family="monospace",
                weight="bold", color="#080" if r.correct else "#b00", va="center")
        y += 1
        for name in names:
            ax.text(0, y, name, fontsize=8, weight="bold", va="center")
            x = 6
            for tok, a, s in zip(r.tokens, r.advantages[name], r.step_index):
                ax.add_patch(plt.Rectangle((x, y - 0.45), 0.9, 0.9, color=_rgb(a, scale)))
                ax.text(x + 0.45, y, "$" if tok == "⏎end" else ("↵" if tok == "\n" else tok), fontsize=8,
                        family="monospace", ha="center", va="center")
                x += 1
                if tok == "\n":
                    if r.progress is not None and name != "grpo" and s < len(r.progress):
                        ax.text(x + 0.5, y, f"P={r.progress[s]:+.2f}", fontsize=7, color="#555", va="center")
                    x, y = 6, y + 1
            if r.progress is not None and name != "grpo":
                ax.text(x + 0.5, y, f"P={r.progress[-1]:+.2f}", fontsize=7, color="#555", va="center")
            y += 1
    ax.set_title(f"Token advantages (green +, red -, full colour at |A| >= {scale:.2f}); P = step progress; $ = end",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
