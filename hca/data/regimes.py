"""Regimes of the embedded arithmetic task: the same pipeline and configs at another difficulty,
chosen by one setting (``python -m hca.workflows.pipeline --regime sparse``, ``make quickstart REGIME=sparse``,
``python -m hca.workflows.experiment --regime sparse``).

A regime moves every output under its own folder (every ``runs/...`` path the configs name becomes
``<root>/...``, so the two regimes never mix data, checkpoints or results) and sets a few dotted
config keys. One table serves every stage's YAML: a key is set in each config that has it
(``model.init_args.scorer.init_args.sampling.max_new_tokens`` only touches the configs whose scorer
samples), and :func:`check_regime` fails if a key reaches no config at all (a typo is an error, not
a silent no-op).

``sparse`` is where outcome credit is thinnest: chains of 5-7 operations instead of 3-5, so the SFT
policy starts at a pass@1 well under 0.10 and most GRPO groups of 8 are all-fail (zero advantage,
no gradient), while step progress still says which lines went wrong. Chains of 6-10 operations
were tried first: the SFT policy started at 0.008 and neither GRPO nor the progress credit moved
it in 100 RL steps (docs/experiment.md), so that regime could not tell the methods apart.
Budgets grow with the chains: responses up to 128 tokens, PRM sequences of 256 (the SFT configs'
own length). The collection labels 1,024 problems instead of 2,048 (each holds more steps).

``middle`` sits between them (4-6 operations, 96-token budgets, 1,536 problems collected, 80 RL
steps per experiment run): a start where GRPO learns slowly rather than not at all, so that dense
credit has outcome signal to agree with but also groups without it to fill.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Regime:
    name: str  # what --regime takes
    root: str  # every "runs/..." path of the configs becomes "<root>/..."
    description: str  # one line for banners and docs
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted config key -> value, set where the key exists
    eval_max_new_tokens: int = 64  # response budget of the final held-out evaluation
    experiment_rl_steps: int = 60  # RL steps per run of hca.workflows.experiment (25 runs per regime must fit on 2 cores)


def _longer_chains(min_steps: int, max_steps: int, tokens: int, problems: int) -> dict[str, Any]:
    """The overrides of a regime with chains of ``min_steps``-``max_steps`` operations, a ``tokens``
    response budget everywhere and a collection of ``problems`` problems (PRM sequences of 256)."""
    return {
        # the task (SFT configs write the problem files)
        "data.init_args.arithmetic.difficulty.min_steps": min_steps,
        "data.init_args.arithmetic.difficulty.max_steps": max_steps,
        # response budgets: SFT validation, collection (policy and prover), RL sampling and validation, MC scorers
        "model.init_args.sampling_eval.max_new_tokens": tokens,
        "model.init_args.collection.policy.max_new_tokens": tokens,
        "model.init_args.collection.prover.max_new_tokens": tokens,
        "model.init_args.sampling.max_new_tokens": tokens,
        "model.init_args.validation.max_new_tokens": tokens,
        "model.init_args.scorer.init_args.sampling.max_new_tokens": tokens,
        # collection size and PRM sequence length
        "data.init_args.limit": problems,
        "data.init_args.max_length": 256,
    }


_SPARSE_TOKENS = 128
_MIDDLE_TOKENS = 96
REGIMES: dict[str, Regime] = {
    "default": Regime("default", "runs", "3-5 operations per problem; SFT policy val pass@1 about 0.19"),
    "sparse": Regime(
        "sparse", "runs/sparse", "5-7 operations per problem; SFT policy val pass@1 about 0.02: sparse outcome reward",
        overrides=_longer_chains(5, 7, _SPARSE_TOKENS, 1024),
        eval_max_new_tokens=_SPARSE_TOKENS, experiment_rl_steps=100),  # sparse credit learns slower
    "middle": Regime(
        "middle", "runs/middle",
        "4-6 operations per problem; between the two: outcome signal scarce but present",
        overrides=_longer_chains(4, 6, _MIDDLE_TOKENS, 1536),
        eval_max_new_tokens=_MIDDLE_TOKENS, experiment_rl_steps=80),
}


def get_regime(regime: str | Regime) -> Regime:
    if isinstance(regime, Regime):
        return regime
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose one of {sorted(REGIMES)}")
    return REGIMES[regime]


def move_root(text: str, root: str) -> str:
    """The YAML ``text`` with every ``runs/`` path moved under ``root`` (unchanged for ``runs``)."""
    root = root.rstrip("/")
    if root == "runs":
        return text
    return text.replace("runs/", f"{root}/")


def applicable(cfg: dict, key: str) -> bool:
    """Whether the dotted ``key`` exists in ``cfg`` with a value that is not a mapping (a regime
    changes settings a config has; it never adds one, which its class might not accept)."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return not isinstance(node, dict)


def regime_values(regime: str | Regime, cfg: dict) -> dict[str, Any]:
    """The regime's overrides that apply to the config ``cfg`` (a loaded YAML)."""
    return {k: v for k, v in get_regime(regime).overrides.items() if applicable(cfg, k)}


def check_regime(regime: str | Regime, configs: list[str]) -> None:
    """Raise if one of the regime's keys applies to none of ``configs`` (YAML paths)."""
    import yaml
    from pathlib import Path

    r = get_regime(regime)
    loaded = [yaml.safe_load(Path(c).read_text()) for c in configs]
    unused = [k for k in r.overrides if not any(applicable(c, k) for c in loaded)]
    if unused:
        raise ValueError(f"regime {r.name!r}: {unused} set nothing in {configs} (misspelled?)")
