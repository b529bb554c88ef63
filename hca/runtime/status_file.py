"""A one-line progress status written to a file, for runs whose console nobody watches.

The pipeline runs independent stages side by side as subprocesses (one CPU thread each) and sends
their consoles to log files; Lightning's rich progress bar writes nothing useful to a file. With
``HCA_STATUS_FILE`` set, :func:`hca.workflows.cli.main` adds :class:`StatusFile` to the trainer, and the
parent prints :func:`read_status` of each child every few seconds.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L

ENV = "HCA_STATUS_FILE"


class StatusFile(L.Callback):
    """Writes ``"<what> <done>/<total> | <elapsed> | eta <eta>"`` to ``path`` at most every
    ``every_s`` seconds during fit (optimizer steps) and predict (batches)."""

    def __init__(self, path: str, every_s: float = 2.0):
        self.path, self.every_s = Path(path), every_s
        self._t0 = time.monotonic()
        self._last = 0.0

    def _write(self, what: str, done: int, total: int | float | None) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s and not (total and done >= total):
            return
        self._last = now
        elapsed = now - self._t0
        line = f"{what} {done}" + (f"/{int(total)}" if total and total != float("inf") else "") + f" | {elapsed:.0f}s"
        if total and total != float("inf") and done:
            line += f" | eta {elapsed / done * (total - done):.0f}s"
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(line + "\n")
        os.replace(tmp, self.path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._write("step", trainer.global_step, trainer.max_steps if trainer.max_steps > 0 else None)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        total = trainer.num_predict_batches[dataloader_idx] if trainer.num_predict_batches else None
        self._write("batch", batch_idx + 1, total)


def read_status(path: str | Path) -> str:
    """The last status line written to ``path`` ("starting" while there is none)."""
    try:
        return Path(path).read_text().strip() or "starting"
    except FileNotFoundError:
        return "starting"
