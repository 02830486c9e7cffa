"""Eviction policies: which thought tokens leave a full window.

kvpress's ScorerPress shape: a policy implements one :meth:`EvictionPolicy.score` hook over a layer's thought
window; the base class evicts the lowest scores (the newest ``keep_newest`` tokens excepted) and returns their
indices sorted, so kept tokens keep their original order and RoPE positions. ``select`` returns ``None`` only for
the sliding window, whose "oldest ``n``" every row shares and the cache applies as a slice.

Events. Every policy evicts on the sliding window's schedule (the cache decides *when*: each time ``window``
thought tokens are held under that schedule), so the thought state and the replay's segments see one eviction step
for all layers. A policy decides *what* and *how many per layer* (:meth:`EvictionPolicy.n_evict`): all but
:class:`PyramidKV` cut ``ceil(evict_fraction * window)`` tokens from every layer; PyramidKV cuts per-layer counts
(zero included) that bring each layer to its own budget.

Attention scores (:class:`H2O`, :class:`SnapKV`, :class:`PyramidKV`) come from the cached keys and each layer's
post-RoPE queries, which the cache records through a hook on the attention module (``BoundedCache.for_model``
installs it), so they work under sdpa and flash attention: no eager attention weights are needed.

Choices differ per row and layer, so score policies set ``records_indices`` and the rollout records them;
:class:`Recorded` re-applies them in the replay. A policy instance serves one cache (score policies keep
per-layer statistics; :class:`Recorded` counts events per layer): build one per cache (:func:`make_policy`).

HeadKV (head-wise budgets) is not offered: it needs ragged per-head key sets, and a layer's cache here is one
rectangular ``[batch, kv_heads, seq, head_dim]`` tensor that sdpa/eager attend to under one mask shared by all heads
(and one position per token, which the thought state un-rotates). Padding heads to the longest set would keep the
memory a head-wise budget is meant to save; a varlen kernel and per-head positions in :class:`EvictionEvent` would
be needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


class EvictionPolicy:
    """Base class: :meth:`score` the thought window (higher = keep); :meth:`select` evicts the lowest."""

    name: str = "base"
    records_indices: bool = True  # True when a replay must re-apply the recorded indices
    needs_queries: bool = False  # True when the cache must record each layer's queries for :meth:`observe`

    def bind(self, num_layers: int, window: int | None, n_evict: int | None) -> None:
        """Called once by the cache that this policy serves."""
        self.num_layers, self.window, self.m = num_layers, window, n_evict

    # -- the hooks a policy implements ----------------------------------------------------------------------
    def score(
        self,
        layer_idx: int,
        keys: torch.Tensor,  # [batch, kv_heads, window, head_dim]: this layer's thought window (post-RoPE)
        values: torch.Tensor,
        positions: torch.Tensor,  # [batch, window]
    ) -> torch.Tensor:  # [batch, window]: higher is kept
        raise NotImplementedError

    def keep_newest(self, layer_idx: int) -> int:
        """The newest tokens never evicted (H2O's recent tokens, SnapKV's observation window)."""
        return 0

    def layer_window(self, layer_idx: int) -> int | None:
        """The most thought tokens this layer holds (its budget)."""
        return self.window

    def n_evict(self, layer_idx: int, held: int) -> int:
        """Tokens this layer cuts at an eviction event, holding ``held`` thought tokens."""
        return self.m

    def observe(self, layer_idx: int, queries: torch.Tensor, keys: torch.Tensor, prompt_mask: torch.Tensor,
                scaling: float) -> None:
        """After a thought forward: its post-RoPE ``queries`` [batch, heads, n, head_dim] and the layer's keys
        [batch, kv_heads, P + window, head_dim], the last ``n`` of them its own; ``prompt_mask`` [batch, P]."""

    def select_rows(self, index: torch.Tensor) -> None:
        """Rows ``index`` of the batch are kept (finished rows were dropped)."""

    # -- written once ---------------------------------------------------------------------------------------
    def select(self, layer_idx, keys, values, positions, n_evict) -> torch.Tensor | None:
        """-> ``[batch, n_evict]`` window indices, ascending: the lowest scores outside the newest protected."""
        scores = self.score(layer_idx, keys, values, positions).float()
        window = scores.shape[-1]
        protect = min(self.keep_newest(layer_idx), window - n_evict)
        if protect > 0:
            scores = scores.clone()
            scores[:, window - protect:] = math.inf
        return scores.topk(n_evict, dim=-1, largest=False).indices.sort(dim=-1).values


@dataclass
class SlidingWindow(EvictionPolicy):
    """The paper's policy D: evict the oldest block of thought tokens (the score is the position)."""

    name: str = "sliding"
    records_indices: bool = False

    def score(self, layer_idx, keys, values, positions):
        return positions

    def select(self, layer_idx, keys, values, positions, n_evict):
        return None  # the oldest n of every row: the cache slices instead of gathering


