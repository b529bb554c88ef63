"""RL steps under DeepSpeed ZeRO on CPU (hca.runtime.strategies.CPUDeepSpeedStrategy, one process, gloo).

With one process ZeRO-2 does the same arithmetic as the plain strategy (fp32), so the weights after
a few RL steps must match a plain run's -- with SGD, so that a gradient clip the engine failed to
apply (or applied twice) would show. A non-finite update is skipped by the engine, counted, and
leaves weights and optimizer state alone. The reference and the scorer stay out of the engine.
ZeRO-3 trains and exports gathered weights. Nothing is compiled (no shm op): these run in seconds.
"""
import dataclasses

import lightning as L
import pytest
import torch

pytest.importorskip("deepspeed")

from hca.models.loading import load_causal_lm  # noqa: E402
from hca.rl.ppo import PPOConfig  # noqa: E402
from hca.rl.batch import CreditConfig  # noqa: E402
from hca.runtime.strategies import CPUDeepSpeedStrategy  # noqa: E402
from builders.callbacks import Record  # noqa: E402
from builders.policy import changed, initial_weights, make  # noqa: E402

HCA = CreditConfig("rloo", progress_coef=1.0, entropy_beta=1.0)


def fit(tmp_path, module, dm, max_steps, strategy=None, callbacks=()):
    kw = {"strategy": strategy, "use_distributed_sampler": False} if strategy is not None else {}
    tr = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
                   enable_checkpointing=False, limit_val_batches=0, callbacks=list(callbacks), log_every_n_steps=1,
                   **kw)
    tr.fit(module, dm)
    return tr


def sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def build(tmp_path, optimizer=sgd, lora=None, export_dir=None):
    module, dm = make(tmp_path, credit=HCA, ppo=PPOConfig(group_size=4, mini_batch_size=4, kl_coef=0.05),
                      reference=True)
    module.optimizer_factory, module.lora, module.hparams.export_dir = optimizer, lora, export_dir
    return module, dm


def test_zero2_matches_plain_run(tmp_path):
    L.seed_everything(0)
    plain, dm = build(tmp_path / "plain")
    before = initial_weights(plain)
    rec_plain = Record()
    fit(tmp_path / "plain", plain, dm, 4, callbacks=[rec_plain])  # 2 RL steps x 2 updates

    L.seed_everything(0)
    zero, dm = build(tmp_path / "zero")
    rec = Record()
    tr = fit(tmp_path / "zero", zero, dm, 4, CPUDeepSpeedStrategy(stage=2), [rec])
    engine = tr.strategy.deepspeed_engine
    assert engine.zero_optimization_stage() == 2 and engine.gradient_clipping() == 1.0  # ppo.max_grad_norm
    # only the policy is in the engine and its optimizer: not the frozen reference
    policy_numel = sum(p.numel() for p in zero.model.parameters())
    assert sum(p.numel() for p in engine.module.parameters()) == policy_numel
    assert sum(p.numel() for g in engine.optimizer.bit16_groups for p in g) == policy_numel
    ref = zero._frozen["reference"]
    assert not any(p.requires_grad for p in ref.parameters())

    logs = rec.logs[-1]
    assert zero.rl_step == 2 and tr.global_step == 4 and logs["train/updates"] == 2
    assert logs["train/skipped_updates"] == 0 and torch.isfinite(torch.tensor(logs["train/loss"]))
    assert max(r["train/grad_norm"] for r in rec.logs) > 1.0  # the clip was active in at least one update
    after = zero.model.state_dict()
    assert changed(before, after) == list(before)
    for k, v in plain.model.state_dict().items():
        torch.testing.assert_close(after[k], v, rtol=1e-4, atol=1e-5)
    for a, b in zip(rec.logs, rec_plain.logs):  # the engine's norm == torch's pre-clip norm
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4)


def test_zero2_skips_non_finite_update(tmp_path):
    module, dm = build(tmp_path, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0))
    before = initial_weights(module)
    make_batch = module.build_batch

    def poisoned(problems, rollout):  # NaN advantages in the first RL step only
        batch = make_batch(problems, rollout)
        nan = torch.full_like(batch.advantages, float("nan"))
        return dataclasses.replace(batch, advantages=nan) if module.rl_step == 0 else batch

    module.build_batch = poisoned
    rec = Record()
    with pytest.warns(RuntimeWarning, match="update skipped"):
        tr = fit(tmp_path, module, dm, 4, CPUDeepSpeedStrategy(stage=2), [rec])
    assert changed(before, rec.weights[0]) == []  # RL step 0: both updates skipped by the engine
    assert rec.logs[0]["train/skipped_updates"] == 2 and rec.logs[1]["train/skipped_updates"] == 2
    assert changed(before, rec.weights[1]) == list(before)  # RL step 1 trains
    state = tr.strategy.deepspeed_engine.optimizer.optimizer.state  # AdamW on the flat fp32 partition
    assert state and all(int(s["step"]) == 2 for s in state.values())  # only the 2 finite updates reached it
    assert all(torch.isfinite(t).all() for s in state.values() for t in s.values() if torch.is_tensor(t))


def test_zero3_trains_and_exports_gathered_weights(tmp_path):
    module, dm = build(tmp_path, export_dir=str(tmp_path / "export"))
    before = initial_weights(module)
    tr = fit(tmp_path, module, dm, 2, CPUDeepSpeedStrategy(stage=3))
    assert tr.strategy.deepspeed_engine.zero_optimization_stage() == 3
    assert all(hasattr(p, "ds_id") for p in module.model.parameters())  # partitioned by ZeRO-3
    exported = load_causal_lm(str(tmp_path / "export")).state_dict()
    assert changed(before, exported) == list(before)
    assert all(torch.isfinite(v).all() for v in exported.values())


def test_lora_under_zero2_trains_only_adapters(tmp_path):
    from hca.models.lora import LoraSettings

    module, dm = build(tmp_path, lora=LoraSettings(r=2, alpha=4, target_modules=("q_proj", "v_proj")))
    before = initial_weights(module)
    tr = fit(tmp_path, module, dm, 2, CPUDeepSpeedStrategy(stage=2))
    lora = sorted(k for k in before if "lora_" in k)
    assert len(lora) == 2 * 2 * 1 and sorted(changed(before, module.model.state_dict())) == lora  # A, B x q, v
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in tr.strategy.deepspeed_engine.optimizer.bit16_groups for p in g) == trainable


def test_clipping_comes_from_ppo_and_stage_0_is_refused():
    from types import SimpleNamespace

    from hca.runtime.strategies import configure_deepspeed_clipping

    def trainer(config):
        return SimpleNamespace(strategy=CPUDeepSpeedStrategy(config=config))

    t = trainer({"zero_optimization": {"stage": 2}, "gradient_clipping": 0.0})
    configure_deepspeed_clipping(t, 0.5)
    assert t.strategy.config["gradient_clipping"] == 0.5
    configure_deepspeed_clipping(t, 0.5)  # agreeing values are fine
    with pytest.raises(ValueError, match="contradicts"):
        configure_deepspeed_clipping(t, 1.0)
    with pytest.raises(ValueError, match="stage >= 1"):
        configure_deepspeed_clipping(trainer({"zero_optimization": {"stage": 0}}), 1.0)
    configure_deepspeed_clipping(SimpleNamespace(strategy=None), 1.0)  # not DeepSpeed: nothing to do
