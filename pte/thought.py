"""The thought state: what PTE keeps of evicted thought tokens (paper eq. 4, Fig. 2).

Per decoder layer and per sequence, a state ``S: [n_g, r]``. Learnable global tokens ``h_g: [n_g, d_model]``
(one set per layer: each layer's frozen ``W_Q, W_K, W_V`` differ, so one shared set would have to serve 36
different projections; per layer costs ``n_g * d_model`` parameters a layer, small next to the adapters)
give ``q_g, k_g, v_g`` through the layer's *frozen base* projections (no adapter, no RoPE; Qwen3's q/k norms
applied; GQA heads flattened). Adapter projections ``W^a_Q: d_q -> r``, ``W^a_K, W^a_V: d_kv -> r`` give

    S_g  = (W^a_Q q_g)(W^a_K k_g)^T (W^a_V v_g)          [n_g, r], the initial state
    S'_k = (W^a_Q q_g)(W^a_K K_e)^T (W^a_V V_e)          [n_g, r], from eviction k's keys/values

What S is: ``q_g`` does not depend on the input, so ``sum_k S'_k = Q_a (sum_e k_e^T v_e)`` reads, with fixed
queries, a rank-r *linear-attention memory* of every evicted token: the sum over chunks equals one pass over all
evicted tokens (there is no softmax in eq. 4).

Each read is one :class:`StateRead` (``init`` / ``update`` / ``read``, and the exact-history form beside them):
:class:`SoftmaxRead`, :class:`LinearAccumulate`, :class:`LinearRecursive`. :class:`ThoughtState` calls the chosen
one on every eviction. Defaults (each alternative is a switch in :class:`pte.adapter.AdapterConfig`):
- ``state_attention="softmax"``: each global query reads the evicted tokens (and the global tokens themselves)
  with a softmax, ``S = Normalize(softmax(Q_a [K_g; K_e]^T / sqrt(r)) [V_g; V_e])`` (Fig. 2 labels these paths
  attention), accumulated online over evictions (running max, denominator, numerator per query: constant memory,
  and equal to one pass over every evicted token). Before any eviction it attends to the global tokens alone, the
  counterpart of ``S_g``. Why not eq. 4's linear form by default: a linear memory is a bag of ``k^T v`` products dominated by
  whatever is evicted most often, while a softmax lets a query pick one token out of many; with the replay's exact
  history gradient (:mod:`pte.history`) both learn the long-range task (docs/results.md, "The mechanism check").
- ``state_attention="linear"`` is eq. 4 as printed: ``R = S_g + sum_k S'_k`` (``state_update="accumulate"``) with
  ``S = Normalize(R)``, or ``"recursive"``, ``S <- Normalize(S + S')`` as the text writes it, which forgets old
  evictions geometrically.
- Normalize: Frobenius norm ``sqrt(min(n_g, r))`` (the norm of LoRA's identity), so PTE does not start ~sqrt(r)
  times weaker than LoRA; ``state_scale="learnable"`` makes that norm a per-layer parameter initialised there.
- ``key_rope="unrotate"``: cached keys carry RoPE, ``k_g`` does not; evicted keys are un-rotated with their
  recorded positions before ``W^a_K`` (exact and cheap). ``"rotated"`` uses them as cached.
- Ablations: ``"global_only"`` (no eviction update: S stays the global tokens' read, a re-parametrised static
  LoRA), ``"global0"`` (no global tokens in the state: zero before the first eviction, then the evicted tokens
  alone; ``q_g`` kept for the queries).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn

from pte.cache import CacheListener, EvictionEvent
from pte.history import LinearHistory, SoftmaxHistory


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def unrotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo RoPE: keys [batch, heads, m, head_dim], cos/sin [batch, m, head_dim] (rotation by -theta)."""
    cos, sin = cos[:, None], sin[:, None]
    return keys * cos - rotate_half(keys) * sin


