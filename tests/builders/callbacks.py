"""Test callbacks shared by the RL tests."""
from __future__ import annotations

import lightning as L


class Record(L.Callback):
    """Logged metrics and a copy of the weights after every RL step."""

    def __init__(self):
        self.logs, self.weights = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        logs = {k: float(v) for k, v in trainer.callback_metrics.items()}
        assert any(k.startswith("train/") for k in logs), f"RL step {batch_idx} logged no train/ metric: {sorted(logs)}"
        self.logs.append(logs)
        self.weights.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})
