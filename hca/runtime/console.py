"""A newcomer's console: the stage banners and progress bars of hca, without library chatter.

:func:`quiet_console` (called by every entry point: ``train.py`` / :func:`hca.workflows.cli.main`,
``python -m hca.workflows.pipeline``) drops, and only drops, messages that carry no information for an hca
user:

* Lightning's sales tips ("💡 Tip: ... litlogger / litmodels") and its device lines ("GPU available:
  False, used: False", "TPU available", "HPU available"), which every stage would print again;
* transformers' and huggingface_hub's per-file progress bars ("Loading weights", "Writing model
  shards"), which flash by for every checkpoint load and save; transformers' info messages;
* wandb's banner and "wandb sync" hint (runs are offline; ``WANDB_SILENT``), DeepSpeed's "Setting
  accelerator to CPU";
* known-harmless warnings, each matched by its exact text (:data:`HARMLESS_WARNINGS`), with why it
  is harmless. Any other warning still shows.

``HCA_VERBOSE=1`` turns all of it back on.
"""
from __future__ import annotations

import logging
import os
import warnings

HARMLESS_WARNINGS: tuple[tuple[str, str], ...] = (
    (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*", "Lightning's own use of a torch pytree API"),
    (r".*module\(s\) in eval mode at the start of training.*",
     "frozen models (reference, scorer, prover) are kept in eval mode on purpose"),
    (r".*does not have many workers which may be a bottleneck.*",
     "problem lists and pre-tokenized batches need no worker processes"),
    (r".*will save all targets and predictions in the buffer.*", "validation sets are small (Spearman buffers)"),
    (r".*The number of training batches \(\d+\) is smaller than the logging interval.*",
     "one RL step is one training batch; every step is logged"),
    (r".*`max_epochs` was not set\. Setting it to 1000 epochs.*", "runs are bounded by max_steps"),
    (r".*Checkpoint directory .* exists and is not empty.*", "a resumed run writes into its own checkpoint folder"),
    (r".*torch\.cuda\.amp\..*is deprecated.*", "DeepSpeed's own use of a torch API"),
    (r".*overridden `transfer_batch_to_device` in `LightningModule` but have passed in a `LightningDataModule`.*",
     "the RL module renders prompts there on purpose; the datamodule defines no such hook"),
    (r".*Using ModelCheckpoint with manual optimization and every_n_train_steps.*",
     "an RL checkpoint is meant to hold the state after the RL step's updates (resume continues from it)"),
    (r".*The anonymous setting has no effect.*", "wandb's own deprecation"),
)

_DROPPED_INFO = ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:", "Setting accelerator to CPU")


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_DROPPED_INFO)


_done = False


def quiet_console() -> None:
    """Apply the filters of the module docstring (idempotent; a no-op with ``HCA_VERBOSE=1``)."""
    global _done
    if _done or os.environ.get("HCA_VERBOSE") == "1":
        return
    _done = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "DeepSpeed"):
        logging.getLogger(name).addFilter(_DropChatter())
    for pattern, _why in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("WANDB_SILENT", "true")  # offline runs: no banner and sync hint per stage
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
