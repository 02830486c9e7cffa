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

Policies (:mod:`pte.eviction`) choose what leaves; the schedule stays the sliding window's for all of them. A
policy may cut a different count per layer (PyramidKV), so layers may hold different numbers of thought tokens;
layer 0 holds the most. transformers builds one attention mask, sized by layer 0, and a hook on every attention
module (installed by :meth:`BoundedCache.for_model`) hands each layer its own columns of it: the prompt's, its
thought tokens' and the incoming ones'. The same hook records each layer's post-RoPE queries for the policies that
score with attention.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from pte.eviction import EvictionPolicy, make_policy


def n_evict_for(window: int, evict_fraction: float) -> int:
    """Tokens cut per eviction: ceil(evict_fraction * window), at least one."""
    return max(1, math.ceil(round(evict_fraction * window, 9)))


def sliding_eviction_steps(n_fed: int, window: int | None, evict_fraction: float = 0.25) -> list[int]:
    """Completion indices c (< n_fed) whose feeding forward is preceded by an eviction, for a count-based policy."""
    if window is None:
        return []
    m = n_evict_for(window, evict_fraction)
    return list(range(window, n_fed, m))


def window_visibility(prompt_len: int, n_fed: int, window: int | None, evict_fraction: float = 0.25,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """What each position of one parallel forward over ``prompt_len + n_fed`` tokens sees under the sliding window:
    causal, the whole prompt, and the thought tokens the window still holds when that token is fed. A forward with
    this mask (and the original positions) equals decoding through :class:`BoundedCache`, so it is both the
    exactness reference and the mask that teacher-forced training under the cache uses.

    -> [n, n] bool. With ``valid`` ([batch, n], False at left pads): [batch, n, n], pad keys hidden and each pad
    query seeing itself (no row fully masked; pad outputs are never read)."""
    n = prompt_len + n_fed
    visible = torch.tril(torch.ones(n, n, dtype=torch.bool))
    if window is not None:
        steps, m = sliding_eviction_steps(n_fed, window, evict_fraction), n_evict_for(window, evict_fraction)
        for c in range(n_fed):  # position prompt_len + c feeds completion token c
            evicted = m * sum(1 for s in steps if s <= c)
            visible[prompt_len + c, prompt_len:prompt_len + evicted] = False
    if valid is None:
        return visible
    return visible[None] & valid[:, None, :] | torch.eye(n, dtype=torch.bool, device=valid.device)[None]


@dataclass
class EvictionEvent:
    """What one eviction removed. Lists are per layer; ``n_evict`` may differ by layer (zero included) under
    per-layer budgets."""

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
    """One layer's keys/values/positions in preallocated buffers, so decoding does not copy the whole cache
    every step (``DynamicLayer`` concatenates). Under autograd (a replay with gradient) it appends
    out of place instead, since in-place writes would break the saved tensors of earlier segments."""

    is_croppable = False
    GROW = 256  # tokens added per reallocation of a full-cache buffer

    def __init__(self, cache: "BoundedCache", layer_idx: int):
        self._k = self._v = self._pos = None  # [batch, kv_heads, capacity, head_dim] / [batch, capacity]
        self._len = 0
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.seen = 0
        self.queries: tuple[torch.Tensor, float] | None = None  # this forward's post-RoPE queries, scaling

    # transformers' layer code reads and assigns .keys/.values; they are views of the buffers' used part
    keys = property(lambda self: None if self._k is None else self._k[:, :, :self._len])
    values = property(lambda self: None if self._v is None else self._v[:, :, :self._len])
    positions = property(lambda self: None if self._pos is None else self._pos[:, :self._len])

    @keys.setter
    def keys(self, value):
        self._k = value
        self._len = 0 if value is None else value.shape[-2]

    @values.setter
    def values(self, value):
        self._v = value

    @positions.setter
    def positions(self, value):
        self._pos = value

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        incoming = self.cache._incoming_positions
        if incoming is None or incoming.shape[-1] != key_states.shape[-2]:
            raise RuntimeError(
                "BoundedCache: call cache.begin_forward(position_ids) before each forward "
                "(pte's loops do; for model.generate use cache.attach(model))"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, used = key_states.shape[-2], self._len
        if self._needs_autograd():
            self._replace(
                key_states if used == 0 else torch.cat([self.keys, key_states], dim=2),
                value_states if used == 0 else torch.cat([self.values, value_states], dim=2),
                incoming if used == 0 else torch.cat([self.positions, incoming], dim=1),
            )
        else:
            self._reserve(used + n, key_states, incoming)
            self._k[:, :, used:used + n] = key_states
            self._v[:, :, used:used + n] = value_states
            self._pos[:, used:used + n] = incoming
            self._len = used + n
        if self.seen > 0 and self.cache.policy.needs_queries:  # a thought forward
            self._observe()
        self.seen += n
        if self.layer_idx == len(self.cache.layers) - 1:
            self.cache._note_peak()
        return self.keys, self.values

    def _observe(self) -> None:
        if self.queries is None:
            raise RuntimeError(f"eviction policy {self.cache.policy.name!r} scores with the layers' queries; build the "
                               "cache with BoundedCache.for_model(model, ...), which records them")
        (queries, scaling), self.queries = self.queries, None
        self.cache.policy.observe(self.layer_idx, queries, self.keys.detach(), self.cache.prompt_mask, scaling)

    def _needs_autograd(self) -> bool:
        """Under grad, never write in place: even keys that need no grad (no adapter on k_proj) are saved by the
        attention for the queries' backward, and an in-place write would invalidate them."""
        return torch.is_grad_enabled()

    def _replace(self, keys, values, positions) -> None:
        self._k, self._v, self._pos, self._len = keys, values, positions, keys.shape[-2]

    def _reserve(self, need: int, like: torch.Tensor, like_pos: torch.Tensor) -> None:
        capacity = 0 if self._k is None else self._k.shape[-2]
        if need <= capacity:
            return
        limit = self.cache.capacity_limit(need, self.layer_idx)
        new_cap = min(limit, need + self.GROW) if limit is not None else need + self.GROW
        b, h, _, d = like.shape
        k = like.new_empty(b, h, new_cap, d)
        v = like.new_empty(b, h, new_cap, d)
        pos = like_pos.new_zeros(b, new_cap)
        if self._len:
            k[:, :, :self._len] = self.keys
            v[:, :, :self._len] = self.values
            pos[:, :self._len] = self.positions
        self._k, self._v, self._pos = k, v, pos

    def physical_length(self) -> int:
        return self._len

    def allocated_bytes(self) -> int:
        return 0 if self._k is None else self._k.nbytes + self._v.nbytes

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._len + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("BoundedCache does not support crop (assisted decoding); it evicts on its own")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._k is not None:
            self._k, self._v, self._pos = self._k[indices], self._v[indices], self._pos[indices]

    def evict(self, prompt_len: int, n_evict: int, policy: EvictionPolicy):
        """Cut ``n_evict`` thought tokens; return their keys, values, positions and (if chosen) indices."""
        thought_k, thought_v = self.keys[:, :, prompt_len:], self.values[:, :, prompt_len:]
        thought_pos = self.positions[:, prompt_len:]
        idx = policy.select(self.layer_idx, thought_k, thought_v, thought_pos, n_evict)
        if idx is None:
            out = (thought_k[:, :, :n_evict], thought_v[:, :, :n_evict], thought_pos[:, :n_evict])
            kept = (thought_k[:, :, n_evict:], thought_v[:, :, n_evict:], thought_pos[:, n_evict:])
        else:
            batch, window = thought_pos.shape
            evicted = torch.zeros(batch, window, dtype=torch.bool, device=idx.device).scatter_(1, idx, True)
            keep = (~evicted).nonzero()[:, 1].view(batch, window - n_evict)
            out = (_gather(thought_k, idx), _gather(thought_v, idx), thought_pos.gather(1, idx))
            kept = (_gather(thought_k, keep), _gather(thought_v, keep), thought_pos.gather(1, keep))
        if self._needs_autograd():
            self._replace(*(torch.cat([whole[..., :prompt_len, :] if whole.dim() == 4 else whole[:, :prompt_len], part],
                                      dim=2 if whole.dim() == 4 else 1)
                            for whole, part in zip((self.keys, self.values, self.positions), kept)))
        else:
            out = tuple(t.clone() for t in out)  # the buffer is about to be overwritten
            kept = tuple(t.clone() for t in kept) if idx is None else kept  # overlapping source and destination
            end = prompt_len + kept[2].shape[1]
            self._k[:, :, prompt_len:end] = kept[0]
            self._v[:, :, prompt_len:end] = kept[1]
            self._pos[:, prompt_len:end] = kept[2]
            self._len = end
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
        self.n_evict = None if window is None else n_evict_for(window, evict_fraction)
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.policy.bind(num_layers, window, self.n_evict)
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
        """A cache for ``model``; installs (once) the attention hooks that per-layer budgets and scores need."""
        _install_attention_hooks(model)
        return cls(model.config.num_hidden_layers, **kwargs)

    # -- lengths ------------------------------------------------------------------------------------------
    def physical_length(self) -> int:
        return self.layers[0].physical_length()

    @property
    def thought_tokens(self) -> int:
        """Thought tokens layer 0 holds (every row alike; every layer alike but under per-layer budgets)."""
        return 0 if self.prompt_len is None else self.physical_length() - self.prompt_len

    @property
    def scheduled_tokens(self) -> int:
        """Thought tokens the sliding window would hold now: the eviction schedule every policy follows."""
        return 0 if self.prompt_len is None else self.layers[0].seen - self.prompt_len - self.evictions * self.n_evict

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].physical_length()

    def cache_bytes(self) -> int:
        """Bytes allocated for keys and values (buffers included, not just the used part)."""
        return sum(layer.allocated_bytes() for layer in self.layers)

    def capacity_limit(self, need: int, layer_idx: int = 0) -> int | None:
        """The most tokens a layer will ever hold (prompt + its window), or None for a full cache."""
        if self.window is None or self.prompt_len is None:
            return None if self.window is None else need  # the prompt forward: exactly the prompt, for now
        return max(need, self.prompt_len + self.policy.layer_window(layer_idx))

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
        event = self._evict() if self.scheduled_tokens >= self.window else None
        held = self.scheduled_tokens
        if held + n_incoming > self.window:
            raise RuntimeError(
                f"a forward of {n_incoming} thought tokens would cross an eviction: the window holds "
                f"{held}/{self.window}; feed at most {self.window - held} tokens "
                "before the next eviction (split the forward at the eviction boundary)"
            )
        return event

    def _evict(self) -> EvictionEvent:
        parts = []
        for layer in self.layers:
            n = self.policy.n_evict(layer.layer_idx, layer.physical_length() - self.prompt_len)
            parts.append(layer.evict(self.prompt_len, n, self.policy))
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
        self.policy.select_rows(indices)
        if self.prompt_mask is not None:
            self.prompt_mask = self.prompt_mask[indices]
            self.has_padding = not bool(self.prompt_mask.all())
        for listener in self.listeners:
            listener.on_select_rows(indices)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("BoundedCache does not support crop (assisted decoding); it evicts on its own")

    def detach_(self) -> None:
        """Cut the autograd graph behind the cached keys/values (between replay segments)."""
        for layer in self.layers:
            if layer._k is not None:
                layer._k, layer._v = layer._k.detach(), layer._v.detach()

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


def _install_attention_hooks(model) -> None:
    """Hook every attention module once; the hooks act only in forwards that pass a :class:`BoundedCache`."""
    for module in model.modules():
        if hasattr(module, "q_proj") and hasattr(module, "layer_idx") and not getattr(module, "_pte_hooked", False):
            module.register_forward_pre_hook(_attention_pre_hook, with_kwargs=True)
            module.register_forward_hook(_attention_post_hook)
            module._pte_hooked = True
            module._pte_sink = None


def _attention_pre_hook(attn, args, kwargs):
    """Before a layer's attention: hand it its own mask columns, and arm the query recorder if the policy scores.

    Queries are recorded from the module that emits them (``q_norm`` where the family has one, else ``q_proj``,
    looked up per forward so an adapter swapped in is the one hooked) and rotated with this forward's RoPE
    tables: the model computes them anyway, and a transformers Cache never receives them."""
    attn._pte_sink = None
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, BoundedCache) or cache.prompt_len is None:
        return None
    layer = cache.layers[attn.layer_idx]
    if cache.policy.needs_queries and layer.seen > 0:
        source = attn.q_norm if hasattr(attn, "q_norm") else attn.q_proj
        if not getattr(source, "_pte_query_hook", False):
            source.register_forward_hook(lambda mod, inp, out, attn=attn: _record_queries(attn, out))
            source._pte_query_hook = True
        attn._pte_sink = (layer, kwargs["position_embeddings"])
    mask = kwargs.get("attention_mask")
    n = kwargs["hidden_states"].shape[1]
    own = layer.physical_length() + n
    if mask is None or mask.shape[-1] == own:
        return None
    longest = mask.shape[-1] - n
    if layer.physical_length() > longest:
        raise RuntimeError(f"BoundedCache: layer {attn.layer_idx} holds more tokens than layer 0; a policy's "
                           "per-layer budgets must not increase with depth")
    kwargs["attention_mask"] = torch.cat([mask[..., :layer.physical_length()], mask[..., longest:]], dim=-1)
    return args, kwargs


def _attention_post_hook(attn, args, output):
    attn._pte_sink = None


def _record_queries(attn, output: torch.Tensor) -> None:
    """output: [batch, n, heads * head_dim] (q_proj) or [batch, n, heads, head_dim] (q_norm)."""
    if attn._pte_sink is None:
        return
    layer, (cos, sin) = attn._pte_sink
    b, n = output.shape[:2]
    q = output.detach().reshape(b, n, -1, attn.head_dim).transpose(1, 2)  # [batch, heads, n, head_dim]
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    layer.queries = (rope(q, q, cos, sin)[0], attn.scaling)
