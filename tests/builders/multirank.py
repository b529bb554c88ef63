"""Two CPU processes (gloo, DeepSpeed ZeRO-2) for tests/test_runtime_multirank.py.

    python tests/builders/multirank.py rl,prm DATA_DIR OUT_DIR

Lightning's launcher re-executes this script for rank 1 at the first fit (one launch serves both
kinds: the start-up, about 15 s on 2 busy cores, is most of the time). Per kind two fits run in
both processes: ``full`` (uninterrupted, writes a checkpoint mid-way) and ``resume`` (a fresh
module, datamodule and trainer, another ambient seed, resumed from that checkpoint with
``ckpt_path`` to the same end). Each rank writes one JSON line per event to
``OUT_DIR/<kind>-<run>-rank<r>.jsonl``:

* ``start`` / ``update``: sha256 of the full weights when training starts and after every
  optimizer update (the engine's ``step`` is wrapped);
* ``batch``: the training examples of each step (RL: problem ids; PRM: (problem, response) pairs);
* ``val``: the examples of each validation batch (``padding``: a stand-in whose results are dropped);
* ``log``: every ``logger.log_metrics`` call (the at-start validation, the periodic ``val/*``);
* ``ref`` (rank 0 only): the validation metrics one process computes over *all* validation
  batches with the same weights, for the test to compare with what the ranks logged.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # tests/ (builders.policy) and tests/builders/

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402

from hca.runtime.strategies import CPUDeepSpeedStrategy  # noqa: E402

RL_STEPS, RL_UPDATES_PER_STEP, RL_CKPT_AT = 4, 2, 2  # RL steps; the checkpoint after RL step 2 (mid-epoch)
PRM_STEPS, PRM_CKPT_AT = 6, 3


def weights_sha(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Events:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, **event) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(event | {"t": time.time()}) + "\n")


class Recorder(Logger):
    """Every ``log_metrics`` call, on every rank (Lightning calls loggers on all ranks)."""

    def __init__(self, events: Events):
        super().__init__()
        self.events = events

    name, version = "recorder", 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.events(ev="log", step=step, metrics={k: float(v) for k, v in metrics.items()})


def rows(batch) -> int:
    """Examples in a batch: a list of problems (RL) or a PRMBatch (its ``input_ids [B, T]``)."""
    return len(batch) if isinstance(batch, list) else int(batch.input_ids.shape[0])


class Probe(L.Callback):
    def __init__(self, events: Events, model_of, train_ids, val_ids, reference=None, ref_at_start=False):
        self.events, self.model_of, self.train_ids, self.val_ids = events, model_of, train_ids, val_ids
        self.reference, self.ref_at_start = reference, ref_at_start

    def on_train_start(self, trainer, pl_module):
        model = self.model_of(pl_module)
        self.events(ev="start", step=trainer.global_step, sha=weights_sha(model))
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is not None:
            step, count = engine.step, [trainer.global_step]

            def recorded_step(*args, **kwargs):
                out = step(*args, **kwargs)
                count[0] += 1
                self.events(ev="update", n=count[0], sha=weights_sha(model))
                return out

            engine.step = recorded_step
        if self.ref_at_start and trainer.global_step == 0:  # the at-start validation's weights
            self._ref(trainer, pl_module, "start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ids = self.train_ids(batch)
        # the recorded ids must be this batch's (the PRM's come from a FIFO of collated batches), or the
        # test's disjointness and coverage checks would judge other examples than were trained on
        assert len(ids) == rows(batch), f"rank {trainer.global_rank}: {len(ids)} ids recorded for {rows(batch)} rows"
        self.events(ev="batch", step=trainer.global_step, ids=ids)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        ids, padding = self.val_ids(batch)
        assert len(ids) == rows(batch), f"rank {trainer.global_rank}: {len(ids)} val ids for {rows(batch)} rows"
        self.events(ev="val", step=trainer.global_step, ids=ids, padding=padding)

    def on_validation_end(self, trainer, pl_module):
        if self.reference is not None:
            self._ref(trainer, pl_module, "val")

    def _ref(self, trainer, pl_module, when):
        if trainer.is_global_zero:
            with torch.no_grad():
                metrics = self.reference(trainer, pl_module)
            self.events(ev="ref", when=when, step=trainer.global_step, metrics=metrics)


def trainer(events, max_steps, val_every, ckpt_dir=None, ckpt_every=None, probe=None):
    callbacks = [probe]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=ckpt_every,
                                         save_top_k=-1, save_last=False))
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=2, strategy=CPUDeepSpeedStrategy(stage=2),
                     use_distributed_sampler=False, logger=Recorder(events), enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=val_every,
                     check_val_every_n_epoch=None, log_every_n_steps=1, callbacks=callbacks,
                     enable_checkpointing=ckpt_dir is not None)


# ---------------------------------------------------------------------------------- RL
def rl_reference(trainer, module):
    """One process over all validation batches: seeds and weights as the ranks', weighted by problems."""
    from hca.rollout.seeds import derive_seed
    from hca.evaluation.policy import evaluate_policy

    cfg, sums, count = module.validation, {}, 0
    was_training = module.model.training
    module.model.eval()
    for g, problems in enumerate(trainer.datamodule.val_batches(1)):
        res = evaluate_policy(module.engine(), problems, n=cfg.n, ks=tuple(cfg.ks), max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, seed=derive_seed(cfg.seed, g, "val/0"))
        for k, v in res.metrics.items():
            sums[f"val/{k}"] = sums.get(f"val/{k}", 0.0) + v * len(problems)
        count += len(problems)
    module.model.train(was_training)
    assert count == len(trainer.datamodule.val_problems), "the reference must score every validation problem"
    return {k: v / count for k, v in sums.items()}


