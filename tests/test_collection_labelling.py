"""Tests of hca/collection/labelling.py (labels against hand-computed values with a fake deterministic engine,
and on tiny random models) and of the problem-chunk datamodule (bad input, resume, sharding)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from hca.collection.labelling import CollectionConfig, label_chunk
from hca.rollout.seeds import derive_seed
from hca.datamodules.problems import ProblemChunkDataModule, make_chunks, pending_chunks
from hca.data.problems import Problem, ProblemFileError, load_problems
from hca.rollout import RolloutBatch
from hca.data.trajectories import shard_name, validate_record, write_shard

EOS = 2


class FakeEngine:
    """Deterministic engine: ``table[prompt]`` lists ``(text, finish_reason)`` outcomes; the samples of
    a prompt string take them in turn (cycled), across repeated copies of the prompt and across calls.
    Records every call's prompts and params."""

    def __init__(self, table: dict[str, list[tuple[str, str]]], default: tuple[str, str] = ("0", "eos")):
        self.table, self.default, self.calls, self.used = table, default, [], {}

    def generate(self, prompts, params, *, progress=False) -> RolloutBatch:
        self.calls.append((list(prompts), params))
        texts, reasons, pidx = [], [], []
        for i, p in enumerate(prompts):
            outs = self.table.get(p, [self.default])
            for _ in range(params.n):
                j = self.used.get(p, 0)
                self.used[p] = j + 1
                text, why = outs[j % len(outs)]
                texts.append(text)
                reasons.append(why)
                pidx.append(i)
        ids = [[4 + ord(c) % 90 for c in t] + ([EOS] if w == "eos" else []) for t, w in zip(texts, reasons)]
        T = max([len(x) for x in ids] + [1])
        rid = torch.zeros((len(ids), T), dtype=torch.long)
        mask = torch.zeros((len(ids), T), dtype=torch.bool)
        for r, x in enumerate(ids):
            rid[r, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[r, :len(x)] = True
        return RolloutBatch(prompt_index=torch.tensor(pidx, dtype=torch.long), prompt_ids=[[1] for _ in ids],
                            response_ids=rid, response_mask=mask, logprobs=torch.zeros(rid.shape),
                            entropy=torch.zeros(rid.shape), finish_reason=reasons, texts=texts)


def arith(pid: str, start: int, ops: list[tuple[str, int]]) -> Problem:
    v = start
    expr = str(start)
    for op, b in ops:
        v = {"+": v + b, "-": v - b, "*": v * b}[op]
        expr += f"{op}{b}"
    return Problem(id=pid, prompt=f"Q:{expr}\n", answer=str(v), task="arithmetic",
                   meta={"start": start, "ops": [[op, b] for op, b in ops]})


P1 = arith("p1", 2, [("+", 3), ("*", 4)])  # Q:2+3*4\n -> 5, 20
CFG = CollectionConfig(num_responses=3, num_rollouts=4, num_rollouts_h0=4, delimiter="\n")


def hand_engines():
    policy = FakeEngine({P1.prompt: [("2+3=5\n5*4=20", "eos"), ("2+3=6\n6*4=24", "eos"), ("2+3=5\n5*4=20", "length")]})
    prover = FakeEngine({
        P1.prompt: [("2+3=5\n5*4=20", "eos"), ("2+3=5\n5*4=21", "eos")],  # h_0: 2/4
        P1.prompt + "2+3=5\n": [("5*4=20", "eos"), ("5*4=20", "eos"), ("5*4=21", "eos"), ("5*4=20", "length")],  # 2/4
        P1.prompt + "2+3=6\n": [("6*4=24", "eos")],  # 0/4
    })
    return policy, prover


def test_labels_match_hand_computed_values():
    policy, prover = hand_engines()
    recs, st = label_chunk([P1], policy, prover, CFG, seed=7, chunk_id=3)
    assert [r.response_index for r in recs] == [0, 1, 2]
    r0, r1, r2 = recs
    assert (r0.outcome, r1.outcome, r2.outcome) == (1, 0, 0)
    assert (r0.truncated, r1.truncated, r2.truncated) == (False, False, True)  # a cut response is kept, outcome 0
    assert r0.step_spans == [[0, 6], [6, 12]]
    assert r0.counts == [[2, 4], [2, 4]] and r0.values == [0.5, 0.5, 1.0] and r0.progress == [0.0, 0.5]
    assert r1.counts == [[2, 4], [0, 4]] and r1.values == [0.5, 0.0, 0.0] and r1.progress == [-0.5, 0.0]
    assert r2.counts == [[2, 4], [2, 4]] and r2.values == [0.5, 0.5, 0.0] and r2.progress == [0.0, -0.5]
    assert all(r.h0_count == [2, 4] and r.labeled_steps == 2 for r in recs)
    assert r0.step_correct == [True, True] and r1.step_correct == [False, False] and r2.step_correct == [True, True]
    assert r0.response_token_ids[-1] == EOS and r2.response_token_ids[-1] != EOS
    assert all(r.seed == 7 and r.chunk_id == 3 and r.delimiter == "\n" for r in recs)
    # one policy call, one prover call holding h_0 once and each unique prefix once (dedupe)
    assert len(policy.calls) == 1 and len(prover.calls) == 1
    prompts, params = prover.calls[0]
    assert sorted(prompts) == sorted([P1.prompt, P1.prompt + "2+3=5\n", P1.prompt + "2+3=6\n"]) and params.n == 4
    assert params.seed == derive_seed(7, 3, "prover/1") and policy.calls[0][1].seed == derive_seed(7, 3, "policy")
    assert (st.problems, st.responses, st.correct, st.truncated, st.steps) == (1, 3, 1, 1, 6)
    assert (st.prefixes_labeled, st.prefixes_unique, st.prefixes_deduped) == (4, 3, 1)
    assert (st.prover_calls, st.prover_generations, st.policy_tokens) == (1, 12, 13 + 13 + 12)
    for r in recs:
        validate_record(r.to_dict())


def test_progress_telescopes():
    policy, prover = hand_engines()
    recs, _ = label_chunk([P1], policy, prover, CFG, seed=0)
    for r in recs:
        assert math.isclose(sum(r.progress), r.outcome - r.values[0], abs_tol=1e-12)


def test_best_of_k_transforms_values_not_counts():
    policy, prover = hand_engines()
    recs, _ = label_chunk([P1], policy, prover, CollectionConfig(**{**CFG.to_dict(), "best_of_k": 2}), seed=0)
    r0, r1, _ = recs
    assert r0.counts == [[2, 4], [2, 4]] and r0.values == [0.75, 0.75, 1.0] and r0.progress == [0.0, 0.25]
    assert r1.values == [0.75, 0.0, 0.0] and r1.progress == [-0.75, 0.0]
    assert CollectionConfig(best_of_k=3).transform(1, 4) == pytest.approx(1 - 0.75 ** 3)


def test_h0_rollouts_differ_from_m_in_one_call():
    policy, prover = hand_engines()
    cfg = CollectionConfig(**{**CFG.to_dict(), "num_rollouts": 2, "num_rollouts_h0": 6})
    recs, st = label_chunk([P1], policy, prover, cfg, seed=0)
    prompts, params = prover.calls[0]
    assert len(prover.calls) == 1 and params.n == 2 and prompts.count(P1.prompt) == 3  # gcd(2, 6) = 2, h_0 x 3
    assert recs[0].h0_count == [3, 6] and recs[0].counts[1] == [2, 2] and recs[1].counts[1] == [0, 2]
    assert st.prover_generations == 6 + 2 + 2


def test_dedupe_off_estimates_every_prefix():
    policy, prover = hand_engines()
    recs, st = label_chunk([P1], policy, prover, CollectionConfig(**{**CFG.to_dict(), "dedupe": False}), seed=0)
    assert (st.prefixes_labeled, st.prefixes_unique, st.prefixes_deduped) == (4, 4, 0)
    assert prover.calls[0][0].count(P1.prompt + "2+3=5\n") == 2 and st.prover_generations == 16
    # the shared prefix now has two estimates from the cycled table: samples 0-3 and 4-7
    assert recs[0].counts[1] == [2, 4] and recs[2].counts[1] == [2, 4]


P2 = arith("p2", 2, [("+", 3), ("*", 4), ("-", 1)])  # Q:2+3*4-1\n -> 5, 20, 19


def test_first_pit_stops_labelling_after_zero_value():
    dead, good = "2+3=6\n6*4=24\n24-1=23", "2+3=5\n5*4=20\n20-1=19"
    table = {P2.prompt: [("2+3=5\n5*4=20\n20-1=19", "eos")],
             P2.prompt + "2+3=6\n": [("x", "eos")],  # V̂(h_1) = 0 for the dead response
             P2.prompt + "2+3=5\n": [("5*4=20\n20-1=19", "eos")],
             P2.prompt + "2+3=5\n5*4=20\n": [("20-1=19", "eos")]}
    cfg = CollectionConfig(num_responses=2, num_rollouts=4, delimiter="\n", first_pit=True)
    policy, prover = FakeEngine({P2.prompt: [(dead, "eos"), (good, "eos")]}), FakeEngine(table)
    (rd, rg), st = label_chunk([P2], policy, prover, cfg, seed=0)
    assert rd.counts == [[4, 4], [0, 4], None] and rd.values == [1.0, 0.0, None, 0.0]
    assert rd.progress == [-1.0, None, None] and rd.labeled_steps == 1
    assert rg.counts == [[4, 4], [4, 4], [4, 4]] and rg.progress == [0.0, 0.0, 0.0] and rg.labeled_steps == 3
    assert len(prover.calls) == 2  # round 1: h_0 and h_1 of both; round 2: h_2 of the live response only
    assert sorted(prover.calls[0][0]) == sorted([P2.prompt, P2.prompt + "2+3=6\n", P2.prompt + "2+3=5\n"])
    assert prover.calls[1][0] == [P2.prompt + "2+3=5\n5*4=20\n"]
    assert st.prefixes_skipped_first_pit == 1 and st.prefixes_labeled == 1 + 1 + 2
    validate_record(rd.to_dict())
    # without first pit, the dead response's h_2 is estimated too, in the same single call
    policy, prover = FakeEngine({P2.prompt: [(dead, "eos"), (good, "eos")]}), FakeEngine(table)
    (rd, _), st = label_chunk([P2], policy, prover, CollectionConfig(num_responses=2, num_rollouts=4, delimiter="\n"), 0)
    assert len(prover.calls) == 1 and rd.counts[2] == [0, 4] and rd.labeled_steps == 3
    assert st.prefixes_skipped_first_pit == 0


def test_first_pit_with_pit_at_last_prefix_keeps_all_progress():
    table = {P1.prompt: [("2+3=5\n5*4=20", "eos")], P1.prompt + "2+3=6\n": [("x", "eos")]}
    cfg = CollectionConfig(num_responses=1, num_rollouts=2, delimiter="\n", first_pit=True)
    (r,), _ = label_chunk([P1], FakeEngine({P1.prompt: [("2+3=6\n6*4=24", "eos")]}), FakeEngine(table), cfg, 0)
    assert r.values == [1.0, 0.0, 0.0] and r.progress == [-1.0, 0.0] and r.labeled_steps == 2


def test_no_delimiter_and_empty_response():
    policy = FakeEngine({P1.prompt: [("20", "eos"), ("", "eos")]})
    prover = FakeEngine({P1.prompt: [("2+3=5\n5*4=20", "eos"), ("no", "eos")]})
    (one, empty), st = label_chunk([P1], policy, prover, CollectionConfig(num_responses=2, num_rollouts=2, delimiter="\n"), 0)
    assert one.step_spans == [[0, 2]] and one.counts == [[1, 2]] and one.values == [0.5, 1.0] and one.progress == [0.5]
    assert empty.step_spans == [] and empty.counts == [] and empty.values == [0.0] and empty.progress == []
    assert empty.labeled_steps == 0 and empty.h0_count == [1, 2] and empty.response_token_ids == [EOS]
    assert prover.calls[0][0] == [P1.prompt]  # only h_0 needed rollouts
    assert st.prefixes_labeled == 1 and st.prover_generations == 2
    validate_record(empty.to_dict())


def test_prover_completion_cut_at_budget_counts_as_wrong():
    policy = FakeEngine({P1.prompt: [("20", "eos")]})
    prover = FakeEngine({P1.prompt: [("2+3=5\n5*4=20", "length")]})
    (r,), _ = label_chunk([P1], policy, prover, CollectionConfig(num_responses=1, num_rollouts=3, delimiter="\n"), 0)
    assert r.h0_count == [0, 3]


def test_config_validation():
    with pytest.raises(ValueError, match="num_rollouts"):
        CollectionConfig(num_rollouts=0)
    with pytest.raises(ValueError, match="delimiter"):
        CollectionConfig(delimiter="")
    with pytest.raises(ValueError, match="temperature"):
        CollectionConfig(prover={"temperature": 0.0})
    assert CollectionConfig(num_rollouts=3).rollouts_h0 == 3


def test_sampling_settings_prover_defaults_to_the_policy():
    from hca.rollout import SamplingParams

    cfg = CollectionConfig(num_responses=3, policy={"max_new_tokens": 40, "temperature": 0.7, "top_p": 0.9})
    assert cfg.prover == cfg.policy == SamplingParams(max_new_tokens=40, temperature=0.7, top_p=0.9)
    assert cfg.prover_params(5, 2) == SamplingParams(max_new_tokens=40, temperature=0.7, top_p=0.9, n=2, seed=5)
    assert cfg.policy_params(6) == SamplingParams(max_new_tokens=40, temperature=0.7, top_p=0.9, n=3, seed=6)
    both = CollectionConfig(policy={"max_new_tokens": 40}, prover=SamplingParams(max_new_tokens=12))
    assert (both.policy.max_new_tokens, both.prover.max_new_tokens) == (40, 12)
    assert CollectionConfig().prover == CollectionConfig().policy == SamplingParams()
    # the manifest form round-trips (stop strings as lists)
    stops = CollectionConfig(policy={"stop": ["\n\n"]})
    assert stops.to_dict()["policy"]["stop"] == ["\n\n"] and CollectionConfig(**stops.to_dict()) == stops
    with pytest.raises(ValueError, match=r"collection\.prover: n and seed are set by the stage"):
        CollectionConfig(prover={"n": 4})
    with pytest.raises(ValueError, match=r"collection\.policy: unknown sampling settings \['max_batch_size'\]"):
        CollectionConfig(policy={"max_batch_size": 4})


# ------------------------------------------------------------------------------------------------ real engines
@pytest.fixture(scope="module")
def engines():
    from hca.models.loading import char_tokenizer, tiny_llama
    from hca.rollout import HFRolloutEngine

    tok = char_tokenizer()
    out = []
    for seed in (0, 1):
        m = tiny_llama(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, seed=seed).eval()
        out.append(HFRolloutEngine(m, tok, max_batch_size=64))
    return out


@pytest.fixture(scope="module")
def problems():
    from hca.data.arithmetic import generate_problems

    return [Problem(id=a.id, prompt=a.prompt, answer=a.answer, meta=a.to_record()["meta"])
            for a in generate_problems(6, seed=3)]


REAL = CollectionConfig(num_responses=3, num_rollouts=2, policy={"max_new_tokens": 40}, prover={"max_new_tokens": 12},
                        delimiter="\n")


def test_real_engines_records_are_valid_and_telescope(engines, problems):
    recs, st = label_chunk(problems[:3], *engines, REAL, seed=5, chunk_id=1)
    assert len(recs) == 9 and st.prover_calls == 1 and st.steps == sum(r.num_steps for r in recs)
    assert sum(r.num_steps > 1 for r in recs) >= 1, "no multi-step response: the test would not check prefixes"
    for r in recs:
        validate_record(r.to_dict())
        assert math.isclose(sum(r.progress), r.outcome - r.values[0], abs_tol=1e-12)
        assert r.step_correct is not None and len(r.step_correct) == r.num_steps
    again, _ = label_chunk(problems[:3], *engines, REAL, seed=5, chunk_id=1)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in recs]  # deterministic in (seed, chunk id)
    other, _ = label_chunk(problems[:3], *engines, REAL, seed=5, chunk_id=2)
    assert [r.response for r in other] != [r.response for r in recs]


