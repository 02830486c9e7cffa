"""pte: Progressive Thought Encoding — RL training of reasoning LMs under a fixed-size KV cache."""

from pte.cache import BoundedCache, CacheListener, EvictionEvent
from pte.eviction import EvictionPolicy, KeyNorm, SlidingWindow
from pte.rollout import CacheSpec, RolloutResult, RolloutRow, Sampling, rollout

__version__ = "0.1.0"
__all__ = [
    "BoundedCache", "CacheListener", "EvictionEvent", "EvictionPolicy", "KeyNorm", "SlidingWindow",
    "CacheSpec", "RolloutResult", "RolloutRow", "Sampling", "rollout",
]
