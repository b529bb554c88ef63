"""Step scoring at RL time: the values ``f(h_0) .. f(h_{K-1})`` of the prefixes of a response.

The RL step (METHOD.md section 8.3) cuts every sampled response into ``K`` steps with
:func:`hca.steps.split_steps` and asks a :class:`StepScorer` for the predicted value of each prefix
``h_k = prompt + steps 1..k`` with ``k < K``. It does **not** ask for ``f(h_K)``: the last step is
grounded in the verified outcome by :func:`hca.credit.step_progress` (``P_K = R - f(h_{K-1})``), so
the progress of a response always telescopes to ``R - f(h_0)``.

Implementations:

* :class:`NoScorer` -- for ``progress_coef = 0`` (GRPO / RLOO / Dr. GRPO, entropy-only): never called.
* :class:`CallableScorer` -- ``fn(prompt, prefix) -> value``: deterministic, for tests and ablations.
* :class:`MonteCarloScorer` -- the honest, expensive estimate the PRM approximates: ``M`` prover
  completions of every prefix, verified (METHOD.md section 3), on the fly. The learned PRM scorer
  (arriving with the PRM) implements the same protocol and replaces it in the configs.

``problems`` (one :class:`~hca.data.problems.Problem` per response) carries the reference answers. A
Monte Carlo scorer needs them to verify its completions; a learned scorer must ignore them (it
would otherwise see the answer it is supposed to predict).

A scorer that holds a model owns its device (the policy module does not move it) and must be
deterministic given its inputs, so that a resumed RL run scores exactly as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Protocol, Sequence, runtime_checkable

from hca.data.problems import Problem
from hca.rollout.base import SamplingParams
from hca.rollout.engines import EngineConfig
from hca.steps import prefix_text, split_steps


@runtime_checkable
class StepScorer(Protocol):
    """``score(...)[i]`` is ``[f(h_0), ..., f(h_{K_i - 1})]`` for response ``i``, with ``K_i =
    len(split_steps(responses[i], delimiter))`` (an empty response has ``K = 0``: an empty list)."""

    def score(self, prompts: list[str], responses: list[str], delimiter: str,
              problems: Sequence[Problem] | None = None) -> list[list[float]]: ...


class NoScorer:
    """The scorer of outcome-only runs (``progress_coef = 0``): scoring is skipped, so this is never called."""

    def score(self, prompts: list[str], responses: list[str], delimiter: str,
              problems: Sequence[Problem] | None = None) -> list[list[float]]:
        raise RuntimeError("NoScorer.score was called: a run with progress_coef > 0 needs a real StepScorer")


class CallableScorer:
    """``f(h_k) = fn(prompt, prefix)`` with ``prefix = prefix_text(response, spans, k)`` (the response
    part of ``h_k``: ``""`` for ``h_0``). Deterministic whenever ``fn`` is."""

    def __init__(self, fn: Callable[[str, str], float]):
        self.fn = fn

    def score(self, prompts: list[str], responses: list[str], delimiter: str,
              problems: Sequence[Problem] | None = None) -> list[list[float]]:
        out = []
        for prompt, response in zip(prompts, responses, strict=True):
            spans = split_steps(response, delimiter)
            out.append([float(self.fn(prompt, prefix_text(response, spans, k))) for k in range(len(spans))])
        return out


CURRENT_POLICY = "current_policy"  # MonteCarloScorer(prover=...): the policy being trained, synced every RL step


class MonteCarloScorer:
    """``f(h_k) = T(correct / total)`` from prover completions of every prefix, verified against the
    reference answer (a completion cut at its budget counts as wrong); ``T`` is the identity or the
    best-of-K transform ``1 - (1 - v)^K``. Prefix estimation is :mod:`hca.collection.labelling`'s (one engine call
    for all prefixes of a batch; identical prefixes of one problem are estimated once). Through the
    vLLM engine, prefix caching lets the ``M`` completions of a prefix, and the prefixes of one
    response, share their KV.

    The prover is a fixed checkpoint, or ``prover: current_policy``: the policy being trained
    (METHOD.md section 3, VinePPO-style step values), sampled by the RL module's own engine, which
    holds the weights of the current RL step (the HF engine samples the live module; the vLLM engine
    is synced after every step's updates). The RL module binds it (:meth:`bind_policy`).

    Its sampling seed is a hash of ``(seed, prompts, responses)``: the same inputs give the same
    values, independently of call order, so RL resume stays exact. Expensive: about
    ``num_rollouts * sum(K_i - 1) + num_rollouts_h0 * problems`` generations per call.
    """

    def __init__(self, prover: str, tokenizer: str | None = None, num_rollouts: int = 4,
                 num_rollouts_h0: int | None = None, sampling: SamplingParams | None = None, best_of_k: int = 1,
                 dtype: str = "float32", device: str = "auto", engine: EngineConfig | None = None, seed: int = 0):
        """
        Args:
            prover: the prover mu: local HF folder, hub name, ``tiny-llama[:k=v,...]`` (loaded on first use),
                or ``current_policy`` (the policy being trained, through the RL module's engine).
            tokenizer: the prover's tokenizer; defaults to ``prover`` (ignored for ``current_policy``).
            num_rollouts: M, prover completions per prefix h_k (0 < k < K).
            num_rollouts_h0: completions of h_0 (once per problem); None: ``num_rollouts``.
            sampling: the prover's sampling (budget, temperature, top_p, stop); a completion cut at its
                budget counts as wrong.
            best_of_k: prover transform V = 1 - (1 - V_mc)^K (1: the prover as is).
            dtype: prover parameter dtype.
            device: where an HF-engine prover runs; ``"auto"``: CUDA when available, else CPU.
            engine: the prover's rollout engine (``hf | vllm | auto``, :class:`hca.rollout.engines.EngineConfig`).
            seed: base of the content-derived sampling seeds.
        """
        from hca.collection.labelling import CollectionConfig

        self.prover, self.tokenizer_name, self.dtype, self.device = prover, tokenizer, dtype, device
        self.engine_config, self.seed = EngineConfig.coerce(engine, "scorer.engine"), seed
        sampling = SamplingParams.coerce(sampling, "scorer.sampling")
        self.config = CollectionConfig(num_rollouts=num_rollouts, num_rollouts_h0=num_rollouts_h0, policy=sampling,
                                       prover=sampling, best_of_k=best_of_k)
        self._engine = None
        self._stage = None  # (prompts callable, policy tokenizer, policy budget) of the RL fit: sizes a vLLM context
        self.tokens_generated = 0  # prover tokens sampled so far (the RL module adds them to val/tokens)

    @property
    def max_new_tokens(self) -> int:
        """The prover's token budget per completion."""
        return self.config.prover.max_new_tokens

    def size_context(self, prompts, policy_tokenizer, policy_budget: int) -> None:
        """What the RL fit will ask: completions of ``prompt + a prefix of a policy response of at most
        ``policy_budget`` tokens`` for the prompts ``prompts()`` returns (None: unknown). With
        ``engine.max_model_len`` unset, an external prover's vLLM context is sized from it
        (:func:`hca.rollout.sizing.continuation_need`) when the engine is first built."""
        self._stage = (prompts, policy_tokenizer, int(policy_budget))

    def context_need(self, tokenizer) -> tuple[int, int] | None:
        """``(longest prompt, policy budget + prover budget)`` in the prover's tokens, or None (the
        model's context) when no RL fit said what it samples."""
        from hca.rollout.sizing import continuation_need

        if self._stage is None:
            return None
        prompts, policy_tokenizer, policy_budget = self._stage
        prompts = prompts() if callable(prompts) else prompts
        if prompts is None:
            return None
        return continuation_need(prompts, policy_tokenizer, policy_budget, tokenizer, self.max_new_tokens)

    @property
    def uses_current_policy(self) -> bool:
        return self.prover == CURRENT_POLICY

    def bind_policy(self, engine) -> None:
        """Sample prover completions with ``engine`` (the RL module's, current weights)."""
        if self.uses_current_policy:
            self._engine = engine

    def engine(self):
        if self._engine is None:
            if self.uses_current_policy:
                raise RuntimeError("MonteCarloScorer(prover='current_policy') is used by an RL module, which binds "
                                   "its engine at fit start; it was called before (or outside) one")
            import torch

            from hca.models.loading import load_causal_lm, load_tokenizer
            from hca.rollout.engines import build_engine, resolve_engine

            tok = load_tokenizer(self.tokenizer_name or self.prover)
            model = need = None
            if resolve_engine(self.engine_config, self.prover, "scorer.engine") == "hf":
                device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
                model = load_causal_lm(self.prover, self.dtype, tokenizer=tok).requires_grad_(False).eval().to(device)
            elif self.engine_config.max_model_len is None:
                need = self.context_need(tok)
            self._engine = build_engine(self.engine_config, self.prover, tok, model=model, dtype=self.dtype,
                                        setting="scorer.engine", context_need=need)
        return self._engine

    def score(self, prompts: list[str], responses: list[str], delimiter: str,
              problems: Sequence[Problem] | None = None) -> list[list[float]]:
        import dataclasses

        from hca.collection.labelling import ChunkStats, estimate_prefix_values
        from hca.rollout.seeds import derive_seed

        if problems is None or len(problems) != len(responses) or len(prompts) != len(responses):
            raise ValueError("MonteCarloScorer needs one problem (reference answer) and one prompt per response")
        if any(p.prompt != q for p, q in zip(problems, prompts)):
            raise ValueError("prompts[i] must equal problems[i].prompt (the prover continues the problem's prompt)")
        unique = list({p.id: p for p in problems}.values())
        index = {p.id: i for i, p in enumerate(unique)}
        keys = []
        for p, response in zip(problems, responses):
            spans = split_steps(response, delimiter)
            keys.append([(index[p.id], prefix_text(response, spans, k), None) for k in range(len(spans))])
        todo = list(dict.fromkeys(k for row in keys for k in row))
        if not todo:
            return [[] for _ in responses]
        digest = hashlib.sha256("\x00".join([*prompts, "\x01", *responses]).encode()).hexdigest()
        cfg = dataclasses.replace(self.config, delimiter=delimiter)
        stats = ChunkStats()
        counts = estimate_prefix_values(todo, unique, self.engine(), cfg, derive_seed(self.seed, 0, digest), stats, False)
        self.tokens_generated += stats.prover_tokens
        return [[cfg.transform(*counts[k]) for k in row] for row in keys]
