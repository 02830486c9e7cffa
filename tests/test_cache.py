import math

import pytest
import torch
from transformers import DynamicCache

from helpers import PROMPTS, Recorder, cached_teacher_forced, completions, masked_full_forward, thought_starts
from pte.cache import BoundedCache, window_visibility
from pte.eviction import KeyNorm, Recorded
from pte.rollout import CacheSpec, Decoder, Sampling, left_pad, rollout

@torch.no_grad()
def test_window_never_filled_equals_full_cache(model):
    """(a) window >= length: logits equal transformers' full-cache decoding, step by step."""
    T = 20
    comp = completions(T, batch=1)
    bounded = cached_teacher_forced(model, BoundedCache.for_model(model, window=T), PROMPTS[:1], comp)
    ids = torch.tensor(PROMPTS[:1])
    ref_cache = DynamicCache(config=model.config)
    ref = [model(input_ids=ids, past_key_values=ref_cache).logits[:, -1:]]
    for t in comp[0]:
        ref.append(model(input_ids=torch.tensor([[t]]), past_key_values=ref_cache).logits)
    ref = torch.cat(ref, dim=1)
    assert (bounded - ref).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("window,fraction", [(8, 0.25), (5, 0.5), (4, 1.0), (1, 1.0)])
def test_evicting_cache_equals_masked_full_forward(model, window, fraction):
    """(b) with evictions, every step's logits equal a full forward that masks exactly the evicted tokens."""
    T = 30
    comp = completions(T)
    cache = BoundedCache.for_model(model, window=window, evict_fraction=fraction)
    got = cached_teacher_forced(model, cache, PROMPTS, comp)
    ref = masked_full_forward(model, PROMPTS, comp, window, fraction, model.config._attn_implementation)
    assert cache.evictions > 2
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


@torch.no_grad()
def test_multi_token_blocks_equal_single_steps(model):
    """Blocks that end at eviction boundaries give the same logits as one token at a time."""
    window, T = 8, 26
    comp = completions(T)
    one = cached_teacher_forced(model, BoundedCache.for_model(model, window=window), PROMPTS, comp)
    # first block fills the window (8), then every block is one eviction's worth (2)
    cache = BoundedCache.for_model(model, window=window)
    ids, pmask = left_pad(PROMPTS, 0)
    dec = Decoder(model, cache)
    out = [dec.prefill(ids, pmask)[:, -1:]]
    c = torch.tensor(comp)
    out.append(dec.step(c[:, :8]))
    for i in range(8, T, 2):
        out.append(dec.step(c[:, i:i + 2]))
    assert (torch.cat(out, 1) - one).abs().max() <= 1e-4 * one.abs().max()


@torch.no_grad()
def test_block_crossing_an_eviction_raises(model):
    cache = BoundedCache.for_model(model, window=4)
    ids, pmask = left_pad(PROMPTS, 0)
    dec = Decoder(model, cache)
    dec.prefill(ids, pmask)
    dec.step(torch.tensor(completions(3)))
    with pytest.raises(RuntimeError, match="cross an eviction"):
        dec.step(torch.tensor(completions(2)))


@torch.no_grad()
def test_left_padded_rows_equal_rows_run_alone(model):
    """(c) each row of a left-padded batch equals that row run alone, unpadded, with evictions."""
    T, window = 25, 6
    comp = completions(T)
    batched = cached_teacher_forced(model, BoundedCache.for_model(model, window=window), PROMPTS, comp)
    for i, p in enumerate(PROMPTS):
        alone = cached_teacher_forced(model, BoundedCache.for_model(model, window=window), [p], [comp[i]])
        assert (batched[i] - alone[0]).abs().max() <= 1e-4 * alone.abs().max()


