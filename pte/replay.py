"""Teacher-forced log-probs of a rollout under the same cache policy, with memory bounded by the window.

The rollout's evictions split each completion into segments: the tokens fed between two evictions run under one
cache content and one thought state. The replay feeds the same tokens segment by segment and calls ``backward``
once per segment, so the live graph holds prompt + window + one segment, never the whole generation.

Segments (completion token ``c`` is *fed* by the forward that predicts ``c + 1``; eviction steps are the ``c``
whose feeding forward is preceded by an eviction):

    segment 0: the prompt forward (predicts token 0) + tokens fed before the first eviction, one graph
    segment k: tokens fed from eviction k up to eviction k + 1

Truncation (``truncate=True``, the default): after each segment's backward, the cached keys/values (the prompt's
included: they keep their graph only within segment 0) are detached. What the thought state carries between
segments is set by ``state_grad``:

- ``"history"`` (the default): the state keeps fixed-size statistics of every evicted token (:mod:`pte.history`)
  whose read gives the thought encoder (``h_g``, ``W^a_*``) the *exact* gradient through every past eviction, in
  constant memory. A token evicted long before it is needed can so teach the encoder to keep it.
- ``"segment"``: the carried history is detached; the next segment's eviction recomputes ``S'_k`` from the
  (detached) evicted keys/values inside its own graph and ``S_g`` is recomputed from ``h_g``, so the encoder learns
  only from the newest eviction; what that does to PTE: docs/log.md, "The cause: the truncation, not the state".

``truncate=False`` keeps the whole graph and calls backward once (memory grows with length): the exact gradient of
the bounded-cache policy, the reference for tests. Dropout is off (the model is put in eval mode).

Memory at scale. ``micro_batch_rows`` replays the rows that many at a time, each micro-batch with its own cache
and state, gradients accumulating in ``.grad``: rows never interact, so the sum equals one batch's gradient (the
loss normaliser is fixed before the replay, and ``loss_fn`` is told which rows it sees). Rows sampled together share
their eviction steps, so a micro-batch's segments are the batch's, cut at its own longest row. Log-probs never
materialise ``[rows, n, vocab]``: the decoder's hidden states go through the LM head chunk by chunk
(:func:`token_logprobs`), keeping per token only the sampled logit and an fp32 logsumexp, and the prompt forward
keeps only its last position. Live memory is then micro-batch x (prompt + window + segment) activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pte.eviction import Recorded
from pte.rollout import CacheSpec, Decoder, RolloutRow, left_pad, right_pad

# loss_fn(logp [rows.stop - rows.start, cols.stop - cols.start], rows, cols) -> scalar to minimise: the loss of
# completion tokens ``cols`` of the replayed rows ``rows`` (indices into the ``rows`` passed to replay)
LossFn = Callable[[torch.Tensor, slice, slice], torch.Tensor]
STATE_GRADS = ("segment", "history")
LOGIT_CHUNK_BYTES = 256 << 20  # fp32 logits built at once by token_logprobs
# the global tokens' part of the state once per replay, not per segment (pte.thought.SharedGlobals); False: the
# reference computation, a fresh graph per segment (tests)
SHARE_GLOBALS = True


@dataclass
class ReplayResult:
    logprobs: torch.Tensor  # [batch, T] detached, 0 past each row's end
    mask: torch.Tensor  # [batch, T] bool: real completion tokens
    loss: float  # sum of the segment losses (0 without loss_fn)
    segments: int  # of the longest row


class _TokenLogprobs(torch.autograd.Function):
    """logp = z[target] - logsumexp(z), z = head(hidden) / temperature in fp32, over flat positions in chunks;
    backward recomputes each chunk's logits (d logp / d z = onehot - softmax(z)), so only ``hidden`` and the
    logsumexp are saved."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk):
        # hidden [N, d] (model dtype), weight [V, d], targets [N] -> logp [N] in fp32 (fp64 for an fp64 model)
        out = torch.promote_types(hidden.dtype, torch.float32)
        lse = torch.empty(targets.shape, dtype=out, device=hidden.device)
        picked = torch.empty_like(lse)
        for s in range(0, hidden.shape[0], chunk):
            z = F.linear(hidden[s:s + chunk], weight, bias).to(out) / temperature  # [chunk, V]
            lse[s:s + chunk] = z.logsumexp(-1)
            picked[s:s + chunk] = z.gather(-1, targets[s:s + chunk, None])[:, 0]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return picked - lse

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        d_h = torch.empty_like(hidden) if need_h else None
        d_w = torch.zeros_like(weight, dtype=lse.dtype) if need_w else None  # accumulated over chunks in fp32
        d_b = torch.zeros_like(bias, dtype=lse.dtype) if need_b else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, g = hidden[s:s + ctx.chunk], grad[s:s + ctx.chunk, None]
            z = F.linear(h, weight, bias).to(lse.dtype) / ctx.temperature
            d_z = (z - lse[s:s + ctx.chunk, None]).exp_().mul_(-g)
            d_z.scatter_add_(-1, targets[s:s + ctx.chunk, None], g)
            d_z = (d_z / ctx.temperature).to(hidden.dtype)  # as autograd of .to(fp32) / T would hand it back
            if need_h:
                d_h[s:s + ctx.chunk] = d_z @ weight
            if need_w:
                d_w += (d_z.T @ h).to(d_w.dtype)
            if need_b:
                d_b += d_z.sum(0).to(d_b.dtype)
        return (d_h, None if d_w is None else d_w.to(weight.dtype), None if d_b is None else d_b.to(bias.dtype),
                None, None, None)


