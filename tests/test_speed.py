"""The train step's fast paths equal the reference computations they replace (docs/train_step.md)."""

import math

import pytest
import torch

import pte.replay
from pte.history import SoftmaxHistory
from pte.replay import replay
from pte.rollout import CacheSpec
from test_pte import grads, make, sampled, weights_loss, zero_grads


def _replay_grads(model, adapter, rows, spec, w, **kw):
    zero_grads(adapter)
    rep = replay(model, rows, spec, adapter=adapter, temperature=0.9, loss_fn=weights_loss(w), **kw)
    return rep.logprobs, grads(adapter)


@pytest.mark.parametrize("cfg,kw", [
    ({}, {}), ({}, dict(state_grad="segment")), ({}, dict(truncate=False)), (dict(ablation="global0"), {}),
    (dict(state_attention="linear"), {}), (dict(state_attention="linear"), dict(state_grad="segment")),
    ({}, dict(micro_batch_rows=2)),
])
def test_shared_globals_equal_a_fresh_graph_per_segment(monkeypatch, cfg, kw):
    """The global tokens' part computed once per replay (leaves, one backward at the end) gives the log-probs and
    gradients of recomputing it in every segment's graph, up to fp32 reassociation: the per-segment gradients are
    summed before, not after, the global tokens' backward (max difference <= 1e-6 of each tensor's largest entry)."""
    model, adapter = make("pte", **cfg)
    rows = sampled(model, adapter, 6).rows
    spec, w = CacheSpec(window=6), torch.randn(3, 26, generator=torch.Generator().manual_seed(2))
    logp, got = _replay_grads(model, adapter, rows, spec, w, **kw)
    monkeypatch.setattr(pte.replay, "SHARE_GLOBALS", False)
    ref_logp, ref = _replay_grads(model, adapter, rows, spec, w, **kw)
    assert (logp - ref_logp).abs().max() <= 1e-6
    assert any(ref[k].abs().max() > 0 for k in ref if "encoders" in k)
    for k in ref:
        assert (got[k] - ref[k]).abs().max() <= 1e-6 * ref[k].abs().max(), k


def test_rollout_shares_constant_globals():
    """Under no grad the state reads one set of global constants per rollout; the log-probs are unchanged."""
    model, adapter = make("pte")
    res = sampled(model, adapter, 6)
    rep = replay(model, res.rows, CacheSpec(window=6), adapter=adapter, temperature=0.9)
    for i, r in enumerate(res.rows):
        assert (rep.logprobs[i, :len(r.logprobs)] - torch.tensor(r.logprobs)).abs().max() <= 1e-5
    state = adapter.new_state(3)
    with torch.no_grad():
        shared = adapter.new_state(3)
        assert shared.shared is not None and state.shared is None
        assert torch.equal(shared._globals(0).q, shared._globals(0).q)
        assert shared._globals(0).q is shared._globals(0).q  # computed once


def _reference_of(q, wa_k, wa_v, keys, values):
    """The einsum formulation: E_i = E_w[k u^T] as [batch, n_g, d_kv, r]."""
    u = values @ wa_v.T
    w = (q @ (keys @ wa_k.T).transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1)
    return torch.einsum("bnm,bmd,bmr->bndr", w, keys, u)


def test_softmax_history_layout_and_backward_equal_the_einsum_form():
    g = torch.Generator().manual_seed(0)
    b, n, r, d, m = 3, 4, 5, 12, 2
    q, wa_k, wa_v = (torch.randn(*s, generator=g) for s in ((n, r), (r, d), (r, d)))
    chunks = [(torch.randn(b, m, d, generator=g), torch.randn(b, m, d, generator=g)) for _ in range(3)]
    hist, ref_e, ref_lse = None, None, None
    for keys, values in chunks:
        new = SoftmaxHistory.of(q, wa_k, wa_v, keys, values)
        e = _reference_of(q, wa_k, wa_v, keys, values)
        assert torch.allclose(new.u_k, e.transpose(-1, -2), atol=1e-6)
        hist = new if hist is None else hist.merge(new)
        ref_lse = new.lse if ref_lse is None else torch.logaddexp(ref_lse, new.lse)
    # one softmax over all chunks at once
    keys, values = torch.cat([c[0] for c in chunks], 1), torch.cat([c[1] for c in chunks], 1)
    once = SoftmaxHistory.of(q, wa_k, wa_v, keys, values)
    for a, c in zip(hist, once):
        assert torch.allclose(a, c, atol=1e-5), a.shape
    # the backward's statistics against autograd through the direct softmax read
    params = [t.clone().requires_grad_() for t in (q, wa_k, wa_v)]
    d_lse, d_read = torch.randn(b, n, generator=g), torch.randn(b, n, r, generator=g)
    lse, read = hist.attach(*params)
    (lse * d_lse).sum().add((read * d_read).sum()).backward()
    got = [p.grad for p in params]
    params = [t.clone().requires_grad_() for t in (q, wa_k, wa_v)]
    qq, kk, vv = params
    scores = qq @ (keys @ kk.T).transpose(1, 2) / math.sqrt(r)
    ((scores.logsumexp(-1) * d_lse).sum() + ((scores.softmax(-1) @ (values @ vv.T)) * d_read).sum()).backward()
    for a, p in zip(got, params):
        assert torch.allclose(a, p.grad, atol=1e-5, rtol=1e-4)
