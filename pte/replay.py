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
  only from the newest eviction. On the long-range task PTE does not learn this way (README, "The mechanism check").

``truncate=False`` keeps the whole graph and calls backward once (memory grows with length): the exact gradient of
the bounded-cache policy, the reference for tests. Dropout is off (the model is put in eval mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pte.eviction import Recorded
from pte.rollout import CacheSpec, Decoder, RolloutRow, left_pad

# loss_fn(logp [batch, n], targets: slice of completion indices) -> scalar to minimise
LossFn = Callable[[torch.Tensor, slice], torch.Tensor]
STATE_GRADS = ("segment", "history")


@dataclass
class ReplayResult:
    logprobs: torch.Tensor  # [batch, T] detached, 0 past each row's end
    mask: torch.Tensor  # [batch, T] bool: real completion tokens
    loss: float  # sum of the segment losses (0 without loss_fn)
    segments: int


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
) -> ReplayResult:
    """Recompute the completion log-probs ``log_softmax(logits / T)`` of ``rows``; with ``loss_fn``, accumulate
    its gradient into the trainable parameters (backward once per segment)."""
    if not rows:
        raise ValueError("no rollout rows to replay")
    if state_grad not in STATE_GRADS:
        raise ValueError(f"state_grad={state_grad!r}: choose one of {list(STATE_GRADS)}")
    windows = {r.window for r in rows}
    if windows != {cache_spec.window}:
        raise ValueError(f"rows were sampled with window(s) {sorted(windows, key=str)}, replay asked for "
                         f"{cache_spec.window}; replay each window separately with its own CacheSpec")
    if any(len(r.completion_ids) == 0 for r in rows):
        raise ValueError("a row has an empty completion; drop it before replay")
    temp = temperature if temperature > 0 else 1.0
    device = next(model.parameters()).device
    batch, T = len(rows), max(len(r.completion_ids) for r in rows)
    tokens = torch.full((batch, T), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(batch, T, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        tokens[i, :len(r.completion_ids)] = torch.tensor(r.completion_ids, device=device)
        mask[i, :len(r.completion_ids)] = True
    starts = segment_bounds(rows)
    fed_end = T - 1  # the last completion token is never fed
    bounds = [0] + starts + [fed_end]

    was_training = model.training
    model.eval()
    grad = loss_fn is not None
    logprobs = None
    total, n_segments = 0.0, 0
    input_ids, pmask = left_pad([r.prompt_ids for r in rows], pad_token_id, device)
    try:
        with torch.set_grad_enabled(grad):
            exact = truncate and state_grad == "history"
            state = adapter.new_state(batch, exact_history=exact) if adapter is not None else None
            policy = (Recorded.from_rows(rows, len(starts), cache_spec.policy)
                      if any(r.evicted_indices for r in rows) else None)
            cache = cache_spec.build(model, (state,) if state is not None else (), policy=policy)
            dec = Decoder(model, cache)
            pending = []  # untruncated: the losses, backward once at the end
            for k in range(len(bounds) - 1):
                c0, c1 = bounds[k], bounds[k + 1]
                parts = []
                if k == 0:
                    parts.append(dec.prefill(input_ids, pmask)[:, -1:])
                if c1 > c0:
                    parts.append(dec.step(tokens[:, c0:c1]))
                    if (dec.last_event is not None) != (k > 0):
                        raise RuntimeError(f"the cache {'did not evict' if k else 'evicted'} before completion token "
                                           f"{c0}, unlike the rollout; replay with the rollout's window and evict fraction")
                if not parts:
                    continue
                lo = 0 if k == 0 else c0 + 1
                hi = c1 + 1
                logits = torch.cat(parts, dim=1)
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temp  # bf16 -> fp32, fp64 kept
                logp = logits.log_softmax(-1).gather(-1, tokens[:, lo:hi, None])[..., 0]
                if logprobs is None:
                    logprobs = torch.zeros(batch, T, device=device, dtype=logp.dtype)
                logprobs[:, lo:hi] = logp.detach() * mask[:, lo:hi]
                n_segments += 1
                if grad:
                    loss = loss_fn(logp, slice(lo, hi))
                    total += float(loss.detach())
                    if truncate:
                        loss.backward()
                        cache.detach_()
                        if state is not None:
                            state.detach_()
                            state.refresh()  # S_g gets a fresh graph in the next segment
                    else:
                        pending.append(loss)
            if grad and not truncate and pending:
                torch.stack(pending).sum().backward()
    finally:
        if adapter is not None:
            adapter.clear_state()
        model.train(was_training)
    return ReplayResult(logprobs=logprobs, mask=mask, loss=total, segments=n_segments)
