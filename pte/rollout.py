"""Batched sampling under a bounded (or full) KV cache.

The loop is :class:`Decoder` (prefill once, then feed tokens; positions and masks handled) plus sampling.
Finished rows are *dropped* from the batch together with their cache rows, so the work per step shrinks as rows
finish and no pad token is ever fed as a thought. All rows still running have fed the same number of thought
tokens, so the sliding window evicts for all of them at the same step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pte.cache import BoundedCache, CacheListener
from pte.eviction import EvictionPolicy


@dataclass
class CacheSpec:
    """How the KV cache is bounded. ``window=None``: full cache. ``window`` counts thought tokens only."""

    window: int | None = None
    evict_fraction: float = 0.25
    policy: str = "sliding"

    def validate(self) -> None:
        """Raise the cache's own error for bad settings, before any model is loaded."""
        BoundedCache(1, window=self.window, evict_fraction=self.evict_fraction, policy=self.policy)

    def build(self, model, listeners=(), policy: EvictionPolicy | None = None) -> BoundedCache:
        return BoundedCache.for_model(
            model, window=self.window, evict_fraction=self.evict_fraction,
            policy=policy if policy is not None else self.policy, listeners=listeners,
        )


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: generate at least one token")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p}: must lie in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 disables it)")


@dataclass
class RolloutRow:
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # log_softmax(logits / T) of each sampled token, before top-p/top-k (T=1 when greedy)
    window: int | None
    eviction_steps: list[int]  # completion indices c whose feeding forward was preceded by an eviction
    finish_reason: str  # "eos" | "stop" | "length"
    # score policies: per eviction, per layer the window indices evicted, [n_evict of that layer] (Recorded.from_rows)
    evicted_indices: list[tuple[torch.Tensor, ...]] = field(default_factory=list)


@dataclass
class RolloutResult:
    rows: list[RolloutRow]
    seconds: float
    generated_tokens: int
    evictions: int  # eviction events (each cuts a block from every active row)
    peak_cache_tokens: int  # physical tokens per row at the peak
    peak_cache_bytes: int

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / max(self.seconds, 1e-9)


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids [batch, P], attention_mask [batch, P] (bool), pads on the left."""
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: at least one question token is needed")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = True
    return ids.to(device), mask.to(device)


def right_pad(seqs: list[list], fill, dtype: torch.dtype, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Completions (or their per-token values) -> values [batch, T], mask [batch, T] (bool), pads on the right."""
    width = max((len(s) for s in seqs), default=0)
    values = torch.full((len(seqs), width), fill, dtype=dtype)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        values[i, :len(s)] = torch.tensor(s, dtype=dtype)
        mask[i, :len(s)] = True
    return values.to(device), mask.to(device)


def max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


class Decoder:
    """Prefill and incremental forwards of a causal LM under one :class:`BoundedCache`.

    Tracks each row's next position (a row's first real token is at 0; pads are hidden by the mask).
    """

    def __init__(self, model, cache: BoundedCache):
        self.model, self.cache = model, cache
        self.next_pos: torch.Tensor | None = None  # [batch]
        self.last_event = None  # the eviction that preceded the latest forward, if any

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 1,
                hidden: bool = False) -> torch.Tensor:
        """Feed the prompts; -> logits [batch, logits_to_keep, vocab], or with ``hidden`` the decoder's last hidden
        states [batch, P, d_model] (the caller applies the LM head: :func:`pte.replay.token_logprobs`)."""
        limit = max_positions(self.model)
        lengths = attention_mask.sum(-1)
        if limit is not None and int(lengths.max()) > limit:
            raise ValueError(f"prompt of {int(lengths.max())} tokens is longer than the model's maximum ({limit} positions); shorten it")
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        self.cache.begin_forward(position_ids, attention_mask)
        out = self._forward(hidden, logits_to_keep, input_ids=input_ids,
                            attention_mask=attention_mask if self.cache.has_padding else None, position_ids=position_ids)
        self.next_pos = lengths.to(torch.long)
        return out

    def step(self, tokens: torch.Tensor, logits_to_keep: int = 0, hidden: bool = False) -> torch.Tensor:
        """Feed ``tokens`` [batch, n] as thought tokens; -> logits [batch, n or logits_to_keep, vocab], or with
        ``hidden`` the last hidden states [batch, n, d_model]."""
        n = tokens.shape[1]
        position_ids = self.next_pos[:, None] + torch.arange(n, device=tokens.device)
        self.last_event = self.cache.begin_forward(position_ids)
        out = self._forward(hidden, logits_to_keep, input_ids=tokens, attention_mask=self.cache.attention_mask(n),
                            position_ids=position_ids)
        self.next_pos = self.next_pos + n
        return out

    def _forward(self, hidden: bool, logits_to_keep: int, **inputs) -> torch.Tensor:
        if hidden:
            return self.model.get_decoder()(**inputs, past_key_values=self.cache, use_cache=True).last_hidden_state
        return self.model(**inputs, past_key_values=self.cache, use_cache=True, logits_to_keep=logits_to_keep).logits

    def select_rows(self, index: torch.Tensor) -> None:
        self.cache.batch_select_indices(index)
        self.next_pos = self.next_pos[index]


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [batch, vocab] -> (token [batch], logprob [batch]); log-prob taken before truncation."""
    logits = logits.float()
    if s.temperature == 0:
        logp = F.log_softmax(logits, dim=-1)
        token = logits.argmax(dim=-1)
        return token, logp.gather(-1, token[:, None])[:, 0]
    scaled = logits / s.temperature
    logp = F.log_softmax(scaled, dim=-1)
    if s.top_k > 0 and s.top_k < scaled.shape[-1]:
        kth = scaled.topk(s.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > s.top_p  # keep the smallest prefix reaching top_p
        scaled = scaled.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    token = torch.multinomial(scaled.softmax(dim=-1), 1, generator=generator)[:, 0]
    return token, logp.gather(-1, token[:, None])[:, 0]


class StopChecker:
    """Detects stop strings in each row's decoded tail (only the last few tokens are decoded per step)."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...]):
        self.tokenizer, self.stop_strings = tokenizer, tuple(s for s in stop_strings if s)
        self.tail = max((len(s) for s in self.stop_strings), default=0) + 8

    def __call__(self, completion: list[int]) -> bool:
        if not self.stop_strings:
            return False
        text = self.tokenizer.decode(completion[-self.tail:], skip_special_tokens=False)
        return any(s in text for s in self.stop_strings)