class Summary(NamedTuple):
    """Online-softmax statistics of one read: per query the max score, sum of exp(score - max), and the
    exp-weighted sum of values. ``merge`` of two equals the read of both token sets at once."""

    top: torch.Tensor  # [..., n_g]
    denom: torch.Tensor  # [..., n_g]
    numer: torch.Tensor  # [..., n_g, r]

    def merge(self, other: "Summary") -> "Summary":
        top = torch.maximum(self.top, other.top)
        a, b = (self.top - top).exp(), (other.top - top).exp()
        return Summary(top, self.denom * a + other.denom * b, self.numer * a[..., None] + other.numer * b[..., None])

    def read(self) -> torch.Tensor:
        return self.numer / self.denom[..., None]

    def apply(self, fn) -> "Summary":
        return Summary(*(fn(t) for t in self))


class StateSlot:
    """The state one layer's adapted linears read: ``None`` is the identity (plain LoRA), else ``[batch, n_g, r]``.

    A :class:`ThoughtState` sets it lazily (:meth:`defer`): it is computed at the first read, so a state replaced
    before any forward reads it (the replay's refresh after a segment, then the next segment's eviction) is built
    once, not twice."""

    __slots__ = ("_state", "_pending")

    def __init__(self):
        self._state, self._pending = None, None

    @property
    def state(self) -> torch.Tensor | None:
        if self._pending is not None:
            self._state, self._pending = self._pending(), None
        return self._state

    @state.setter
    def state(self, value: torch.Tensor | None) -> None:
        self._state, self._pending = value, None

    def defer(self, compute) -> None:
        self._state, self._pending = None, compute

    @property
    def pending(self) -> bool:
        return self._pending is not None


class Globals(NamedTuple):
    """What a layer's state takes from its parameters alone: the global queries and the global tokens' own read
    (softmax: its online summary; linear: ``S_g``). Unused fields are ``None``."""

    q: torch.Tensor  # [n_g, r]: W^a_Q q_g
    top: torch.Tensor | None = None  # [n_g]
    denom: torch.Tensor | None = None  # [n_g]
    numer: torch.Tensor | None = None  # [n_g, r]
    initial: torch.Tensor | None = None  # [n_g, r]: S_g

    @property
    def summary(self) -> Summary:
        return Summary(self.top, self.denom, self.numer)


class SharedGlobals:
    """Every layer's :class:`Globals`, computed once and read by many graphs: under no grad (the rollout) as
    constants; with grad (the replay) as detached leaves, so each segment's graph starts there and their gradients
    accumulate in ``.grad``. :meth:`backward` then sends the sum through the parameters in one backward: exact,
    because the parameters do not change within a replay, and it spares every segment the global tokens' pass
    through the frozen projections, forward and backward."""

    def __init__(self, encoders: nn.ModuleList, read: "StateRead"):
        self.encoders, self.read = encoders, read
        self.roots: list[Globals | None] = [None] * len(encoders)
        self.leaves: list[Globals | None] = [None] * len(encoders)

    def __getitem__(self, i: int) -> Globals:
        if self.leaves[i] is None:
            root = self.read.init(self.encoders[i])
            if torch.is_grad_enabled():
                self.roots[i] = root
                root = Globals(*(None if t is None else t.detach().requires_grad_() for t in root))
            self.leaves[i] = root
        return self.leaves[i]

    def backward(self) -> None:
        """Add the leaves' accumulated gradients to the parameters (call once, after the last backward)."""
        roots, grads = [], []
        for root, leaf in zip(self.roots, self.leaves):
            if root is None:
                continue
            for r, l in zip(root, leaf):
                if r is not None and l.grad is not None:
                    roots.append(r)
                    grads.append(l.grad)
        if roots:
            torch.autograd.backward(roots, grads)
        self.roots = [None] * len(self.encoders)
        self.leaves = [None] * len(self.encoders)