@dataclass
class KeyNorm(EvictionPolicy):
    """Evict the thought tokens whose keys have the largest L2 norm (mean over kv heads).

    Keys with a small norm tend to draw the most attention (Devoto et al., 2024, "A simple and effective L2
    norm-based strategy for KV cache compression"; kvpress's KnormPress). It needs no queries at all.
    """

    name: str = "keynorm"

    def score(self, layer_idx, keys, values, positions):
        return -keys.float().norm(dim=-1).mean(dim=1)


def attention_logits(queries: torch.Tensor, keys: torch.Tensor, scaling: float, first_slot: int) -> torch.Tensor:
    """Causal, scaled logits in fp32: queries [batch, heads, n, d] sit at key slots ``first_slot ..
    first_slot + n - 1`` of keys [batch, kv_heads, L, d] -> [batch, heads, n, L], ``-inf`` on later keys."""
    q, k = queries.float(), keys.float()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query heads
    logits = q @ k.transpose(-1, -2) * scaling
    n, L = q.shape[-2], k.shape[-2]
    later = torch.ones(n, L, dtype=torch.bool, device=q.device).triu(first_slot + 1)
    return logits.masked_fill(later, -math.inf)


def _hide_pads(logits: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """Mask the prompt's pads (the first ``P`` keys) out of logits [batch, heads, n, L]."""
    P = prompt_mask.shape[1]
    pads = torch.zeros(logits.shape[0], logits.shape[-1], dtype=torch.bool, device=logits.device)
    pads[:, :P] = ~prompt_mask.to(logits.device)
    return logits.masked_fill(pads[:, None, None], -math.inf)


def _drop(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [batch, window] without the columns idx [batch, n] (kept in order)."""
    keep = torch.ones_like(x, dtype=torch.bool).scatter_(1, idx, False)
    return x[keep].view(x.shape[0], -1)


@dataclass
class H2O(EvictionPolicy):
    """Heavy hitters (Zhang et al., 2023): evict the thought tokens that received the least attention, summed
    over heads and over every query since they were cached; the newest ``recent`` are always kept.

    The sum is kept incrementally: one fp32 number per cached thought token and layer, updated after each forward
    from that forward's queries (:meth:`observe`), so memory is constant per cached token and no attention matrix
    is ever kept. The prompt's queries are not counted: they cannot see thought tokens.
    """

    name: str = "h2o"
    recent: int = 2
    needs_queries: bool = True

    def bind(self, num_layers, window, n_evict):
        super().bind(num_layers, window, n_evict)
        self.received: list[torch.Tensor | None] = [None] * num_layers  # per layer [batch, thoughts held]

    def observe(self, layer_idx, queries, keys, prompt_mask, scaling):
        n, P = queries.shape[-2], prompt_mask.shape[1]
        logits = _hide_pads(attention_logits(queries, keys, scaling, keys.shape[-2] - n), prompt_mask)
        got = logits.softmax(-1)[..., P:].sum(dim=(1, 2))  # [batch, thoughts held]
        old = self.received[layer_idx]
        if old is not None:
            got[:, :old.shape[1]] += old
        self.received[layer_idx] = got

    def keep_newest(self, layer_idx):
        return self.recent

    def score(self, layer_idx, keys, values, positions):
        received = self.received[layer_idx]
        if received is None or received.shape[1] != keys.shape[-2]:
            raise RuntimeError("H2O: no attention recorded for this window; build the cache with "
                               "BoundedCache.for_model(model, ...) so that it records the layers' queries")
        return received

    def select(self, layer_idx, keys, values, positions, n_evict):
        idx = super().select(layer_idx, keys, values, positions, n_evict)
        self.received[layer_idx] = _drop(self.received[layer_idx], idx.to(self.received[layer_idx].device))
        return idx

    def select_rows(self, index):
        self.received = [None if r is None else r[index.to(r.device)] for r in self.received]


@dataclass
class SnapKV(EvictionPolicy):
    """SnapKV-style (Li et al., 2024): at each eviction, score the window by the attention it receives from the
    last ``observation`` queries (mean over heads and those queries), average-pooled over ``kernel`` neighbouring
    positions so that a kept token keeps its context; the observation window itself is kept.

    The last queries are kept per layer with the log-sum-exp of their logits over the prompt (whose keys never
    change), so the attention over the whole cache is exact from the window's keys alone.
    """

    name: str = "snapkv"
    observation: int = 4
    kernel: int = 3
    needs_queries: bool = True

    def __post_init__(self):
        if self.observation < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"{type(self).__name__}: observation={self.observation} must be >= 1 and "
                             f"kernel={self.kernel} odd and >= 1")

    def bind(self, num_layers, window, n_evict):
        super().bind(num_layers, window, n_evict)
        self.queries: list[torch.Tensor | None] = [None] * num_layers  # [batch, heads, <= observation, head_dim]
        self.prompt_lse: list[torch.Tensor | None] = [None] * num_layers  # [batch, heads, <= observation]
        self.scaling = 1.0

    def observe(self, layer_idx, queries, keys, prompt_mask, scaling):
        P = prompt_mask.shape[1]
        logits = _hide_pads(attention_logits(queries, keys[:, :, :P], scaling, P), prompt_mask)
        lse = logits.logsumexp(-1)
        if self.queries[layer_idx] is not None:
            queries = torch.cat([self.queries[layer_idx], queries.float()], dim=2)
            lse = torch.cat([self.prompt_lse[layer_idx], lse], dim=2)
        self.queries[layer_idx] = queries[:, :, -self.observation:].float()
        self.prompt_lse[layer_idx] = lse[:, :, -self.observation:]
        self.scaling = scaling

    def keep_newest(self, layer_idx):
        return self.observation

    def score(self, layer_idx, keys, values, positions):
        q, lse_prompt = self.queries[layer_idx], self.prompt_lse[layer_idx]
        if q is None:
            raise RuntimeError("SnapKV: no queries recorded; build the cache with BoundedCache.for_model(model, ...) "
                               "so that it records the layers' queries")
        w, window = q.shape[2], keys.shape[-2]
        logits = attention_logits(q, keys, self.scaling, window - w)  # the observed are the newest w tokens
        lse = torch.logaddexp(lse_prompt, logits.logsumexp(-1))
        attn = (logits - lse[..., None]).exp().mean(dim=(1, 2))  # [batch, window]
        return F.avg_pool1d(attn[:, None], self.kernel, stride=1, padding=self.kernel // 2,
                            count_include_pad=False)[:, 0]

    def select(self, layer_idx, keys, values, positions, n_evict):
        idx = super().select(layer_idx, keys, values, positions, n_evict)
        # only protected observed tokens survive for sure; keep those queries, so they stay the newest slots
        kept = min(self.observation, keys.shape[-2] - n_evict)
        self.queries[layer_idx] = self.queries[layer_idx][:, :, self.queries[layer_idx].shape[2] - kept:]
        self.prompt_lse[layer_idx] = self.prompt_lse[layer_idx][:, :, self.prompt_lse[layer_idx].shape[2] - kept:]
        return idx

    def select_rows(self, index):
        self.queries = [None if q is None else q[index.to(q.device)] for q in self.queries]
        self.prompt_lse = [None if x is None else x[index.to(x.device)] for x in self.prompt_lse]


def pyramid_budgets(num_layers: int, window: int, n_evict: int, spread: float) -> list[int]:
    """Per-layer thought budgets, linear from ``(1 + spread) * window`` at layer 0 to ``(1 - spread) * window`` at
    the last, each at least ``n_evict``, summing to exactly ``num_layers * window``."""
    if num_layers == 1:
        return [window]
    raw = [window * (1 + spread * (1 - 2 * l / (num_layers - 1))) for l in range(num_layers)]
    budgets = [max(n_evict, math.floor(x)) for x in raw]
    target = num_layers * window
    l = 0
    while sum(budgets) < target:
        budgets[l % num_layers] += 1
        l += 1
    while sum(budgets) > target:
        top = max(range(num_layers), key=lambda i: (budgets[i] - n_evict, -i))
        budgets[top] -= 1
    return sorted(budgets, reverse=True)


@dataclass
class PyramidKV(SnapKV):
    """PyramidKV-style (Cai et al., 2024): SnapKV scores under per-layer budgets that decrease with depth, at the
    sliding window's total (:func:`pyramid_budgets`).

    Events stay the sliding window's, for every layer; only the count each layer cuts differs: enough to hold at
    most its budget until the next event, ``max(0, held + n_evict - budget)``. So a deep layer cuts a large block at
    the first event and ``n_evict`` after, and a shallow one cuts nothing until it has grown to its budget (the
    thought state then receives no tokens from it). Layer 0 always holds the most, which lets the cache hand each
    layer its own columns of the one attention mask transformers builds.
    """

    name: str = "pyramidkv"
    spread: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.spread < 1.0:
            raise ValueError(f"PyramidKV: spread={self.spread} must lie in [0, 1)")

    def bind(self, num_layers, window, n_evict):
        super().bind(num_layers, window, n_evict)
        self.budgets = None if window is None else pyramid_budgets(num_layers, window, n_evict, self.spread)

    def layer_window(self, layer_idx):
        return None if self.budgets is None else self.budgets[layer_idx]

    def n_evict(self, layer_idx, held):
        return min(held, max(0, held + self.m - self.budgets[layer_idx]))


@dataclass
class Recorded(EvictionPolicy):
    """Re-applies the indices a score-based policy chose during a rollout (for replay).

    ``indices[event][layer]`` is ``[batch, n_evict of that layer]``. Each layer consumes its own events in order,
    so the order in which layers call it does not matter. ``source`` is the recorded policy, for its budgets.
    """

    indices: list[list[torch.Tensor]] = field(default_factory=list)
    source: EvictionPolicy | None = None
    name: str = "recorded"

    def bind(self, num_layers, window, n_evict):
        super().bind(num_layers, window, n_evict)
        self._next = [0] * num_layers
        if self.source is not None:
            self.source.bind(num_layers, window, n_evict)

    @classmethod
    def from_rows(cls, rows, n_events: int, source: str | EvictionPolicy | None = None) -> "Recorded":
        """From rollout rows' ``evicted_indices`` (per event, per layer ``[n]``); rows that had finished before an
        event evict their oldest tokens there (they are past their end)."""
        events = []
        for k in range(n_events):
            example = next(r.evicted_indices[k] for r in rows if len(r.evicted_indices) > k)
            per_layer = []
            for layer, ex in enumerate(example):
                filler = torch.arange(ex.shape[0])
                per_layer.append(torch.stack([r.evicted_indices[k][layer] if len(r.evicted_indices) > k else filler
                                              for r in rows]))
            events.append(per_layer)
        return cls(events, make_policy(source) if isinstance(source, str) else source)

    def _chosen(self, layer_idx: int) -> torch.Tensor:
        k = self._next[layer_idx]
        if k >= len(self.indices):
            raise RuntimeError(
                f"recorded policy: eviction #{k + 1} of layer {layer_idx} was not recorded ({len(self.indices)} were); "
                "replay the same tokens with the same window and evict fraction as the rollout"
            )
        return self.indices[k][layer_idx]

    def layer_window(self, layer_idx):
        return self.window if self.source is None else self.source.layer_window(layer_idx)

    def n_evict(self, layer_idx, held):
        return self._chosen(layer_idx).shape[-1]

    def select(self, layer_idx, keys, values, positions, n_evict):
        chosen = self._chosen(layer_idx)
        if chosen.shape[-1] != n_evict:
            raise RuntimeError(f"recorded policy: layer {layer_idx} recorded {chosen.shape[-1]} tokens, cache asks {n_evict}")
        self._next[layer_idx] += 1
        return chosen.to(keys.device)


POLICIES = {p.name: p for p in (SlidingWindow, KeyNorm, H2O, SnapKV, PyramidKV)}


def make_policy(name: str) -> EvictionPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]()
