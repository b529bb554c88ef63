"""Experiment loggers: wandb offline by default, never required.

``OptionalWandbLogger`` is a Lightning ``Logger`` that forwards to ``WandbLogger`` when wandb is
importable and ``WANDB_MODE`` is not ``disabled``, and otherwise does nothing, so a config that
lists it beside a ``CSVLogger`` (the fallback that always works) runs on any machine. Runs are
offline unless ``WANDB_MODE=online`` is set: nothing leaves the machine by default.
"""
from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import Logger


class OptionalWandbLogger(Logger):
    def __init__(self, save_dir: str = "runs", project: str = "hca", name: str | None = None,
                 group: str | None = None, tags: list[str] | None = None):
        super().__init__()
        self._inner = None
        self._save_dir = save_dir
        mode = os.environ.get("WANDB_MODE", "offline")
        if mode == "disabled":
            return
        try:
            import wandb  # noqa: F401
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:
            return
        os.makedirs(save_dir, exist_ok=True)
        self._inner = WandbLogger(save_dir=save_dir, project=project, name=name, group=group, tags=tags,
                                  offline=(mode != "online"))
        init = getattr(self._inner, "_wandb_init", {})
        if init.get("anonymous") is None:  # Lightning passes anonymous=None, which wandb >= 0.2x warns about
            init.pop("anonymous", None)

    @property
    def active(self) -> bool:
        return self._inner is not None

    @property
    def name(self) -> str:
        return self._inner.name if self._inner else "wandb-disabled"

    @property
    def version(self) -> Any:
        return self._inner.version if self._inner else 0

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def experiment(self):
        return self._inner.experiment if self._inner else None

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        if self._inner:
            self._inner.log_hyperparams(params, *args, **kwargs)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._inner:
            self._inner.log_metrics(metrics, step)

    def finalize(self, status: str) -> None:
        """Finish the wandb run at the end of a stage: the next stage in the same process (a recipe,
        a notebook) then starts its own run instead of logging into this one."""
        if self._inner:
            self._inner.finalize(status)
            run = getattr(self._inner, "_experiment", None)
            if run is not None and callable(getattr(run, "finish", None)):
                run.finish()

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        if self._inner:
            self._inner.after_save_checkpoint(checkpoint_callback)