@torch.no_grad()
def test_question_tokens_never_evicted(model):
    """(d) after many evictions each layer still holds every prompt token, unchanged, at its position."""
    window, T = 4, 40
    cache = BoundedCache.for_model(model, window=window)
    ids, pmask = left_pad(PROMPTS, 0)
    dec = Decoder(model, cache)
    dec.prefill(ids, pmask)
    prompt_keys = [layer.keys.clone() for layer in cache.layers]
    P = ids.shape[1]
    for t in torch.tensor(completions(T)).T:
        dec.step(t[:, None])
    assert cache.evictions == math.ceil((T - window) / cache.n_evict)
    for layer, k0 in zip(cache.layers, prompt_keys):
        assert torch.equal(layer.keys[:, :, :P], k0)
        assert torch.equal(layer.positions[:, :P], (pmask.long().cumsum(-1) - 1).clamp(min=0))
        assert layer.physical_length() == P + cache.thought_tokens <= P + window


@torch.no_grad()
def test_listener_receives_exactly_the_evicted_entries(model):
    """(e) evicted keys/values arrive per layer, in order: the oldest window entries as they were cached.

    Layer 0's keys depend on the tokens only, so they must also equal the full cache's entries there."""
    window, fraction, T = 8, 0.25, 30
    comp = torch.tensor(completions(T))
    rec = Recorder()
    cache = BoundedCache.for_model(model, window=window, evict_fraction=fraction, listeners=[rec])
    ids, pmask = left_pad(PROMPTS, 0)
    P = ids.shape[1]
    dec = Decoder(model, cache)
    dec.prefill(ids, pmask)
    m = math.ceil(fraction * window)
    snapshots = []
    for t in comp.T:
        snapshots.append([(l.keys[:, :, P:P + m].clone(), l.values[:, :, P:P + m].clone()) for l in cache.layers])
        dec.step(t[:, None])
        if dec.last_event is not None:
            assert dec.last_event is rec.events[-1]
            for layer, (k, v) in enumerate(snapshots[-1]):
                assert torch.equal(rec.events[-1].keys[layer], k) and torch.equal(rec.events[-1].values[layer], v)
    assert len(rec.events) == math.ceil((T - window) / m)
    full = BoundedCache.for_model(model)
    cached_teacher_forced(model, full, PROMPTS, comp.tolist())
    lengths = torch.tensor([len(p) for p in PROMPTS])
    for k, ev in enumerate(rec.events):
        assert ev.step == window + k * m
        lo = P + k * m
        assert torch.equal(ev.keys[0], full.layers[0].keys[:, :, lo:lo + m])
        assert torch.equal(ev.values[0], full.layers[0].values[:, :, lo:lo + m])
        for layer in range(len(cache.layers)):
            assert torch.equal(ev.positions[layer], lengths[:, None] + k * m + torch.arange(m))


@torch.no_grad()
def test_keynorm_evicts_recorded_high_norm_tokens_and_replays():
    """A score-based policy: per row/layer choices are the largest-norm keys, recorded, and re-applied exactly."""
    from pte.models import tiny_model

    model = tiny_model("qwen2", init_std=0.2, layers=3)
    window, T = 8, 30
    comp = completions(T)
    rec = Recorder()
    cache = BoundedCache.for_model(model, window=window, policy=KeyNorm(), listeners=[rec])
    ids, pmask = left_pad(PROMPTS, 0)
    dec = Decoder(model, cache)
    logits = [dec.prefill(ids, pmask)[:, -1:]]
    P = ids.shape[1]
    for t in torch.tensor(comp).T:
        before = [(l.keys[:, :, P:].clone(), l.positions[:, P:].clone()) for l in cache.layers]
        logits.append(dec.step(t[:, None]))
        if dec.last_event is not None:
            ev = dec.last_event
            for li, (k, pos) in enumerate(before):
                norms = k.norm(dim=-1).mean(1)
                expect = norms.topk(cache.n_evict, dim=-1).indices.sort(-1).values
                assert torch.equal(ev.indices[li], expect)
                assert torch.equal(ev.positions[li], pos.gather(1, expect))
                kept = torch.ones_like(pos, dtype=torch.bool).scatter(1, expect, False)
                assert torch.equal(cache.layers[li].positions[:, P:-1], pos[kept].view(len(PROMPTS), -1))
    assert len(rec.events) > 3
    layers_differ = any(not torch.equal(rec.events[-1].indices[0], ix) for ix in rec.events[-1].indices[1:])
    assert layers_differ, "per-layer choices should differ on a random model"
    replay = BoundedCache.for_model(model, window=window, policy=Recorded([e.indices for e in rec.events]))
    again = cached_teacher_forced(model, replay, PROMPTS, comp)
    assert torch.equal(again, torch.cat(logits, dim=1))