def test_chunk_records_do_not_depend_on_world_size(engines, problems, tmp_path):
    chunks = make_chunks(problems, 2)

    def collect(world: int) -> list[dict]:
        out = []
        for rank in range(world):
            for c in pending_chunks(chunks, str(tmp_path), rank, world):
                out += [r.to_dict() for r in label_chunk(c.problems, *engines, REAL, seed=11, chunk_id=c.chunk_id)[0]]
        return sorted(out, key=lambda r: (r["problem_id"], r["response_index"]))

    one, two = collect(1), collect(2)
    assert len(one) == 6 * 3 and one == two


# ------------------------------------------------------------------------------------------------ datamodule
def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = [json.dumps({"id": f"q{i}", "prompt": f"Q:{i}+1\n", "answer": str(i + 1)}) for i in range(5)]


def test_datamodule_chunks_resume_and_rank_filter(tmp_path):
    f = write_lines(tmp_path / "p.jsonl", GOOD)
    dm = ProblemChunkDataModule(str(f), str(tmp_path / "out"), chunk_size=2)
    dm.setup("predict")
    assert [c.chunk_id for c in dm.chunks] == [0, 1, 2] and [len(c.problems) for c in dm.chunks] == [2, 2, 1]
    assert [c.chunk_id for c in dm.pending] == [0, 1, 2]
    write_shard(tmp_path / "out" / shard_name(1), [])
    (tmp_path / "out" / ".shard-000002.jsonl.tmp.123").write_text("partial")  # a killed writer's leftover
    dm.setup("predict")
    assert [c.chunk_id for c in dm.pending] == [0, 2]
    assert [c.chunk_id for c in pending_chunks(dm.chunks, str(tmp_path / "out"), 0, 2)] == [0, 2]
    assert [c.chunk_id for c in pending_chunks(dm.chunks, str(tmp_path / "out"), 1, 2)] == []
    batches = list(dm.predict_dataloader())
    assert [b.chunk_id for b in batches] == [0, 2] and batches[0].problems[0].id == "q0"
    write_shard(tmp_path / "out" / shard_name(0), [])
    write_shard(tmp_path / "out" / shard_name(2), [])
    dm.setup("predict")
    assert [b.chunk_id for b in dm.predict_dataloader()] == [-1]  # placeholder keeps every rank in the loop


