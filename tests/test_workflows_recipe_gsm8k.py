"""The real-text path on CPU, no download: tiny Qwen2-architecture policy and prover with a BPE
tokenizer trained here on GSM8K text (a ChatML chat template set on it), a PRM backbone of another
family with a *different* tokenizer, and a handful of GSM8K problems through the GSM8K recipe:
collection -> PRM -> RL (GRPO and HCA, two RL steps each) -> evaluation, then a rerun that skips
everything. Checks the content, not only that it ran."""
import json
from pathlib import Path

import pytest
import torch

from hca.evaluation.processbench import data_dir

GSM8K = data_dir() / "gsm8k" / "train.jsonl"
pytestmark = pytest.mark.skipif(not GSM8K.exists(), reason="shared GSM8K data absent")


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    from builders.recipe import run_tiny_recipe

    return run_tiny_recipe(tmp_path_factory.mktemp("recipe"), GSM8K, sft_steps=40, text_limit=400)


def _records(out: Path):
    from hca.data.trajectories import read_dataset

    return read_dataset(out / "collect")


def test_collection_cuts_steps_on_blank_lines_and_labels_in_unit_interval(recipe_run):
    models, out, _ = recipe_run
    manifest, recs = _records(out)
    assert manifest["complete"] and len({r.problem_id for r in recs}) == 8 and len(recs) == 16
    assert all(r.prompt.startswith("<|im_start|>user\n") and r.prompt.endswith("<|im_start|>assistant\n") for r in recs)
    multi = [r for r in recs if r.num_steps > 1]
    assert multi, "the SFT'd tiny policy should write at least one blank-line separated step"
    for r in recs:
        texts = [r.response[a:b] for a, b in r.step_spans]
        assert "".join(texts) == r.response
        assert all(t.endswith("\n\n") for t in texts[:-1])  # a step ends with its blank line(s) ...
        assert all("\n\n" not in t.strip("\n") for t in texts)  # ... and holds no other (leading ones: step 1)
        assert all(v is None or 0.0 <= v <= 1.0 for v in r.values)
        assert r.values[-1] == r.outcome and all(c[1] == 2 for c in r.counts if c)
    fmt = manifest["identity"]["module"]["prompt_format"]
    assert fmt["style"] == "chat" and "<<question>>" in fmt["rendered"]


def test_prm_reads_its_value_at_step_ends_with_its_own_tokenizer(recipe_run):
    from hca.prm.scorer import PRMScorer
    from hca.steps import split_steps
    from transformers import AutoTokenizer

    models, out, _ = recipe_run
    manifest, recs = _records(out)
    export = out / "prm" / "model"
    cfg = json.loads((export / "prm_config.json").read_text())
    assert cfg["prompt_format"] == manifest["identity"]["module"]["prompt_format"]
    policy_tok, prm_tok = AutoTokenizer.from_pretrained(models["policy"]), AutoTokenizer.from_pretrained(str(export))
    assert policy_tok.get_vocab() != prm_tok.get_vocab()  # a different tokenizer: the PRM re-tokenizes the text
    scorer = PRMScorer(str(export), device="cpu")
    r = max(recs, key=lambda x: x.num_steps)
    ids, positions, cut = scorer._encode(prm_tok, r.prompt, r.response, split_steps(r.response, "\n\n"))
    assert not cut and len(positions) == r.num_steps + 1
    offsets = prm_tok(r.prompt + r.response, return_offsets_mapping=True)["offset_mapping"]
    ends = [len(r.prompt)] + [len(r.prompt) + b for _, b in r.step_spans]
    for pos, end in zip(positions, ends):  # h_k is read at the last token lying wholly inside h_k (hca.steps)
        assert offsets[pos][1] <= end and (pos + 1 == len(offsets) or offsets[pos + 1][1] > end)
    assert any(offsets[pos][1] == end for pos, end in zip(positions[1:], ends[1:]))
    values = scorer.values([r.prompt], [r.response], "\n\n")[0]
    assert len(values) == r.num_steps + 1 and all(0.0 < v < 1.0 for v in values)


def test_rl_changed_the_weights_and_evaluation_covers_every_checkpoint(recipe_run):
    from hca.models.loading import load_causal_lm

    models, out, _ = recipe_run
    import csv

    start = load_causal_lm(models["policy"]).state_dict()
    for method in ("grpo", "hca"):
        trained = load_causal_lm(str(out / "rl" / method / "model")).state_dict()
        changed = any(not torch.equal(start[k], trained[k]) for k in start)
        logs = sorted((out / "rl" / method / "logs").rglob("metrics.csv"))
        rows = [r for r in csv.DictReader(logs[-1].open()) if r.get("train/rl_step")]
        assert [float(r["train/rl_step"]) for r in rows] == [1.0, 2.0]
        rewards = [float(r["train/reward"]) for r in rows]
        if method == "hca":  # dense credit moves the weights even when every response fails
            assert changed
        elif all(x == 0.0 for x in rewards):  # GRPO: all-fail groups give zero advantage, so nothing may change
            assert not changed
        else:
            assert changed
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev) == {"start", "grpo", "hca"}
    assert all(0.0 <= r["pass@1"] <= 1.0 and "pass@2" in r for r in ev.values())


def test_rl_refuses_a_prm_of_another_prompt_format(recipe_run):
    from hca.modules.policy import HCAPolicyModule
    from hca.prm.scorer import PRMScorer
    from hca.data.prompts import PromptFormatError
    from hca.rl.batch import CreditConfig

    models, out, _ = recipe_run
    scorer = PRMScorer(str(out / "prm" / "model"), device="cpu")
    credit = CreditConfig(progress_coef=1.0)
    other = HCAPolicyModule(policy=models["policy"], scorer=scorer, credit=credit,
                            prompt={"instruction": "Answer in one line."})
    other.configure_model()
    with pytest.raises(PromptFormatError, match="another format than the policy's"):
        other.check_prompt_format()
    same = HCAPolicyModule(policy=models["policy"], scorer=scorer, credit=credit)
    same.configure_model()
    same.check_prompt_format()
    forced = HCAPolicyModule(policy=models["policy"], scorer=scorer, credit=credit,
                             prompt={"instruction": "Answer in one line."}, allow_prompt_format_mismatch=True)
    forced.configure_model()
    forced.check_prompt_format()


def test_rerun_skips_every_finished_stage(recipe_run, capsys):
    from hca.workflows.pipeline import run_stages

    _, out, stages = recipe_run
    before = {p: p.stat().st_mtime for p in out.rglob("*") if p.is_file()}
    run_stages(stages, log_dir=str(out / "logs"))
    text = capsys.readouterr().out
    assert text.count("already done, skipped") == len(stages)
    assert {p: p.stat().st_mtime for p in out.rglob("*") if p.is_file()} == before