def rl_build(data: Path):
    from hca.datamodules.rl_problems import ProblemDataModule
    from hca.models.loading import char_tokenizer
    from hca.modules.policy import HCAPolicyModule, PolicyEval
    from hca.rl.ppo import PPOConfig
    from hca.rl.batch import CreditConfig
    from hca.rl.scoring import CallableScorer
    from builders.policy import TINY, value_fn

    dm = ProblemDataModule(train_file=str(data / "train.jsonl"), val_file=str(data / "val.jsonl"),
                           problems_per_step=2, val_batch_size=2, seed=0)
    module = HCAPolicyModule(policy=TINY, scorer=CallableScorer(value_fn),
                             optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0),
                             credit=CreditConfig("rloo", progress_coef=1.0, entropy_beta=1.0),
                             ppo=PPOConfig(group_size=4, mini_batch_size=4), sampling={"max_new_tokens": 6},
                             delimiter="\n", validation=PolicyEval(n=2, ks=(1, 2), max_new_tokens=6), seed=0)
    module.tokenizer = char_tokenizer(list("12\n"))
    return module, dm


def run_rl(data: Path, out: Path, rank: int) -> None:
    def probe(events):
        return Probe(events, lambda m: m.model, lambda b: [p.id for p in b], lambda b: ([p.id for p in b], False),
                     rl_reference, ref_at_start=True)

    L.seed_everything(0)
    module, dm = rl_build(data)
    ev = Events(out / f"rl-full-rank{rank}.jsonl")
    max_steps, ckpt_every = RL_STEPS * RL_UPDATES_PER_STEP, RL_CKPT_AT * RL_UPDATES_PER_STEP
    full = trainer(ev, max_steps, 2, out / "ckpt-rl", ckpt_every, probe(ev))
    full.fit(module, dm)
    assert full.global_step == max_steps and module.rl_step == RL_STEPS
    L.seed_everything(1)  # other initial weights and ambient RNG: everything must come from the checkpoint
    module, dm = rl_build(data)
    ev = Events(out / f"rl-resume-rank{rank}.jsonl")
    ckpt = out / "ckpt-rl" / f"step={ckpt_every}.ckpt"  # a DeepSpeed checkpoint folder
    resumed = trainer(ev, max_steps, 2, probe=probe(ev))
    resumed.fit(module, dm, ckpt_path=str(ckpt))
    assert resumed.global_step == max_steps and module.rl_step == RL_STEPS  # resumed at step 2, ran to the end