def test_malformed_line_names_file_and_line(tmp_path):
    f = write_lines(tmp_path / "p.jsonl", GOOD[:2] + ['{"id": "bad", "prompt": '] + GOOD[2:])
    dm = ProblemChunkDataModule(str(f), str(tmp_path / "out"))
    with pytest.raises(ProblemFileError, match=r"p\.jsonl:3: invalid JSON"):
        dm.setup("predict")
    dm = ProblemChunkDataModule(str(f), str(tmp_path / "out"), skip_malformed=True)
    dm.setup("predict")
    assert len(dm.problems) == 5 and dm.num_skipped == 1 and dm.identity()["num_malformed_skipped"] == 1


def test_missing_answer_field(tmp_path):
    f = write_lines(tmp_path / "p.jsonl", GOOD[:1] + [json.dumps({"id": "x", "prompt": "Q:1\n"})])
    with pytest.raises(ProblemFileError, match=r"p\.jsonl:2: missing field answer"):
        load_problems(f)


def test_empty_problem_set_is_an_error(tmp_path):
    f = write_lines(tmp_path / "p.jsonl", ["", "  "])
    with pytest.raises(ProblemFileError, match="no problems"):
        ProblemChunkDataModule(str(f), str(tmp_path / "out")).setup("predict")
    with pytest.raises(ValueError, match="chunk_size"):
        ProblemChunkDataModule(str(f), str(tmp_path / "out"), chunk_size=0)


