"""The replay's memory bounds (pte.replay, "Memory at scale"): row micro-batches equal one batch; log-probs come
from the hidden states chunk by chunk, with no [rows, n, vocab] tensor kept for backward."""

import pytest
import torch

from pte.adapter import AdapterConfig, attach
from pte.models import tiny_model
from pte.replay import replay, token_logprobs
from pte.rollout import CacheSpec, Sampling, rollout

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24], [30, 31], [40, 41, 42, 43]]
EOS = (60, 61, 62)  # frequent enough that rows stop at different lengths


def make(method="pte", policy="sliding", vocab_size=128, dtype=torch.float32, **cfg):
    """A sharp-ish tiny model, rows of different lengths sampled by the base model, then the adapter (A != 0)."""
    model = tiny_model("llama", init_std=0.1, seed=4, vocab_size=vocab_size, dtype=dtype)
    spec = CacheSpec(window=None if method == "lora" else 6, policy=policy)
    rows = rollout(model, PROMPTS, Sampling(max_new_tokens=30, temperature=0.9, eos_token_ids=EOS), spec,
                   generator=torch.Generator().manual_seed(1)).rows
    c = dict(method=method, rank=4, n_global=4 if method != "pte" else 3, seed=1) | cfg
    adapter = attach(model, AdapterConfig(**c))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for lin in adapter.linears.values():
            lin.A.copy_(torch.randn(lin.A.shape, generator=g) * 0.3)
    for p in adapter.parameters():
        p.data = p.data.to(dtype)
    return model, adapter, spec, rows


def replay_grads(model, adapter, spec, rows, weights, **kw):
    for p in adapter.parameters():
        p.grad = None
    rep = replay(model, rows, spec, adapter=adapter, temperature=0.9,
                 loss_fn=lambda logp, r, c: -(weights[r, c] * logp).sum() / weights.numel(), **kw)
    return rep, {k: p.grad.clone() for k, p in adapter.named_parameters()}


def micro_batch_errors(method, policy, kw, dtype, sizes):
    """-> per micro-batch size: (max |dlogp|, |dloss| / |loss|, |dgrad| / |grad| over all parameters)."""
    model, adapter, spec, rows = make(method, policy, dtype=dtype)
    lengths = [len(r.completion_ids) for r in rows]
    assert len(set(lengths)) >= 3 and max(lengths) >= 25, lengths
    assert spec.window is None or len(rows[lengths.index(max(lengths))].eviction_steps) >= 5
    w = torch.randn(len(rows), 30, generator=torch.Generator().manual_seed(2), dtype=dtype)
    w *= torch.arange(30) < torch.tensor(lengths)[:, None]  # as GRPO's mask: no weight past a row's end
    whole, ref = replay_grads(model, adapter, spec, rows, w, **kw)
    norm = torch.cat([g.flatten() for g in ref.values()]).norm()
    assert norm > 0
    errors = {}
    for size in sizes:
        part, got = replay_grads(model, adapter, spec, rows, w, micro_batch_rows=size, **kw)
        assert part.segments == whole.segments
        errors[size] = (float((part.logprobs - whole.logprobs).abs().max()), abs(part.loss - whole.loss) / abs(whole.loss),
                        float(torch.cat([(got[k] - ref[k]).flatten() for k in ref]).norm() / norm))
    return errors


@pytest.mark.parametrize("method,policy,kw", [
    ("pte", "sliding", {}), ("pte", "sliding", dict(state_grad="segment")), ("pte", "sliding", dict(truncate=False)),
    ("pte", "keynorm", {}), ("lora_c", "sliding", {}), ("lora", "sliding", {}),
])
def test_micro_batched_replay_equals_one_batch(method, policy, kw):
    """Exact in float64: what differs is rounding only."""
    for size, errs in micro_batch_errors(method, policy, kw, torch.float64, (1, 2, 3)).items():
        assert max(errs) <= 1e-12, (size, errs)


def test_micro_batched_replay_gradient_in_fp32():
    """fp32: within 1e-6 of one batch (measured <= 7e-7; micro-batches of one row reach ~9e-7: GEMMs of another
    batch size round differently, while float64 agrees to 1e-15)."""
    for size, (logp, loss, grad) in micro_batch_errors("pte", "sliding", {}, torch.float32, (2, 3)).items():
        assert logp <= 1e-5 and loss <= 1e-6 and grad <= 1e-6, (size, logp, loss, grad)


def test_micro_batch_rows_must_be_positive():
    model, adapter, spec, rows = make("lora_c")
    with pytest.raises(ValueError, match="micro_batch_rows=0"):
        replay(model, rows, spec, adapter=adapter, micro_batch_rows=0)


@pytest.mark.parametrize("dtype,bias", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_chunked_token_logprobs_equal_log_softmax_gather(dtype, bias):
    """Values and gradients (hidden, weight, bias) of token_logprobs equal the reference that builds every logit."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias).to(dtype)
    hidden = torch.randn(3, 7, 16, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (3, 7), generator=g)
    upstream = torch.randn(3, 7, generator=g)

    ref = (head(hidden).float() / 0.7).log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [hidden, *head.parameters()])
    got = token_logprobs(hidden, head, targets, temperature=0.7, chunk=4)  # 21 positions: a ragged last chunk
    got_grads = torch.autograd.grad((got * upstream).sum(), [hidden, *head.parameters()])
    assert got.dtype == torch.float32
    tol = 1e-6 if dtype == torch.float32 else 2e-2  # bf16: the gradients round to bf16 (as the reference's do)
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-6)
    for a, b in zip(got_grads, ref_grads):
        assert a.dtype == b.dtype and torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


def test_replay_keeps_no_vocab_sized_tensor_for_backward():
    """The former replay saved [rows, n, vocab] fp32 logits (and the prompt's) for backward. Vocab 211 appears in
    no other dimension, so any saved tensor with a 211 is a logit tensor unless it is the LM head's weight."""
    model, adapter, spec, rows = make("pte", vocab_size=211)
    head_shape = tuple(model.get_output_embeddings().weight.shape)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    w = torch.randn(len(rows), 30, generator=torch.Generator().manual_seed(2))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        replay(model, rows, spec, adapter=adapter, loss_fn=lambda logp, r, c: -(w[r, c] * logp).sum())
    assert len(shapes) > 100 and head_shape in shapes
    assert [s for s in shapes if 211 in s and s != head_shape] == []
