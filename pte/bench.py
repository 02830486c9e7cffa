"""Benchmarks. Each configuration runs in a fresh subprocess (so RSS is its own), after a warm-up.

``pte bench rollout``: tokens/s and memory of generation versus length, for
(a) ``transformers`` ``generate`` with its default (full, dynamic) cache,
(b) pte's rollout engine with a full cache, (c) pte's rollout engine under the bounded cache.
The model is a randomly initialised Llama built in code (:data:`BENCH_MODEL`); EOS is disabled so every row
generates exactly ``length`` tokens; sampling is plain temperature-1 multinomial in all three.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from pte.memory import peak_rss_bytes, reset_peak_rss, rss_bytes

# 4 layers, hidden 256, 4 heads (head_dim 64, no GQA), MLP 512, vocab 2048: about 3.7M parameters.
BENCH_MODEL = dict(arch="llama", vocab_size=2048, hidden=256, layers=4, heads=4, kv_heads=4, intermediate=512,
                   max_positions=16384)
ENGINES = ("hf_generate", "pte_full", "pte_bounded")


def _prompts(batch: int, prompt_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, BENCH_MODEL["vocab_size"], (batch, prompt_len), generator=g).tolist()


def rollout_worker(engine: str, length: int, window: int, batch: int, prompt_len: int) -> dict:
    from pte.models import tiny_model
    from pte.rollout import CacheSpec, Sampling, rollout

    model = tiny_model(**BENCH_MODEL, seed=0)
    prompts = _prompts(batch, prompt_len)
    ids = torch.tensor(prompts)

    def generate(n: int) -> int:
        torch.manual_seed(0)
        if engine == "hf_generate":
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0,
                top_k=0, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0,
                return_dict_in_generate=True,
            )
            return sum(l.keys.nbytes + l.values.nbytes for l in out.past_key_values.layers)
        spec = CacheSpec(window=window if engine == "pte_bounded" else None)
        res = rollout(model, prompts, Sampling(max_new_tokens=n, temperature=1.0), spec,
                      generator=torch.Generator().manual_seed(0))
        return res.peak_cache_bytes

    with torch.no_grad():
        generate(32)  # warm-up
        gc.collect()
        before = rss_bytes()
        reset_peak_rss()
        start = time.perf_counter()
        cache_bytes = generate(length)
        seconds = time.perf_counter() - start
        peak = peak_rss_bytes() - before
    return {
        "engine": engine, "length": length, "window": window if engine == "pte_bounded" else None, "batch": batch,
        "tokens_per_s": batch * length / seconds, "seconds": seconds, "cache_bytes": cache_bytes,
        "peak_rss_bytes": peak, "threads": torch.get_num_threads(),
    }


def bench_rollout(out: str, lengths=(256, 512, 1024, 2048, 4096), window: int = 128, batch: int = 4,
                  prompt_len: int = 32, engines=ENGINES) -> list[dict]:
    results = []
    configs = [(e, n) for n in lengths for e in engines]
    for i, (engine, n) in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] {engine} length={n} ...", end=" ", flush=True, file=sys.stderr)
        args = json.dumps(dict(engine=engine, length=n, window=window, batch=batch, prompt_len=prompt_len))
        proc = subprocess.run([sys.executable, "-m", "pte.bench", "rollout-worker", args],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark worker {engine} length={n} failed:\n{proc.stderr[-4000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{row['tokens_per_s']:.0f} tok/s, cache {row['cache_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
        results.append(row)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(results, indent=1))
    plot_rollout(results, path.with_suffix(".png"))
    print(rollout_table(results))
    return results


def rollout_table(results: list[dict]) -> str:
    by = {(r["engine"], r["length"]): r for r in results}
    lengths = sorted({r["length"] for r in results})
    lines = [
        "| length | generate tok/s | pte full tok/s (ratio) | pte bounded tok/s (ratio) | generate cache MiB | pte bounded cache MiB | peak RSS Δ MiB generate / full / bounded |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in lengths:
        g, f, b = by.get(("hf_generate", n)), by.get(("pte_full", n)), by.get(("pte_bounded", n))
        if not (g and f and b):
            continue
        mib = lambda x: x / 2**20
        lines.append(
            f"| {n} | {g['tokens_per_s']:.0f} | {f['tokens_per_s']:.0f} ({f['tokens_per_s'] / g['tokens_per_s']:.2f}x) "
            f"| {b['tokens_per_s']:.0f} ({b['tokens_per_s'] / g['tokens_per_s']:.2f}x) | {mib(g['cache_bytes']):.1f} "
            f"| {mib(b['cache_bytes']):.2f} | {mib(g['peak_rss_bytes']):.0f} / {mib(f['peak_rss_bytes']):.0f} / {mib(b['peak_rss_bytes']):.0f} |"
        )
    return "\n".join(lines)


def plot_rollout(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for engine in ENGINES:
        rows = sorted((r for r in results if r["engine"] == engine), key=lambda r: r["length"])
        if not rows:
            continue
        xs = [r["length"] for r in rows]
        axes[0].plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=engine)
        axes[1].plot(xs, [r["cache_bytes"] / 2**20 for r in rows], marker="o", label=engine)
    for ax, title in zip(axes, ("tokens/s (batch, higher is better)", "KV cache MiB at the peak")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("generated tokens per row")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "rollout-worker":
        print(json.dumps(rollout_worker(**json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m pte.bench rollout-worker JSON (use `pte bench rollout` instead)")
