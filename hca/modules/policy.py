"""RL of the policy with hierarchical credit assignment (METHOD.md section 8.3), manual optimization.

One training step = one **RL step** on a batch of problems from
:class:`~hca.datamodules.rl_problems.ProblemDataModule`:

1. sample ``G`` responses per problem with the ``engine`` (:mod:`hca.rollout.engines`: the HF
   engine samples the live module and records log-probs and entropies; a vLLM engine is first
   synced to the module's weights, and its samples get log-probs and entropies from one
   teacher-forced pass of the trainer, docs/rl.md), seed ``derive_seed(seed, rl_step, "policy/<rank>")``;
2. verify the outcomes, score the steps with the frozen scorer when ``progress_coef != 0`` and build
   the token advantages (:func:`hca.rl.batch.build_rl_batch`); reference log-probs when a reference
   is given;
3. ``ppo_epochs`` passes over shuffled mini-batches (:mod:`hca.rl.ppo`), one optimizer update each.

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

Validation (sampled pass@k on held-out problems, before RL step 1 and at every validation) is
:class:`hca.modules.policy_validation.PolicyValidation`, a mixin of this module.
"""
from __future__ import annotations

import dataclasses
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from hca.credit import truncated_is_weights
from hca.data.problems import Problem
from hca.data.prompts import PromptFormat, context_length, render_problems, rendered_prompts
from hca.models.loading import enable_gradient_checkpointing, load_causal_lm, load_tokenizer, save_checkpoint
from hca.models.lora import LoraSettings, add_lora, merged_copy
from hca.modules.policy_validation import PolicyEval, PolicyValidation
from hca.rl.batch import CreditConfig, RLBatch, build_rl_batch
from hca.rl.metrics import batch_metrics
from hca.rl.ppo import (PPOConfig, frozen_logprobs, micro_batch_weights, micro_batches, ppo_loss, rollout_logp_gap,
                        teacher_forced)
from hca.rl.scoring import NoScorer, StepScorer
from hca.rollout.base import SamplingParams
from hca.rollout.engines import EngineConfig
from hca.rollout.seeds import derive_seed
from hca.runtime.hparams import store_plain_hparams
from hca.runtime.strategies import configure_deepspeed_clipping, deepspeed_engine, gathered
from hca.verify import verify_responses


class _CurrentPolicy:
    """The RL module's engine as a prover (``MonteCarloScorer(prover='current_policy')``): whatever
    engine the module samples with, synced to the weights of the current RL step."""

    def __init__(self, module: "HCAPolicyModule"):
        self.module = module

    def generate(self, prompts, params, *, progress: bool = False):
        return self.module.engine().generate(prompts, params, progress=progress)


def default_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)


def _config(cls, value):
    return cls(**value) if isinstance(value, dict) else (cls() if value is None else value)


