"""The thought state's history with an exact gradient in constant memory (replay with ``state_grad="history"``).

A truncated replay detaches what a state carries between segments, so the encoder (``h_g``, ``W^a_*``) learns only
from the newest eviction: a token evicted many segments before it is needed (the long-range task's answer) never
teaches the encoder to keep it. The untruncated graph would, at a memory cost that grows with length.

Within one replay the parameters do not change, and the evicted keys/values are constants (the cache detaches
them). Then a few fixed-size statistics of every evicted token, accumulated online, give both the history's read
and its *exact* gradient with respect to the global queries ``q = W^a_Q q_g``, ``W^a_K`` and ``W^a_V``:

softmax read (:class:`SoftmaxHistory`), per global query ``i`` with weights ``w_ij = softmax_j(q_i . W^a_K k_j / sqrt(r))``
over raw (un-rotated) evicted keys ``k_j`` and values ``v_j``, ``u_j = W^a_V v_j``:

    lse_i = log sum_j exp(score_ij)           read_i = sum_j w_ij u_j                       (the forward)
    mu_i = E_w[k]   m_i = E_w[v]   E_i = E_w[k u^T]                                         (for the backward)
    dL/dscore_ij = w_ij (lambda_i + g_i . (u_j - read_i)),  lambda = dL/dlse, g = dL/dread, so
    dL/dq_i = W^a_K c_i / sqrt(r),  dL/dW^a_K = sum_i q_i c_i^T / sqrt(r),  dL/dW^a_V = sum_i g_i m_i^T,
    with c_i = lambda_i mu_i + (E_i - mu_i read_i^T) g_i.

linear (eq. 4, :class:`LinearHistory`): ``sum_k S'_k = q M`` with ``M = sum_j (W^a_K k_j)(W^a_V v_j)^T``; with
``P = sum_j (W^a_V v_j) k_j^T`` and ``Q = sum_j (W^a_K k_j) v_j^T``: ``dL/dW^a_K = sum_b dM P``, ``dL/dW^a_V = sum_b dM^T Q``.

Smallest exact form: what is derivable from the rest at read time is not stored (``read_i = W^a_V m_i``;
``M = Q W^a_V^T``). What is left is needed: ``dL/dW^a_K`` takes ``E_i g_i`` for an arbitrary ``g`` (a new one after
every segment), and ``E_i`` is a generic ``d_kv x r`` matrix per query. Memory per layer and sequence, in fp32
(the encoder's dtype) and constant in the number of evicted tokens: ``n_g (d_kv (r + 2) + 1)`` numbers (softmax) or
``2 r d_kv`` (linear); :func:`history_bytes`. Only the replay with ``state_grad="history"`` keeps them, per replayed
row: ``replay(micro_batch_rows=)`` bounds the total. The gradient equals the untruncated graph's wherever the
evicted keys/values themselves carry no gradient (``tests/test_pte.py``); what is still cut is the path from the
answer back into the forwards that *wrote* the evicted keys/values.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


def history_bytes(layers: int, n_global: int, rank: int, d_kv: int, attention: str = "softmax",
                  element_bytes: int = 4) -> int:
    """Bytes of one sequence's history statistics over all layers (fp32 by default)."""
    per_layer = n_global * (d_kv * (rank + 2) + 1) if attention == "softmax" else 2 * rank * d_kv
    return layers * per_layer * element_bytes


