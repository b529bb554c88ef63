"""Training the progress reward model on prover-labeled trajectories (METHOD.md section 4).

Thin: the model (:class:`hca.prm.model.ProgressRewardModel`) is built in ``configure_model`` (so
DeepSpeed ZeRO can shard it), optionally with LoRA adapters on the backbone; data come from
:class:`hca.datamodules.trajectories.TrajectoryDataModule`; metric definitions live in
:mod:`hca.prm.metrics`.

Loss (:class:`PRMLoss`): binary cross-entropy with logits against the label of every boundary
``h_0 .. h_K``, ``sum(w * BCE) / sum(w)`` over the batch:

* targets: soft ``V̂(h_k)`` (default) or hard ``1[V̂ >= 0.5]``; ``h_K``'s target is the outcome ``R``;
* weights: with ``rollout_weights``, an MC label weighs the prover completions behind it (``h_0``'s
  split over its problem's responses, see the datamodule); ``h_K`` weighs ``final_weight`` (it is
  exact, so "as if many rollouts"; 0 leaves ``f(h_K)`` untrained). Without ``rollout_weights``
  every MC label weighs 1 and ``h_K`` still weighs ``final_weight``;
* ``class_balance``: per batch, labels of class ``1[target >= 0.5]`` and the others get equal total weight.

Why train on ``h_K``: RL never asks for ``f(h_K)`` (the last step is grounded by the verified
outcome), but best-of-N selection with the ``last`` aggregation does, and its label is exact.

Validation logs ``val/loss``, ``val/value_mse`` (MC labels, ``h_0 .. h_{K-1}``),
``val/progress_mse`` and ``val/progress_spearman`` (steps whose both ends are labeled, ``P̂`` from
the PRM alone), ``val/harmful_auroc`` / ``val/harmful_f1`` (first harmful step), ``val/ece`` (soft
calibration, all labels), ``val/outcome_auroc`` (``f(h_K)`` against ``R``, pooled over problems),
``val/outcome_pair_acc`` (within-problem ranking of ``f(h_K)``: what best-of-N needs), and where ground-truth
step correctness exists ``val/first_error_f1_value`` / ``val/first_error_f1_progress``.

On several ranks each validates its own share of the fixed validation batches (the datamodule's),
and the logged values are those of one process over all of them: ``val/loss`` is the
response-weighted mean of the batch losses summed over ranks, and every metric's state is
gathered before it is computed (docs/prm.md, "Several ranks").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanSquaredError, SpearmanCorrCoef
from torchmetrics.classification import BinaryAUROC, BinaryF1Score

from hca.data.trajectories import manifest_prompt_format
from hca.datamodules.sharding import gather_objects
from hca.datamodules.trajectories import PRMBatch
from hca.models.lora import LoraSettings
from hca.prm.metrics import (FirstErrorF1, PairwiseRankAccuracy, SoftCalibrationError, first_flag, harmful_step_targets,
                             predicted_first_error)
from hca.prm.model import ProgressRewardModel, grow_backbone, hidden_size_of, load_backbone, save_prm
from hca.runtime.hparams import store_plain_hparams


@dataclass
class PRMLoss:
    """How labels become the loss (module docstring)."""

    targets: str = "soft"  # "soft": V̂(h_k); "hard": 1[V̂(h_k) >= 0.5]
    rollout_weights: bool = True  # weight each MC label by the rollouts behind it (else 1)
    final_weight: float = 16.0  # weight of the h_K label (target = outcome); 0: do not train f(h_K)
    class_balance: bool = False  # equal total weight for labels >= 0.5 and < 0.5, per batch


@dataclass
class PRMEval:
    """Validation metric settings (definitions in hca/prm/metrics.py)."""

    harmful_threshold: float = 0.5  # a step is harmful when its label progress <= -this
    error_value_threshold: float = 0.5  # rule "value": first step with f(h_k) below this is the predicted error
    error_progress_threshold: float = 0.5  # rule "progress": first step with predicted progress <= -this
    calibration_bins: int = 10  # bins of the soft calibration error


def default_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)


def _as(cls, value):
    return cls(**value) if isinstance(value, dict) else value


class PRMModule(L.LightningModule):
    def __init__(self, backbone: str = "tiny-llama", tokenizer: str | None = None, dtype: str = "float32",
                 loss: PRMLoss | None = None, lora: LoraSettings | None = None, eval: PRMEval | None = None,
                 optimizer: OptimizerCallable = default_optimizer, scheduler: LRSchedulerCallable | None = None,
                 gradient_checkpointing: bool = False, extra_layers: int = 0, head_seed: int = 0,
                 export_dir: str | None = None):
        """
        Args:
            backbone: HF base model: a causal LM / PRM folder (its base model is used), a hub name,
                or ``tiny-llama[:k=v,...]`` for a fresh tiny Llama. Loaded in ``configure_model``.
            tokenizer: tokenizer name/path; defaults to ``backbone`` (must match the datamodule's).
            dtype: backbone parameter dtype (``float32``, ``bfloat16``); the head is float32.
            loss: targets, weights and class balancing (:class:`PRMLoss`).
            lora: LoRA adapters on the backbone (:class:`hca.models.lora.LoraSettings`; None: train the whole
                backbone); only the adapters, the head and any ``extra_layers`` train.
            eval: validation metric thresholds (:class:`PRMEval`).
            optimizer: a callable taking the trainable parameters and returning an optimizer.
            scheduler: a callable taking the optimizer and returning an LR scheduler (stepped each batch).
            gradient_checkpointing: recompute backbone activations in the backward pass (saves memory).
            extra_layers: decoder layers appended on top of the backbone, starting as the identity
                (:func:`hca.prm.model.grow_backbone`); they train even with LoRA.
            head_seed: seed of the value head's initial weights.
            export_dir: where the PRM export folder (:func:`hca.prm.model.save_prm`) is written when fit ends.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.loss_cfg = _as(PRMLoss, loss) or PRMLoss()
        self.lora_cfg = _as(LoraSettings, lora)
        self.eval_cfg = _as(PRMEval, eval) or PRMEval()
        if self.loss_cfg.targets not in ("soft", "hard"):
            raise ValueError(f"loss.targets must be 'soft' or 'hard', got {self.loss_cfg.targets!r}")
        if self.loss_cfg.final_weight < 0:
            raise ValueError(f"loss.final_weight must be >= 0, got {self.loss_cfg.final_weight}")
        store_plain_hparams(self, loss=self.loss_cfg, lora=self.lora_cfg, eval=self.eval_cfg)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.tokenizer = None
        self.prm: ProgressRewardModel | None = None
        self.value_mse, self.progress_mse = MeanSquaredError(), MeanSquaredError()
        self.progress_spearman = SpearmanCorrCoef()
        self.harmful_auroc, self.harmful_f1, self.outcome_auroc = BinaryAUROC(), BinaryF1Score(), BinaryAUROC()
        self.ece = SoftCalibrationError(self.eval_cfg.calibration_bins)
        self.first_error_value, self.first_error_progress = FirstErrorF1(), FirstErrorF1()
        self.outcome_pair_acc = PairwiseRankAccuracy()

    # ---------------------------------------------------------------------------------- model
    def configure_model(self) -> None:
        if self.prm is not None:
            return
        from hca.models.loading import load_tokenizer

        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer or hp.backbone)
        backbone = grow_backbone(load_backbone(hp.backbone, hp.dtype, tokenizer=self.tokenizer), hp.extra_layers)
        if hp.gradient_checkpointing:
            backbone.gradient_checkpointing_enable()
        hidden = hidden_size_of(backbone)
        if self.lora_cfg is not None:
            from hca.models.lora import add_lora

            n = hp.extra_layers
            new = [f"layers.{i}." for i in range(len(backbone.layers) - n, len(backbone.layers))] if n else []
            add_lora(backbone, self.lora_cfg)  # in place: still the same PreTrainedModel class
            for name, p in backbone.named_parameters():  # the new layers are trained in full
                if name.startswith(tuple(new)) and "lora_" not in name:
                    p.requires_grad_(True)
        self.prm = ProgressRewardModel(backbone, hidden, hp.head_seed).train()  # from_pretrained returns eval mode

    def forward(self, batch: PRMBatch) -> torch.Tensor:
        """Logits ``[B, J]`` at every boundary of the batch."""
        return self.prm(batch.input_ids, batch.attention_mask, batch.positions)

    def configure_callbacks(self):
        from hca.runtime.progress import step_progress_bar

        return step_progress_bar(self.trainer)  # "PRM step 340/2000", not Lightning's "Epoch 0/-2"

    def progress_steps(self) -> tuple[str, int, int | None]:
        """The training bar's ``(label, done, total)`` (:mod:`hca.runtime.progress`): optimizer steps."""
        from hca.runtime.progress import training_total

        return "PRM step", self.trainer.global_step, training_total(self.trainer)

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        tok = getattr(dm, "tokenizer", None)
        probe = "Q:12+5*9\n12+5=17\n17*9=153\nThe answer is 153."
        if tok is not None and tok(probe)["input_ids"] != self.tokenizer(probe)["input_ids"]:
            raise ValueError(f"the datamodule's tokenizer ({dm.hparams.tokenizer!r}) is not the PRM backbone's "
                             f"({self.hparams.tokenizer or self.hparams.backbone!r}): token positions would not match")

    # ---------------------------------------------------------------------------------- loss
    def label_weights(self, batch: PRMBatch, targets: torch.Tensor) -> torch.Tensor:
        """Per-label loss weights ``[B, J]`` (0 where there is no label)."""
        c = self.loss_cfg
        w = batch.rollouts if c.rollout_weights else batch.label_mask.float()
        w = torch.where(batch.is_final, torch.full_like(w, c.final_weight), w) * batch.label_mask
        if c.class_balance:
            pos = targets >= 0.5
            total, wpos = w.sum(), (w * pos).sum()
            wneg = total - wpos
            if wpos > 0 and wneg > 0:
                w = torch.where(pos, w * (0.5 * total / wpos), w * (0.5 * total / wneg))
        return w

    def loss(self, logits: torch.Tensor, batch: PRMBatch) -> torch.Tensor:
        targets = batch.targets if self.loss_cfg.targets == "soft" else (batch.targets >= 0.5).float()
        w = self.label_weights(batch, targets)
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return (w * bce).sum() / w.sum().clamp_min(1e-8)

    def training_step(self, batch: PRMBatch, batch_idx: int):
        loss = self.loss(self(batch), batch)
        self.log_dict({"train/loss": loss, "train/labels": batch.label_mask.sum().float(),
                       "train/tokens": batch.attention_mask.sum().float()}, on_step=True, batch_size=len(batch))
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=len(batch))
        return loss

    # ---------------------------------------------------------------------------------- validation
    def _val_metrics(self) -> dict:
        return {"val/value_mse": self.value_mse, "val/progress_mse": self.progress_mse,
                "val/progress_spearman": self.progress_spearman, "val/harmful_auroc": self.harmful_auroc,
                "val/harmful_f1": self.harmful_f1, "val/ece": self.ece, "val/outcome_auroc": self.outcome_auroc,
                "val/outcome_pair_acc": self.outcome_pair_acc,
                "val/first_error_f1_value": self.first_error_value,
                "val/first_error_f1_progress": self.first_error_progress}

    def _val_counts(self, reset: bool = False) -> dict:
        """This rank's items per metric and the loss sums of the current validation."""
        if reset or not hasattr(self, "_val_state"):
            self._val_state = dict.fromkeys(self._val_metrics(), 0) | {"loss_sum": 0.0, "responses": 0}
        return self._val_state

    def on_validation_epoch_start(self) -> None:
        self._val_counts(reset=True)

    def validation_step(self, batch: PRMBatch, batch_idx: int) -> None:
        """Accumulate this rank's share (see the module docstring for how ranks are combined)."""
        logits = self(batch)  # a padding batch too: under ZeRO-3 every rank must run as many forward passes
        if batch.padding:  # discard it, but update the metrics below with typed empty tensors
            batch = dataclasses.replace(batch, **{f.name: getattr(batch, f.name)[:0] for f in dataclasses.fields(batch)
                                                  if isinstance(getattr(batch, f.name), torch.Tensor)})
            logits = logits[:0]
        counts = self._val_counts()
        if len(batch):
            counts["loss_sum"] += float(self.loss(logits, batch)) * len(batch)
            counts["responses"] += len(batch)

        def add(name, n, metric, *args, empty_ok=False):  # list-state metrics always get (maybe empty) updates
            counts[name] += int(n)
            if n or empty_ok:
                metric.update(*args)

        f, t, m = torch.sigmoid(logits), batch.targets, batch.label_mask
        mc = m & ~batch.is_final
        add("val/value_mse", mc.sum(), self.value_mse, f[mc], t[mc])
        add("val/ece", m.sum(), self.ece, f[m], t[m])
        fin, rows = batch.is_final, batch.is_final.any(1)
        add("val/outcome_auroc", fin.sum(), self.outcome_auroc, f[fin], t[fin].long(), empty_ok=True)
        add("val/outcome_pair_acc", fin.sum(), self.outcome_pair_acc, batch.problem_index[rows], f[fin], t[fin],
            empty_ok=True)
        both = m[:, 1:] & m[:, :-1]
        pp, lp = (f[:, 1:] - f[:, :-1])[both], (t[:, 1:] - t[:, :-1])[both]
        add("val/progress_mse", both.sum(), self.progress_mse, pp, lp)
        add("val/progress_spearman", both.sum(), self.progress_spearman, pp, lp, empty_ok=True)
        cfg = self.eval_cfg
        include, positive = harmful_step_targets(t, m, cfg.harmful_threshold)
        pred_prog, harmful = (f[:, 1:] - f[:, :-1])[include], positive[include].long()
        add("val/harmful_auroc", include.sum(), self.harmful_auroc, -pred_prog, harmful, empty_ok=True)
        add("val/harmful_f1", include.sum(), self.harmful_f1, (pred_prog <= -cfg.harmful_threshold).long(), harmful)
        steps = batch.step_correct[:, 1:]  # [B, J-1]
        exists = batch.boundary_mask[:, 1:]
        known = ((steps >= 0) | ~exists).all(1) & (steps >= 0).any(1)  # every kept step has ground truth
        truth = first_flag((steps == 0) & exists)[known]
        for rule, thr, name, metric in (("value", cfg.error_value_threshold, "val/first_error_f1_value",
                                         self.first_error_value),
                                        ("progress", cfg.error_progress_threshold, "val/first_error_f1_progress",
                                         self.first_error_progress)):
            add(name, known.sum(), metric, predicted_first_error(f, exists, rule, thr)[known], truth)

    def on_validation_epoch_end(self) -> None:
        """Combine the ranks exactly: loss and counts are summed over every rank's share; every
        torchmetrics state is gathered by ``compute()`` (sums, or the concatenated scores that
        AUROC, Spearman and the pair accuracy need), which all ranks call for a metric that any rank
        has data for. A metric no rank has data for is not logged."""
        totals: dict = {}
        for part in gather_objects(self._val_counts()):
            for k, v in part.items():
                totals[k] = totals.get(k, 0) + v
        out = {}
        for name, metric in self._val_metrics().items():
            if totals[name] > 0:
                out[name] = metric.compute().float()
            metric.reset()
        # the same on every rank: "max" over ranks keeps each value exact (and Lightning's sync check quiet)
        if out:
            self.log_dict(out, sync_dist=True, reduce_fx="max")
        if totals["responses"]:
            self.log("val/loss", totals["loss_sum"] / totals["responses"], prog_bar=True, sync_dist=True,
                     reduce_fx="max")
        self._val_counts(reset=True)

    # ---------------------------------------------------------------------------------- export / optim
    def export(self, path: str) -> None:
        """Write the PRM export folder (LoRA adapters merged into a copy of the backbone)."""
        backbone = self.prm.backbone
        if self.lora_cfg is not None:
            from hca.models.lora import merged_copy

            backbone = merged_copy(backbone)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        extra = {"backbone": self.hparams.backbone, "dtype": self.hparams.dtype,
                 "data_dir": getattr(getattr(dm, "hparams", None), "data_dir", None),
                 "max_length": getattr(getattr(dm, "hparams", None), "max_length", None),
                 "prompt_format": manifest_prompt_format(getattr(dm, "manifest", None) or {})}
        save_prm(backbone, self.prm.head, self.tokenizer, path, extra)

    def on_train_end(self) -> None:
        if not self.hparams.export_dir:
            return
        params = list(self.prm.parameters())
        if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3: gather the shards on every rank, save on rank 0
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if self.trainer.is_global_zero:
                    self.export(self.hparams.export_dir)
        elif self.trainer.is_global_zero:
            self.export(self.hparams.export_dir)

    def configure_optimizers(self):
        opt = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}
