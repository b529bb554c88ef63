"""The tiny GSM8K recipe run of the recipe tests: tiny real-format models built here, then every
stage (collection -> PRM -> RL GRPO / HCA -> evaluation) at ``scale="tiny"``."""
from __future__ import annotations

from pathlib import Path


def run_tiny_recipe(root: Path, gsm8k: Path, sft_steps: int, text_limit: int, engine: str | None = None):
    """``(models, out, stages)`` of a finished run under ``root`` (``engine``: ``--engine``)."""
    from hca.workflows.pipeline import run_stages
    from hca.workflows.recipes import recipe_stages
    from hca.workflows.tiny_models import build_tiny_models

    models = build_tiny_models(root / "models", gsm8k, sft_steps=sft_steps, prover_sft_steps=sft_steps,
                               text_limit=text_limit)
    out = root / "gsm8k"
    stages = recipe_stages("gsm8k", models["policy"], models["prover"], models["prm_backbone"], out=str(out),
                           scale="tiny", engine=engine)
    run_stages(stages, log_dir=str(root / "logs"))
    missing = [o for s in stages for o in s.outputs if not Path(o).exists()]
    assert not missing, f"the recipe finished without {missing}"
    return models, out, stages
