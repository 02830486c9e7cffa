"""The training methods as data: each is a preset of two switches, not a code path (docs/design.md).

A method's adapter either carries a thought state that the evicted keys/values update (PTE) or fixes ``S`` to
the identity (a static LoRA); and it trains either under the bounded cache it will be used with (LoRA_c, PTE)
or with the full cache (LoRA). Config validation, the adapter, bench, demo and check-mechanism read this table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    stateful: bool  # S is the thought state, updated on every eviction; else S = I (so n_global must equal rank)
    bounded_cache: bool  # trained (rollout and replay) under the sliding window; else with the full cache


METHODS = {
    "lora": Method(stateful=False, bounded_cache=False),
    "lora_c": Method(stateful=False, bounded_cache=True),
    "pte": Method(stateful=True, bounded_cache=True),
}
