"""PRMModule: real optimizer steps change the weights and lower the loss; LoRA trains only
adapters + head; the export reloads to identical scores through PRMScorer (the StepScorer the RL
module uses); resume equals a straight run; loss options (the metric definitions: test_prm_metrics.py)."""
from __future__ import annotations

import inspect

import lightning as L
import pytest
import torch
from builders import TINY, write_collection

from hca.datamodules.trajectories import PRMBatch, TrajectoryDataModule
from hca.modules.prm import PRMLoss, PRMModule
from hca.prm.scorer import PRMScorer
from hca.rl.scoring import StepScorer


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    return write_collection(tmp_path_factory.mktemp("coll"), num_problems=48)


def make(coll, export=None, lr=3e-3, **kw):
    dm = TrajectoryDataModule(str(coll), "tiny-llama", val_fraction=0.25, batch_size=16, max_length=64)
    module = PRMModule(backbone=TINY, tokenizer="tiny-llama", export_dir=str(export) if export else None,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=lr), **kw)
    return module, dm


def trainer(root, max_steps, **kw):
    kw = {"limit_val_batches": 0, "enable_checkpointing": False, **kw}
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(root), num_sanity_val_steps=0, **kw)


def test_trains_logs_exports_and_scores_identically(coll, tmp_path):
    module, dm = make(coll, export=tmp_path / "prm")
    module.configure_model()
    before = {k: v.clone() for k, v in module.prm.state_dict().items()}
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    tr = trainer(tmp_path, 40, limit_val_batches=None, val_check_interval=40, check_val_every_n_epoch=None,
                 callbacks=[Record()])
    tr.fit(module, dm)
    after = module.prm.state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    assert sum(losses[-8:]) / 8 < 0.9 * sum(losses[:8]) / 8, losses
    for key in ("val/loss", "val/value_mse", "val/progress_mse", "val/progress_spearman", "val/harmful_auroc",
                "val/harmful_f1", "val/ece", "val/outcome_auroc", "val/outcome_pair_acc", "val/first_error_f1_value",
                "val/first_error_f1_progress"):
        assert key in tr.callback_metrics, key
    # The export reloads to the same values the module computes, via the RL scorer.
    batch = dm.collate(dm.examples("val")[:6])
    with torch.no_grad():
        expect = torch.sigmoid(module.eval()(batch))
    probs = dm.problems("val")
    _, records = __import__("hca.data.trajectories", fromlist=["read_dataset"]).read_dataset(coll)
    index = {(t.problem_id, t.response_index): t for t in records}
    trajs = [index[(probs[e.problem_index].id, e.response_index)] for e in dm.examples("val")[:6]]
    scorer = PRMScorer(str(tmp_path / "prm"), device="cpu", batch_size=4)
    vals = scorer.values([t.prompt for t in trajs], [t.response for t in trajs], "\n")
    got = scorer.score([t.prompt for t in trajs], [t.response for t in trajs], "\n", problems=None)
    for i, t in enumerate(trajs):
        K = t.num_steps
        assert vals[i] == pytest.approx(expect[i, :K + 1].tolist(), abs=1e-5)
        assert got[i] == vals[i][:K]


def test_scorer_follows_the_step_scorer_protocol(coll, tmp_path):
    module, _ = make(coll)
    module.configure_model()
    module.export(str(tmp_path / "prm"))
    scorer = PRMScorer(str(tmp_path / "prm"), device="cpu")
    assert isinstance(scorer, StepScorer)
    assert inspect.signature(PRMScorer.score) == inspect.signature(StepScorer.score)
    out = scorer.score(["Q:1+2\n", "Q:3*4\n", "Q:5\n"], ["1+2=3", "3*4=12\n12-1=11", ""], "\n")
    assert [len(v) for v in out] == [1, 2, 0]
    assert all(0 < x < 1 for v in out for x in v)
    # Past max_length the last boundary inside the window repeats, with a warning.
    short = PRMScorer(str(tmp_path / "prm"), device="cpu", max_length=14)  # room for h_0 (token 6) and h_1 (token 13)
    long_resp = "3*4=12\n12-1=11\n11+1=12"
    full = scorer.values(["Q:3*4\n"], [long_resp], "\n")[0]
    with pytest.warns(UserWarning, match="longer than max_length"):
        cut = short.values(["Q:3*4\n"], [long_resp], "\n")[0]
    assert cut[:2] == pytest.approx(full[:2], abs=1e-6) and cut[2:] == [cut[1]] * 2


