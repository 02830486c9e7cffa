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

Defaults (each alternative is a switch in :class:`pte.adapter.AdapterConfig`):
- ``state_update="accumulate"``: keep ``R = S_g + sum_k S'_k`` and use ``S = Normalize(R)`` (Fig. 2).
  ``"recursive"`` is ``S <- Normalize(S + S')`` as the text writes it, which forgets old evictions geometrically.
- Normalize: Frobenius norm ``sqrt(min(n_g, r))`` (the norm of LoRA's identity), so PTE does not start ~sqrt(r)
  times weaker than LoRA; ``state_scale="learnable"`` makes that norm a per-layer parameter initialised there.
- ``key_rope="unrotate"``: cached keys carry RoPE, ``k_g`` does not; evicted keys are un-rotated with their
  recorded positions before ``W^a_K`` (exact and cheap). ``"rotated"`` uses them as cached.
- Ablations: ``"global_only"`` (no eviction update: S stays ``Normalize(S_g)``, a re-parametrised static LoRA),
  ``"global0"`` (``S_g = 0``; ``q_g`` kept for the eviction path).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from pte.cache import CacheListener, EvictionEvent


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def unrotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo RoPE: keys [batch, heads, m, head_dim], cos/sin [batch, m, head_dim] (rotation by -theta)."""
    cos, sin = cos[:, None], sin[:, None]
    return keys * cos - rotate_half(keys) * sin


class StateSlot:
    """The state one layer's adapted linears read: ``None`` is the identity (plain LoRA), else ``[batch, n_g, r]``."""

    __slots__ = ("state",)

    def __init__(self):
        self.state: torch.Tensor | None = None


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
        self.h_g = nn.Parameter(torch.randn(n_global, d_model))
        self.wa_q = nn.Parameter(torch.randn(rank, d_q) / math.sqrt(d_q))
        self.wa_k = nn.Parameter(torch.randn(rank, d_kv) / math.sqrt(d_kv))
        self.wa_v = nn.Parameter(torch.randn(rank, d_kv) / math.sqrt(d_kv))
        self.target_norm = math.sqrt(min(n_global, rank))
        self.log_scale = nn.Parameter(torch.tensor(math.log(self.target_norm))) if learnable_scale else None

    def _base(self, name: str) -> nn.Module:
        proj = getattr(self.attn, name)
        return getattr(proj, "base", proj)  # the frozen linear under an adapter

    def global_qkv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> q_g [n_g, d_q], k_g [n_g, d_kv], v_g [n_g, d_kv] through the frozen projections."""
        h = self.h_g.to(self._base("q_proj").weight.dtype)
        q, k, v = self._base("q_proj")(h), self._base("k_proj")(h), self._base("v_proj")(h)
        n = h.shape[0]
        if hasattr(self.attn, "q_norm"):
            q = self.attn.q_norm(q.view(n, -1, self.head_dim)).reshape(n, -1)
        if hasattr(self.attn, "k_norm"):
            k = self.attn.k_norm(k.view(n, -1, self.head_dim)).reshape(n, -1)
        return q, k, v

    def queries(self) -> torch.Tensor:
        """W^a_Q q_g: [n_g, r]."""
        return self.global_qkv()[0] @ self.wa_q.T

    def initial_state(self) -> torch.Tensor:
        """S_g: [n_g, r]."""
        q, k, v = self.global_qkv()
        return (q @ self.wa_q.T) @ (k @ self.wa_k.T).T @ (v @ self.wa_v.T)

    def evicted_state(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """S' from evicted keys/values [batch, kv_heads, m, head_dim] -> [batch, n_g, r].

        ``positions`` [batch, m] un-rotate the keys; ``None`` uses them as cached (post-RoPE)."""
        if positions is not None:
            cos, sin = self.rotary(values, positions)
            keys = unrotate(keys, cos.to(keys.dtype), sin.to(keys.dtype))
        b, h, m, d = keys.shape
        k = keys.transpose(1, 2).reshape(b, m, h * d)  # [batch, m, d_kv]
        v = values.transpose(1, 2).reshape(b, m, h * d)
        ka, va = k @ self.wa_k.to(k.dtype).T, v @ self.wa_v.to(v.dtype).T  # [batch, m, r]
        return self.queries().to(k.dtype) @ (ka.transpose(1, 2) @ va)  # [n_g, r] @ [batch, r, r]

    def normalize(self, r: torch.Tensor) -> torch.Tensor:
        """[batch, n_g, r] -> Frobenius norm sqrt(min(n_g, r)) (or the learnt scale) per sample."""
        scale = self.log_scale.exp() if self.log_scale is not None else self.target_norm
        norm = r.flatten(1).norm(dim=-1).clamp_min(1e-12)[:, None, None]
        return r * (scale / norm)


class ThoughtState(CacheListener):
    """Per-sequence states of every layer, updated on each eviction; writes them into the layers' slots.

    The timing rule follows from when the cache calls :meth:`on_evict`: inside ``begin_forward``, before the
    forward that feeds the next thought token. So that forward, in every adapted linear of every layer, uses the
    state after all evictions made before it; the prompt forward uses ``Normalize(S_g)``; cached keys/values are
    never recomputed. Tokens between two evictions form one segment under one state.
    """

    def __init__(self, encoders: nn.ModuleList, slots: list[StateSlot], batch: int, *, update: str = "accumulate",
                 ablation: str = "none", key_rope: str = "unrotate"):
        self.encoders, self.slots = encoders, slots
        self.update, self.ablation, self.key_rope = update, ablation, key_rope
        self.batch = batch
        # accumulate: sum_k S'_k; recursive: the latest state. None until the first eviction.
        self.history: list[torch.Tensor | None] = [None] * len(encoders)
        self.refresh()

    def _initial(self, i: int) -> torch.Tensor:
        s_g = self.encoders[i].initial_state()
        s_g = torch.zeros_like(s_g) if self.ablation == "global0" else s_g
        return s_g.expand(self.batch, -1, -1)

    def refresh(self) -> None:
        """Recompute every layer's state from S_g (a fresh graph) and the carried history."""
        for i, (enc, slot) in enumerate(zip(self.encoders, self.slots)):
            hist = self.history[i]
            if self.update == "recursive" and hist is not None:
                slot.state = hist
            else:
                slot.state = enc.normalize(self._initial(i) if hist is None else self._initial(i) + hist)

    def on_evict(self, event: EvictionEvent) -> None:
        if self.ablation == "global_only":
            return
        for i, (enc, slot) in enumerate(zip(self.encoders, self.slots)):
            pos = event.positions[i] if self.key_rope == "unrotate" else None
            s_new = enc.evicted_state(event.keys[i], event.values[i], pos)
            if self.update == "recursive":
                slot.state = self.history[i] = enc.normalize(slot.state + s_new)
            else:
                self.history[i] = s_new if self.history[i] is None else self.history[i] + s_new
                slot.state = enc.normalize(self._initial(i) + self.history[i])

    def on_select_rows(self, index: torch.Tensor) -> None:
        self.batch = int(index.numel())
        for i, slot in enumerate(self.slots):
            slot.state = slot.state[index]
            if self.history[i] is not None:
                self.history[i] = self.history[i][index]

    def detach_(self) -> None:
        """Truncate the graph between replay segments: the carried history becomes a constant."""
        for i, slot in enumerate(self.slots):
            slot.state = slot.state.detach()
            if self.history[i] is not None:
                self.history[i] = self.history[i].detach()

    def close(self) -> None:
        for slot in self.slots:
            slot.state = None