@torch.no_grad()
def test_generate_with_cache_matches_our_loop(model):
    """(f) model.generate driving the cache through the pre-hook gives the same tokens and log-probs."""
    window, T = 6, 24
    prompts = PROMPTS
    ours = rollout(model, prompts, Sampling(max_new_tokens=T, temperature=0), CacheSpec(window=window))
    ids, pmask = left_pad(prompts, 0)
    cache = BoundedCache.for_model(model, window=window)
    handle = cache.attach(model)
    try:
        out = model.generate(
            input_ids=ids, attention_mask=pmask.long(), past_key_values=cache, max_new_tokens=T, min_new_tokens=T,
            do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True,
        )
    finally:
        handle.remove()
    assert cache.evictions > 2
    gen_logp = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # [batch, T, vocab]
    for b, row in enumerate(ours.rows):
        ours_tokens = torch.tensor(row.completion_ids)
        gen_tokens = out.sequences[b, ids.shape[1]:]
        ref = gen_logp[b].gather(-1, ours_tokens[:, None])[:, 0]
        first_diff = (ours_tokens != gen_tokens).nonzero()
        upto = int(first_diff[0]) if len(first_diff) else T
        assert (torch.tensor(row.logprobs[:upto + 1]) - ref[:upto + 1]).abs().max() <= 1e-4
        if upto < T:  # a flip is allowed only at a near-tie
            top2 = gen_logp[b, upto].topk(2).values
            assert float(top2[0] - top2[1]) < 1e-4


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(window=0), "at least one thought token"),
        (dict(window=-3), "at least one thought token"),
        (dict(window=4, evict_fraction=0.0), r"\(0, 1\]"),
        (dict(window=4, evict_fraction=1.5), r"\(0, 1\]"),
        (dict(window=4, policy="lru"), "unknown eviction policy 'lru'"),
    ],
)
def test_bad_cache_settings_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BoundedCache(2, **kwargs)


@pytest.mark.parametrize("window,fraction", [(8, 0.25), (5, 0.5), (4, 1.0), (1, 1.0), (None, 0.25)])
def test_window_visibility_hides_exactly_what_the_simulated_window_evicted(window, fraction):
    """The one mask of the bounded cache (pte.cache.window_visibility) against an independent simulation: thought c
    sees the prompt and thoughts [start_c, c], nothing else; with left padding, pads are hidden as keys."""
    P, T = 3, 30
    got = window_visibility(P, T, window, fraction)
    want = torch.tril(torch.ones(P + T, P + T, dtype=torch.bool))
    for c, start in enumerate(thought_starts(T, window, fraction)):
        want[P + c, P:P + start] = False
    assert torch.equal(got, want)
    valid = torch.tensor([[False, True, True] + [True] * T])
    padded = window_visibility(P, T, window, fraction, valid)[0]
    assert torch.equal(padded[1:], want[1:] & valid[0]) and torch.equal(padded[0], torch.eye(P + T, dtype=torch.bool)[0])


def test_thought_starts_reference_is_sane():
    assert thought_starts(12, 4, 0.5) == [0, 0, 0, 0, 2, 2, 4, 4, 6, 6, 8, 8]
