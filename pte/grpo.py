"""The cache-aware GRPO objective: group-normalised advantages and a token-level clipped policy gradient.

Advantages follow the paper's eq. 1: ``(s_i - mean) / sqrt(var + eps)`` over a group of G completions of one
prompt, with the population variance and ``eps`` inside the square root; a group whose rewards are all equal gets
exactly zero advantage. The loss is PPO-style and token-level (every completion token of the batch weighs the
same; the normaliser is the batch's token count, fixed before the replay): ``ratio = exp(logp - logp_old)`` and
``loss_t = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t``, where ``KL_t`` is the k3
estimator ``exp(ref - logp) - (ref - logp) - 1`` against the reference log-probs.

``pi_old`` is, by default, the first optimisation pass's own log-probs, detached (``TokenBatch.old_logp=None`` in
that pass): its ratio is then exactly 1 in any precision, and the clip acts only from the second pass on. The
rollout's sampling log-probs agree with the replay's to ~1e-6 in fp32 but not in bf16 (different kernels and
shapes), so using them as ``pi_old`` would let the clip act on numerical noise; their gap is logged instead. The
paper writes the objective without ratio or clip; with one pass per batch the clipped form is its policy gradient.
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
    adv = (rewards - mean) / torch.sqrt(var + eps)
    # the mean of equal non-binary rewards (e.g. 0.1) is not always exactly that value in floating point: force
    # exact zeros, so a group without signal is never replayed
    return adv.masked_fill(spread(rewards).logical_not()[:, None], 0.0)


def spread(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [n_prompts, G] -> [n_prompts] bool: whether the group's rewards differ (it carries a signal)."""
    return rewards.amax(dim=1) > rewards.amin(dim=1)


def soft_overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's overlong reward shaping: lengths [rows] -> [rows] in [-penalty, 0]; 0 up to ``max_len - buffer``
    tokens, then linear down to ``-penalty`` at ``max_len``."""
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    over = (lengths.float() - (max_len - buffer)).clamp(min=0) / buffer
    return -penalty * over.clamp(max=1.0)


@dataclass
class TokenBatch:
    """Per-token quantities, all fixed before the replay. Shapes [batch, T]."""

    advantages: torch.Tensor  # [batch] broadcast over tokens, stored [batch, 1]
    old_logp: torch.Tensor | None  # pi_old; None: the pass's own detached log-probs (ratio exactly 1)
    mask: torch.Tensor  # bool, completion tokens in the loss
    ref_logp: torch.Tensor | None = None
    normalizer: float = 1.0


def clipped_token_loss(logp: torch.Tensor, batch: TokenBatch, cols: slice, *, rows: slice = slice(None),
                       clip_low: float = 0.2, clip_high: float = 0.2, beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Loss (to minimise) of the completion tokens ``cols`` of rows ``rows`` (a replay micro-batch): logp
    [rows, n] with grad."""
    mask = batch.mask[rows, cols].to(logp.dtype)
    old = logp.detach() if batch.old_logp is None else batch.old_logp[rows, cols].to(logp.dtype)
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
