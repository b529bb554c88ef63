"""benchmarks/gpu_check.py (``make gpu-check``): the CPU dry run runs every part at tiny shapes and
writes finite figures; a part that cannot run makes the exit status non-zero; the figures it derives
from a shape (parameters, bytes) match a real model of that shape."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PARTS = ("rl", "logp_gap", "lean_memory", "static_compile")
KEY_FIGURES = {
    "rl": ("grpo_rl_steps_per_s", "hca_rl_steps_per_s", "grpo_samples_per_s", "hca_samples_per_s",
           "grpo_generated_tokens_per_s", "grpo_hbm_roofline_fraction_decode", "grpo_median_time_generation_s",
           "hca_median_time_scoring_s"),
    "logp_gap": ("bf16_mixed_init_rollout_logp_gap", "bf16_weights_init_rollout_logp_gap",
                 "bf16_mixed_sharp_rollout_logp_gap_max"),
    "lean_memory": ("peak_mib_lean", "peak_mib_naive", "peak_ratio_naive_over_lean", "tokens_per_s_lean"),
    "static_compile": ("tok_s_dynamic", "tok_s_static", "tok_s_compiled", "speedup_compiled_vs_dynamic",
                       "hbm_roofline_fraction_compiled", "compile_first_call_s"),
}


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def test_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _run("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "dry-run" and report["ok"] is True
    assert (report["parts_ok"], report["parts_total"]) == (4, 4)
    assert set(report["parts"]) == set(PARTS)
    for name in PARTS:
        part = report["parts"][name]
        assert part["ok"] and "error" not in part, (name, part.get("error"))
        figures = part["figures"]
        for key, value in figures.items():
            assert isinstance(value, (int, float)) and math.isfinite(value), (name, key, value)
        missing = [k for k in KEY_FIGURES[name] if k not in figures]
        assert not missing, (name, missing)
    assert report["parts"]["rl"]["info"]["vocab"].startswith("synthetic byte-level BPE of 512 tokens")
    assert report["parts"]["lean_memory"]["figures"]["peak_mib_lean"] > 0
    assert report["roofline_formula"].startswith("fraction = ")
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check ok=4/4 mode=dry-run"), last
    assert not list(tmp_path.glob("*.tmp")), "the JSON is written through a temporary file, then renamed"


def test_out_of_budget_parts_fail_the_run(tmp_path):
    """A part that does not run (here: no time budget at all) is an error in the JSON and exit status 1."""
    out = tmp_path / "gpu_check.json"
    proc = _run("--dry-run", "--out", str(out), "--parts", "rl,static_compile", "--budget-s", "0", timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["ok"] is False and report["parts_ok"] == 0 and report["parts_total"] == 2
    for name in ("rl", "static_compile"):
        assert report["parts"][name]["ok"] is False and "budget" in report["parts"][name]["error"]
    assert proc.stdout.strip().splitlines()[-1].startswith("gpu_check ok=0/2")


@pytest.mark.parametrize("shape_name", ["SMOLLM2_135M", "TINY_LLAMA"])
def test_shape_facts_match_a_real_model(shape_name):
    """The parameter count behind the HBM roofline (weights read per decode step) is the model's own;
    SmolLM2-135M's is 134,515,008 (its published size, 135M)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    shape = getattr(gpu_check, shape_name)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    params = sum(p.numel() for p in model.parameters())  # tied head: one parameter
    facts = gpu_check.model_facts(shape)
    assert facts["params"] == params
    assert facts["weight_bytes_bf16"] == 2 * params
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    assert facts["kv_bytes_per_token"] == 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * 2
    if shape_name == "SMOLLM2_135M":
        assert params == 134_515_008


def test_synthetic_tokenizer_has_the_exact_vocabulary_and_round_trips():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    tok = gpu_check.synthetic_tokenizer(600)
    assert len(tok) == 600 and tok.eos_token_id == tok.pad_token_id == 0
    text = "Q: 12+7*3=? A: 33\n12+7=19"
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert tok.decode(ids) == text
    assert tok("!!", add_special_tokens=True)["input_ids"] == [tok.convert_tokens_to_ids("!!")]  # merges apply
    assert isinstance(tok.decode(list(range(600)), skip_special_tokens=True), str)  # every id decodes


def test_a_failing_part_keeps_its_figures_and_fails_the_run(tmp_path):
    """A part that raises after some figures: its error and those figures are in the JSON, exit status 1."""
    out = tmp_path / "gpu_check.json"
    env_part = {"GPU_CHECK_INJECT_FAILURE": "logp_gap"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--parts", "logp_gap"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=os.environ | {"OMP_NUM_THREADS": "1"} | env_part)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    part = json.loads(out.read_text())["parts"]["logp_gap"]
    assert part["ok"] is False and "injected failure" in part["error"] and "traceback" in part
    assert math.isfinite(part["figures"]["bf16_weights_sharp_rollout_logp_gap"])