def test_collector_module_checks_models(tmp_path):
    from hca.modules.collector import CollectorModule

    m = CollectorModule(policy="runs/nowhere/model", prover="tiny-llama:seed=1")  # configs instantiate without models
    with pytest.raises(FileNotFoundError, match="policy checkpoint not found: 'runs/nowhere/model'"):
        m.identity()  # the writer's setup asks for it before anything is sampled
    with pytest.warns(UserWarning, match="the prover is the policy"):
        CollectorModule(policy="tiny-llama:seed=1", prover="tiny-llama:seed=1")
    import warnings

    with warnings.catch_warnings():  # best-of-K of the policy is a prover of its own (PAV): no warning
        warnings.simplefilter("error")
        CollectorModule(policy="tiny-llama:seed=1", prover="tiny-llama:seed=1", collection={"best_of_k": 4})
    m = CollectorModule(policy="tiny-llama:seed=0", prover="tiny-llama:seed=1", collection={"delimiter": "\n"})
    assert m.cfg.delimiter == "\n" and m.identity()["prover"]["kind"] == "tiny-spec"
    assert m.identity()["engine"] == {"policy": "hf", "prover": "hf", "max_batch_size": 256}  # tiny specs: HF
    m = CollectorModule(policy="tiny-llama:seed=0", prover="tiny-llama:seed=1", engine={"max_batch_size": 8})
    assert m.identity()["engine"]["max_batch_size"] == 8
    with pytest.raises(ValueError, match="model.init_args.engine: .*unexpected keyword"):
        CollectorModule(policy="tiny-llama:seed=0", prover="tiny-llama:seed=1", engine={"max_batch": 8})


