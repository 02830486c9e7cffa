"""A transformers KV cache that keeps the question and a bounded window of thought tokens (the paper's policy D).

Layout of every layer, physically: ``[prompt (left pads included) | kept thought tokens]``. The prompt is a
never-evicted prefix; thought tokens (completion tokens fed back to the model) live in a window of at most
``window`` tokens. Eviction happens *between* forward passes, never inside ``update``: before a forward that
feeds thought tokens, if the window already holds ``window`` of them, ``ceil(evict_fraction * window)`` are
cut from every layer at once (the oldest, for the sliding window). So a query sees at most ``window`` thought
tokens, its own included, and a multi-token forward never crosses an eviction (it raises instead).

Positions: tokens keep the RoPE positions they were fed at; callers pass ``position_ids`` to the model and to
:meth:`BoundedCache.begin_forward`. ``get_seq_length()`` reports the *logical* length (tokens ever fed, so
``generate`` slices its inputs right); ``get_query_offset()`` / ``get_mask_sizes()`` the *physical* one with kv
offset 0, so transformers builds the causal mask over physical indices. That mask is exact because all cached
tokens precede the incoming ones and physical order is original order. Padding is hidden by a 2D mask over
physical indices (:meth:`BoundedCache.attention_mask`); a longer logical mask (what ``generate`` passes) works
too, because the prompt, where all pads sit, is a prefix of both.

Each eviction hands every layer's evicted keys/values, with their positions, to the listeners.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from pte.eviction import EvictionPolicy, make_policy


@dataclass
class EvictionEvent:
    """What one eviction removed. Lists are per layer."""

    step: int  # thought tokens fed before this eviction: the index of the completion token about to be fed
    keys: list[torch.Tensor]  # [batch, kv_heads, n_evict, head_dim], RoPE applied (as cached)
    values: list[torch.Tensor]  # [batch, kv_heads, n_evict, head_dim]
    positions: list[torch.Tensor]  # [batch, n_evict]
    indices: list[torch.Tensor] | None  # [batch, n_evict] window indices, for policies that record them


class CacheListener:
    """Subscribes to a :class:`BoundedCache` (the thought encoder does)."""

    def on_evict(self, event: EvictionEvent) -> None:
        pass

    def on_select_rows(self, index: torch.Tensor) -> None:
        """Rows ``index`` of the batch are kept (finished rows were dropped)."""


class BoundedLayer(DynamicLayer):
    is_croppable = False

    def __init__(self, cache: "BoundedCache", layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.positions: torch.Tensor | None = None  # [batch, physical]
        self.seen = 0

    def update(self, key_states, value_states, *args, **kwargs):
        incoming = self.cache._incoming_positions
        if incoming is None or incoming.shape[-1] != key_states.shape[-2]:
            raise RuntimeError(
                "BoundedCache: call cache.begin_forward(position_ids) before each forward "
                "(pte's loops do; for model.generate use cache.attach(model))"
            )
        keys, values = super().update(key_states, value_states)
        self.positions = incoming if self.positions is None else torch.cat([self.positions, incoming], dim=-1)
        self.seen += key_states.shape[-2]
        if self.layer_idx == len(self.cache.layers) - 1:
            self.cache._note_peak()
        return keys, values

    def physical_length(self) -> int:
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.physical_length() + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("BoundedCache does not support crop (assisted decoding); it evicts on its own")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions = self.positions[indices]

    def evict(self, prompt_len: int, n_evict: int, policy: EvictionPolicy):
        """Cut ``n_evict`` thought tokens; return their keys, values, positions and (if chosen) indices."""
        thought_k, thought_v = self.keys[:, :, prompt_len:], self.values[:, :, prompt_len:]
        thought_pos = self.positions[:, prompt_len:]
        idx = policy.select(self.layer_idx, thought_k, thought_v, thought_pos, n_evict)
        if idx is None:
            out = (thought_k[:, :, :n_evict], thought_v[:, :, :n_evict], thought_pos[:, :n_evict])
            kept_k, kept_v, kept_pos = thought_k[:, :, n_evict:], thought_v[:, :, n_evict:], thought_pos[:, n_evict:]
        else:
            batch, window = thought_pos.shape
            evicted = torch.zeros(batch, window, dtype=torch.bool, device=idx.device).scatter_(1, idx, True)
            keep = (~evicted).nonzero()[:, 1].view(batch, window - n_evict)
            out = (_gather(thought_k, idx), _gather(thought_v, idx), thought_pos.gather(1, idx))
            kept_k, kept_v, kept_pos = _gather(thought_k, keep), _gather(thought_v, keep), thought_pos.gather(1, keep)
        self.keys = torch.cat([self.keys[:, :, :prompt_len], kept_k], dim=2)
        self.values = torch.cat([self.values[:, :, :prompt_len], kept_v], dim=2)
        self.positions = torch.cat([self.positions[:, :prompt_len], kept_pos], dim=1)
        return (*out, idx)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, dim], idx: [batch, n] -> [batch, heads, n, dim]."""
    b, h, _, d = x.shape
    return x.gather(2, idx[:, None, :, None].expand(b, h, idx.shape[1], d))


