"""Held-out evaluation during RL: the policy's sampled pass@k / maj@k on the validation problems at
every validation, and once before RL step 1, combined over ranks as one process over all problems.

:class:`PolicyValidation` holds :class:`hca.modules.policy.HCAPolicyModule`'s validation hooks, apart
from its RL step. It needs of the module: ``validation`` (a :class:`PolicyEval` or None), ``engine()``
(the rollout engine, holding the current weights), ``model``, the counters ``rl_step``,
``samples_seen``, ``tokens_generated`` and ``scorer_tokens``, and ``transfer_batch_to_device`` (which
renders the problems' prompts).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hca.data.problems import Problem
from hca.datamodules.sharding import gather_objects, global_batch_index
from hca.rollout.seeds import derive_seed


@dataclass(frozen=True)
class PolicyEval:
    """Held-out sampled evaluation at each validation (see :mod:`hca.evaluation.policy`)."""

    n: int = 4  # samples per problem
    ks: tuple[int, ...] = (1, 4)  # pass@k / maj@k reported
    max_new_tokens: int = 64  # response budget; a response cut here scores 0
    temperature: float = 1.0  # sampling temperature
    seed: int = 1234  # sampling seed, fixed so validations are comparable
    at_start: bool = True  # also validate the starting policy before RL step 1 (logged at step 0)


class PolicyValidation:
    """The validation hooks of the RL module (a mixin before ``L.LightningModule``)."""

    def _evaluate(self, problems: list[Problem], index: int) -> dict[str, float]:
        """Sums over one validation batch: every metric of :func:`hca.evaluation.policy.evaluate_policy` is
        a mean over the batch's problems (each with ``n`` samples), so ``val/*`` sums are mean x
        problem count, and ``count`` is the problem count. Sampling is seeded by the batch's global
        index ``index`` (the same on any number of ranks; ``val/0`` is the tag one process always used)."""
        from hca.evaluation.policy import evaluate_policy

        if not problems:
            return {}
        cfg = self.validation
        res = evaluate_policy(self.engine(), problems, n=cfg.n, ks=tuple(cfg.ks), max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, seed=derive_seed(cfg.seed, index, "val/0"))
        return {f"val/{k}": float(v) * len(problems) for k, v in res.metrics.items()} | {"count": len(problems)}

    def _val_sums(self, reset: bool = False) -> dict[str, float]:
        if reset or not hasattr(self, "_val_acc"):
            self._val_acc: dict[str, float] = {}
        return self._val_acc

    def _val_combine(self, sums: dict[str, float]) -> dict[str, float]:
        """The ``val/*`` means over every rank's share (all ranks must call it): sums and problem
        counts of all ranks added up in rank order, then divided, as one process over all the
        problems (to float64 rounding); ``val/samples`` and ``val/tokens`` are the training totals
        of all ranks, ``val/tokens`` counting every token generated for training: the responses
        (``val/response_tokens``) and a sampling scorer's prover completions (``val/scorer_tokens``,
        e.g. the current policy as Monte Carlo prover). ``{}`` when no rank validated a problem."""
        totals: dict[str, float] = {}
        samples = tokens = 0
        scorer = 0
        for part, n_samples, n_tokens, n_scorer in gather_objects((sums, self.samples_seen, self.tokens_generated,
                                                                   self.scorer_tokens)):
            for k, v in part.items():
                totals[k] = totals.get(k, 0.0) + v
            samples, tokens, scorer = samples + n_samples, tokens + n_tokens, scorer + n_scorer
        count = totals.pop("count", 0)
        if not count:
            return {}
        return {k: v / count for k, v in totals.items()} | {"val/samples": float(samples),
                                                             "val/rl_step": float(self.rl_step),
                                                             "val/tokens": float(tokens + scorer),
                                                             "val/response_tokens": float(tokens),
                                                             "val/scorer_tokens": float(scorer)}

    def on_validation_epoch_start(self) -> None:
        self._val_sums(reset=True)

    def validation_step(self, problems: list[Problem], batch_idx: int):
        """Sample this rank's batch; the val loader gives rank ``r`` of ``W`` the fixed batches ``r, r
        + W, ...`` (:func:`hca.datamodules.sharding.global_batch_index`), combined at the epoch end."""
        if self.validation is None:
            return
        world = self.trainer.world_size if self._trainer is not None else 1
        acc = self._val_sums()
        for k, v in self._evaluate(problems, global_batch_index(batch_idx, self.global_rank, world)).items():
            acc[k] = acc.get(k, 0.0) + v

    def on_validation_epoch_end(self) -> None:
        if self.validation is None:
            return
        metrics = self._val_combine(self._val_sums())
        if metrics:  # the same on every rank: "max" over ranks keeps it exact (and Lightning's sync check quiet)
            self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")
        self._val_sums(reset=True)

    def on_train_start(self) -> None:
        """Validate the starting policy once, before RL step 1 (``validation.at_start``), and write it
        to the loggers at step 0 with ``val/samples = 0``, so every learning curve starts at the
        policy RL began from. Same problems, seeds and combination over ranks as the periodic
        validation (every rank validates its share); a resumed run skips it."""
        cfg = self.validation
        if cfg is None or not cfg.at_start or self.rl_step != 0 or self.trainer.datamodule is None:
            return
        sums: dict[str, float] = {}
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for i, problems in enumerate(self.trainer.datamodule.val_dataloader()):
                problems = self.transfer_batch_to_device(problems, self.device, 0)  # as Lightning does for val
                index = global_batch_index(i, self.global_rank, self.trainer.world_size)
                for k, v in self._evaluate(problems, index).items():
                    sums[k] = sums.get(k, 0.0) + v
        self.model.train(was_training)
        metrics = self._val_combine(sums)
        if metrics:  # every rank, as Lightning calls loggers (its loggers write on rank 0 only)
            for logger in self.loggers:
                logger.log_metrics(metrics | {"val/samples": 0.0, "val/rl_step": 0.0, "val/tokens": 0.0,
                                              "val/response_tokens": 0.0, "val/scorer_tokens": 0.0}, step=0)