class HCAPolicyModule(PolicyValidation, L.LightningModule):
    def __init__(self, policy: str = "runs/sft/policy/model", tokenizer: str | None = None,
                 reference: str | None = None, scorer: StepScorer | None = None, dtype: str = "float32",
                 optimizer: OptimizerCallable = default_optimizer, scheduler: LRSchedulerCallable | None = None,
                 credit: CreditConfig | None = None, ppo: PPOConfig | None = None,
                 sampling: SamplingParams | None = None, engine: EngineConfig | None = None, delimiter: str = "\n\n",
                 validation: PolicyEval | None = None, export_dir: str | None = None, seed: int = 0,
                 lora: LoraSettings | None = None, prompt: PromptFormat | None = None,
                 allow_prompt_format_mismatch: bool = False, gradient_checkpointing: bool = False,
                 reference_dtype: str | None = None):
        """
        Args:
            policy: the policy to train: local HF folder, hub name or ``tiny-llama[:k=v,...]``.
            tokenizer: the policy's tokenizer; defaults to ``policy``.
            reference: frozen reference policy for the k3 KL term (same forms); None: no reference, no KL.
            scorer: frozen step scorer (:class:`hca.rl.scoring.StepScorer`); required when progress_coef != 0.
            dtype: parameter dtype of the policy and the reference.
            optimizer: a callable taking parameters and returning an optimizer.
            scheduler: a callable taking the optimizer and returning an LR scheduler, stepped every update.
            credit: estimator, alpha, beta, weight clip, progress whitening (:class:`hca.rl.batch.CreditConfig`).
            ppo: group size, epochs, mini-batches, clip, aggregation, KL, grad clip, truncation.
            sampling: the policy's sampling during RL (budget, temperature, top_p, stop; ``n`` is
                ``ppo.group_size`` and the seed is derived per RL step).
            engine: the rollout engine of RL sampling and validation (``hf | vllm | auto``,
                :class:`hca.rollout.engines.EngineConfig`). With vLLM the weights are synced into the
                engine after every RL step's updates, log-probs and entropies for the update come from
                the trainer's teacher-forced pass, and ``train/rollout_logp_gap`` logs how far vLLM's were.
            delimiter: the step delimiter (``"\\n"`` on the arithmetic task).
            validation: sampled pass@k / maj@k on the val problems at each validation; None: skip.
            export_dir: where the final HF checkpoint (model + tokenizer) is written when fit ends.
            seed: every sampling seed and mini-batch shuffle derives from (seed, RL step).
            lora: train LoRA adapters only (:mod:`hca.models.lora`; the export merges them); None: all weights.
            prompt: how native problem lines become prompts with the policy's tokenizer (:mod:`hca.data.prompts`);
                a scorer that records the format it was trained on (a PRM export) must match it.
            allow_prompt_format_mismatch: score with a PRM trained on another prompt format anyway.
            gradient_checkpointing: recompute the policy's decoder layers in the backward (HF
                ``gradient_checkpointing_enable``, non-reentrant; with LoRA the input embeddings'
                outputs require grad); less activation memory for about one more forward per update.
            reference_dtype: parameter dtype of the frozen reference; None: ``bfloat16`` under a
                ``bf16*`` trainer precision (the dtype the policy computes in), else ``dtype``. The
                reference is not loaded at all when ``ppo.kl_coef == 0`` (a warning says so).
        """
        super().__init__()
        self.automatic_optimization = False
        self.prompt = PromptFormat.coerce(prompt)
        self.save_hyperparameters(ignore=["scorer", "optimizer", "scheduler"])
        self.credit, self.ppo = _config(CreditConfig, credit), _config(PPOConfig, ppo)
        self.sampling = SamplingParams.coerce(sampling, "model.init_args.sampling")
        self.engine_config = EngineConfig.coerce(engine, "model.init_args.engine")
        self.lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
        self.validation = PolicyEval(**validation) if isinstance(validation, dict) else validation
        store_plain_hparams(self, engine=self.engine_config,
                            **{name: getattr(self, name) for name in ("credit", "ppo", "sampling", "validation", "lora", "prompt")})
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
        self._engine_synced = False  # the engine holds the module's current weights (always, for the HF engine)
        self._on_policy = False  # this step's update forward gives old_logp (fuses_logprob_pass)
        self._sync_seconds = self._recompute_seconds = 0.0
        self.rl_step = 0  # RL steps completed (saved in checkpoints)
        self.samples_seen = 0  # responses sampled for training so far
        self.tokens_generated = 0  # response tokens sampled for training so far (scorer rollouts not included)
        self.scorer_tokens = 0  # tokens a sampling scorer (Monte Carlo prover) generated for training so far
        self.skipped_updates = 0  # updates skipped for a non-finite loss or gradient
        self.prompts_skipped = 0  # problems dropped for a prompt longer than the context (prompt.long_prompts: skip)

    # ------------------------------------------------------------------ setup
    def configure_model(self) -> None:
        hp = self.hparams
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(hp.tokenizer or hp.policy)
        if self.model is None:
            self.model = load_causal_lm(hp.policy, hp.dtype, tokenizer=self.tokenizer)
            if self.lora is not None:
                self.model = add_lora(self.model, self.lora)  # only the adapters require gradients
            if hp.get("gradient_checkpointing", False):  # HF turns use_cache off only while grads are on
                enable_gradient_checkpointing(self.model, lora=self.lora is not None)
        if hp.reference is not None and self.ppo.kl_coef == 0:
            if not getattr(self, "_warned_reference_unused", False):
                self._warned_reference_unused = True
                warnings.warn(f"reference={hp.reference!r} is not loaded: ppo.kl_coef == 0, so it would be unused "
                              "(no KL term, no train/kl metric)", UserWarning, stacklevel=2)
        elif hp.reference is not None and "reference" not in self._frozen:
            precision = str(getattr(self._trainer, "precision", "")) if self._trainer is not None else ""
            ref_dtype = hp.get("reference_dtype") or ("bfloat16" if precision.startswith("bf16") else hp.dtype)
            ref = load_causal_lm(hp.reference, ref_dtype, tokenizer=self.tokenizer)
            self._frozen["reference"] = ref.requires_grad_(False).eval()

    def configure_optimizers(self):
        configure_deepspeed_clipping(self._trainer, self.ppo.max_grad_norm)  # DeepSpeed clips in its engine
        opt = self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    def configure_callbacks(self):
        from hca.runtime.progress import step_progress_bar

        return step_progress_bar(self.trainer)  # "RL step 12/200", not Lightning's "Epoch 0/-2"

    def progress_steps(self) -> tuple[str, int, int | None]:
        """The training bar's ``(label, done, total)`` (:mod:`hca.runtime.progress`): RL steps done, of those
        ``trainer.max_steps`` (``ppo.updates_per_step`` updates each) and ``max_epochs`` allow."""
        from hca.runtime.progress import training_total

        dm = self.trainer.datamodule
        per_step = getattr(dm, "hparams", {}).get("problems_per_step") if dm is not None else None
        updates = self.ppo.updates_per_step(per_step * self.ppo.group_size) if per_step else None
        if updates is None and self.rl_step:
            updates = max(1, self.trainer.global_step // self.rl_step)
        return "RL step", self.rl_step, training_total(self.trainer, updates, 1) if updates else None

    def on_fit_start(self) -> None:
        for model in self._frozen.values():
            model.to(self.device)
        self._engine = None
        self._stage_prompts = None  # of this fit's datamodule
        self.check_prompt_format()
        if getattr(self.scorer, "uses_current_policy", False):
            self.scorer.bind_policy(_CurrentPolicy(self))  # the prover is the policy of the current RL step
        elif hasattr(self.scorer, "size_context"):  # an external prover completes prefixes of this fit's responses
            self.scorer.size_context(self.stage_prompts, self.tokenizer, self.sampling.max_new_tokens)

    def check_prompt_format(self) -> None:
        """Refuse a scorer trained on prompts of another format (``allow_prompt_format_mismatch`` overrides)."""
        if self.hparams.allow_prompt_format_mismatch or not hasattr(self.scorer, "prompt_format"):
            return
        from hca.data.prompts import check_same_format

        check_same_format(self.prompt.describe(self.tokenizer), self.scorer.prompt_format,
                          f"the PRM at {getattr(self.scorer, 'path', self.scorer)!r}",
                          "model.init_args.allow_prompt_format_mismatch")

    def render(self, problems: list[Problem]) -> list[Problem]:
        """Prompts of native problem lines rendered in the policy's format; with ``prompt.long_prompts:
        skip`` a problem whose prompt fills the context is dropped and counted (``prompts_skipped``)."""
        kept, skipped = render_problems(problems, self.prompt, self.tokenizer, context_length(self.model))
        self.prompts_skipped += len(skipped)
        if not kept:
            raise ValueError(f"every problem of this batch ({len(problems)}) has a prompt longer than the policy's "
                             "context; nothing to sample")
        return kept

    def engine(self):
        """The rollout engine of RL sampling and validation, holding the module's current weights."""
        if self._engine is None:
            from hca.rollout.engines import build_engine, resolve_engine

            setting = "model.init_args.engine"
            vllm = resolve_engine(self.engine_config, self.hparams.policy, setting) == "vllm"
            if vllm and self._trainer is not None and self.trainer.world_size > 1:
                raise ValueError(f"{setting}: vllm runs on one rank only for now (got {self.trainer.world_size} "
                                 f"ranks); use {setting}: hf on several ranks")
            need = self.context_need() if vllm and self.engine_config.max_model_len is None else None
            self._engine = build_engine(self.engine_config, self.hparams.policy, self.tokenizer, model=self.model,
                                        dtype=self.hparams.dtype, owner="rl", setting=setting, context_need=need)
            self._engine_synced = self._engine.samples_live_weights
        if not self._engine_synced:
            self.sync_engine()
        return self._engine

    def stage_prompts(self) -> list[str] | None:
        """The prompts this fit samples after (unique): the datamodule's train and validation problems
        rendered in the policy's format; None when the trainer has no such datamodule."""
        if getattr(self, "_stage_prompts", None) is None:
            dm = self.trainer.datamodule if self._trainer is not None else None
            if dm is None or not hasattr(dm, "train_problems"):
                return None
            problems = [*dm.train_problems, *getattr(dm, "val_problems", [])]
            self._stage_prompts = rendered_prompts(problems, self.prompt, self.tokenizer)
        return self._stage_prompts

    def context_need(self) -> tuple[int, int] | None:
        """``(longest prompt, response budget)`` in the policy's tokens, which sizes a vLLM engine's
        context when ``engine.max_model_len`` is unset (:func:`hca.rollout.sizing.stage_context_len`);
        None without a datamodule of problems (the model's context then). The budget is the most the
        engine is asked for after a prompt: RL sampling, validation, and a Monte Carlo scorer whose
        prover is the current policy (it completes prefixes of responses)."""
        from hca.rollout.sizing import sampling_need

        prompts = self.stage_prompts()
        if prompts is None:
            return None
        budget = max(self.sampling.max_new_tokens, self.validation.max_new_tokens if self.validation else 0)
        if getattr(self.scorer, "uses_current_policy", False):
            budget = max(budget, self.sampling.max_new_tokens + self.scorer.max_new_tokens)
        return sampling_need(prompts, self.tokenizer, budget)

    def sync_engine(self) -> float:
        """Load the module's weights into an engine that keeps its own copy (vLLM): LoRA merged,
        ZeRO-3 gathered; returns the seconds it took (0 for the HF engine, which samples the module)."""
        engine = self._engine
        if engine is None or engine.samples_live_weights:
            return 0.0
        t0 = time.perf_counter()
        with gathered(self.model):  # ZeRO-3: full weights for the copy; else a no-op
            model = merged_copy(self.model) if self.lora is not None else self.model
            engine.sync_weights(model.state_dict().items())
        self._engine_synced = True
        self._sync_seconds = time.perf_counter() - t0
        return self._sync_seconds

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return self.render(batch)  # lists of problems (text); tensors are made on the right device later

    # ------------------------------------------------------------------ the RL step
    def training_step(self, problems: list[Problem], batch_idx: int):
        t0 = time.perf_counter()
        self._sync_seconds = 0.0
        engine = self.engine()  # syncs the weights of the last step's updates into a vLLM engine
        t_sync = time.perf_counter()
        rollout = engine.generate([p.prompt for p in problems], self.sampling.call(
            self.ppo.group_size, derive_seed(self.hparams.seed, self.rl_step, f"policy/{self.global_rank}")))
        t1 = time.perf_counter()
        batch = self.build_batch(problems, rollout)
        t2 = time.perf_counter()
        stats = batch_metrics(batch) | self._engine_stats
        if self._on_policy:  # the entropies come with the update's forward (its `entropy` metric), not before it
            stats = {k: v for k, v in stats.items() if not k.startswith("entropy")}
        if not engine.samples_live_weights:
            engine.sleep()  # GPU: the engine's memory goes to the update (a no-op on CPU)
        stats |= self.update(batch.to(self.device))
        self._engine_synced = engine.samples_live_weights
        t3 = time.perf_counter()
        self.rl_step += 1
        self.samples_seen += len(batch)
        self.tokens_generated += int(batch.response_mask.sum())
        stats |= {"time_sync": self._sync_seconds, "time_generation": t1 - t_sync, "time_scoring": batch.scoring_seconds,
                  "time_recompute": self._recompute_seconds,
                  "time_credit": t2 - t1 - batch.scoring_seconds - self._recompute_seconds, "time_update": t3 - t2,
                  "time_step": t3 - t0,
                  "samples": float(self.samples_seen), "tokens": float(self.tokens_generated + self.scorer_tokens),
                  "response_tokens": float(self.tokens_generated), "scorer_tokens": float(self.scorer_tokens),
                  "rl_step": float(self.rl_step),
                  "skipped_updates": float(self.skipped_updates), "prompts_skipped": float(self.prompts_skipped)}
        self.log_dict({f"train/{k}": float(v) for k, v in stats.items()}, on_step=True, on_epoch=False,
                      batch_size=len(batch))
        self.log("reward", stats["reward"], prog_bar=True, logger=False, on_step=True, batch_size=len(batch))

    def build_batch(self, problems: list[Problem], rollout) -> RLBatch:
        """Verify, score and assign credit; add reference (and, if asked, recomputed behaviour) log-probs.

        Samples of an engine that keeps its own weights (vLLM) get ``old_logp`` and entropies from
        the trainer's teacher-forced pass (the policy the update's ratio is taken against); the
        engine's log-probs give ``rollout_logp_gap`` and, with ``ppo.tis_cap``, truncated importance weights.
        When :meth:`fuses_logprob_pass`, that pass is the update's own forward instead."""
        chunk, temp = self.ppo.mini_batch_size or len(rollout), self.sampling.temperature
        self._engine_stats, behaviour, t0 = {}, None, time.perf_counter()
        self._on_policy = False
        if rollout.entropy is None or not (self._engine is None or self._engine.samples_live_weights):
            behaviour = rollout.logprobs.float()
        if behaviour is not None and self.fuses_logprob_pass(len(rollout)):
            # the update's forward gives old_logp, the gap and the entropy metric (ppo_loss(on_policy=True));
            # until then old_logp holds the engine's log-probs and the entropies (unused by this credit) zeros
            rollout, self._on_policy = rollout.with_entropy(torch.zeros_like(behaviour)), True
        elif behaviour is not None:
            ids, attn, start = (t if isinstance(t, int) else t.to(self.device) for t in rollout.model_inputs())
            logp, ent = teacher_forced(self.model, ids, attn, start, rollout.response_mask.to(self.device), chunk, temp,
                                       self.ppo.logprob_chunk_size, with_entropy=True,
                                       group=rollout.prompt_index.to(self.device) if self.ppo.share_prompt_forward else None)
            rollout = dataclasses.replace(rollout.with_entropy(ent.cpu()), logprobs=logp.float().cpu())
            gap = rollout_logp_gap(rollout.logprobs, behaviour, rollout.response_mask)
            self._engine_stats = {k: float(v) for k, v in gap.items()}
        self._recompute_seconds = time.perf_counter() - t0
        correct = verify_responses(rollout.texts, [problems[i] for i in rollout.prompt_index.tolist()])
        before = getattr(self.scorer, "tokens_generated", 0)
        batch = build_rl_batch(rollout, problems, correct, self.tokenizer, self.credit, self.hparams.delimiter,
                               self.scorer, self.ppo.truncation)
        self.scorer_tokens += getattr(self.scorer, "tokens_generated", 0) - before
        if behaviour is not None and self.ppo.tis_cap is not None:
            w, tis = truncated_is_weights(batch.old_logp, behaviour, batch.response_mask, self.ppo.tis_cap)
            batch = dataclasses.replace(batch, is_weight=w)
            self._engine_stats |= {k: float(v) for k, v in tis.items()}
        needs_forward = (self.ppo.recompute_old_logp and behaviour is None) or "reference" in self._frozen
        on_device = batch.to(self.device) if needs_forward else batch
        if self.ppo.recompute_old_logp and behaviour is None:
            t0 = time.perf_counter()
            batch = dataclasses.replace(batch, old_logp=frozen_logprobs(
                self.model, on_device, chunk, temp, self.ppo.logprob_chunk_size, self.ppo.share_prompt_forward).cpu())
            self._recompute_seconds += time.perf_counter() - t0
        if "reference" in self._frozen:
            ref = frozen_logprobs(self._frozen["reference"], on_device, chunk, temp, self.ppo.logprob_chunk_size,
                                  self.ppo.share_prompt_forward)
            batch = dataclasses.replace(batch, ref_logp=ref.cpu())
        return batch

    def fuses_logprob_pass(self, num_responses: int) -> bool:
        """Whether engine samples (vLLM) of a step of ``num_responses`` take ``old_logp`` from the
        update's own forward (``ppo.fuse_logprob_pass``; :mod:`hca.rl.ppo`): only when the step makes one
        update, the credit reads no entropies (beta 0, no entropy bonus) and nothing else needs the
        trainer's log-probs before the update (``tis_cap``, ``recompute_old_logp``)."""
        c, p = self.credit, self.ppo
        return (p.fuse_logprob_pass and p.updates_per_step(num_responses) == 1 and c.entropy_beta == 0
                and not c.entropy_bonus and p.tis_cap is None and not p.recompute_old_logp)

    def update(self, batch: RLBatch) -> dict[str, float]:
        """``ppo_epochs`` passes of mini-batch updates; returns the mean metrics of the finite updates."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        gen = torch.Generator().manual_seed(derive_seed(self.hparams.seed, self.rl_step, "minibatches"))
        params = [p for p in self.model.parameters() if p.requires_grad]
        engine = deepspeed_engine(self._trainer)
        sums: dict[str, torch.Tensor] = {}
        done = 0
        clock = {"time_forward": 0.0, "time_backward": 0.0, "time_optimizer": 0.0}  # wall s (CPU; async on CUDA)
        for j, rows in enumerate(self.ppo.minibatches(len(batch), gen)):
            loss, metrics = self._forward_backward(batch.select(rows.to(batch.device)), clock, engine is not None)
            t2 = time.perf_counter()
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
            clock["time_optimizer"] += time.perf_counter() - t2
        out = {k: float(v) / max(done, 1) for k, v in sums.items()} | clock
        out["lr"] = float(opt.param_groups[0]["lr"])
        out["updates"] = float(done)
        return out

    def _forward_backward(self, minibatch: RLBatch, clock: dict[str, float], deepspeed: bool
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and metrics of one mini-batch, its gradient accumulated over ``ppo.micro_batch_size``
        micro-batches weighted by :func:`hca.rl.ppo.micro_batch_weights` (the metrics: their weighted
        means, maxima for ``*_max``); one pass when it is null or covers the mini-batch."""
        order = torch.argsort(minibatch.group, stable=True)  # micro-batches keep a problem's responses together
        parts = [order[p] for p in micro_batches(len(minibatch), self.ppo)]
        if len(parts) > 1 and deepspeed:
            raise ValueError("ppo.micro_batch_size: gradient accumulation under DeepSpeed is the engine's own "
                             "(its config's gradient_accumulation_steps); leave micro_batch_size null there")
        weights = [1.0] if len(parts) == 1 else micro_batch_weights(
            minibatch.response_mask, minibatch.loss_mask, parts, self.ppo.agg, self.sampling.max_new_tokens)
        total, out = None, {}
        for part, w in zip(parts, weights):
            t0 = time.perf_counter()
            mb = minibatch if len(parts) == 1 else minibatch.select(part.to(minibatch.device))
            loss, metrics = ppo_loss(self.model, mb, self.ppo, self.sampling.temperature,
                                     self.sampling.max_new_tokens, on_policy=self._on_policy)
            t1 = time.perf_counter()
            self.manual_backward(loss if len(parts) == 1 else loss * w)
            clock["time_forward"] += t1 - t0
            clock["time_backward"] += time.perf_counter() - t1
            if len(parts) == 1:
                return loss, metrics
            total = loss.detach() * w if total is None else total + loss.detach() * w
            for k, v in metrics.items():
                v = v.detach()
                out[k] = (torch.maximum(out[k], v) if k in out else v) if k.endswith("_max") else out.get(k, 0.0) + v * w
        return total, out

    # ------------------------------------------------------------------ export, state
    def on_train_end(self) -> None:
        if not self.hparams.export_dir:
            return
        with gathered(self.model):  # ZeRO-3: full weights on every rank for the export; else a no-op
            if self.trainer.is_global_zero:
                model = merged_copy(self.model) if self.lora is not None else self.model  # LoRA: merged, plain HF
                save_checkpoint(model, self.tokenizer, self.hparams.export_dir)

    _COUNTERS = ("rl_step", "samples_seen", "tokens_generated", "scorer_tokens", "skipped_updates", "prompts_skipped")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The RL counters; on several ranks every rank's own (gathered: each rank samples its own
        responses, so their token counts differ) under ``per_rank``, rank 0's at the top level."""
        state = {name: getattr(self, name) for name in self._COUNTERS}
        if self._trainer is not None and self.trainer.world_size > 1:  # every rank dumps the checkpoint: a collective is safe
            mine = torch.tensor([float(state[n]) for n in self._COUNTERS], dtype=torch.float64, device=self.device)
            state["per_rank"] = [dict(zip(self._COUNTERS, map(int, row)))
                                 for row in self.all_gather(mine).reshape(-1, len(self._COUNTERS)).tolist()]
        checkpoint["hca_rl"] = state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("hca_rl", {})
        ranks = state.get("per_rank")
        if ranks and self._trainer is not None and len(ranks) == self.trainer.world_size:
            state = ranks[self.global_rank]
        for name in self._COUNTERS:
            setattr(self, name, int(state.get(name, 0)))