def test_lora_trains_only_adapters_and_head(coll, tmp_path):
    module, dm = make(coll, export=tmp_path / "prm", lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    module.configure_model()
    trainable = {n for n, p in module.prm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    before = {n: p.detach().clone() for n, p in module.prm.named_parameters()}
    trainer(tmp_path, 4).fit(module, dm)
    for n, p in module.prm.named_parameters():
        assert torch.equal(before[n], p) != (n in trainable), n  # trainable ones changed, frozen ones did not
    # The export merges the adapters: the plain backbone scores as the adapted one.
    batch = dm.collate(dm.examples("val")[:3])
    with torch.no_grad():
        expect = torch.sigmoid(module.eval()(batch))
    from hca.prm.model import load_prm

    prm = load_prm(tmp_path / "prm")
    assert type(prm.model.backbone).__name__ == "LlamaModel"
    with torch.no_grad():
        got = torch.sigmoid(prm.model(batch.input_ids, batch.attention_mask, batch.positions))
    torch.testing.assert_close(got[batch.boundary_mask], expect[batch.boundary_mask], atol=1e-5, rtol=1e-5)


def test_resume_matches_straight_run(coll, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    m1, d1 = make(coll)
    trainer(tmp_path / "a", 5).fit(m1, d1)
    L.seed_everything(0)
    m2, d2 = make(coll)
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer(tmp_path / "b", 4, callbacks=[ck], enable_checkpointing=True).fit(m2, d2)
    L.seed_everything(123)
    m3, d3 = make(coll)
    trainer(tmp_path / "b", 5).fit(m3, d3, ckpt_path=str(tmp_path / "ck" / "step=3.ckpt"))
    for k, v in m1.prm.state_dict().items():
        torch.testing.assert_close(m3.prm.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert not torch.equal(m2.prm.state_dict()[k], v)


def test_tokenizer_mismatch_is_refused(coll, tmp_path):
    module, dm = make(coll)
    dm.setup()
    dm.tokenizer = type("Other", (), {"__call__": lambda self, s: {"input_ids": [0]}})()  # encodes differently
    with pytest.raises(ValueError, match="not the PRM backbone's"):
        trainer(tmp_path, 1).fit(module, dm)


def _batch(targets, rollouts, final, mask=None) -> PRMBatch:
    t = torch.tensor(targets, dtype=torch.float)
    B, J = t.shape
    m = torch.ones(B, J, dtype=torch.bool) if mask is None else torch.tensor(mask)
    z = torch.zeros(B, J, dtype=torch.long)
    return PRMBatch(torch.zeros(B, 4, dtype=torch.long), torch.ones(B, 4, dtype=torch.long), z, t,
                    torch.tensor(rollouts, dtype=torch.float) * m, torch.ones(B, J, dtype=torch.bool), m,
                    torch.tensor(final), z - 1, torch.zeros(B), torch.arange(B))


def test_loss_weights_targets_and_balance():
    b = _batch([[0.75, 0.25, 1.0]], [[4.0, 8.0, 0.0]], [[False, False, True]])
    w = PRMModule(loss=PRMLoss(final_weight=16)).label_weights(b, b.targets)
    assert w.tolist() == [[4.0, 8.0, 16.0]]
    w = PRMModule(loss=PRMLoss(rollout_weights=False, final_weight=1)).label_weights(b, b.targets)
    assert w.tolist() == [[1.0, 1.0, 1.0]]
    m = PRMModule(loss={"rollout_weights": True, "final_weight": 0.0, "class_balance": True})
    w = m.label_weights(b, b.targets)
    assert float(w[b.targets >= 0.5].sum()) == pytest.approx(float(w[b.targets < 0.5].sum()))
    assert float(w[0, 2]) == 0.0  # h_K untrained with final_weight 0
    # the loss is the weighted mean BCE; hard targets threshold at 0.5
    logits = torch.tensor([[0.3, -1.0, 2.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    soft = PRMModule(loss=PRMLoss(final_weight=16)).loss(logits, b)
    assert float(soft) == pytest.approx(float((bce(logits, b.targets, reduction="none") * torch.tensor([4, 8, 16])).sum() / 28))
    hard = PRMModule(loss=PRMLoss(targets="hard", final_weight=16)).loss(logits, b)
    assert float(hard) == pytest.approx(float((bce(logits, torch.tensor([[1.0, 0.0, 1.0]]), reduction="none")
                                               * torch.tensor([4, 8, 16])).sum() / 28))
    with pytest.raises(ValueError, match="targets"):
        PRMModule(loss=PRMLoss(targets="both"))


def test_extra_layers_start_as_identity_train_and_reload(coll, tmp_path):
    plain, dm = make(coll)
    grown, _ = make(coll, extra_layers=1, lora={"r": 2, "alpha": 4})
    plain.configure_model()
    grown.configure_model()
    dm.setup()
    batch = dm.collate(dm.examples("val")[:4])
    with torch.no_grad():
        torch.testing.assert_close(grown.eval()(batch), plain.eval()(batch))  # the new layer is the identity at init
    trainable = {n for n, p in grown.prm.named_parameters() if p.requires_grad}
    assert any(".layers.1.mlp.down_proj.base_layer.weight" in n for n in trainable)  # the new layer trains in full ...
    assert not any(".layers.0." in n and "lora_" not in n for n in trainable)  # ... the old ones only via LoRA
    trainer(tmp_path, 3).fit(grown, dm)
    grown.export(str(tmp_path / "prm"))
    from hca.prm.model import load_prm

    prm = load_prm(tmp_path / "prm")
    assert prm.model.backbone.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(prm.model(batch.input_ids, batch.attention_mask, batch.positions)),
                                   torch.sigmoid(grown.eval()(batch)), atol=1e-5, rtol=1e-5)


def test_progress_bar_counts_prm_steps_of_the_total(coll, tmp_path, capsys):
    """Under trainer.max_steps the training bar reads "PRM step k/max_steps", not "Epoch 0/-2"."""
    from hca.runtime.progress import StepProgressBar

    module, dm = make(coll)
    tr = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=True, enable_model_summary=False,
                   enable_checkpointing=False, default_root_dir=str(tmp_path), limit_val_batches=0)
    tr.fit(module, dm)
    assert isinstance(tr.progress_bar_callback, StepProgressBar)
    assert tr.progress_bar_callback.train_progress_bar.n == 3
    err = capsys.readouterr().out  # Lightning's tqdm bars write to stdout
    assert "PRM step" in err and all(f"{k}/3" in err for k in (1, 2, 3)) and "Epoch" not in err
