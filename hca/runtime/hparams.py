"""Dataclass settings stored as plain dicts in a module's hyperparameters."""
from __future__ import annotations

import copy
import dataclasses

import lightning as L


def store_plain_hparams(module: L.LightningModule, **values) -> None:
    """``module.hparams[name] = asdict(value)`` (None stays None) for every ``name=value``, in both the
    live hyperparameters and the copy loggers receive (``hparams_initial``).

    Plain types keep checkpoints loadable with ``weights_only=True``; updating the initial copy too
    matters for programmatic use: a frozen dataclass left there makes every Lightning logger fail in
    ``log_hyperparams`` ("A frozen dataclass was passed to apply_to_collection"). ``LightningCLI``
    passes dicts, which is why only programmatic runs with a logger met it.
    """
    for name, value in values.items():
        plain = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        module.hparams[name] = plain
    module._hparams_initial = copy.deepcopy(module.hparams)  # Lightning's own attribute behind hparams_initial