class BoundedCache(Cache):
    """Prompt prefix + a window of ``window`` thought tokens; ``window=None`` is a full (never-evicting) cache."""

    def __init__(
        self,
        num_layers: int,
        window: int | None = None,
        evict_fraction: float = 0.25,
        policy: str | EvictionPolicy = "sliding",
        listeners: tuple[CacheListener, ...] | list[CacheListener] = (),
    ):
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, int):
                raise TypeError(f"window={window!r}: expected an int or None (full cache)")
            if window < 1:
                raise ValueError(f"window={window}: the cache must hold at least one thought token; set window >= 1 (or None for a full cache)")
        if not (0.0 < evict_fraction <= 1.0):
            raise ValueError(f"evict_fraction={evict_fraction}: must lie in (0, 1]; the paper uses 0.25")
        super().__init__(layers=[BoundedLayer(self, i) for i in range(num_layers)])
        self.window = window
        self.evict_fraction = evict_fraction
        self.n_evict = None if window is None else max(1, math.ceil(round(evict_fraction * window, 9)))
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.listeners = list(listeners)
        self.prompt_len: int | None = None
        self.prompt_mask: torch.Tensor | None = None  # [batch, prompt_len] bool, False at pads
        self.has_padding = False
        self.evictions = 0
        self.peak_tokens = 0  # physical tokens per row
        self.peak_bytes = 0
        self._incoming_positions: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model, **kwargs) -> "BoundedCache":
        return cls(model.config.num_hidden_layers, **kwargs)

    # -- lengths ------------------------------------------------------------------------------------------
    def physical_length(self) -> int:
        return self.layers[0].physical_length()

    @property
    def thought_tokens(self) -> int:
        """Thought tokens currently held (the same in every layer and row)."""
        return 0 if self.prompt_len is None else self.physical_length() - self.prompt_len

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].physical_length()

    def cache_bytes(self) -> int:
        return sum(l.keys.nbytes + l.values.nbytes for l in self.layers if l.keys is not None)

    def _note_peak(self) -> None:
        self.peak_tokens = max(self.peak_tokens, self.physical_length())
        self.peak_bytes = max(self.peak_bytes, self.cache_bytes())

    # -- the forward protocol -----------------------------------------------------------------------------
    def begin_forward(self, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> EvictionEvent | None:
        """Call before every forward. The first call is the prompt (``attention_mask``: its ``[batch, P]`` pad
        mask); later calls feed thought tokens and may evict first. Returns the eviction, if one happened."""
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be [batch, n_incoming], got shape {tuple(position_ids.shape)}")
        n_incoming = position_ids.shape[-1]
        event = None
        if self.prompt_len is None:
            if n_incoming == 0:
                raise ValueError("empty prompt: at least one question token is needed")
            mask = torch.ones_like(position_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            if mask.shape != position_ids.shape:
                raise ValueError(f"prompt attention_mask {tuple(mask.shape)} does not match position_ids {tuple(position_ids.shape)}")
            self.prompt_len, self.prompt_mask, self.has_padding = n_incoming, mask, not bool(mask.all())
        else:
            event = self.evict_if_full(n_incoming)
        self._incoming_positions = position_ids
        return event

    def evict_if_full(self, n_incoming: int) -> EvictionEvent | None:
        if self.window is None:
            return None
        held = self.thought_tokens
        event = self._evict() if held >= self.window else None
        if self.thought_tokens + n_incoming > self.window:
            raise RuntimeError(
                f"a forward of {n_incoming} thought tokens would cross an eviction: the window holds "
                f"{self.thought_tokens}/{self.window}; feed at most {self.window - self.thought_tokens} tokens "
                "before the next eviction (split the forward at the eviction boundary)"
            )
        return event

    def _evict(self) -> EvictionEvent:
        parts = [layer.evict(self.prompt_len, self.n_evict, self.policy) for layer in self.layers]
        keys, values, positions, indices = (list(x) for x in zip(*parts))
        step = self.layers[0].seen - self.prompt_len
        event = EvictionEvent(step, keys, values, positions, indices if self.policy.records_indices else None)
        self.evictions += 1
        for listener in self.listeners:
            listener.on_evict(event)
        return event

    def attention_mask(self, n_incoming: int) -> torch.Tensor | None:
        """2D mask over physical keys for the next forward (``None`` when no row is padded)."""
        if not self.has_padding:
            return None
        batch = self.prompt_mask.shape[0]
        ones = torch.ones(batch, self.thought_tokens + n_incoming, dtype=torch.bool, device=self.prompt_mask.device)
        return torch.cat([self.prompt_mask, ones], dim=1)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` (drops finished rows together with their cache)."""
        super().batch_select_indices(indices)
        if self.prompt_mask is not None:
            self.prompt_mask = self.prompt_mask[indices]
            self.has_padding = not bool(self.prompt_mask.all())
        for listener in self.listeners:
            listener.on_select_rows(indices)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("BoundedCache does not support crop (assisted decoding); it evicts on its own")

    # -- model.generate ---------------------------------------------------------------------------------
    def attach(self, model):
        """Let ``model.generate(..., past_key_values=cache)`` drive this cache: a forward pre-hook calls
        :meth:`begin_forward` with the positions and mask generate passes. Returns the hook handle."""

        def hook(module, args, kwargs):
            if kwargs.get("past_key_values") is not self:
                return None
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                raise RuntimeError("BoundedCache needs explicit position_ids in every forward")
            mask = kwargs.get("attention_mask")
            if self.prompt_len is None:
                mask = None if mask is None else mask[:, -position_ids.shape[-1]:]
            self.begin_forward(position_ids, mask)
            return None

        return model.register_forward_pre_hook(hook, with_kwargs=True)