def token_logprobs(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, temperature: float = 1.0,
                   chunk: int | None = None) -> torch.Tensor:
    """``log_softmax(head(hidden).float() / temperature).gather(targets)`` without ``[batch, n, vocab]`` kept:
    hidden [batch, n, d_model], targets [batch, n] -> [batch, n] in fp32 (fp64 for an fp64 model). ``chunk``:
    positions per LM-head call (default: LOGIT_CHUNK_BYTES of fp32 logits)."""
    if chunk is None:
        chunk = max(1, LOGIT_CHUNK_BYTES // (4 * head.out_features))
    flat = _TokenLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, targets.reshape(-1),
                                float(temperature), int(chunk))
    return flat.view(targets.shape)


def segment_bounds(rows: list[RolloutRow]) -> list[int]:
    """Completion indices where segments start (after the prompt segment), from the rollout's evictions."""
    steps = sorted({s for r in rows for s in r.eviction_steps})
    for r in rows:
        expected = [s for s in steps if s < len(r.completion_ids) - 1]
        if r.eviction_steps != expected:
            raise ValueError(
                f"rollout rows disagree on eviction steps ({r.eviction_steps[:6]}... vs {expected[:6]}...); "
                "replay rows sampled together, with one window and evict fraction"
            )
    return steps


def replay(
    model,
    rows: list[RolloutRow],
    cache_spec: CacheSpec,
    *,
    adapter=None,
    temperature: float = 1.0,
    loss_fn: LossFn | None = None,
    truncate: bool = True,
    state_grad: str = "history",
    pad_token_id: int = 0,
    micro_batch_rows: int | None = None,
) -> ReplayResult:
    """Recompute the completion log-probs ``log_softmax(logits / T)`` of ``rows``; with ``loss_fn``, accumulate
    its gradient into the trainable parameters (backward once per segment). ``micro_batch_rows``: replay that many
    rows at a time (None: all at once); the log-probs and gradients are those of one batch."""
    if not rows:
        raise ValueError("no rollout rows to replay")
    if state_grad not in STATE_GRADS:
        raise ValueError(f"state_grad={state_grad!r}: choose one of {list(STATE_GRADS)}")
    if micro_batch_rows is not None and micro_batch_rows < 1:
        raise ValueError(f"micro_batch_rows={micro_batch_rows}: replay at least one row at a time (None: all rows)")
    windows = {r.window for r in rows}
    if windows != {cache_spec.window}:
        raise ValueError(f"rows were sampled with window(s) {sorted(windows, key=str)}, replay asked for "
                         f"{cache_spec.window}; replay each window separately with its own CacheSpec")
    if any(len(r.completion_ids) == 0 for r in rows):
        raise ValueError("a row has an empty completion; drop it before replay")
    segment_bounds(rows)  # rows sampled together: every micro-batch's segments are the batch's
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    batch, T = len(rows), max(len(r.completion_ids) for r in rows)
    logprobs = torch.zeros(batch, T, device=device, dtype=torch.promote_types(head.weight.dtype, torch.float32))
    _, mask = right_pad([r.completion_ids for r in rows], 0, torch.long, device)
    size = micro_batch_rows or batch
    was_training = model.training
    model.eval()
    total, n_segments = 0.0, 0
    try:
        with torch.set_grad_enabled(loss_fn is not None):
            for r0 in range(0, batch, size):
                loss, segments = _replay_rows(
                    model, head, rows[r0:r0 + size], r0, logprobs, cache_spec, adapter=adapter,
                    temperature=temperature if temperature > 0 else 1.0, loss_fn=loss_fn, truncate=truncate,
                    exact=truncate and state_grad == "history", pad_token_id=pad_token_id)
                total, n_segments = total + loss, max(n_segments, segments)
    finally:
        if adapter is not None:
            adapter.clear_state()
        model.train(was_training)
    return ReplayResult(logprobs=logprobs, mask=mask, loss=total, segments=n_segments)


