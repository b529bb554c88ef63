"""DeepSpeed strategies for the RL module: :class:`RLDeepSpeedStrategy` (GPU) and
:class:`CPUDeepSpeedStrategy` (CPU, for tests and for debugging sharded runs without a GPU).

Both are Lightning's :class:`~lightning.pytorch.strategies.DeepSpeedStrategy` (same arguments,
config, engine and checkpoints) with one fix each:

* **Problem batches.** DeepSpeed's precision plugin passes every batch through
  ``apply_to_collection`` to cast float tensors, which raises on frozen dataclasses -- and an RL
  batch is a list of frozen :class:`~hca.data.problems.Problem` (text only, nothing to cast). Batches
  holding no tensor are passed through unchanged; all others as Lightning does.
* **CPU** (:class:`CPUDeepSpeedStrategy` only). Lightning refuses any accelerator but CUDA
  (``setup_environment``), validates CUDA device indices (``setup_distributed``) and hands
  DeepSpeed the CUDA index of the root device (``None`` on CPU, which DeepSpeed rejects).
  DeepSpeed itself runs ZeRO 1, 2 and 3 on CPU: without CUDA its accelerator is ``cpu``
  (``DS_ACCELERATOR=cpu`` is set to make sure), the process group is gloo and a torch optimizer
  steps the (sharded) fp32 master weights. The subclass skips the two checks, pins the root device
  to the CPU and passes the local rank as DeepSpeed's device rank. By default it also keeps
  DeepSpeed from JIT-compiling its shared-memory all-reduce op (``shm_comm``; a C++ build of 1-2
  minutes on first use, cached under ``~/.cache/torch_extensions``, only useful for several CPU
  processes): plain gloo collectives then, nothing is compiled and no ``CUDA_HOME`` is needed.

The RL datamodule's loader is not a distributed sampler: pair either strategy with
``trainer.use_distributed_sampler: false`` (the ``configs/strategy`` fragments do). See docs/rl.md
("DeepSpeed") for gradient clipping, skipped updates and what the engine wraps.
"""
from __future__ import annotations

import os

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


def _has_tensor(data) -> bool:
    if isinstance(data, torch.Tensor):
        return True
    if isinstance(data, dict):
        return any(_has_tensor(v) for v in data.values())
    if isinstance(data, (list, tuple)):
        return any(_has_tensor(v) for v in data)
    fields = getattr(data, "__dataclass_fields__", None)
    return bool(fields) and any(_has_tensor(getattr(data, f)) for f in fields)


class RLDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` that leaves tensor-free batches (lists of problems) alone."""

    strategy_name = "deepspeed_rl"

    def setup(self, trainer) -> None:
        plugin = self.precision_plugin
        convert = plugin.convert_input
        plugin.convert_input = lambda data: convert(data) if _has_tensor(data) else data
        super().setup(trainer)


class CPUDeepSpeedStrategy(RLDeepSpeedStrategy):
    """``DeepSpeedStrategy`` on CPU processes with the gloo backend (same arguments, plus ``shm_comm``)."""

    strategy_name = "deepspeed_cpu"

    def __init__(self, *args, process_group_backend: str | None = "gloo", shm_comm: bool = False, **kwargs):
        """Arguments of ``DeepSpeedStrategy``, plus ``shm_comm``: let DeepSpeed build its shared-memory
        all-reduce op for CPU (JIT-compiled on first use; speeds up several processes on one machine)."""
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's accelerator: never probe for CUDA
        super().__init__(*args, process_group_backend=process_group_backend, **kwargs)
        self.shm_comm = shm_comm
        if isinstance(self.config, dict):  # ZeRO-Offload with a torch optimizer (no compiled DeepSpeedCPUAdam)
            self.config.setdefault("zero_force_ds_cpu_optimizer", False)

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu")

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's "only CUDA" check; calls setup_distributed

    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()  # as DeepSpeedStrategy, minus the CUDA device-index validation
        self.set_world_ranks()
        if self.shm_comm:
            self._init_deepspeed_distributed()
            return
        import importlib

        ds_torch = importlib.import_module("deepspeed.comm.torch")  # (`import ... as` would bind the torch module)
        build = ds_torch.build_shm_op
        ds_torch.build_shm_op = lambda: None  # DeepSpeed then all-reduces with gloo
        try:
            self._init_deepspeed_distributed()
        finally:
            ds_torch.build_shm_op = build

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        """As Lightning's, with ``device_rank`` = the local rank (Lightning passes the CUDA device index)."""
        import argparse

        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()), optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False)
        return engine, ds_optimizer


# ---------------------------------------------------------------------------------- helpers for modules
def deepspeed_engine(trainer):
    """The DeepSpeed engine when ``trainer`` runs a DeepSpeed strategy, else None."""
    strategy = getattr(trainer, "strategy", None)
    return strategy.deepspeed_engine if isinstance(strategy, DeepSpeedStrategy) else None


def configure_deepspeed_clipping(trainer, max_grad_norm: float | None) -> None:
    """Under DeepSpeed, make the engine clip the global gradient norm at ``max_grad_norm`` (its
    ``gradient_clipping``; Lightning's ``clip_gradients`` is a no-op there). Call it from
    ``configure_optimizers``, which DeepSpeedStrategy runs after formatting its config and before
    ``deepspeed.initialize``. Refuses ZeRO stage 0, whose engine steps a non-finite gradient."""
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy.config, dict):
        return
    stage = (strategy.config.get("zero_optimization") or {}).get("stage", 0)
    if stage < 1:
        raise ValueError("the RL module under DeepSpeed needs ZeRO stage >= 1 (stage 0 does not skip a non-finite "
                         "update)")
    want = float(max_grad_norm or 0.0)
    have = float(strategy.config.get("gradient_clipping") or 0.0)
    if have not in (0.0, want):
        raise ValueError(f"DeepSpeed config gradient_clipping={have} contradicts ppo.max_grad_norm={max_grad_norm}")
    strategy.config["gradient_clipping"] = want


def gathered(module: torch.nn.Module):
    """Context in which a ZeRO-3-partitioned ``module`` holds its full weights on every rank
    (read-only); a no-op context for any other module."""
    from contextlib import nullcontext

    params = list(module.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
