"""``pte demo``: what pte does today, on a tiny model built in code (no download).

1. Exactness: under evictions, the bounded cache's logits equal one full forward whose mask hides exactly the
   evicted thought tokens, at their original positions (the invariant the public re-implementation breaks).
2. Constant memory: the KV cache of a bounded rollout stays flat as generation grows; a full cache grows.

The GRPO comparison of base / LoRA / LoRA_c / PTE (issue 5) is not built yet.
"""

from __future__ import annotations

import time

import torch

from pte.cache import BoundedCache
from pte.models import tiny_model
from pte.rollout import CacheSpec, Decoder, Sampling, left_pad, rollout


def _exactness(model, window: int, T: int) -> tuple[float, int]:
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    comp = torch.randint(3, model.config.vocab_size, (len(prompts), T), generator=torch.Generator().manual_seed(0))
    ids, pmask = left_pad(prompts, 0)
    cache = BoundedCache.for_model(model, window=window)
    dec = Decoder(model, cache)
    got = [dec.prefill(ids, pmask)[:, -1:]]
    for t in comp.T:
        got.append(dec.step(t[:, None]))
    got = torch.cat(got, 1)
    # reference: one forward; thought c sees the prompt and thoughts [start_c, c]
    P, n_evict = ids.shape[1], cache.n_evict
    full = torch.cat([ids, comp], 1)
    valid = torch.cat([pmask, torch.ones_like(comp, dtype=torch.bool)], 1)
    visible = torch.tril(torch.ones(P + T, P + T, dtype=torch.bool))[None] & valid[:, None]
    visible |= torch.eye(P + T, dtype=torch.bool)[None]
    held = evicted = 0
    for c in range(T):
        if held >= window:
            held, evicted = held - n_evict, evicted + n_evict
        held += 1
        visible[:, P + c, P:P + evicted] = False
    ref = model(input_ids=full, attention_mask=visible[:, None], position_ids=(valid.cumsum(-1) - 1).clamp(min=0)).logits
    return float((got - ref[:, P - 1:]).abs().max()), cache.evictions


@torch.no_grad()
def demo(quick: bool = False, out: str | None = None) -> int:
    torch.manual_seed(0)
    model = tiny_model("qwen2", vocab_size=512, hidden=128, layers=4, heads=4, kv_heads=2, init_std=0.2)
    print("pte demo — tiny random Qwen2 (4 layers, hidden 128), CPU\n")
    err, n_ev = _exactness(model, window=16, T=64 if quick else 200)
    print(f"1. exactness under eviction: {n_ev} evictions, max |logit - masked full forward| = {err:.2e}")
    lengths = (64, 256) if quick else (128, 512, 2048)
    prompts = [list(range(3, 40)), list(range(50, 70))]
    print("\n2. KV cache versus generation length (batch 2, window 64 thought tokens on top of the question)")
    print("| generated | full cache tokens | full cache KiB | bounded tokens | bounded KiB | evictions | bounded tok/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in lengths:
        s = Sampling(max_new_tokens=n, temperature=1.0)
        full = rollout(model, prompts, s, CacheSpec(), generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        bounded = rollout(model, prompts, s, CacheSpec(window=64), generator=torch.Generator().manual_seed(0))
        print(f"| {n} | {full.peak_cache_tokens} | {full.peak_cache_bytes // 1024} | {bounded.peak_cache_tokens} | "
              f"{bounded.peak_cache_bytes // 1024} | {len(bounded.rows[0].eviction_steps)} | "
              f"{bounded.generated_tokens / (time.perf_counter() - start):.0f} |")
    print("\nThe GRPO demo (base / LoRA / LoRA_c / PTE) is not built yet; see README 'Status'.")
    return 0 if err < 1e-3 else 1
