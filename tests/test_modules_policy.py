"""HCAPolicyModule: real RL steps on a tiny model change every weight and log the metrics; a
non-finite update is skipped without touching weights; the KL to an identical reference starts at
0; a resumed run reproduces an uninterrupted one; validation logs pass@k."""
import math

import lightning as L
import pytest
import torch
from builders.callbacks import Record
from builders.policy import TINY, changed, initial_weights, make, trainer

from hca.modules.policy import HCAPolicyModule, PolicyEval
from hca.rl.batch import CreditConfig
from hca.rl.ppo import PPOConfig


@pytest.mark.parametrize("credit", [CreditConfig("grpo", 0.0, 0.0), CreditConfig("rloo", 1.0, 1.0)],
                         ids=["grpo", "hca"])
def test_rl_steps_change_every_weight_and_log(tmp_path, credit):
    module, dm = make(tmp_path, credit=credit, ppo=PPOConfig(group_size=8, mini_batch_size=8, kl_coef=0.01),
                      reference=True,  # kl_coef > 0: with kl_coef = 0 the reference is not loaded
                      validation=PolicyEval(n=2, ks=(1, 2), max_new_tokens=6))
    before = initial_weights(module)
    rec = Record()
    tr = trainer(tmp_path, 6, [rec], limit_val_batches=None, val_check_interval=3)
    tr.fit(module, dm)
    assert len(rec.logs) == 3 and module.rl_step == 3 and tr.global_step == 6  # 2 updates per RL step
    assert changed(before, module.model.state_dict()) == list(before), "some parameters did not change"
    assert all(torch.isfinite(v).all() for v in module.model.state_dict().values())
    logs = rec.logs[-1]
    for key in ("reward", "pass_at_group", "truncated_frac", "response_length", "num_steps", "entropy",
                "entropy_step_0", "kl", "approx_kl", "clip_frac", "grad_norm", "loss", "pg_loss", "adv_mean", "adv_std",
                "adv_abs_mean", "zero_var_groups", "time_generation", "time_scoring", "time_update", "samples",
                "skipped_updates", "lr", "rl_step"):
        assert f"train/{key}" in logs, key
    assert logs["train/samples"] == 3 * 2 * 8 and logs["train/skipped_updates"] == 0
    assert all(math.isfinite(v) for v in logs.values())
    assert min(r["train/zero_var_groups"] for r in rec.logs) < 1  # there was an outcome signal to learn from
    assert ("train/progress_mean" in logs) == (credit.progress_coef != 0)
    for key in ("val/pass@1", "val/pass@2", "val/maj@2"):
        assert key in tr.callback_metrics and 0 <= float(tr.callback_metrics[key]) <= 1


def test_non_finite_update_is_skipped(tmp_path):
    module, dm = make(tmp_path, ppo=PPOConfig(group_size=4, mini_batch_size=4))  # 2 updates per RL step
    before = initial_weights(module)
    build = module.build_batch

    def poisoned(problems, rollout):  # NaN advantages in the first RL step only
        import dataclasses

        batch = build(problems, rollout)
        return dataclasses.replace(batch, advantages=torch.full_like(batch.advantages, float("nan"))) \
            if module.rl_step == 0 else batch

    module.build_batch = poisoned
    rec = Record()
    with pytest.warns(RuntimeWarning, match="update skipped"):
        trainer(tmp_path, 4, [rec]).fit(module, dm)
    assert changed(before, rec.weights[0]) == []  # step 0: weights untouched
    assert rec.logs[0]["train/skipped_updates"] == 2 and rec.logs[1]["train/skipped_updates"] == 2
    assert changed(before, rec.weights[1]) == list(before)  # step 1 trains normally
    state = module.trainer.optimizers[0].state
    assert all(torch.isfinite(t).all() for s in state.values() for t in s.values() if torch.is_tensor(t))
    assert all(int(s["step"]) == 2 for s in state.values())  # only the 2 finite updates reached AdamW


def test_kl_starts_at_zero_with_identical_reference(tmp_path):
    module, dm = make(tmp_path, ppo=PPOConfig(group_size=4, kl_coef=0.1), reference=True)
    rec = Record()
    trainer(tmp_path, 3, [rec]).fit(module, dm)
    assert rec.logs[0]["train/kl"] < 1e-7  # policy == reference at the first update
    assert rec.logs[-1]["train/kl"] > 1e-6  # and they drift apart


