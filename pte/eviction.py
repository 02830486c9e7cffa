"""Eviction policies: which thought tokens leave a full window.

A policy sees one layer's thought window and returns the indices (into that window) of the tokens to evict,
or ``None`` for "the oldest ``n``" (the paper's sliding window, which every layer and row shares and which the
cache applies as a slice). Score-based policies may pick different tokens per row and per layer; the cache
keeps every row and layer at the same physical length, because each evicts the same number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class EvictionPolicy:
    """Base class. ``select`` returns ``[batch, n_evict]`` window indices (ascending) or ``None`` (oldest)."""

    name: str = "base"
    records_indices: bool = False  # True when a replay must re-apply the recorded indices

    def select(
        self,
        layer_idx: int,
        keys: torch.Tensor,  # [batch, kv_heads, window, head_dim]: this layer's thought window
        values: torch.Tensor,
        positions: torch.Tensor,  # [batch, window]
        n_evict: int,
    ) -> torch.Tensor | None:
        raise NotImplementedError


@dataclass
class SlidingWindow(EvictionPolicy):
    """The paper's policy D: evict the oldest block of thought tokens."""

    name: str = "sliding"

    def select(self, layer_idx, keys, values, positions, n_evict):
        return None


@dataclass
class KeyNorm(EvictionPolicy):
    """Score-based: evict the thought tokens whose keys have the largest L2 norm (mean over kv heads).

    Keys with a small norm tend to draw the most attention (Devoto et al., 2024, "A simple and effective L2
    norm-based strategy for KV cache compression"; kvpress's KnormPress). Unlike H2O it needs no attention
    weights, so it works with sdpa and flash attention. Picks differ per row and layer, so they are recorded.
    """

    name: str = "keynorm"
    records_indices: bool = True

    def select(self, layer_idx, keys, values, positions, n_evict):
        scores = keys.float().norm(dim=-1).mean(dim=1)  # [batch, window]
        return scores.topk(n_evict, dim=-1).indices.sort(dim=-1).values


@dataclass
class Recorded(EvictionPolicy):
    """Re-applies the indices a score-based policy chose during a rollout (for replay).

    ``indices[event][layer]`` is ``[batch, n_evict]``; events are consumed in order.
    """

    indices: list[list[torch.Tensor]] = field(default_factory=list)
    name: str = "recorded"
    records_indices: bool = True
    _event: int = 0

    def select(self, layer_idx, keys, values, positions, n_evict):
        if self._event >= len(self.indices):
            raise RuntimeError(
                f"recorded policy: eviction #{self._event + 1} was not recorded ({len(self.indices)} were); "
                "replay the same tokens with the same window and evict fraction as the rollout"
            )
        chosen = self.indices[self._event][layer_idx]
        if chosen.shape[-1] != n_evict:
            raise RuntimeError(f"recorded policy: eviction #{self._event + 1} recorded {chosen.shape[-1]} tokens, cache asks {n_evict}")
        if layer_idx == len(self.indices[self._event]) - 1:
            self._event += 1
        return chosen.to(keys.device)


POLICIES = {"sliding": SlidingWindow, "keynorm": KeyNorm}


def make_policy(name: str) -> EvictionPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]()