def test_first_error_evidence_and_summary_on_hand_records():
    from hca.collection.report import first_error_evidence, summarize, text_histogram

    recs, _ = label_chunk([P1], *hand_engines(), CFG, seed=0)  # progress [0, .5], [-.5, 0], [0, -.5]
    ev = first_error_evidence(recs, -0.5)
    assert (ev.responses, ev.with_error, ev.flagged, ev.exact) == (3, 1, 2, 1)
    assert (ev.flag_before_error, ev.flag_after_error, ev.error_unflagged) == (1, 0, 0)
    assert (ev.precision, ev.recall, ev.detectable, ev.recall_detectable) == (0.5, 1.0, 1, 1.0)
    ev = first_error_evidence(recs, -0.75)
    assert (ev.flagged, ev.error_unflagged, ev.detectable, ev.precision) == (0, 1, 0, None)
    s = summarize(recs)
    assert (s["problems"], s["responses"], s["v_h0_mean"], s["progress_values"]) == (1, 3, 0.5, 6)
    assert s["progress_negative_frac"] == pytest.approx(2 / 6) and summarize([])["outcome_mean"] is None
    hist = text_histogram([-1.0, -0.5, 0.0, 0.0, 1.0], -1.0, 1.0, bins=4).splitlines()
    assert [int(line.split()[2]) for line in hist] == [1, 1, 2, 1]
