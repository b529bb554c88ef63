"""Step scorers: the protocol, CallableScorer's prefixes, and MonteCarloScorer's real prover estimates
(one value per step, shared h_0, determinism, the best-of-K transform on the same completions)."""
import pytest

from hca.models.loading import char_tokenizer, load_causal_lm, save_checkpoint
from hca.data.problems import Problem
from hca.rl.scoring import CallableScorer, MonteCarloScorer, NoScorer, StepScorer

TINY = ("tiny-llama:hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,"
        "num_key_value_heads=1,max_position_embeddings=64")


@pytest.fixture(scope="module")
def prover_dir(tmp_path_factory):
    """A random tiny prover over a 7-token vocabulary ("1", "2", "\\n" + specials): it answers "1" or
    "2" often enough that Monte Carlo values are neither all 0 nor all 1."""
    tok = char_tokenizer(list("12\n"))
    return str(save_checkpoint(load_causal_lm(TINY, tokenizer=tok), tok, tmp_path_factory.mktemp("prover") / "model"))


def test_protocol_and_callable_scorer():
    seen = []
    s = CallableScorer(lambda prompt, prefix: seen.append((prompt, prefix)) or len(prefix))
    assert isinstance(s, StepScorer) and isinstance(NoScorer(), StepScorer)
    assert s.score(["P", "Q"], ["a\nbb\nc", ""], "\n") == [[0.0, 2.0, 5.0], []]
    assert seen == [("P", ""), ("P", "a\n"), ("P", "a\nbb\n")]  # h_0, h_1, h_2; never h_K
    with pytest.raises(RuntimeError):
        NoScorer().score(["P"], ["a"], "\n")


def test_monte_carlo_scorer(prover_dir):
    probs = [Problem(id="a", prompt="Q:1\n", answer="1"), Problem(id="b", prompt="Q:2\n", answer="2")]
    rows = [probs[0], probs[0], probs[0], probs[1]]
    responses = ["1\n2\n1", "1\n1", "", "2"]
    kw = dict(prover=prover_dir, num_rollouts=8, num_rollouts_h0=16, sampling={"max_new_tokens": 4}, device="cpu", seed=3)
    mc = MonteCarloScorer(**kw)
    values = mc.score([p.prompt for p in rows], responses, "\n", rows)
    assert [len(v) for v in values] == [3, 2, 0, 1]
    assert values[0][0] == values[1][0]  # h_0 estimated once per problem
    assert values[0][1] == values[1][1]  # the identical prefix "1\n" of one problem, estimated once
    flat = [x for v in values for x in v]
    assert all(0.0 <= x <= 1.0 for x in flat) and len(set(flat)) > 1
    assert all((x * 8) % 1 == 0 for v in values for x in v[1:]) and all((v[0] * 16) % 1 == 0 for v in values if v)
    assert mc.score([p.prompt for p in rows], responses, "\n", rows) == values  # deterministic in its inputs
    bok = MonteCarloScorer(best_of_k=3, **kw).score([p.prompt for p in rows], responses, "\n", rows)
    for v, w in zip(values, bok):  # same completions, transformed
        assert w == pytest.approx([1 - (1 - x) ** 3 for x in v])
    with pytest.raises(ValueError, match="problem"):
        mc.score([p.prompt for p in rows], responses, "\n")


def test_monte_carlo_scorer_settings():
    from hca.rollout import SamplingParams

    mc = MonteCarloScorer("p", num_rollouts=3, sampling={"max_new_tokens": 5, "temperature": 0.5},
                          engine={"engine": "hf", "max_batch_size": 16})
    assert mc.config.prover_params(1, 3) == SamplingParams(max_new_tokens=5, temperature=0.5, n=3, seed=1)
    assert mc.engine_config.max_batch_size == 16 and mc.engine_config.engine == "hf"
    with pytest.raises(ValueError, match=r"scorer\.sampling: n and seed are set by the stage"):
        MonteCarloScorer("p", sampling={"seed": 1})
    with pytest.raises(TypeError):
        MonteCarloScorer("p", max_new_tokens=5)  # the old flat keys are gone: sampling.max_new_tokens
    with pytest.raises(RuntimeError, match="current_policy"):
        MonteCarloScorer("current_policy").engine()  # bound by the RL module at fit start