class ThoughtEncoder(nn.Module):
    """One decoder layer's global tokens and adapter projections."""

    def __init__(self, attn: nn.Module, rotary: nn.Module, d_model: int, n_global: int, rank: int,
                 head_dim: int, learnable_scale: bool):
        super().__init__()
        # the frozen attention module and rotary embedding are read, never owned (not in state_dict)
        object.__setattr__(self, "attn", attn)
        object.__setattr__(self, "rotary", rotary)
        self.head_dim = head_dim
        d_q, d_kv = self._base("q_proj").out_features, self._base("k_proj").out_features
        fp32 = dict(dtype=torch.float32)  # whatever the base model's dtype (pte.adapter, "Precision")
        self.h_g = nn.Parameter(torch.randn(n_global, d_model, **fp32))
        self.wa_q = nn.Parameter(torch.randn(rank, d_q, **fp32) / math.sqrt(d_q))
        self.wa_k = nn.Parameter(torch.randn(rank, d_kv, **fp32) / math.sqrt(d_kv))
        self.wa_v = nn.Parameter(torch.randn(rank, d_kv, **fp32) / math.sqrt(d_kv))
        self.target_norm = math.sqrt(min(n_global, rank))
        self.log_scale = nn.Parameter(torch.tensor(math.log(self.target_norm), **fp32)) if learnable_scale else None

    def _base(self, name: str) -> nn.Module:
        proj = getattr(self.attn, name)
        return getattr(proj, "base", proj)  # the frozen linear under an adapter

    @property
    def dtype(self) -> torch.dtype:
        """What the encoder computes in: its parameters' dtype (fp32), not the base model's."""
        return self.wa_q.dtype

    def global_qkv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> q_g [n_g, d_q], k_g [n_g, d_kv], v_g [n_g, d_kv] through the frozen projections (run in the base
        dtype, as for any token), returned in :attr:`dtype`."""
        h = self.h_g.to(self._base("q_proj").weight.dtype)
        q, k, v = self._base("q_proj")(h), self._base("k_proj")(h), self._base("v_proj")(h)
        n = h.shape[0]
        if hasattr(self.attn, "q_norm"):
            q = self.attn.q_norm(q.view(n, -1, self.head_dim)).reshape(n, -1)
        if hasattr(self.attn, "k_norm"):
            k = self.attn.k_norm(k.view(n, -1, self.head_dim)).reshape(n, -1)
        return q.to(self.dtype), k.to(self.dtype), v.to(self.dtype)

    def raw(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor | None):
        """Evicted keys/values [batch, kv_heads, m, head_dim] (cache dtype) -> [batch, m, d_kv] each in
        :attr:`dtype`, heads flattened. ``positions`` [batch, m] un-rotate the keys; ``None`` uses them as cached
        (post-RoPE)."""
        keys, values = keys.to(self.dtype), values.to(self.dtype)
        if positions is not None:
            cos, sin = self.rotary(values, positions)
            keys = unrotate(keys, cos, sin)
        b, h, m, d = keys.shape
        return keys.transpose(1, 2).reshape(b, m, h * d), values.transpose(1, 2).reshape(b, m, h * d)

    def project(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor | None):
        """Evicted keys/values [batch, kv_heads, m, head_dim] -> (W^a_K k, W^a_V v), each [batch, m, r]."""
        k, v = self.raw(keys, values, positions)
        return k @ self.wa_k.T, v @ self.wa_v.T

    def summary(self, ka: torch.Tensor, va: torch.Tensor, q: torch.Tensor | None = None) -> Summary:
        """Softmax read of projected keys/values [..., m, r] by the global queries ``q`` [n_g, r] (default
        :meth:`queries`), kept as an online-softmax summary (max, denominator, numerator) so reads of successive
        chunks merge exactly."""
        q = self.queries() if q is None else q
        scores = q @ ka.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [..., n_g, m]
        top = scores.amax(-1)  # [..., n_g]
        w = (scores - top[..., None]).exp()
        return Summary(top, w.sum(-1), w @ va)

    def global_summary(self) -> Summary:
        """The global tokens' own keys/values read by their queries: [n_g], [n_g], [n_g, r]."""
        _, k, v = self.global_qkv()
        return self.summary(k @ self.wa_k.T, v @ self.wa_v.T)

    def queries(self) -> torch.Tensor:
        """W^a_Q q_g: [n_g, r]."""
        return self.global_qkv()[0] @ self.wa_q.T

    def initial_state(self) -> torch.Tensor:
        """S_g: [n_g, r]."""
        q, k, v = self.global_qkv()
        return (q @ self.wa_q.T) @ (k @ self.wa_k.T).T @ (v @ self.wa_v.T)

    def evicted_state(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor | None,
                      q: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 4's S' (linear) from evicted keys/values [batch, kv_heads, m, head_dim] -> [batch, n_g, r]."""
        ka, va = self.project(keys, values, positions)  # [batch, m, r]
        return (self.queries() if q is None else q) @ (ka.transpose(1, 2) @ va)  # [n_g, r] @ [batch, r, r]

    def global_projections(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass of the global tokens through the frozen and the adapter projections: W^a_Q q_g, W^a_K k_g,
        W^a_V v_g, each [n_g, r]."""
        q, k, v = self.global_qkv()
        return q @ self.wa_q.T, k @ self.wa_k.T, v @ self.wa_v.T

    def normalize(self, r: torch.Tensor) -> torch.Tensor:
        """[batch, n_g, r] -> Frobenius norm sqrt(min(n_g, r)) (or the learnt scale) per sample."""
        scale = self.log_scale.exp() if self.log_scale is not None else self.target_norm
        norm = r.flatten(1).norm(dim=-1).clamp_min(1e-12)[:, None, None]
        return r * (scale / norm)


class StateRead:
    """How a layer's state is made of the global tokens and the evicted ones; one subclass per read.

    ``init`` takes what the parameters alone give (:class:`Globals`), ``update`` folds one eviction into the
    history a layer carries, ``read`` makes the state ``[batch, n_g, r]`` of both. The exact-history form
    (``state_grad="history"``) keeps :attr:`history_kind`'s fixed-size statistics instead (``update_exact``) and
    reads them with their gradient through every past eviction (``read_exact``). ``with_globals=False`` is the
    ``global0`` ablation: the global tokens' part of the state is zero."""

    history_kind: type | None = None  # the pte.history statistics of the exact form; None: it has none

    def __init__(self, with_globals: bool = True):
        self.with_globals = with_globals

    def init(self, enc: ThoughtEncoder) -> Globals:
        raise NotImplementedError

    def update(self, enc: ThoughtEncoder, g: Globals, hist, keys: torch.Tensor, values: torch.Tensor,
               positions: torch.Tensor | None, current):
        """-> the history after one eviction: keys/values [batch, kv_heads, m, head_dim], ``positions``
        [batch, m] or ``None`` (keys used as cached), ``current()`` the state before it."""
        raise NotImplementedError

    def read(self, enc: ThoughtEncoder, g: Globals, hist, batch: int) -> torch.Tensor:
        raise NotImplementedError

    def update_exact(self, enc: ThoughtEncoder, g: Globals, hist, keys, values, positions):
        """The exact form's history after one eviction: statistics of the raw evicted keys/values, taken at the
        current (detached) projections."""
        k, v = enc.raw(keys, values, positions)
        new = self.history_kind.of(g.q.detach(), enc.wa_k.detach(), enc.wa_v.detach(), k, v)
        return new if hist is None else hist.merge(new)

    def read_exact(self, enc: ThoughtEncoder, g: Globals, hist, batch: int) -> torch.Tensor:
        raise NotImplementedError


class SoftmaxRead(StateRead):
    """``S = Normalize(softmax(Q_a [K_g; K_e]^T / sqrt(r)) [V_g; V_e])``: the history is the evicted tokens'
    online :class:`Summary`, merged eviction by eviction (equal to one softmax over all of them)."""

    history_kind = SoftmaxHistory

    def init(self, enc):
        q, ka, va = enc.global_projections()
        return Globals(q, *enc.summary(ka, va, q))

    def update(self, enc, g, hist, keys, values, positions, current):
        new = enc.summary(*enc.project(keys, values, positions), g.q)
        return new if hist is None else hist.merge(new)

    def read(self, enc, g, hist, batch):
        if not self.with_globals:
            if hist is None:
                return torch.zeros(batch, *g.q.shape, dtype=enc.dtype, device=enc.h_g.device)
            return enc.normalize(hist.read())
        glob = g.summary.apply(lambda t: t.expand(batch, *t.shape))
        return enc.normalize((glob if hist is None else glob.merge(hist)).read())

    def read_exact(self, enc, g, hist, batch):
        lse_h, read_h = hist.attach(g.q, enc.wa_k, enc.wa_v)
        if not self.with_globals:
            return enc.normalize(read_h)
        lse_g, read_g = g.top + g.denom.log(), g.summary.read()  # [n_g], [n_g, r]
        share = torch.sigmoid(lse_g - lse_h)[..., None]  # the global tokens' share of the softmax mass
        return enc.normalize(share * read_g + (1 - share) * read_h)


class LinearAccumulate(StateRead):
    """Eq. 4 as printed: ``S = Normalize(S_g + sum_k S'_k)``; the history is ``sum_k S'_k``."""

    history_kind = LinearHistory

    def init(self, enc):
        q, ka, va = enc.global_projections()
        return Globals(q, initial=q @ ka.T @ va)

    def initial(self, g: Globals, batch: int) -> torch.Tensor:
        """S_g [batch, n_g, r] (zero without the global tokens)."""
        s_g = g.initial if self.with_globals else torch.zeros_like(g.initial)
        return s_g.expand(batch, -1, -1)

    def update(self, enc, g, hist, keys, values, positions, current):
        s_new = enc.evicted_state(keys, values, positions, g.q)
        return s_new if hist is None else hist + s_new

    def read(self, enc, g, hist, batch):
        return enc.normalize(self.initial(g, batch) if hist is None else self.initial(g, batch) + hist)

    def read_exact(self, enc, g, hist, batch):
        return enc.normalize(self.initial(g, batch) + hist.attach(g.q, enc.wa_k, enc.wa_v))


class LinearRecursive(LinearAccumulate):
    """The text's recursive form, ``S <- Normalize(S + S')``, which forgets old evictions geometrically; the
    history is the latest state. A renormalisation at every eviction has no fixed-size gradient statistics, so
    there is no exact-history form."""

    history_kind = None

    def update(self, enc, g, hist, keys, values, positions, current):
        return enc.normalize(current() + enc.evicted_state(keys, values, positions, g.q))

    def read(self, enc, g, hist, batch):
        return super().read(enc, g, None, batch) if hist is None else hist


READS = {("softmax", "accumulate"): SoftmaxRead, ("linear", "accumulate"): LinearAccumulate,
         ("linear", "recursive"): LinearRecursive}


class ThoughtState(CacheListener):
    """Per-sequence states of every layer, updated on each eviction; writes them into the layers' slots.

    The timing rule follows from when the cache calls :meth:`on_evict`: inside ``begin_forward``, before the
    forward that feeds the next thought token. So that forward, in every adapted linear of every layer, uses the
    state after all evictions made before it; the prompt forward uses the global tokens' state; cached
    keys/values are never recomputed. Tokens between two evictions form one segment under one state.

    How a state is made is its :class:`StateRead` (:data:`READS`, by ``attention`` x ``update``); this class only
    keeps the time. ``history[i]`` is what layer i carries between evictions (the read's history), ``None``
    before the first one. The global tokens' part (:class:`Globals`) comes from the parameters: read from one
    :class:`SharedGlobals` (``share_globals``; by default when built under no grad), or recomputed whenever the
    state is (see :meth:`refresh`), so it always carries a graph. With ``exact_history`` (replay,
    ``state_grad="history"``) the history is kept as :mod:`pte.history`'s fixed-size statistics instead, whose read
    carries the exact gradient through every past eviction. States and histories are in the encoders' dtype (fp32)
    for any base dtype.
    """

    def __init__(self, encoders: nn.ModuleList, slots: list[StateSlot], batch: int, *, attention: str = "softmax",
                 update: str = "accumulate", ablation: str = "none", key_rope: str = "unrotate",
                 exact_history: bool = False, share_globals: bool | None = None):
        if (attention, update) not in READS:
            raise ValueError(f"state_attention={attention!r} with state_update={update!r}: no such state read; "
                             f"choose one of {sorted(READS)}")
        self.read: StateRead = READS[attention, update](with_globals=ablation != "global0")
        if exact_history and self.read.history_kind is None:
            raise ValueError("state_grad='history' needs state_update='accumulate' (a recursive renormalisation has no "
                             "fixed-size gradient statistics); use state_grad='segment'")
        self.encoders, self.slots = encoders, slots
        self.folds_evictions = ablation != "global_only"  # False: the Global-Only ablation
        self.key_rope = key_rope
        self.exact = exact_history
        self.batch = batch
        self.history: list = [None] * len(encoders)
        # None: share when built under no grad (constants); True with grad: the caller calls backward_globals()
        share = not torch.is_grad_enabled() if share_globals is None else share_globals
        self.shared = SharedGlobals(encoders, self.read) if share else None
        self.refresh()

    def _globals(self, i: int) -> Globals:
        """Layer i's :class:`Globals`: shared (:class:`SharedGlobals`), or a fresh graph per state."""
        return self.shared[i] if self.shared is not None else self.read.init(self.encoders[i])

    def backward_globals(self) -> None:
        """With shared globals under grad: send their accumulated gradients into the parameters (after the last
        backward of the graphs that read them)."""
        if self.shared is not None:
            self.shared.backward()

    def _state(self, i: int) -> torch.Tensor:
        enc, hist, g = self.encoders[i], self.history[i], self._globals(i)
        if self.exact and hist is not None:
            return self.read.read_exact(enc, g, hist, self.batch)
        return self.read.read(enc, g, hist, self.batch)

    def refresh(self) -> None:
        """Every layer's state is recomputed from the parameters (a fresh graph) and the carried history, at its
        first read (:meth:`StateSlot.defer`)."""
        for i, slot in enumerate(self.slots):
            slot.defer(lambda i=i: self._state(i))

    def on_evict(self, event: EvictionEvent) -> None:
        if not self.folds_evictions:
            return
        for i, (enc, slot) in enumerate(zip(self.encoders, self.slots)):
            if event.keys[i].shape[-2] == 0:  # a per-layer budget cut nothing here: the state stays
                continue
            pos = event.positions[i] if self.key_rope == "unrotate" else None
            g, hist = self._globals(i), self.history[i]
            if self.exact:
                self.history[i] = self.read.update_exact(enc, g, hist, event.keys[i], event.values[i], pos)
            else:
                self.history[i] = self.read.update(enc, g, hist, event.keys[i], event.values[i], pos,
                                                   current=lambda slot=slot: slot.state)
            slot.defer(lambda i=i: self._state(i))

    def _map_history(self, fn) -> None:
        for i, hist in enumerate(self.history):
            if hist is not None:
                self.history[i] = fn(hist) if isinstance(hist, torch.Tensor) else hist.apply(fn)

    def on_select_rows(self, index: torch.Tensor) -> None:
        self.batch = int(index.numel())
        for slot in self.slots:
            if not slot.pending:  # a pending state is built from the history, selected below, and the new batch
                slot.state = slot.state[index]
        self._map_history(lambda t: t[index])

    def detach_(self) -> None:
        """Truncate the graph between replay segments: the carried history becomes a constant."""
        for slot in self.slots:
            if not slot.pending:
                slot.state = slot.state.detach()
        self._map_history(lambda t: t.detach())

    def close(self) -> None:
        for slot in self.slots:
            slot.state = None