class SoftmaxHistory(NamedTuple):
    lse: torch.Tensor  # [batch, n_g]
    mean_k: torch.Tensor  # [batch, n_g, d_kv]: E_w[k]
    mean_v: torch.Tensor  # [batch, n_g, d_kv]: E_w[v]; the read is W^a_V E_w[v]
    u_k: torch.Tensor  # [batch, n_g, r, d_kv]: E_w[(W^a_V v) k^T] = E_i^T (d_kv last: E_i g_i is one bmm)

    @staticmethod
    @torch.no_grad()
    def of(q: torch.Tensor, wa_k: torch.Tensor, wa_v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """Statistics of one chunk: q [n_g, r], keys/values [batch, m, d_kv] (raw, un-rotated)."""
        u = values @ wa_v.T  # [batch, m, r]
        scores = q @ (keys @ wa_k.T).transpose(1, 2) / math.sqrt(q.shape[-1])  # [batch, n_g, m]
        w = scores.softmax(-1)
        b, m, d = keys.shape
        outer = (u[..., None] * keys[:, :, None]).view(b, m, -1)  # [batch, m, r * d_kv]
        return SoftmaxHistory(scores.logsumexp(-1), w @ keys, w @ values, (w @ outer).view(b, -1, u.shape[-1], d))

    def merge(self, other: "SoftmaxHistory") -> "SoftmaxHistory":
        lse = torch.logaddexp(self.lse, other.lse)
        b = (other.lse - lse).exp()  # the other's share; self's is 1 - b

        def mix(x, y):  # x (1 - b) + y b
            return torch.lerp(x, y, b.reshape(b.shape + (1,) * (x.dim() - b.dim())))

        return SoftmaxHistory(lse, *(mix(x, y) for x, y in zip(self[1:], other[1:])))

    def apply(self, fn) -> "SoftmaxHistory":
        return SoftmaxHistory(*(fn(t) for t in self))

    def attach(self, q: torch.Tensor, wa_k: torch.Tensor, wa_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (lse [batch, n_g], read [batch, n_g, r]) as functions of the parameters, with the exact gradient."""
        return _SoftmaxRead.apply(q, wa_k, wa_v, *self)


class _SoftmaxRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, wa_k, wa_v, lse, mean_k, mean_v, u_k):
        read = mean_v @ wa_v.T  # [batch, n_g, r]
        ctx.save_for_backward(q, wa_k, read, mean_k, mean_v, u_k)
        return lse.clone(), read

    @staticmethod
    def backward(ctx, d_lse, d_read):
        q, wa_k, read, mean_k, mean_v, u_k = ctx.saved_tensors
        b, n, r, d = u_k.shape
        # c_i = lambda_i mu_i + (E_i - mu_i read_i^T) g_i                                          [batch, n_g, d_kv]
        e_g = torch.bmm(d_read.reshape(b * n, 1, r), u_k.reshape(b * n, r, d)).view(b, n, d)  # E_i g_i
        c = d_lse[..., None] * mean_k + e_g - mean_k * (read * d_read).sum(-1, keepdim=True)
        c_sum = c.sum(0)  # [n_g, d_kv]: q is shared by the batch
        d_q = c_sum @ wa_k.T / math.sqrt(r)
        d_wa_k = q.T @ c_sum / math.sqrt(r)
        d_wa_v = d_read.reshape(-1, r).T @ mean_v.reshape(-1, d)
        return d_q, d_wa_k, d_wa_v, None, None, None, None


class LinearHistory(NamedTuple):
    u_k: torch.Tensor  # [batch, r, d_kv]: P = sum_j (W^a_V v_j) k_j^T
    k_v: torch.Tensor  # [batch, r, d_kv]: Q = sum_j (W^a_K k_j) v_j^T; the memory is M = Q W^a_V^T

    @staticmethod
    @torch.no_grad()
    def of(q, wa_k, wa_v, keys, values):
        ka, u = keys @ wa_k.T, values @ wa_v.T  # [batch, m, r]
        return LinearHistory(u.transpose(1, 2) @ keys, ka.transpose(1, 2) @ values)

    def merge(self, other: "LinearHistory") -> "LinearHistory":
        return LinearHistory(*(x + y for x, y in zip(self, other)))

    def apply(self, fn) -> "LinearHistory":
        return LinearHistory(*(fn(t) for t in self))

    def attach(self, q, wa_k, wa_v) -> torch.Tensor:
        """-> sum_k S'_k = q M [batch, n_g, r], with the exact gradient."""
        return _LinearRead.apply(q, wa_k, wa_v, *self)


class _LinearRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, wa_k, wa_v, u_k, k_v):
        memory = k_v @ wa_v.T  # [batch, r, r]
        ctx.save_for_backward(q, memory, u_k, k_v)
        return q @ memory

    @staticmethod
    def backward(ctx, d_s):
        q, memory, u_k, k_v = ctx.saved_tensors
        d_m = q.T @ d_s  # [batch, r, r]
        return (d_s @ memory.transpose(1, 2)).sum(0), (d_m @ u_k).sum(0), (d_m.transpose(1, 2) @ k_v).sum(0), \
            None, None
