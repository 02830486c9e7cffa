"""Benchmarks. Each configuration runs in a fresh subprocess (so RSS is its own), after a warm-up.

``pte bench rollout``: tokens/s and memory of generation versus length, for
(a) ``transformers`` ``generate`` with its default (full, dynamic) cache,
(b) pte's rollout engine with a full cache, (c) pte's rollout engine under the bounded cache.
The model is a randomly initialised Llama built in code (:data:`BENCH_MODEL`); EOS is disabled so every row
generates exactly ``length`` tokens; sampling is plain temperature-1 multinomial in all three.

``pte bench train-step``: wall time of one GRPO step of LoRA_c and PTE on identical rows (:func:`train_step_worker`).
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pte.files import write_text_atomic
from pte.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from pte.methods import METHODS

# 4 layers, hidden 256, 4 heads (head_dim 64, no GQA), MLP 512, vocab 2048: about 3.7M parameters.
BENCH_MODEL = dict(arch="llama", vocab_size=2048, hidden=256, layers=4, heads=4, kv_heads=4, intermediate=512,
                   max_positions=16384)
# hf_generate: transformers generate, full cache. ours_full / ours_bounded: pte's engine, no adapter.
# lora_c / pte: pte's engine under the window with a rank-32 adapter attached (PTE with its state updates).
ENGINES = ("hf_generate", "ours_full", "ours_bounded", "lora_c", "pte")


def _prompts(batch: int, prompt_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, BENCH_MODEL["vocab_size"], (batch, prompt_len), generator=g).tolist()


def rollout_worker(engine: str, length: int, window: int, batch: int, prompt_len: int) -> dict:
    from pte.models import tiny_model
    from pte.rollout import CacheSpec, Sampling, rollout

    model = tiny_model(**BENCH_MODEL, seed=0)
    adapter = None
    if engine in METHODS:
        from pte.adapter import AdapterConfig, attach

        adapter = attach(model, AdapterConfig(method=engine, rank=32, n_global=32))
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
        spec = CacheSpec(window=None if engine == "ours_full" else window)
        res = rollout(model, prompts, Sampling(max_new_tokens=n, temperature=1.0), spec,
                      generator=torch.Generator().manual_seed(0), adapter=adapter)
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
        "engine": engine, "length": length, "window": None if engine in ("hf_generate", "ours_full") else window,
        "batch": batch,
        "tokens_per_s": batch * length / seconds, "seconds": seconds, "cache_bytes": cache_bytes,
        "peak_rss_bytes": peak, "threads": torch.get_num_threads(),
    }


def train_memory_worker(method: str, length: int, window: int, batch: int, prompt_len: int, rank: int = 32) -> dict:
    """One training step's memory: LoRA = one teacher-forced forward/backward over prompt + completion with a
    full cache (what TRL does); LoRA_c and PTE = the segment replay under the window (backward per segment)."""
    from pte.adapter import AdapterConfig, attach
    from pte.cache import sliding_eviction_steps
    from pte.memory import measure_step
    from pte.models import tiny_model
    from pte.replay import replay
    from pte.rollout import CacheSpec, RolloutRow

    model = tiny_model(**BENCH_MODEL, seed=0)
    adapter = attach(model, AdapterConfig(method=method, rank=rank, n_global=rank))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lin in adapter.linears.values():
            lin.A.normal_(0, 0.01, generator=g)
    win = window if METHODS[method].bounded_cache else None
    prompts = _prompts(batch, prompt_len)
    comps = torch.randint(3, BENCH_MODEL["vocab_size"], (batch, length), generator=g).tolist()
    rows = [RolloutRow(p, c, [0.0] * length, win, sliding_eviction_steps(length - 1, win), "length")
            for p, c in zip(prompts, comps)]
    weights = torch.randn(batch, length, generator=g)
    spec = CacheSpec(window=win)
    loss_fn = lambda logp, rows, cols: -(weights[rows, cols] * logp).sum() / weights.numel()

    def step():
        replay(model, rows, spec, adapter=adapter, loss_fn=loss_fn)

    rows_short = [RolloutRow(r.prompt_ids, r.completion_ids[:64], r.logprobs[:64], win,
                             sliding_eviction_steps(63, win), "length") for r in rows]
    replay(model, rows_short, spec, adapter=adapter, loss_fn=loss_fn)  # warm-up
    for p in adapter.parameters():
        p.grad = None
    gc.collect()
    before = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    mem = measure_step(step)
    seconds = time.perf_counter() - start
    return {"method": method, "length": length, "window": win, "batch": batch, "peak_bytes": mem["peak_bytes"],
            "peak_rss_bytes": peak_rss_bytes() - before, "seconds": seconds, "rank": rank}


def bench_train_memory(out: str, lengths=(512, 1024, 2048, 4096, 8192), window: int = 128, batch: int = 1,
                       prompt_len: int = 32, methods=tuple(METHODS)) -> list[dict]:
    configs = [dict(method=m, length=n, window=window, batch=batch, prompt_len=prompt_len)
               for n in lengths for m in methods]
    return _run_bench("train-memory-worker", configs, out, plot_train_memory, train_memory_table,
                      lambda r: f"peak {r['peak_bytes'] / 2**20:.1f} MiB live tensors, {r['seconds']:.1f}s")


def train_memory_table(results: list[dict]) -> str:
    by = {(r["method"], r["length"]): r for r in results}
    lines = ["| generated tokens | LoRA (full cache) MiB | LoRA_c MiB | PTE MiB | PTE / LoRA | RSS Δ MiB LoRA / LoRA_c / PTE |",
             "|---:|---:|---:|---:|---:|---:|"]
    mib = lambda x: x / 2**20
    for n in sorted({r["length"] for r in results}):
        lo, lc, pt = (by.get((m, n)) for m in METHODS)  # the table's columns: LoRA, LoRA_c, PTE
        if not (lo and lc and pt):
            continue
        lines.append(f"| {n} | {mib(lo['peak_bytes']):.1f} | {mib(lc['peak_bytes']):.1f} | {mib(pt['peak_bytes']):.1f} "
                     f"| {pt['peak_bytes'] / lo['peak_bytes']:.2f} | {mib(lo['peak_rss_bytes']):.0f} / "
                     f"{mib(lc['peak_rss_bytes']):.0f} / {mib(pt['peak_rss_bytes']):.0f} |")
    return "\n".join(lines)


def plot_train_memory(results: list[dict], path: Path) -> None:
    from pte.plots import Line, line_plot

    lines = []
    for method in METHODS:
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["length"])
        if rows:
            lines.append(Line(method, [r["length"] for r in rows], [r["peak_bytes"] / 2**20 for r in rows]))
    line_plot(path, lines, xlabel="generated tokens", ylabel="peak live tensor MiB, one training step", log2_x=True)


def _run_bench(kind: str, configs: list[dict], out: str, plot, table, describe) -> list[dict]:
    """Run every configuration in its own subprocess, write the JSON atomically, the PNG beside it, print the table."""
    results = _run_workers(kind, configs, describe)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(results, indent=1))
    plot(results, path.with_suffix(".png"))
    print(table(results))
    return results


def _run_workers(kind: str, configs: list[dict], describe) -> list[dict]:
    results = []
    for i, cfg in enumerate(configs, 1):
        label = " ".join(f"{k}={v}" for k, v in cfg.items() if k in ("engine", "method", "length", "setting"))
        print(f"[{i}/{len(configs)}] {label} ...", end=" ", flush=True, file=sys.stderr)
        proc = subprocess.run([sys.executable, "-m", "pte.lab.bench", kind, json.dumps(cfg)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark worker {label} failed:\n{proc.stderr[-4000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(describe(row), file=sys.stderr)
        results.append(row)
    return results


def bench_rollout(out: str, lengths=(256, 512, 1024, 2048, 4096), window: int = 128, batch: int = 4,
                  prompt_len: int = 32, engines=ENGINES) -> list[dict]:
    configs = [dict(engine=e, length=n, window=window, batch=batch, prompt_len=prompt_len)
               for n in lengths for e in engines]
    return _run_bench("rollout-worker", configs, out, plot_rollout, rollout_table,
                      lambda r: f"{r['tokens_per_s']:.0f} tok/s, cache {r['cache_bytes'] / 2**20:.1f} MiB")


def rollout_table(results: list[dict]) -> str:
    by = {(r["engine"], r["length"]): r for r in results}
    lengths = sorted({r["length"] for r in results})
    lines = [
        "| length | generate tok/s | ours full (× generate) | ours bounded (× generate) | LoRA_c bounded | PTE bounded (× LoRA_c) "
        "| cache MiB generate / ours full / bounded | peak RSS Δ MiB generate / ours full / bounded / PTE |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    mib = lambda x: x / 2**20
    for n in lengths:
        g, f, b, lc, pt = (by.get((e, n)) for e in ENGINES)
        if not all((g, f, b, lc, pt)):
            continue
        tps = lambda r: r["tokens_per_s"]
        lines.append(
            f"| {n} | {tps(g):.0f} | {tps(f):.0f} ({tps(f) / tps(g):.2f}×) | {tps(b):.0f} ({tps(b) / tps(g):.2f}×) "
            f"| {tps(lc):.0f} | {tps(pt):.0f} ({tps(pt) / tps(lc):.2f}×) "
            f"| {mib(g['cache_bytes']):.1f} / {mib(f['cache_bytes']):.1f} / {mib(b['cache_bytes']):.2f} "
            f"| {mib(g['peak_rss_bytes']):.0f} / {mib(f['peak_rss_bytes']):.0f} / {mib(b['peak_rss_bytes']):.0f} / "
            f"{mib(pt['peak_rss_bytes']):.0f} |"
        )
    return "\n".join(lines)


def plot_rollout(results: list[dict], path: Path) -> None:
    from pte.plots import Line, Panel, figure

    speed, cache = [], []
    for engine in ENGINES:
        rows = sorted((r for r in results if r["engine"] == engine), key=lambda r: r["length"])
        if rows:
            xs = [r["length"] for r in rows]
            speed.append(Line(engine, xs, [r["tokens_per_s"] for r in rows]))
            cache.append(Line(engine, xs, [r["cache_bytes"] / 2**20 for r in rows]))
    figure(path, [Panel(lines, "generated tokens per row", title=title, log2_x=True) for lines, title in
                  ((speed, "tokens/s (batch, higher is better)"), (cache, "KV cache MiB at the peak"))], size=(10, 4))


def bench_paper_memory(out: str, lengths=(3072, 6144, 16384, 65536), window: int = 1024, **kwargs) -> list[dict]:
    """``pte bench paper-memory``: the paper's models' training step on fake tensors (:mod:`pte.lab.paper_memory`);
    JSON records, then the table of docs/paper_memory.md on stdout. No subprocesses: nothing is allocated."""
    from pte.lab.paper_memory import paper_records

    start = time.perf_counter()
    records = paper_records(lengths=lengths, window=window, log=lambda m: print(m, file=sys.stderr), **kwargs)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(records, indent=1))
    print(paper_memory_table(records))
    print(f"[pte] {len(records)} records in {time.perf_counter() - start:.0f}s -> {path}", file=sys.stderr)
    return records


def fits(records: list[dict], model: str, method: str, length: int, capacity: float) -> int | None:
    """The largest micro-batch whose step peak fits ``capacity`` bytes (None: not even one row)."""
    ok = [r["rows"] for r in records if (r["model"], r["method"], r["length"], r["phase"]) == (model, method, length, "step")
          and r["peak_bytes"] <= capacity]
    return max(ok, default=None)


def paper_memory_table(records: list[dict]) -> str:
    """Per model, method and length: the step's peak at micro-batches 1 and 8 (GiB, % of a 40 GiB A100), the
    largest micro-batch that fits 40 and 80 GiB, the rollout's K/V and state at 1 row, the attention TFLOPs."""
    gib = 2**30
    step = {(r["model"], r["method"], r["length"], r["rows"]): r for r in records if r["phase"] == "step"}
    lines = ["| model | method | length | peak GiB, 1 row (% of 40 GiB) | peak GiB, 8 rows | fits 40 GiB at | "
             "fits 80 GiB at | K/V + state MiB, 1 row | attention TFLOPs / sequence |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (model, method, length, rows), r in step.items():
        if rows != 1:
            continue
        eight = step.get((model, method, length, 8))
        f40, f80 = (fits(records, model, method, length, c * gib) for c in (40, 80))
        lines.append(f"| {model} | {method} | {length} | {r['peak_bytes'] / gib:.1f} ({100 * r['peak_bytes'] / (40 * gib):.0f}%) "
                     f"| {eight['peak_bytes'] / gib:.1f} | {f40 or 'no'} | {f80 or 'no'} "
                     f"| {(r['kv_cache_bytes'] + r['state_bytes']) / 2**20:.0f} | {r['attention_tflops']:.1f} |"
                     if eight else f"| {model} | {method} | {length} | {r['peak_bytes'] / gib:.1f} | | | | | |")
    return "\n".join(lines)


# -- train-step -------------------------------------------------------------------------------------------------
# "demo": the demo's model (a directory under pte/assets/), rank and window (the shipped base model, rank 8, window 8), 64 rows of 66 tokens;
# "long": a random-init model (BENCH_MODEL), rank 32, window 128, 2048 tokens, few rows.
TRAIN_STEP_SETTINGS = {
    "demo": dict(model="long_range_base", rank=8, window=8, rows=64, length=66),
    "long": dict(model=None, rank=32, window=128, rows=2, length=2048),
}
TRAIN_STEP_PHASES = ("rollout", "replay", "optimizer", "step")


class TrainStep:
    """One setting of :data:`TRAIN_STEP_SETTINGS` set up for both methods: the base model's rows (sampled once,
    under the window, no EOS, so every row has ``length`` tokens), and per method a copy of the model with its
    adapter and Adam. :meth:`run` is one GRPO step, timed by phase: the method's rollout of the same prompts, then
    ``passes`` x (replay forward + backward of the base rows with the clipped loss; gradient clip + Adam)."""

    def __init__(self, setting: str, passes: int = 2, **overrides):
        import copy

        from pte.adapter import AdapterConfig, attach
        from pte.rollout import CacheSpec, Sampling, rollout

        s = self.settings = TRAIN_STEP_SETTINGS[setting] | overrides
        if s["model"] is None:
            from pte.models import tiny_model

            base = tiny_model(**BENCH_MODEL, seed=0)
            self.prompts = _prompts(s["rows"], 32)
        else:
            from pte.data import render_prompt
            from pte.models import load
            from pte.lab.pretrain import recipe_task

            path = Path(__file__).resolve().parents[1] / "assets" / s["model"]
            base, tok = load(str(path))
            examples = recipe_task(path).examples(s["rows"], seed=0)
            self.prompts = [render_prompt(tok, ex.prompt, "{prompt}") for ex in examples]
        self.passes = passes
        self.spec = CacheSpec(window=s["window"])
        self.sampling = Sampling(max_new_tokens=s["length"], temperature=1.0)
        self.rows = rollout(base, self.prompts, self.sampling, self.spec, generator=torch.Generator().manual_seed(0)).rows
        self.adv = torch.randn(len(self.rows), 1, generator=torch.Generator().manual_seed(1))
        self.mask = torch.ones(len(self.rows), s["length"], dtype=torch.bool)
        self.old = torch.tensor([r.logprobs for r in self.rows])
        self.methods = {}
        for method in ("lora_c", "pte"):
            model = copy.deepcopy(base)
            adapter = attach(model, AdapterConfig(method=method, rank=s["rank"], n_global=s["rank"]))
            with torch.no_grad():
                for lin in adapter.linears.values():  # a trained-like adapter: A = 0 would leave B without gradient
                    lin.A.normal_(0, 0.01, generator=torch.Generator().manual_seed(2))
            self.methods[method] = (model, adapter, torch.optim.Adam(adapter.parameters(), lr=1e-4))

    def run(self, method: str) -> dict:
        from pte.grpo import TokenBatch, clipped_token_loss
        from pte.replay import replay
        from pte.rollout import rollout

        model, adapter, optimizer = self.methods[method]
        t = {}
        start = time.perf_counter()
        rollout(model, self.prompts, self.sampling, self.spec, generator=torch.Generator().manual_seed(0),
                adapter=adapter)
        t["rollout"] = time.perf_counter() - start
        t["replay"] = t["optimizer"] = 0.0
        tb = TokenBatch(advantages=self.adv, old_logp=self.old, mask=self.mask, normalizer=float(self.mask.sum()))
        loss_fn = lambda logp, rows, cols: clipped_token_loss(logp, tb, cols, rows=rows)[0]
        for _ in range(self.passes):
            optimizer.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            replay(model, self.rows, self.spec, adapter=adapter, loss_fn=loss_fn)
            t1 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
            optimizer.step()
            t["replay"] += t1 - t0
            t["optimizer"] += time.perf_counter() - t1
        t["step"] = time.perf_counter() - start
        return t


def train_step_worker(setting: str, reps: int = 3, passes: int = 2, threads: int = 1, **overrides) -> dict:
    """:class:`TrainStep` for both methods in this process, alternating rep by rep (LoRA_c, PTE, LoRA_c, ...)
    after one warm-up step each, so a shared machine's load hits both alike; medians per phase."""
    torch.set_num_threads(threads)
    bench = TrainStep(setting, passes, **overrides)
    times = {m: {p: [] for p in TRAIN_STEP_PHASES} for m in bench.methods}
    for rep in range(reps + 1):  # rep 0 warms up
        for m in bench.methods:
            t = bench.run(m)
            if rep:
                for p in TRAIN_STEP_PHASES:
                    times[m][p].append(t[p])
    med = {m: {p: statistics.median(v) for p, v in tm.items()} for m, tm in times.items()}
    return {"setting": setting, **bench.settings, "passes": passes, "reps": reps, "threads": threads,
            "median_s": med, "all_s": times,
            "ratio": {p: med["pte"][p] / med["lora_c"][p] for p in TRAIN_STEP_PHASES}}


def bench_train_step(out: str, settings=("demo", "long"), reps: int = 3, threads: int = 1, **overrides) -> list[dict]:
    """Each setting in its own subprocess; JSON (atomic) and the ratio table on stdout."""
    configs = [dict(setting=s, reps=reps, threads=threads, **overrides) for s in settings]
    results = _run_workers("train-step-worker", configs,
                           lambda r: "PTE / LoRA_c step " + f"{r['ratio']['step']:.2f}x")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(results, indent=1))
    print(train_step_table(results))
    return results


def train_step_table(results: list[dict]) -> str:
    lines = ["| setting | phase | LoRA_c s | PTE s | PTE / LoRA_c |", "|---|---|---:|---:|---:|"]
    for r in results:
        label = f"{r['setting']} ({r['rows']} rows x {r['length']} tokens, window {r['window']}, rank {r['rank']})"
        for p in TRAIN_STEP_PHASES:
            lc, pt = r["median_s"]["lora_c"][p], r["median_s"]["pte"][p]
            lines.append(f"| {label} | {p} | {lc:.3f} | {pt:.3f} | {pt / lc:.2f} |")
            label = ""
    return "\n".join(lines)


WORKERS = {"rollout-worker": rollout_worker, "train-memory-worker": train_memory_worker,
           "train-step-worker": train_step_worker}

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in WORKERS:
        print(json.dumps(WORKERS[sys.argv[1]](**json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m pte.lab.bench {rollout-worker|train-memory-worker|train-step-worker} JSON (use `pte bench` instead)")