def test_resume_matches_straight_run(tmp_path):
    """4 RL steps straight == 2 steps, checkpoint, resume for 2 more (2 updates per RL step, with a
    reference, progress and entropy credit)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    kw = dict(ppo=PPOConfig(group_size=4, ppo_epochs=2, kl_coef=0.05), reference=True)
    L.seed_everything(0)
    m1, d1 = make(tmp_path / "a", **kw)
    trainer(tmp_path / "a", 8).fit(m1, d1)

    L.seed_everything(0)
    m2, d2 = make(tmp_path / "b", **kw)
    ck = ModelCheckpoint(dirpath=tmp_path / "b" / "ck", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    trainer(tmp_path / "b", 6, [ck], enable_checkpointing=True).fit(m2, d2)  # "killed" after RL step 3
    mid = tmp_path / "b" / "ck" / "step=4.ckpt"
    assert mid.exists()

    L.seed_everything(123)  # resume must not depend on the ambient seed
    m3, d3 = make(tmp_path / "b", **kw)
    tr = trainer(tmp_path / "b", 8)
    tr.fit(m3, d3, ckpt_path=str(mid))
    assert m3.rl_step == 4 and tr.global_step == 8 and m3.samples_seen == m1.samples_seen
    for k, v in m1.model.state_dict().items():
        torch.testing.assert_close(m3.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert changed(m1.model.state_dict(), m2.model.state_dict())  # the 3-step run really differs


def test_progress_needs_a_scorer_and_kl_a_reference():
    with pytest.raises(ValueError, match="StepScorer"):
        HCAPolicyModule(policy=TINY, credit=CreditConfig(progress_coef=1.0), scorer=None)
    with pytest.raises(ValueError, match="reference"):
        HCAPolicyModule(policy=TINY, credit=CreditConfig(progress_coef=0.0), ppo=PPOConfig(kl_coef=0.1))
    HCAPolicyModule(policy=TINY, credit=CreditConfig(progress_coef=0.0))  # outcome-only needs neither


def test_sampling_and_engine_settings_are_checked():
    outcome = CreditConfig(progress_coef=0.0)
    with pytest.raises(ValueError, match=r"model\.init_args\.sampling: n and seed are set by the stage"):
        HCAPolicyModule(policy=TINY, credit=outcome, sampling={"n": 4})  # n is ppo.group_size
    with pytest.raises(ValueError, match=r"model\.init_args\.sampling: unknown sampling settings \['max_batch_size'\]"):
        HCAPolicyModule(policy=TINY, credit=outcome, sampling={"max_batch_size": 64})  # now engine.max_batch_size
    with pytest.raises(ValueError, match="engine must be one of"):
        HCAPolicyModule(policy=TINY, credit=outcome, engine={"engine": "sglang"})
    m = HCAPolicyModule(policy=TINY, credit=outcome, sampling={"max_new_tokens": 5}, engine={"max_batch_size": 8})
    assert m.sampling.max_new_tokens == 5 and m.hparams.engine["max_batch_size"] == 8
    m.configure_model()
    engine = m.engine()  # a tiny spec resolves to the HF engine under engine: auto
    assert type(engine).__name__ == "HFRolloutEngine" and engine.max_batch_size == 8 and engine.samples_live_weights


def test_behaviour_logprobs_match_teacher_forcing(tmp_path):
    """The sampler's recorded log-probs are what the update's first forward pass recomputes (ratio 1)."""
    from hca.rl.ppo import frozen_logprobs
    from hca.data.problems import Problem
    from hca.rollout import SamplingParams

    module, _ = make(tmp_path, ppo=PPOConfig(group_size=4, truncation="mask", recompute_old_logp=True))
    module.configure_model()
    probs = [Problem(id="a", prompt="Q:1\n", answer="1"), Problem(id="b", prompt="Q:22\n", answer="2")]
    rollout = module.engine().generate([p.prompt for p in probs], SamplingParams(max_new_tokens=6, n=4, seed=1))
    batch = module.build_batch(probs, rollout)
    assert batch.truncated.any() and torch.equal(batch.included, ~batch.truncated)  # truncation="mask"
    torch.testing.assert_close(batch.old_logp, rollout.logprobs, rtol=1e-5, atol=1e-5)  # recomputed == recorded
    torch.testing.assert_close(frozen_logprobs(module.model, batch, 3, 1.0), batch.old_logp, rtol=1e-5, atol=1e-5)


def test_start_policy_is_validated_at_step_0(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    module, dm = make(tmp_path, credit=CreditConfig("grpo", 0.0, 0.0), validation=PolicyEval(n=2, ks=(1, 2), max_new_tokens=6))
    tr = trainer(tmp_path, 2, limit_val_batches=None, val_check_interval=2)
    tr.loggers = [CSVLogger(str(tmp_path), name="logs")]
    tr.fit(module, dm)
    rows = list(csv.DictReader(open(tmp_path / "logs" / "version_0" / "metrics.csv")))
    val = [r for r in rows if r.get("val/pass@1")]
    assert [float(r["val/samples"]) for r in val] == [0.0, 2 * 2 * 4]  # at start, then after 2 RL steps
    assert val[0]["step"] == "0" and float(val[1]["val/rl_step"]) == 2
    assert float(val[1]["val/tokens"]) == float([r for r in rows if r.get("train/tokens")][-1]["train/tokens"]) > 0


def test_progress_bar_counts_rl_steps_of_the_total(tmp_path, capsys):
    """Under trainer.max_steps (max_epochs -1) the training bar counts RL steps of the total, not
    "Epoch 0/-2" over the batches of an epoch: 2 updates per RL step (ppo_epochs 2), max_steps 6 -> 3."""
    from lightning.pytorch.callbacks import RichProgressBar

    from hca.runtime.progress import StepProgressBar

    module, dm = make(tmp_path, credit=CreditConfig("grpo", 0.0, 0.0), ppo=PPOConfig(group_size=4, ppo_epochs=2))
    tr = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=True, enable_model_summary=False,
                   enable_checkpointing=False, default_root_dir=str(tmp_path), limit_val_batches=0)
    tr.fit(module, dm)
    bar = tr.progress_bar_callback
    assert isinstance(bar, StepProgressBar) and not any(isinstance(c, RichProgressBar) for c in tr.callbacks)
    assert module.rl_step == 3 and bar.train_progress_bar.n == 3 and bar.train_progress_bar.total == 3
    err = capsys.readouterr().out  # Lightning's tqdm bars write to stdout
    assert "RL step" in err and all(f"{k}/3" in err for k in (1, 2, 3)) and "Epoch" not in err and "reward=" in err
    # an explicit bar of another kind, or none, is left alone
    module, dm = make(tmp_path / "off", credit=CreditConfig("grpo", 0.0, 0.0))
    tr = trainer(tmp_path / "off", 1)
    tr.fit(module, dm)
    assert tr.progress_bar_callback is None


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_sum_norm"])
def test_micro_batches_accumulate_the_mini_batch_gradient(tmp_path, agg):
    """ppo.micro_batch_size splits each update's forward/backward; the accumulated gradient is the
    mini-batch's, so two RL steps end at the same weights (and losses) as whole mini-batches."""
    runs = {}
    for micro in (None, 3):
        module, dm = make(tmp_path / str(micro), ppo=PPOConfig(group_size=4, mini_batch_size=8, agg=agg,
                                                               micro_batch_size=micro))
        before = initial_weights(module)
        rec = Record()
        trainer(tmp_path / str(micro), 2, [rec]).fit(module, dm)
        assert changed(before, module.model.state_dict()) == list(before)
        runs[micro] = (module.model.state_dict(), rec.logs)
    (whole, logs_w), (micro, logs_m) = runs[None], runs[3]
    for k in whole:
        torch.testing.assert_close(micro[k], whole[k], rtol=1e-4, atol=1e-5)  # Adam at lr 1e-2 amplifies float noise
    for a, b in zip(logs_w, logs_m):
        assert a["train/reward"] == b["train/reward"]
        for key in ("loss", "pg_loss", "grad_norm"):
            assert abs(a[f"train/{key}"] - b[f"train/{key}"]) < 1e-5 * max(1.0, abs(a[f"train/{key}"])), key
