"""Reference computations shared by the tests."""

import math

import torch

from pte.cache import CacheListener, window_visibility
from pte.rollout import Decoder, left_pad

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]  # left padding, three lengths


def completions(T, batch=len(PROMPTS), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (batch, T), generator=g).tolist()


class Recorder(CacheListener):
    """Keeps every eviction event a cache reports."""

    def __init__(self):
        self.events = []

    def on_evict(self, event):
        self.events.append(event)


def thought_starts(n_thoughts: int, window: int | None, evict_fraction: float) -> list[int]:
    """For each thought token c: the index of the oldest thought it can see (sliding window, simulated)."""
    if window is None:
        return [0] * n_thoughts
    n_evict = max(1, math.ceil(round(evict_fraction * window, 9)))
    held, evicted, starts = 0, 0, []
    for _ in range(n_thoughts):
        if held >= window:
            held -= n_evict
            evicted += n_evict
        held += 1
        starts.append(evicted)
    return starts


def masked_full_forward(model, prompts, completions, window, evict_fraction, attn):
    """One forward over prompt+completion whose 4D mask (:func:`pte.cache.window_visibility`, itself checked
    against :func:`thought_starts`' simulation) hides what each position could not see.

    -> logits [batch, 1 + T, vocab]: the last prompt position, then every completion position.
    """
    from conftest import reference_mask

    T = len(completions[0])
    ids, pmask = left_pad(prompts, 0)
    P = ids.shape[1]
    full = torch.cat([ids, torch.tensor(completions)], dim=1)
    valid = torch.cat([pmask, torch.ones(len(prompts), T, dtype=torch.bool)], dim=1)
    visible = window_visibility(P, T, window, evict_fraction, valid)
    position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
    mask = reference_mask(valid, visible, attn)
    logits = model(input_ids=full, attention_mask=mask, position_ids=position_ids).logits
    return logits[:, P - 1:]


def cached_teacher_forced(model, cache, prompts, completions, block=1):
    """Feed prompt then completion through ``cache`` in blocks of ``block`` tokens (a block may not cross an
    eviction). -> logits [batch, 1 + T, vocab] aligned with :func:`masked_full_forward`."""
    ids, pmask = left_pad(prompts, 0)
    dec = Decoder(model, cache)
    out = [dec.prefill(ids, pmask)[:, -1:]]
    comp = torch.tensor(completions)
    for i in range(0, comp.shape[1], block):
        out.append(dec.step(comp[:, i:i + block]))
    return torch.cat(out, dim=1)



def assert_grads_match(got: dict, ref: dict, rtol: float = 1e-5):
    """Each gradient tensor agrees with the reference to `rtol` of that tensor's largest entry.

    Elementwise rtol fails on entries near zero inside a tensor whose scale is ~30: two fp32
    summation orders (replay's segments vs one full backward) differ there by ~1e-6 of the scale,
    while a wrong gradient is off by the scale itself.
    """
    assert got.keys() == ref.keys()
    for k in ref:
        err = (got[k] - ref[k]).abs().max()
        scale = ref[k].abs().max().clamp(min=1.0)
        assert err <= rtol * scale, f"{k}: max |diff| {err:.3g} > {rtol} x {scale:.3g}"