# ---------------------------------------------------------------------------------- PRM
def prm_build(data: Path):
    from builders import TINY

    from hca.datamodules.trajectories import TrajectoryDataModule, collate_examples
    from hca.modules.prm import PRMModule

    class Tagged(TrajectoryDataModule):
        """Keeps the (problem, response) pairs of every collated batch, in order (a FIFO per loader)."""

        def collate(self, batch):
            self.train_fifo.append([[e.problem_index, e.response_index] for e in batch])
            return collate_examples(batch, self.tokenizer.pad_token_id)

        def collate_val(self, item):
            self.val_fifo.append(([[e.problem_index, e.response_index] for e in item[0]], item[1]))
            return super().collate_val(item)

    dm = Tagged(str(data / "coll"), "tiny-llama", val_fraction=0.25, batch_size=8, val_batch_size=5, pool_batches=2,
                max_length=64)
    dm.train_fifo, dm.val_fifo = [], []
    module = PRMModule(backbone=TINY, tokenizer="tiny-llama", optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    return module, dm


def prm_reference(trainer, module):
    """One process over all validation batches with the module's own per-batch code, no syncing."""
    from hca.datamodules.trajectories import collate_examples
    from hca.modules.prm import PRMModule

    ref = PRMModule(backbone=module.hparams.backbone, tokenizer="tiny-llama")
    ref.prm = module.prm
    for metric in ref._val_metrics().values():
        metric.sync_on_compute = metric._to_sync = False
    dm = trainer.datamodule
    was_training = module.prm.training
    module.prm.eval()
    ref.on_validation_epoch_start()
    loss_sum = responses = 0
    for i, examples in enumerate(dm.val_batches()):  # (not dm.collate_val: that one records for the probe)
        batch = collate_examples(examples, dm.tokenizer.pad_token_id)
        ref.validation_step(batch, i)
        loss_sum, responses = loss_sum + float(module.loss(module(batch), batch)) * len(batch), responses + len(batch)
    module.prm.train(was_training)
    counts = ref._val_counts()
    out = {name: float(m.compute()) for name, m in ref._val_metrics().items() if counts[name] > 0}
    return out | {"val/loss": loss_sum / responses}  # as Lightning's batch-size-weighted mean of the batch losses


def run_prm(data: Path, out: Path, rank: int) -> None:
    def probe(events, dm):
        return Probe(events, lambda m: m.prm, lambda b: dm.train_fifo.pop(0), lambda b: dm.val_fifo.pop(0),
                     prm_reference)

    L.seed_everything(0)
    module, dm = prm_build(data)
    ev = Events(out / f"prm-full-rank{rank}.jsonl")
    full = trainer(ev, PRM_STEPS, PRM_CKPT_AT, out / "ckpt-prm", PRM_CKPT_AT, probe(ev, dm))
    full.fit(module, dm)
    assert full.global_step == PRM_STEPS
    L.seed_everything(1)
    module, dm = prm_build(data)
    ev = Events(out / f"prm-resume-rank{rank}.jsonl")
    resumed = trainer(ev, PRM_STEPS, PRM_CKPT_AT, probe=probe(ev, dm))
    resumed.fit(module, dm, ckpt_path=str(out / "ckpt-prm" / f"step={PRM_CKPT_AT}.ckpt"))
    assert resumed.global_step == PRM_STEPS and not dm.train_fifo  # every collated batch was trained on


if __name__ == "__main__":
    torch.set_num_threads(1)
    kinds, data, out = sys.argv[1].split(","), Path(sys.argv[2]), Path(sys.argv[3])
    rank = int(os.environ.get("LOCAL_RANK", 0))  # rank 0 is the process the test started
    for kind in kinds:
        {"rl": run_rl, "prm": run_prm}[kind](data, out, rank)
