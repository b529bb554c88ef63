"""TrajectoryDataModule: problem-level split, labels and boundaries under two tokenizers,
truncation, bucketed resumable batches, errors that name the shard and line."""
from __future__ import annotations

import json
import random

import pytest
from builders import make_records, problems_file, write_collection

from hca.datamodules.bucketing import BucketLoader
from hca.datamodules.trajectories import TrajectoryDataModule, encode_trajectory, split_problem_ids
from hca.steps import prefix_text
from hca.data.trajectories import TrajectoryFormatError, read_dataset


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    return write_collection(tmp_path_factory.mktemp("coll"), num_problems=40)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE trained on arithmetic text without the pre-tokenizer regex, so merges
    cross line breaks and digits/operators (tokens straddle step boundaries)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from hca.data.arithmetic import generate_problems

    text = [p.prompt + p.solution for p in generate_problems(300, 7)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                                     show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    out = tmp_path_factory.mktemp("bpe")
    tok.save_pretrained(out)
    return out


def make_dm(coll, **kw):
    kw = {"tokenizer": "tiny-llama", "val_fraction": 0.25, "batch_size": 8, "max_length": 64, **kw}
    dm = TrajectoryDataModule(str(coll), **kw)
    dm.setup("fit")
    return dm


def test_split_is_by_problem_seeded_and_disjoint(coll):
    _, records = read_dataset(coll)
    ids = [t.problem_id for t in records]
    train, val = split_problem_ids(ids, 0.25, seed=0)
    assert not set(train) & set(val) and set(train) | set(val) == set(ids)
    assert len(val) == 10
    assert split_problem_ids(ids, 0.25, seed=0) == (train, val)  # deterministic
    assert set(split_problem_ids(ids, 0.25, seed=1)[1]) != set(val)  # the seed matters
    # the split of a problem does not depend on which other problems were collected
    sub = [i for i in ids if i not in set(train[:5])]
    assert set(split_problem_ids(sub, 0.25, seed=0)[1]) <= set(val) | set(train)
    dm = make_dm(coll)
    tr, va = dm.problems("train"), dm.problems("val")
    assert {p.id for p in va} == set(val) and {p.id for p in tr} == set(train)
    assert len({p.id for p in tr}) == len(tr)  # unique
    for split, probs in (("train", tr), ("val", va)):  # every response of a problem lands in its problem's split
        assert {probs[e.problem_index].id for e in dm.examples(split)} == {p.id for p in probs}
    assert len(dm.examples("train")) + len(dm.examples("val")) == len(records)
    with pytest.raises(ValueError, match="val_fraction"):
        split_problem_ids(ids, 1.0, 0)


def test_labels_weights_and_problem_meta(coll, tmp_path):
    pf = problems_file(tmp_path, num_problems=40)
    dm = make_dm(coll, problems_file=str(pf))
    _, records = read_dataset(coll)
    by_key = {(t.problem_id, t.response_index): t for t in records}
    probs = dm.problems("train")
    assert all("ops" in p.meta for p in probs)
    for e in dm.examples("train")[:20]:
        p = probs[e.problem_index]
        t = by_key[(p.id, e.response_index)]
        assert dm.tokenizer.decode(e.input_ids[e.positions[0] + 1:], skip_special_tokens=True) == t.response
        K = t.num_steps
        assert e.targets == pytest.approx([float(v) for v in t.values])  # V̂(h_0..h_{K-1}), then R
        assert e.is_final == [False] * K + [True]
        assert e.rollouts[0] == t.h0_count[1] / 4  # shared by the problem's 4 responses
        assert e.rollouts[1:K] == [c[1] for c in t.counts[1:]] and e.rollouts[K] == 0
        assert e.step_correct == [-1] + [int(b) for b in t.step_correct]


@pytest.mark.parametrize("tok", ["chars", "bpe"])
def test_boundaries_with_either_tokenizer(coll, bpe_dir, tok):
    """The value of h_k is read at a token whose prefix text is exactly h_k (char tokenizer), or
    the longest token prefix inside h_k (BPE, whose tokens may straddle step boundaries)."""
    dm = make_dm(coll, tokenizer="tiny-llama" if tok == "chars" else str(bpe_dir), max_length=256)
    tk = dm.tokenizer
    _, records = read_dataset(coll)
    straddles = 0
    for t in records[:60]:
        e = encode_trajectory(tk, t, 256)
        enc = tk(t.prompt + t.response, return_offsets_mapping=True)
        assert e.input_ids == enc["input_ids"]
        ends = [b for _, b in enc["offset_mapping"]]
        for k, pos in enumerate(e.positions):
            h = t.prompt + prefix_text(t.response, t.step_spans, k)
            assert ends[pos] <= len(h)  # nothing of a later step is visible at the read position
            nxt = pos + 1 < len(ends) and ends[pos + 1] <= len(h)
            assert not nxt  # ... and it is the last such token
            if tok == "chars":
                assert tk.decode(e.input_ids[: pos + 1], skip_special_tokens=True) == h
            straddles += ends[pos] < len(h)
    if tok == "bpe":
        assert straddles > 0, "the BPE fixture should produce tokens straddling step boundaries"


def test_truncation_drops_whole_trailing_steps(coll):
    _, records = read_dataset(coll)
    tk = make_dm(coll).tokenizer
    t = next(r for r in records if r.num_steps >= 3)
    full = encode_trajectory(tk, t, 10_000)
    cut = full.positions[2] + 1  # room for h_0, h_1, h_2 only
    e = encode_trajectory(tk, t, cut)
    assert e.positions == full.positions[:3] and e.input_ids == full.input_ids[:cut]
    assert e.targets == full.targets[:3] and not any(e.is_final) and e.truncated_steps == t.num_steps - 2
    e = encode_trajectory(tk, t, 5)  # not even the prompt fits: its last 5 tokens, h_0 only
    assert e.input_ids == full.input_ids[full.positions[0] - 4: full.positions[0] + 1]
    assert e.positions == [4] and e.targets == full.targets[:1]


def test_collate_and_bucketing(coll):
    dm = make_dm(coll, batch_size=4, pool_batches=4)
    loader = dm.train_dataloader()
    seen, waste_bucket = [], 0
    for b in loader:
        assert b.input_ids.shape == b.attention_mask.shape
        assert (b.label_mask <= b.boundary_mask).all() and (b.rollouts[~b.label_mask] == 0).all()
        assert (b.positions < b.attention_mask.sum(1, keepdim=True)).all()
        waste_bucket += int((b.attention_mask == 0).sum())
        seen.append(len(b))
    assert sum(seen) == len(dm.examples("train"))
    ex = dm.examples("train")
    rng = random.Random(0)
    order = list(range(len(ex)))
    rng.shuffle(order)
    waste_random = sum(max(len(ex[i].input_ids) for i in order[a:a + 4]) * len(order[a:a + 4])
                       - sum(len(ex[i].input_ids) for i in order[a:a + 4]) for a in range(0, len(order), 4))
    assert waste_bucket < waste_random


def test_bucket_loader_resumes_mid_epoch():
    data = list(range(37))
    lengths = [random.Random(i).randint(1, 50) for i in data]

    def loader():
        return BucketLoader(data, lengths, batch_size=4, pool_batches=3, seed=5, collate_fn=list)

    a = loader()
    epoch0 = [b for b in a]
    assert sorted(x for b in epoch0 for x in b) == data and len(epoch0) == len(a)
    epoch1 = [b for b in a]
    assert epoch1 != epoch0  # a new order every epoch
    b = loader()
    it = iter(b)
    head = [next(it) for _ in range(3)]
    state = b.state_dict()
    c = loader()
    c.load_state_dict(state)
    assert head + list(c) == epoch0 and list(c) == epoch1
    with pytest.raises(ValueError, match="seed"):
        BucketLoader(data, lengths, batch_size=4, seed=6).load_state_dict(state)


def test_bad_record_names_shard_and_line(tmp_path):
    coll = write_collection(tmp_path / "c", num_problems=8, chunk_size=4)
    shard = coll / "shard-000001.jsonl"
    lines = shard.read_text().splitlines()
    rec = json.loads(lines[2])
    rec["values"][0] = 1.5
    lines[2] = json.dumps(rec)
    shard.write_text("\n".join(lines) + "\n")
    with pytest.raises(TrajectoryFormatError, match="shard-000001.jsonl: sha256"):
        make_dm(coll)
    with pytest.raises(TrajectoryFormatError, match=r"shard-000001.jsonl:3: values\[0\]"):
        make_dm(coll, verify_sha256=False)
    m = json.loads((coll / "manifest.json").read_text())
    m["format"] = "hca-trajectories/0"
    (coll / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TrajectoryFormatError, match="manifest.json: format"):
        make_dm(coll, verify_sha256=False)


def test_empty_responses_are_skipped_and_counted(tmp_path):
    from hca.data.arithmetic import generate_problems
    from hca.data.trajectories import FORMAT_VERSION, Trajectory, shard_name, write_manifest, write_shard

    recs = make_records(generate_problems(4, 0), 2, 0, 0)
    empty = Trajectory(**{**recs[0].to_dict(), "response_index": 2, "response": "", "response_token_ids": [2],
                          "step_spans": [], "counts": [], "values": [0], "progress": [], "labeled_steps": 0,
                          "step_correct": [], "outcome": 0})
    sha = write_shard(tmp_path / shard_name(0), recs + [empty])
    write_manifest(tmp_path, {"format": FORMAT_VERSION, "created": "t", "complete": True, "identity": {}, "totals": {},
                              "shards": [{"file": shard_name(0), "chunk_id": 0, "records": 9, "sha256": sha}]})
    dm = make_dm(tmp_path, val_fraction=0.0)
    assert dm.stats["empty_skipped"] == 1 and len(dm.examples("train")) == 8