def _replay_rows(model, head, rows, offset, logprobs, cache_spec, *, adapter, temperature, loss_fn, truncate, exact,
                 pad_token_id) -> tuple[float, int]:
    """Replay ``rows`` (the micro-batch at ``offset``) with one cache and state; write their log-probs into
    ``logprobs[offset:]``. -> (sum of segment losses, segments)."""
    device = logprobs.device
    batch, T = len(rows), max(len(r.completion_ids) for r in rows)
    row_slice = slice(offset, offset + batch)
    tokens, mask = right_pad([r.completion_ids for r in rows], pad_token_id, torch.long, device)
    starts = segment_bounds(rows)
    bounds = [0] + starts + [T - 1]  # the last completion token is never fed
    input_ids, pmask = left_pad([r.prompt_ids for r in rows], pad_token_id, device)
    state = adapter.new_state(batch, exact_history=exact, share_globals=SHARE_GLOBALS) if adapter is not None else None
    policy = Recorded.from_rows(rows, len(starts), cache_spec.policy) if any(r.evicted_indices for r in rows) else None
    cache = cache_spec.build(model, (state,) if state is not None else (), policy=policy)
    dec = Decoder(model, cache)
    total, n_segments = 0.0, 0
    pending = []  # untruncated: the losses, backward once at the end
    for k in range(len(bounds) - 1):
        c0, c1 = bounds[k], bounds[k + 1]
        parts = []  # hidden states [batch, n, d_model] of the positions that predict tokens lo..hi-1
        if k == 0:
            parts.append(dec.prefill(input_ids, pmask, hidden=True)[:, -1:])
        if c1 > c0:
            parts.append(dec.step(tokens[:, c0:c1], hidden=True))
            if (dec.last_event is not None) != (k > 0):
                raise RuntimeError(f"the cache {'did not evict' if k else 'evicted'} before completion token "
                                   f"{c0}, unlike the rollout; replay with the rollout's window and evict fraction")
        if not parts:
            continue
        lo, hi = (0 if k == 0 else c0 + 1), c1 + 1
        logp = token_logprobs(torch.cat(parts, dim=1), head, tokens[:, lo:hi], temperature)
        logprobs[row_slice, lo:hi] = logp.detach() * mask[:, lo:hi]
        n_segments += 1
        if loss_fn is not None:
            loss = loss_fn(logp, row_slice, slice(lo, hi))
            total += float(loss.detach())
            if truncate:
                loss.backward()
                cache.detach_()
                if state is not None:
                    state.detach_()
                    state.refresh()  # S_g gets a fresh graph in the next segment
            else:
                pending.append(loss)
    if pending:
        torch.stack(pending).sum().backward()
    if state is not None and loss_fn is not None:
        state.backward_globals()
    if adapter is not None:
        adapter.clear_state()
    return total, n_segments
