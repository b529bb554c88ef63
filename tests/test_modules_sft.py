"""SFT: a few real optimizer steps on a tiny model change the weights, export a loadable HF
checkpoint, log held-out sampled pass@k, and resume to the same weights."""
import lightning as L
import torch

from hca.datamodules.sft import ArithmeticData, SFTDataModule
from hca.modules.sft import SamplingEval, SFTModule
from hca.data.arithmetic import ArithmeticConfig

TINY = "tiny-llama:hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,num_key_value_heads=1"


def make(tmp_path, sampling_eval=None, export=True):
    data_dir = tmp_path / "data"
    arith = ArithmeticData(out_dir=str(data_dir), num_train=128, num_val=8, num_test=8, seed=0,
                           difficulty=ArithmeticConfig(min_steps=2, max_steps=3))
    dm = SFTDataModule(tokenizer="tiny-llama", train_file=str(data_dir / "train.jsonl"), val_file=str(data_dir / "val.jsonl"),
                       arithmetic=arith, batch_size=8)
    module = SFTModule(model=TINY, tokenizer="tiny-llama", sampling_eval=sampling_eval,
                       export_dir=str(tmp_path / "model") if export else None,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    return module, dm


def trainer(tmp_path, max_steps, **kw):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0, **kw)


def test_sft_trains_exports_and_evaluates(tmp_path):
    from hca.models.loading import load_causal_lm, load_tokenizer

    module, dm = make(tmp_path, SamplingEval(num_problems=4, n=2, ks=(1, 2), max_new_tokens=24))
    module.configure_model()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    tr = trainer(tmp_path, 6, val_check_interval=6, enable_checkpointing=False)
    tr.fit(module, dm)
    after = module.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), f"unchanged parameters: {set(before) - set(changed)}"
    for key in ("val/loss", "val/pass@1", "val/pass@2", "val/maj@2", "val/truncated_frac"):
        assert key in tr.callback_metrics, key
    assert 0.0 <= float(tr.callback_metrics["val/pass@1"]) <= 1.0
    # The export is an ordinary HF checkpoint with identical weights and tokenizer.
    tok, model = load_tokenizer(str(tmp_path / "model")), load_causal_lm(str(tmp_path / "model"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, after[k])
    assert tok("Q:1+2\n").input_ids == module.tokenizer("Q:1+2\n").input_ids


def test_sft_loss_decreases(tmp_path):
    module, dm = make(tmp_path, export=False)
    tr = trainer(tmp_path, 30, limit_val_batches=0, enable_checkpointing=False, log_every_n_steps=1)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    tr.callbacks.append(Record())
    tr.fit(module, dm)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_sft_resume_matches_straight_run(tmp_path):
    """4 steps straight == resume from the step-2 checkpoint of another run for 2 more steps
    (same weights: same data order mid-epoch, same optimizer state)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    m1, d1 = make(tmp_path / "a", export=False)
    trainer(tmp_path / "a", 4, limit_val_batches=0, enable_checkpointing=False).fit(m1, d1)

    L.seed_everything(0)
    m2, d2 = make(tmp_path / "b", export=False)
    ck = ModelCheckpoint(dirpath=tmp_path / "b" / "ck", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer(tmp_path / "b", 3, limit_val_batches=0, callbacks=[ck]).fit(m2, d2)  # "killed" after step 3
    mid = tmp_path / "b" / "ck" / "step=2.ckpt"
    assert mid.exists()

    L.seed_everything(123)  # resume must not depend on the ambient seed
    m3, d3 = make(tmp_path / "b", export=False)
    trainer(tmp_path / "b", 4, limit_val_batches=0, enable_checkpointing=False).fit(m3, d3, ckpt_path=str(mid))
    for k, v in m1.model.state_dict().items():
        torch.testing.assert_close(m3.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert not torch.equal(m2.model.state_dict()[k], v)  # the 3-step run really differs


def test_datamodule_masks_prompt_and_appends_eos(tmp_path):
    _, dm = make(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    ids, labels, attn = batch["input_ids"][0], batch["labels"][0], batch["attention_mask"][0]
    n = int(attn.sum())
    text = tok.decode(ids[:n], skip_special_tokens=False)
    resp = labels[labels != -100]
    assert resp[-1].item() == tok.eos_token_id
    assert text.startswith("<s>Q:")
    prompt_len = n - len(resp)
    assert tok.decode(ids[:prompt_len], skip_special_tokens=True).endswith("\n")
    assert (labels[:prompt_len] == -100).all() and (labels[n:] == -100).all()


def test_careful_solutions_replace_shortcut_lines(tmp_path):
    data_dir = tmp_path / "data"
    arith = ArithmeticData(out_dir=str(data_dir), num_train=64, num_val=8, num_test=8, seed=0,
                           difficulty=ArithmeticConfig(min_steps=3, max_steps=4, shortcut_prob=0.5))
    kw = dict(tokenizer="tiny-llama", train_file=str(data_dir / "train.jsonl"), val_file=str(data_dir / "val.jsonl"),
              arithmetic=arith, batch_size=8)
    mixed, careful = SFTDataModule(**kw), SFTDataModule(**kw, careful_solutions=True)
    for dm in (mixed, careful):
        dm.prepare_data()
        dm.setup("fit")
    merged = [(a, b) for a, b in zip(mixed.train_problems, careful.train_problems) if a.solution != b.solution]
    assert merged  # shortcut_prob 0.5 merged some lines
    for a, b in merged:
        assert b.solution.count("\n") > a.solution.count("\n") and a.answer == b.answer
        assert all(line.count("=") == 1 and sum(line.count(o) for o in "+-*") == 1 for line in b.solution.split("\n"))
    assert careful.tokenizer.decode(careful.train_examples[0][0][careful.train_examples[0][1]:]).startswith(
        careful.train_problems[0].solution)


def test_progress_bar_counts_sft_steps_of_the_total(tmp_path, capsys):
    """Under trainer.max_steps the training bar reads "SFT step k/max_steps", not "Epoch 0/-2"."""
    from hca.runtime.progress import StepProgressBar

    module, dm = make(tmp_path, export=False)
    tr = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=True, enable_model_summary=False,
                   enable_checkpointing=False, default_root_dir=str(tmp_path), limit_val_batches=0)
    tr.fit(module, dm)
    assert isinstance(tr.progress_bar_callback, StepProgressBar)
    out = capsys.readouterr().out  # Lightning's tqdm bars write to stdout
    assert "SFT step" in out and all(f"{k}/3" in out for k in (1, 2, 3)) and "Epoch" not in out
