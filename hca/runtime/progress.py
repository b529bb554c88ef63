"""The training progress bar of the stages bounded by ``trainer.max_steps`` (RL, PRM).

Lightning's bar counts the batches of an epoch and, with ``max_epochs`` -1 (what ``max_steps``
leaves it), reads "Epoch 0/-2". :class:`StepProgressBar` counts the stage's steps of the total
instead ("RL step 12/200", "PRM step 340/2000"), across epochs, with the stage's metrics. A module
installs it from ``configure_callbacks`` with :func:`step_progress_bar`, and says what its steps
are with ``progress_steps() -> (label, done, total)`` (else: optimizer steps of ``max_steps``).

(Not in :mod:`hca.runtime.console`, which entry points import before Lightning so that its filters apply
from the start.)
"""
from __future__ import annotations

import math
import sys

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


def training_total(trainer, updates_per_step: int = 1, batches_per_step: int | None = None) -> int | None:
    """Steps the fit makes: ``trainer.max_steps`` optimizer updates at ``updates_per_step`` per step,
    or ``max_epochs`` epochs of training batches at ``batches_per_step`` per step (None:
    ``accumulate_grad_batches``), whichever ends first; None when neither bounds it (or the number
    of batches is unknown)."""
    totals = []
    if trainer.max_steps is not None and trainer.max_steps > 0:
        totals.append(math.ceil(trainer.max_steps / max(1, updates_per_step)))
    batches = trainer.num_training_batches
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and batches != float("inf"):
        per = batches_per_step if batches_per_step is not None else trainer.accumulate_grad_batches
        totals.append(trainer.max_epochs * math.ceil(int(batches) / max(1, per)))
    return min(totals) if totals else None


def stage_steps(trainer, pl_module) -> tuple[str, int, int | None]:
    """``(label, done, total)`` of the training bar: the module's ``progress_steps()`` when it has
    one, else optimizer steps (``global_step``) of :func:`training_total`."""
    fn = getattr(pl_module, "progress_steps", None)
    if fn is not None:
        return fn()
    return "step", trainer.global_step, training_total(trainer)


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar whose training bar shows the stage's steps (:func:`stage_steps`) over
    the whole fit (one bar across epochs; the epoch joins the label after the first); validation and
    the other bars are Lightning's."""

    _steps = ("Training", 0, None)

    def init_train_tqdm(self):
        label, done, total = self._steps
        return Tqdm(desc=label, initial=done, total=total, position=2 * self.process_position,
                    disable=self.is_disabled, leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0,
                    bar_format=self.BAR_FORMAT)

    def on_train_start(self, trainer, pl_module) -> None:
        self._steps = stage_steps(trainer, pl_module)  # a resumed run starts at its checkpoint's step
        super().on_train_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module, *args) -> None:
        epoch = trainer.current_epoch
        if self._leave and epoch > 0:  # a bar per epoch
            self._steps = stage_steps(trainer, pl_module)
            self.train_progress_bar = self.init_train_tqdm()
        if epoch > 0 and not self.train_progress_bar.disable:
            self.train_progress_bar.set_description(f"{self._steps[0]} (epoch {epoch})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        _, done, total = stage_steps(trainer, pl_module)
        if bar is not None and not bar.disable and self._should_update(done, total):
            bar.total = total
            bar.n = done
            bar.set_postfix(self.get_metrics(trainer, pl_module))


def step_progress_bar(trainer) -> list:
    """For ``LightningModule.configure_callbacks``: ``[StepProgressBar]`` in place of the trainer's
    stock progress bar (Lightning's default ``RichProgressBar``, or ``TQDMProgressBar`` whose
    refresh rate it keeps), ``[]`` when the bar is off or of another kind. The stock bar is taken out of
    ``trainer.callbacks`` here, as Lightning itself replaces only a superclass of what the module
    returns (a rich bar would stay next to it)."""
    bar = trainer.progress_bar_callback
    if type(bar) not in (TQDMProgressBar, RichProgressBar):
        return []
    trainer.callbacks = [c for c in trainer.callbacks if c is not bar]
    return [StepProgressBar(refresh_rate=bar.refresh_rate if isinstance(bar, TQDMProgressBar) else 1)]
