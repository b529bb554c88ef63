"""RL of the policy with hierarchical credit assignment (METHOD.md section 8.3), manual optimization.

One training step = one **RL step** on a batch of problems from
:class:`~hca.datamodules.rl_problems.ProblemDataModule`:

1. sample ``G`` responses per problem (:class:`~hca.rollout.HFRolloutEngine`, log-probs and
   entropies recorded), seed ``derive_seed(seed, rl_step, "policy/<rank>")``;
2. verify the outcomes, score the steps with the frozen scorer when ``progress_coef != 0`` and build
   the token advantages (:func:`hca.rl_batch.build_rl_batch`); reference log-probs when a reference
   is given;
3. ``ppo_epochs`` passes over shuffled mini-batches (:mod:`hca.ppo`), one optimizer update each.

GRPO, RLOO and Dr. GRPO are this module with ``progress_coef = entropy_beta = 0`` (and, for Dr. GRPO,
``agg: seq_mean_token_sum_norm``); there is no separate code path.

Steps and resume. Lightning's ``global_step`` counts optimizer updates in manual optimization, so it
advances by ``ppo.updates_per_step(N)`` per RL step (``trainer.max_steps`` and checkpoint periods
are in updates; set them to multiples of that). An update whose loss or gradient is not finite is
skipped -- gradients dropped (set to None) before ``optimizer.step()``, which then leaves weights
and optimizer state untouched -- but still counted, so ``global_step`` stays ``updates_per_step``
times the RL step and the LR schedule keeps its pace; ``train/skipped_updates`` counts them. (A
fp16 ``GradScaler`` refuses such a step: use fp32 or bf16. Under DeepSpeed ZeRO the engine clips, at
``ppo.max_grad_norm``, and skips a non-finite step itself; see docs/rl.md.) Every random choice is a function of
``(seed, rl_step)`` -- the RL step counter is saved in the checkpoint -- never of the ambient RNG, so
a resumed run reproduces the uninterrupted one. The reference model is frozen and kept out of the
state dict (it is rebuilt from ``reference``); the scorer owns its own model and device.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from hca.collect import verify_responses
from hca.collect import derive_seed
from hca.modules.hparams import store_plain_hparams
from hca.lora import LoraSettings, add_lora, merged_copy
from hca.models import load_causal_lm, load_tokenizer, save_checkpoint
from hca.ppo import PPOConfig, frozen_logprobs, ppo_loss
from hca.problems import Problem
from hca.rl_batch import CreditConfig, RLBatch, build_rl_batch
from hca.rl_metrics import batch_metrics
from hca.rollout import SamplingParams
from hca.scoring import NoScorer, StepScorer
from hca.strategies import configure_deepspeed_clipping, deepspeed_engine, gathered


@dataclass(frozen=True)
class RolloutConfig:
    """How the policy samples its G responses per problem during RL."""

    max_new_tokens: int = 64  # response budget (a response cut here is handled by ppo.truncation)
    temperature: float = 1.0  # sampling temperature; log-probs and entropies are at this temperature
    top_p: float = 1.0  # nucleus sampling (1: off); log-probs stay those of the untruncated distribution
    max_batch_size: int = 256  # samples per engine sub-batch (part of what fixes the random stream)

    def params(self, n: int, seed: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              n=n, seed=seed)


@dataclass(frozen=True)
class PolicyEval:
    """Held-out sampled evaluation at each validation (see :mod:`hca.evaluation`)."""

    n: int = 4  # samples per problem
    ks: tuple[int, ...] = (1, 4)  # pass@k / maj@k reported
    max_new_tokens: int = 64  # response budget; a response cut here scores 0
    temperature: float = 1.0  # sampling temperature
    seed: int = 1234  # sampling seed, fixed so validations are comparable
    at_start: bool = True  # also validate the starting policy before RL step 1 (logged at step 0)


def default_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)


def _config(cls, value):
    return cls(**value) if isinstance(value, dict) else (cls() if value is None else value)


class HCAPolicyModule(L.LightningModule):
    def __init__(self, policy: str = "runs/sft/policy/model", tokenizer: str | None = None,
                 reference: str | None = None, scorer: StepScorer | None = None, dtype: str = "float32",
                 optimizer: OptimizerCallable = default_optimizer, scheduler: LRSchedulerCallable | None = None,
                 credit: CreditConfig | None = None, ppo: PPOConfig | None = None,
                 sampling: RolloutConfig | None = None, delimiter: str = "\n\n",
                 validation: PolicyEval | None = None, export_dir: str | None = None, seed: int = 0,
                 lora: LoraSettings | None = None):
        """
        Args:
            policy: the policy to train: local HF folder, hub name or ``tiny-llama[:k=v,...]``.
            tokenizer: the policy's tokenizer; defaults to ``policy``.
            reference: frozen reference policy for the k3 KL term (same forms); None: no reference, no KL.
            scorer: frozen step scorer (:class:`hca.scoring.StepScorer`); required when progress_coef != 0.
            dtype: parameter dtype of the policy and the reference.
            optimizer: a callable taking parameters and returning an optimizer.
            scheduler: a callable taking the optimizer and returning an LR scheduler, stepped every update.
            credit: estimator, alpha, beta, weight clip, progress whitening (:class:`hca.rl_batch.CreditConfig`).
            ppo: group size, epochs, mini-batches, clip, aggregation, KL, grad clip, truncation.
            sampling: the policy's sampling during RL.
            delimiter: the step delimiter (``"\\n"`` on the arithmetic task).
            validation: sampled pass@k / maj@k on the val problems at each validation; None: skip.
            export_dir: where the final HF checkpoint (model + tokenizer) is written when fit ends.
            seed: every sampling seed and mini-batch shuffle derives from (seed, RL step).
            lora: train LoRA adapters only (:mod:`hca.lora`; the export merges them); None: all weights.
        """
        super().__init__()
        self.automatic_optimization = False
        self.save_hyperparameters(ignore=["scorer", "optimizer", "scheduler"])
        self.credit, self.ppo = _config(CreditConfig, credit), _config(PPOConfig, ppo)
        self.sampling = _config(RolloutConfig, sampling)
        self.lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
        self.validation = PolicyEval(**validation) if isinstance(validation, dict) else validation
        store_plain_hparams(self, **{name: getattr(self, name) for name in ("credit", "ppo", "sampling", "validation", "lora")})
        if self.credit.progress_coef != 0 and (scorer is None or isinstance(scorer, NoScorer)):
            raise ValueError(f"progress_coef={self.credit.progress_coef} needs a StepScorer (scorer is {scorer!r}); "
                             "use progress_coef: 0 for outcome-only credit")
        if self.ppo.kl_coef > 0 and reference is None:
            raise ValueError("kl_coef > 0 needs a reference policy")
        self.scorer = scorer
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.tokenizer = None
        self.model = None
        self._frozen: dict[str, torch.nn.Module] = {}  # the reference: out of the state dict and the optimizer
        self._engine = None
        self.rl_step = 0  # RL steps completed (saved in checkpoints)
        self.samples_seen = 0  # responses sampled for training so far
        self.tokens_generated = 0  # response tokens sampled for training so far (scorer rollouts not included)
        self.skipped_updates = 0  # updates skipped for a non-finite loss or gradient

    # ------------------------------------------------------------------ setup
    def configure_model(self) -> None:
        hp = self.hparams
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(hp.tokenizer or hp.policy)
        if self.model is None:
            self.model = load_causal_lm(hp.policy, hp.dtype, tokenizer=self.tokenizer)
            if self.lora is not None:
                self.model = add_lora(self.model, self.lora)  # only the adapters require gradients
        if hp.reference is not None and "reference" not in self._frozen:
            ref = load_causal_lm(hp.reference, hp.dtype, tokenizer=self.tokenizer)
            self._frozen["reference"] = ref.requires_grad_(False).eval()

    def configure_optimizers(self):
        configure_deepspeed_clipping(self._trainer, self.ppo.max_grad_norm)  # DeepSpeed clips in its engine
        opt = self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    def on_fit_start(self) -> None:
        for model in self._frozen.values():
            model.to(self.device)
        self._engine = None

    def engine(self):
        if self._engine is None:
            from hca.rollout import HFRolloutEngine

            self._engine = HFRolloutEngine(self.model, self.tokenizer, max_batch_size=self.sampling.max_batch_size)
        return self._engine

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # lists of problems (text); tensors are made on the right device later

    # ------------------------------------------------------------------ the RL step
    def training_step(self, problems: list[Problem], batch_idx: int):
        t0 = time.perf_counter()
        rollout = self.engine().generate([p.prompt for p in problems], self.sampling.params(
            self.ppo.group_size, derive_seed(self.hparams.seed, self.rl_step, f"policy/{self.global_rank}")))
        t1 = time.perf_counter()
        batch = self.build_batch(problems, rollout)
        t2 = time.perf_counter()
        stats = batch_metrics(batch)
        stats |= self.update(batch.to(self.device))
        t3 = time.perf_counter()
        self.rl_step += 1
        self.samples_seen += len(batch)
        self.tokens_generated += int(batch.response_mask.sum())
        stats |= {"time_generation": t1 - t0, "time_scoring": batch.scoring_seconds,
                  "time_credit": t2 - t1 - batch.scoring_seconds, "time_update": t3 - t2, "time_step": t3 - t0,
                  "samples": float(self.samples_seen), "tokens": float(self.tokens_generated),
                  "rl_step": float(self.rl_step),
                  "skipped_updates": float(self.skipped_updates)}
        self.log_dict({f"train/{k}": float(v) for k, v in stats.items()}, on_step=True, on_epoch=False,
                      batch_size=len(batch))
        self.log("reward", stats["reward"], prog_bar=True, logger=False, on_step=True, batch_size=len(batch))

    def build_batch(self, problems: list[Problem], rollout) -> RLBatch:
        """Verify, score and assign credit; add reference (and, if asked, recomputed behaviour) log-probs."""
        correct = verify_responses(rollout.texts, [problems[i] for i in rollout.prompt_index.tolist()])
        batch = build_rl_batch(rollout, problems, correct, self.tokenizer, self.credit, self.hparams.delimiter,
                               self.scorer, self.ppo.truncation)
        chunk, temp = self.ppo.mini_batch_size or len(batch), self.sampling.temperature
        needs_forward = self.ppo.recompute_old_logp or "reference" in self._frozen
        on_device = batch.to(self.device) if needs_forward else batch
        if self.ppo.recompute_old_logp:
            batch = dataclasses.replace(batch, old_logp=frozen_logprobs(self.model, on_device, chunk, temp).cpu())
        if "reference" in self._frozen:
            ref = frozen_logprobs(self._frozen["reference"], on_device, chunk, temp)
            batch = dataclasses.replace(batch, ref_logp=ref.cpu())
        return batch

    def update(self, batch: RLBatch) -> dict[str, float]:
        """``ppo_epochs`` passes of mini-batch updates; returns the mean metrics of the finite updates."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        gen = torch.Generator().manual_seed(derive_seed(self.hparams.seed, self.rl_step, "minibatches"))
        params = [p for p in self.model.parameters() if p.requires_grad]
        engine = deepspeed_engine(self._trainer)
        sums: dict[str, torch.Tensor] = {}
        done = 0
        for j, rows in enumerate(self.ppo.minibatches(len(batch), gen)):
            loss, metrics = ppo_loss(self.model, batch.select(rows.to(batch.device)), self.ppo,
                                     self.sampling.temperature, self.sampling.max_new_tokens)
            self.manual_backward(loss)
            if engine is None:
                grads = [p.grad for p in params if p.grad is not None]
                metrics["grad_norm"] = torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros(())
                ok = bool(torch.isfinite(loss) & torch.isfinite(metrics["grad_norm"]))
                if ok and self.ppo.max_grad_norm is not None:
                    self.clip_gradients(opt, gradient_clip_val=self.ppo.max_grad_norm, gradient_clip_algorithm="norm")
                elif not ok:  # gradients dropped: optimizer.step() then changes neither weights nor optimizer state
                    opt.zero_grad(set_to_none=True)
                opt.step()
            else:  # DeepSpeed (ZeRO >= 1): the engine clips, and skips a step whose gradient norm is not finite
                opt.step()
                norm = engine.get_global_grad_norm()
                metrics["grad_norm"] = loss.new_tensor(float("nan") if norm is None else float(norm)).float()
                ok = bool(torch.isfinite(metrics["grad_norm"]))
            if ok:
                sums = {k: sums.get(k, 0.0) + v.detach().float() for k, v in metrics.items()}
                done += 1
            else:
                self.skipped_updates += 1
                warnings.warn(f"non-finite loss or gradient at RL step {self.rl_step}, update {j}: update skipped",
                              RuntimeWarning, stacklevel=2)
            opt.zero_grad(set_to_none=True)
            if sched is not None:
                sched.step()
        out = {k: float(v) / max(done, 1) for k, v in sums.items()}
        out["lr"] = float(opt.param_groups[0]["lr"])
        out["updates"] = float(done)
        return out

    # ------------------------------------------------------------------ validation, export, state
    def _evaluate(self, problems: list[Problem], batch_idx: int) -> dict[str, float]:
        from hca.evaluation import evaluate_policy

        cfg = self.validation
        res = evaluate_policy(self.engine(), problems, n=cfg.n, ks=tuple(cfg.ks), max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature,
                              seed=derive_seed(cfg.seed, batch_idx, f"val/{self.global_rank}"))
        return {f"val/{k}": float(v) for k, v in res.metrics.items()}

    def validation_step(self, problems: list[Problem], batch_idx: int):
        if self.validation is None:
            return
        metrics = self._evaluate(problems, batch_idx) | {"val/samples": float(self.samples_seen),
                                                         "val/rl_step": float(self.rl_step),
                                                         "val/tokens": float(self.tokens_generated)}
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=len(problems), sync_dist=True)

    def on_train_start(self) -> None:
        """Validate the starting policy once, before RL step 1 (``validation.at_start``), and write it
        to the loggers at step 0 with ``val/samples = 0``, so every learning curve starts at the
        policy RL began from. Same problems and seeds as the periodic validation; a resumed run skips it."""
        cfg = self.validation
        if cfg is None or not cfg.at_start or self.rl_step != 0 or self.trainer.datamodule is None:
            return
        sums: dict[str, float] = {}
        count = 0
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for i, problems in enumerate(self.trainer.datamodule.val_dataloader()):
                for k, v in self._evaluate(problems, i).items():
                    sums[k] = sums.get(k, 0.0) + v * len(problems)
                count += len(problems)
        self.model.train(was_training)
        if count and self.trainer.is_global_zero:
            metrics = {k: v / count for k, v in sums.items()} | {"val/samples": 0.0, "val/rl_step": 0.0, "val/tokens": 0.0}
            for logger in self.loggers:
                logger.log_metrics(metrics, step=0)

    def on_train_end(self) -> None:
        if not self.hparams.export_dir:
            return
        with gathered(self.model):  # ZeRO-3: full weights on every rank for the export; else a no-op
            if self.trainer.is_global_zero:
                model = merged_copy(self.model) if self.lora is not None else self.model  # LoRA: merged, plain HF
                save_checkpoint(model, self.tokenizer, self.hparams.export_dir)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["hca_rl"] = {"rl_step": self.rl_step, "samples_seen": self.samples_seen,
                                "tokens_generated": self.tokens_generated,
                                "skipped_updates": self.skipped_updates}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("hca_rl", {})
        self.rl_step = int(state.get("rl_step", 0))
        self.samples_seen = int(state.get("samples_seen", 0))
        self.tokens_generated = int(state.get("tokens_generated", 0))
        self.skipped_updates = int(state.get("skipped_updates", 0))
