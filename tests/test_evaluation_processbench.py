"""ProcessBench: the shipped files load with the documented counts; the evaluator's F1 on
hand-made cases; steps are scored as given even when they contain the join string."""
from __future__ import annotations

import json

import pytest

from hca.evaluation.processbench import (SPLITS, data_dir, evaluate_prm, load_processbench, predicted_errors,
                                         response_and_spans)

HAVE_DATA = (data_dir() / "processbench" / "gsm8k.json").exists()


@pytest.mark.skipif(not HAVE_DATA, reason="shared ProcessBench data not present")
def test_loader_counts_match_the_readme():
    expect = {"gsm8k": (400, 193), "math": (1000, 406), "olympiadbench": (1000, 339), "omnimath": (1000, 241)}
    for split in SPLITS:
        items = load_processbench(split)
        assert (len(items), sum(it.label == -1 for it in items)) == expect[split], split
        assert sum(it.final_answer_correct for it in items) == len(items) // 2
        assert all(-1 <= it.label < len(it.steps) for it in items)


def test_env_override_and_bad_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HCA_SHARED_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="HCA_SHARED_DATA"):
        load_processbench("gsm8k")
    (tmp_path / "processbench").mkdir()
    good = {"id": "g-0", "generator": "x", "problem": "1+1?", "steps": ["1+1=2", "So 2."], "final_answer_correct": True,
            "label": -1}
    (tmp_path / "processbench" / "gsm8k.json").write_text(json.dumps([good, {**good, "label": 5}]))
    with pytest.raises(ValueError, match=r"gsm8k.json: item 1: label 5"):
        load_processbench("gsm8k")
    (tmp_path / "processbench" / "gsm8k.json").write_text(json.dumps([good, {k: v for k, v in good.items() if k != "steps"}]))
    with pytest.raises(ValueError, match=r"item 1: missing field 'steps'"):
        load_processbench("gsm8k")
    with pytest.raises(ValueError, match="split"):
        load_processbench("aime")


def test_spans_keep_steps_that_contain_the_join():
    text, spans = response_and_spans(["a\n\nb", "c", "d"])
    assert text == "a\n\nb\n\nc\n\nd"
    assert [text[a:b] for a, b in spans] == ["a\n\nb\n\n", "c\n\n", "d"]


def test_predicted_errors_and_f1(tmp_path, monkeypatch):
    assert predicted_errors([[0.9, 0.4, 0.1], [0.9, 0.8], [0.2]], 0.5) == [1, -1, 0]

    class Scripted:  # values of h_0..h_K chosen per item
        def __init__(self, table):
            self.table = table

        def values_at_spans(self, prompts, responses, spans):
            assert all(len(s) == len(self.table[i]) - 1 for i, s in enumerate(spans))
            return self.table

    root = tmp_path
    (root / "processbench").mkdir()
    items = [{"id": f"g-{i}", "generator": "x", "problem": "p", "steps": ["s1", "s2", "s3"],
              "final_answer_correct": lab == -1, "label": lab} for i, lab in enumerate([1, 2, -1, -1])]
    (root / "processbench" / "gsm8k.json").write_text(json.dumps(items))
    table = [[0.9, 0.8, 0.2, 0.1],   # predicted 1 == label 1: hit
             [0.9, 0.3, 0.2, 0.1],   # predicted 0 != 2: miss
             [0.9, 0.8, 0.7, 0.6],   # predicted -1: hit
             [0.9, 0.8, 0.7, 0.6]]   # hit
    r = evaluate_prm(Scripted(table), "gsm8k", threshold=0.5, root=root)
    assert (r["acc_erroneous"], r["acc_correct"]) == (0.5, 1.0) and r["f1"] == pytest.approx(2 / 3)
    assert r["counts"] == {"erroneous": 2, "erroneous_hit": 1, "correct": 2, "correct_hit": 2}


@pytest.mark.skipif(not HAVE_DATA, reason="shared ProcessBench data not present")
def test_real_prm_runs_on_real_items(tmp_path):
    """An untrained tiny PRM through the whole evaluator on 3 real items (plumbing only)."""
    from builders import TINY

    from hca.modules.prm import PRMModule
    from hca.prm.scorer import PRMScorer

    m = PRMModule(backbone=TINY, tokenizer="tiny-llama")
    m.configure_model()
    m.export(str(tmp_path / "prm"))
    r = evaluate_prm(PRMScorer(str(tmp_path / "prm"), device="cpu", max_length=4096), "gsm8k", limit=3)
    assert r["items"] == 3 and sum(r["counts"][k] for k in ("erroneous", "correct")) == 3