@torch.no_grad()
def rollout(
    model,
    prompts: list[list[int]],
    sampling: Sampling,
    cache_spec: CacheSpec = CacheSpec(),
    *,
    pad_token_id: int = 0,
    tokenizer=None,
    generator: torch.Generator | None = None,
    listeners: tuple[CacheListener, ...] = (),
    adapter=None,
) -> RolloutResult:
    """Sample a completion for every prompt under ``cache_spec``; see :class:`RolloutRow` for what is returned.

    With a PTE ``adapter`` attached, each row gets its own thought state, updated on every eviction."""
    sampling.validate()
    if sampling.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode completions; pass tokenizer=")
    stop = StopChecker(tokenizer, sampling.stop_strings) if sampling.stop_strings else None
    device = next(model.parameters()).device
    input_ids, mask = left_pad(prompts, pad_token_id, device)
    state = adapter.new_state(len(prompts)) if adapter is not None else None
    cache = cache_spec.build(model, tuple(listeners) + ((state,) if state is not None else ()))
    decoder = Decoder(model, cache)
    try:
        return _sample_loop(prompts, sampling, cache_spec, cache, decoder, input_ids, mask, stop, generator)
    finally:
        if adapter is not None:
            adapter.clear_state()


def _sample_loop(prompts, sampling, cache_spec, cache, decoder, input_ids, mask, stop, generator) -> RolloutResult:
    device = input_ids.device
    eos = torch.tensor(sorted(set(sampling.eos_token_ids)), dtype=torch.long, device=device)

    rows = [RolloutRow(list(p), [], [], cache_spec.window, [], "length") for p in prompts]
    active = list(range(len(prompts)))  # original row of each batch row
    start = time.perf_counter()
    logits = decoder.prefill(input_ids, mask)[:, -1]
    generated = 0
    for step in range(sampling.max_new_tokens):
        token, logp = sample(logits, sampling, generator)
        token_list, logp_list = token.tolist(), logp.tolist()
        finished = torch.zeros(len(active), dtype=torch.bool)
        is_eos = torch.isin(token, eos).tolist() if eos.numel() else [False] * len(active)
        for b, r in enumerate(active):
            row = rows[r]
            row.completion_ids.append(token_list[b])
            row.logprobs.append(logp_list[b])
            if is_eos[b]:
                row.finish_reason, finished[b] = "eos", True
            elif stop is not None and stop(row.completion_ids):
                row.finish_reason, finished[b] = "stop", True
        generated += len(active)
        if step == sampling.max_new_tokens - 1:
            break
        if finished.any():
            keep = (~finished).nonzero()[:, 0]
            if keep.numel() == 0:
                break
            active = [active[i] for i in keep.tolist()]
            decoder.select_rows(keep.to(device))
            token = token[keep.to(device)]
        logits = decoder.step(token[:, None], logits_to_keep=1)[:, -1]
        event = decoder.last_event
        if event is not None:
            chosen = None if event.indices is None else [ix.cpu() for ix in event.indices]  # per layer [batch, n]
            for b, r in enumerate(active):
                rows[r].eviction_steps.append(step)
                if chosen is not None:
                    rows[r].evicted_indices.append(tuple(ix[b] for ix in chosen))
    return RolloutResult(
        rows=rows, seconds=time.perf_counter() - start, generated_tokens=generated, evictions=cache.evictions,
        peak_cache_tokens=cache.peak_tokens, peak_cache_bytes=cache.peak_bytes,
    )
