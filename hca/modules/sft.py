"""Supervised fine-tuning of a causal LM on gold worked solutions (the start of every policy and
prover), with held-out pass@k measured by sampling at the end of each validation epoch."""
from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from hca.models.loading import load_causal_lm, load_tokenizer, save_checkpoint
from hca.runtime.hparams import store_plain_hparams


@dataclass
class SamplingEval:
    """Held-out evaluation by sampling (see :mod:`hca.evaluation.policy`)."""

    num_problems: int = 128  # validation problems scored (the first ones of the val file)
    n: int = 4  # samples per problem
    ks: tuple[int, ...] = (1, 4)  # pass@k / maj@k reported
    max_new_tokens: int = 64  # response budget; a response cut here scores 0
    temperature: float = 1.0  # sampling temperature (the policy's RL sampling distribution)
    seed: int = 1234  # sampling seed, fixed so epochs are comparable


def default_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)


class SFTModule(L.LightningModule):
    def __init__(self, model: str = "tiny-llama", tokenizer: str | None = None, dtype: str = "float32",
                 optimizer: OptimizerCallable = default_optimizer, scheduler: LRSchedulerCallable | None = None,
                 sampling_eval: SamplingEval | None = None, export_dir: str | None = None):
        """
        Args:
            model: hub name or local path of a causal LM, or ``tiny-llama[:k=v,...]`` for a fresh tiny Llama.
            tokenizer: tokenizer name/path; defaults to ``model``.
            dtype: parameter dtype (``float32``, ``bfloat16``).
            optimizer: a callable taking parameters and returning an optimizer.
            scheduler: a callable taking the optimizer and returning an LR scheduler (stepped each batch).
            sampling_eval: sampled pass@k on validation problems at each validation epoch end; None skips it.
            export_dir: where the final HF checkpoint (model + tokenizer) is written when fit ends.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.sampling_eval = SamplingEval(**sampling_eval) if isinstance(sampling_eval, dict) else sampling_eval
        store_plain_hparams(self, sampling_eval=self.sampling_eval)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.tokenizer = None
        self.model = None

    def configure_model(self) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.hparams.tokenizer or self.hparams.model)
        if self.model is None:
            self.model = load_causal_lm(self.hparams.model, self.hparams.dtype, tokenizer=self.tokenizer)
            self.model.train()  # from_pretrained returns eval mode

    def forward(self, **batch):
        return self.model(**batch)

    def _loss(self, batch) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log_dict({"train/loss": loss, "train/tokens": (batch["labels"] != -100).sum().float()},
                      prog_bar=False, on_step=True, batch_size=batch["input_ids"].shape[0])
        self.log("loss", loss, prog_bar=True, logger=False)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def on_validation_epoch_end(self) -> None:
        cfg = self.sampling_eval
        dm = getattr(self.trainer, "datamodule", None)
        if cfg is None or self.trainer.sanity_checking or dm is None:
            return
        from hca.evaluation.policy import evaluate_policy
        from hca.rollout import HFRolloutEngine

        problems = dm.val_problems[: cfg.num_problems]
        engine = HFRolloutEngine(self.model, self.tokenizer)
        res = evaluate_policy(engine, problems, n=cfg.n, ks=tuple(cfg.ks), max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, seed=cfg.seed)
        self.log_dict({f"val/{k}": float(v) for k, v in res.metrics.items()}, prog_bar=False, sync_dist=True)
        self.log("pass@1", float(res.metrics["pass@1"]), prog_bar=True, logger=False)

    def on_train_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            save_checkpoint(self.model, self.tokenizer, self.hparams.export_dir)

    def configure_callbacks(self):
        from hca.runtime.progress import step_progress_bar

        return step_progress_bar(self.trainer)  # "SFT step 340/2000", not Lightning's "Epoch 0/-2"

    def progress_steps(self) -> tuple[str, int, int | None]:
        """The training bar's ``(label, done, total)`` (:mod:`hca.runtime.progress`): optimizer steps."""
        from hca.runtime.progress import training_total

        return "SFT step", self.trainer.global_step, training_total(self.trainer)

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.model.parameters())
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}
