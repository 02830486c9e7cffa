"""The cache-aware GRPO objective: group-normalised advantages and a token-level clipped policy gradient.

Advantages follow the paper's eq. 1: ``(s_i - mean) / sqrt(var + eps)`` over a group of G completions of one
prompt, with the population variance and ``eps`` inside the square root, so an all-equal group gives exactly
zero advantage (no NaN). The loss is PPO-style and token-level (every completion token of the batch weighs the
same; the normaliser is the batch's token count, fixed before the replay): ``ratio = exp(logp - logp_old)`` and
``loss_t = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t``, where ``KL_t`` is the k3
estimator ``exp(ref - logp) - (ref - logp) - 1`` against the reference log-probs.

``pi_old`` is the replay's own first-pass log-probs, detached (TRL does the same when it stores no old
log-probs), not the rollout's sampling log-probs: the rollout feeds one token per forward and the replay one
segment per forward, which round differently in bf16/fp16 (they agree to 1e-4 in fp32 only). So the first pass's
ratio is exactly 1 in any precision, and the clip acts only from the second pass on (``num_iterations > 1``); the
rollout/replay mismatch is logged as a metric (``logprob_mismatch``), not fed into the ratio. The paper writes the
objective without ratio or clip; with one pass per batch the clipped form reduces to its policy gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """rewards [n_prompts, G] -> advantages [n_prompts, G]."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [n_prompts, group_size], got shape {tuple(rewards.shape)}")
    mean = rewards.mean(dim=1, keepdim=True)
    var = ((rewards - mean) ** 2).mean(dim=1, keepdim=True)
    return (rewards - mean) / torch.sqrt(var + eps)


@dataclass
class TokenBatch:
    """Per-token quantities, all fixed before the replay. Shapes [batch, T]."""

    advantages: torch.Tensor  # [batch] broadcast over tokens, stored [batch, 1]
    old_logp: torch.Tensor
    mask: torch.Tensor  # bool, real completion tokens
    ref_logp: torch.Tensor | None = None
    normalizer: float = 1.0


def clipped_token_loss(logp: torch.Tensor, batch: TokenBatch, cols: slice, *, rows: slice = slice(None),
                       clip_low: float = 0.2, clip_high: float = 0.2, beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Loss (to minimise) of the completion tokens ``cols`` of rows ``rows`` (a replay micro-batch): logp
    [rows, n] with grad."""
    mask = batch.mask[rows, cols].to(logp.dtype)
    old = batch.old_logp[rows, cols].to(logp.dtype)
    adv = batch.advantages[rows].to(logp.dtype)
    ratio = torch.exp(logp - old)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    stats = {"clipped_tokens": float(((clipped < unclipped) * mask).sum()), "tokens": float(mask.sum())}  # the clip binds
    if beta > 0:
        if batch.ref_logp is None:
            raise ValueError("beta > 0 needs reference log-probs (kl.reference)")
        delta = batch.ref_logp[rows, cols].to(logp.dtype) - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        stats["kl_sum"] = float((kl.detach() * mask).sum())
    return (per_token * mask).sum() / batch.normalizer, stats
