import pytest
import torch

from helpers import PROMPTS, masked_full_forward
from pte.models import char_tokenizer, tiny_model
from pte.rollout import CacheSpec, Sampling, rollout



@pytest.fixture(scope="module")
def qwen():
    return tiny_model("qwen2", init_std=0.2, seed=3)


@pytest.mark.parametrize("window", [None, 6])
def test_sampling_logprobs_are_pre_truncation_and_tokens_inside_nucleus(qwen, window):
    """log-probs are log_softmax(logits / T) of the reference forward, taken before top-p/top-k."""
    s = Sampling(max_new_tokens=30, temperature=0.7, top_p=0.6, top_k=20)
    res = rollout(qwen, PROMPTS, s, CacheSpec(window=window), generator=torch.Generator().manual_seed(0))
    comp = [r.completion_ids for r in res.rows]
    ref = masked_full_forward(qwen, PROMPTS, comp, window, 0.25, "sdpa")[:, :-1] / s.temperature
    logp = ref.log_softmax(-1)
    got = torch.tensor([r.logprobs for r in res.rows])
    tokens = torch.tensor(comp)
    assert (got - logp.gather(-1, tokens[..., None])[..., 0]).abs().max() <= 1e-4
    # every sampled token lies in the top-k and in the smallest prefix whose mass reaches top_p
    probs = logp.exp()
    sorted_p, order = probs.sort(-1, descending=True)
    rank = (order == tokens[..., None]).nonzero()[:, -1].view_as(tokens)
    mass_before = (sorted_p.cumsum(-1) - sorted_p).gather(-1, rank[..., None])[..., 0]
    assert (rank < s.top_k).all() and (mass_before <= s.top_p + 1e-5).all()
    if window is not None:
        assert all(r.eviction_steps == list(range(window, 30, 2))[: len(r.eviction_steps)] for r in res.rows)
        assert res.peak_cache_tokens == len(PROMPTS[0]) + window


def test_seeded_sampling_is_reproducible(qwen):
    s = Sampling(max_new_tokens=20, temperature=1.0)
    a = rollout(qwen, PROMPTS, s, CacheSpec(window=5), generator=torch.Generator().manual_seed(7))
    b = rollout(qwen, PROMPTS, s, CacheSpec(window=5), generator=torch.Generator().manual_seed(7))
    assert [r.completion_ids for r in a.rows] == [r.completion_ids for r in b.rows]


def test_finished_rows_are_dropped_without_changing_the_others(qwen):
    """Rows stop at EOS at different steps; every row equals the same row generated alone."""
    probe = rollout(qwen, PROMPTS, Sampling(max_new_tokens=30, temperature=0), CacheSpec(window=6))
    eos = probe.rows[1].completion_ids[4]  # row 1 stops early; others may stop later or not at all
    s = Sampling(max_new_tokens=30, temperature=0, eos_token_ids=(eos,))
    batch = rollout(qwen, PROMPTS, s, CacheSpec(window=6))
    assert batch.rows[1].finish_reason == "eos" and len(batch.rows[1].completion_ids) <= 5
    assert len({len(r.completion_ids) for r in batch.rows}) > 1
    for i, p in enumerate(PROMPTS):
        alone = rollout(qwen, [p], s, CacheSpec(window=6)).rows[0]
        assert alone.completion_ids == batch.rows[i].completion_ids
        assert alone.eviction_steps == batch.rows[i].eviction_steps
        assert max(abs(a - b) for a, b in zip(alone.logprobs, batch.rows[i].logprobs)) <= 1e-4
    assert batch.generated_tokens == sum(len(r.completion_ids) for r in batch.rows)


def test_stop_strings_end_a_row():
    tok = char_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), init_std=0.2, seed=5)
    prompt = tok("Q: 1+1=")["input_ids"]
    probe = rollout(model, [prompt], Sampling(max_new_tokens=20, temperature=0), CacheSpec(window=4))
    ids = probe.rows[0].completion_ids
    text = tok.decode(ids)
    i = next(i for i in range(3, len(ids) - 1) if min(ids[i], ids[i + 1]) >= 3)  # two plain characters
    stop = tok.decode(ids[i:i + 2])
    res = rollout(model, [prompt], Sampling(max_new_tokens=20, temperature=0, stop_strings=(stop,)),
                  CacheSpec(window=4), tokenizer=tok)
    out = tok.decode(res.rows[0].completion_ids)
    assert res.rows[0].finish_reason == "stop" and out.endswith(stop) and out == text[: len(out)]
    assert stop not in out[:-1]


@pytest.mark.parametrize(
    "prompts,sampling,message",
    [
        ([[1, 2], []], Sampling(max_new_tokens=4), "prompt 1 is empty"),
        ([[3] * 70], Sampling(max_new_tokens=4), "longer than the model's maximum"),
        ([[1, 2]], Sampling(max_new_tokens=0), "max_new_tokens=0"),
        ([[1, 2]], Sampling(max_new_tokens=4, top_p=0.0), r"top_p=0.0"),
        ([[1, 2]], Sampling(max_new_tokens=4, temperature=-1), "temperature=-1"),
    ],
)
def test_bad_input_names_the_problem(prompts, sampling, message):
    model = tiny_model("llama", max_positions=64)
    with pytest.raises(ValueError, match=message):
        rollout(model, prompts, sampling)
