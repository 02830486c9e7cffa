"""Generation-length scaling at a fixed window (the paper's Fig. 5), on the long-range task's distance variant.

    python scripts/length_scaling.py --methods pte,lora_c,lora --seeds 0,1,2 --out runs/length_scaling \
        [--base DIR] [--train-countdown 9] [--eval-countdowns 9,18,36,72] [--workers 2]

``DIR`` is a base model pretrained on the distance variant (``pte pretrain-task --set countdown=LO-HI``); the
default, ``pte/assets/long_range_countdown_base``, solves it with a full cache up to a countdown of ~75
(docs/ablations.md, "Reasoning length"). Each
(method, seed) trains the long-range recipe (``configs/long_range_{method}.yaml``) on that base at countdown
``--train-countdown``, then evaluates the last checkpoint greedily at the training window on every countdown of
``--eval-countdowns``: more thought tokens, so more evictions, between the restated result and its use. The base
model itself is evaluated too, under the window and with a full cache. Each step is a README command run as a
subprocess with one thread:

    pte train --config configs/long_range_{method}.yaml --set model.name=DIR \
        --set 'data.task_options={"hops": 6, "countdown": C}' --set sampling.max_new_tokens=N ...
    pte eval --model DIR --adapter CKPT --benchmark long_range --task-option countdown=C --cache-window 8 ...

One JSON line per evaluation goes to OUT/results.jsonl; a markdown table (every seed, 95% intervals, the mean) to
OUT/table.md; accuracy against the countdown (each method's mean over seeds, bars to its lowest and highest seed)
to OUT/length_scaling.png. ``--replot`` redraws both from OUT/results.jsonl.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from pte.lab.jobs import ONE_THREAD, held_out_eval, run_jobs

ROOT = Path(__file__).resolve().parents[1]
HOPS = 6


def max_new_tokens(countdown: int) -> int:
    """The worked solution's length in tokens, plus 4 (as the shipped recipes)."""
    from pte.tasks.long_range import LongRange, tokenizer

    task = LongRange(hops=HOPS, countdown=countdown)
    return len(tokenizer(countdown=True)(task.solution(task.examples(1, seed=0)[0]))["input_ids"]) + 4


def diagnose(eval_dir: Path, countdown: int) -> dict:
    """What each completion got right, apart: the answer digit (the memory: the last ``ans D``) and the first
    counter (the format: ``#{countdown - 1}``, the question's counter minus one). The verifier needs both."""
    rows = [json.loads(line) for p in sorted(eval_dir.glob("predictions-*.jsonl")) for line in p.open()]
    first = [re.search(r"#(\d\d)", r["completion"]) for r in rows]
    answer = [re.findall(r"ans (\d)", r["completion"]) for r in rows]
    return {"answer_digit": sum(bool(a) and a[-1] == r["answer"] for a, r in zip(answer, rows)) / len(rows),
            "first_counter": sum(bool(m) and int(m.group(1)) == countdown - 1 for m in first) / len(rows),
            "evictions": sum(r["evictions"] for r in rows) / len(rows)}


def eval_dir(out: Path, method: str, seed: int | None, countdown: int, window: int | None) -> Path:
    if seed is None:
        return out / f"base-w{window or 'full'}-c{countdown}"
    return out / f"{method}-s{seed}" / f"eval-c{countdown}"


def evaluate(base: Path, adapter: Path | None, countdown: int, window: int | None, limit: int, out: Path,
             log) -> dict:
    cmd = held_out_eval(base, out, max_new_tokens=max_new_tokens(countdown), limit=limit, adapter=adapter,
                        windows=str(window) if window else None,
                        extra=("--task-option", f"countdown={countdown}", "--task-option", f"hops={HOPS}"))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=ONE_THREAD)
    s = json.loads((out / "summary.json").read_text())["runs"][0]
    return {"countdown": countdown, "window": window, "accuracy": s["pass1"], "ci": [s["ci_low"], s["ci_high"]],
            "eval_seconds": round(time.perf_counter() - t0, 1), **diagnose(out, countdown)}


def run_method(method: str, seed: int, args) -> list[dict]:
    base, out = Path(args.base).resolve(), Path(args.out)
    run_dir = out / f"{method}-s{seed}"
    log = (out / f"{method}-s{seed}.log").open("w")
    task = json.dumps({"hops": HOPS, "countdown": args.train_countdown})
    sets = [f"run.seed={seed}", f"run.out_dir={run_dir}", f"model.name={base}", f"data.task_options={task}",
            f"sampling.max_new_tokens={max_new_tokens(args.train_countdown)}", *args.set]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pte", "train", "--config", str(ROOT / f"configs/long_range_{method}.yaml"),
                    *sum([["--set", s] for s in sets], [])], check=True, stdout=log, stderr=subprocess.STDOUT,
                   cwd=ROOT, env=ONE_THREAD)
    train_s = round(time.perf_counter() - t0, 1)
    from pte.checkpoint import latest

    ckpt = latest(run_dir)
    return [{"method": method, "seed": seed, "train_seconds": train_s, "checkpoint": str(ckpt),
             **evaluate(base, ckpt, c, args.window, args.limit, eval_dir(out, method, seed, c, args.window), log)}
            for c in args.eval_countdowns]


def run_base(args) -> list[dict]:
    base, out = Path(args.base).resolve(), Path(args.out)
    log = (out / "base.log").open("w")
    return [{"method": "base" if w else "base, full cache", "seed": None,
             **evaluate(base, None, c, w, args.limit, eval_dir(out, "base", None, c, w), log)}
            for c in args.eval_countdowns for w in (args.window, None)]


def table(rows: list[dict], counts: list[int], train_countdown: int) -> str:
    head = " | ".join(f"countdown {c} ({c / train_countdown:g}x)" for c in counts)
    lines = [f"| method | seed | {head} | train s |", "|---|---|" + "---|" * len(counts) + "---|"]
    by_run: dict[tuple, dict] = {}
    for r in rows:
        by_run.setdefault((r["method"], r["seed"]), {})[r["countdown"]] = r
    def cell(r):
        return f"{100 * r['accuracy']:.1f}% ({100 * r['ci'][0]:.0f}–{100 * r['ci'][1]:.0f})" if r else "—"
    for (m, s), cs in sorted(by_run.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])):
        train_s = next(iter(cs.values())).get("train_seconds")
        lines.append(f"| {m} | {'—' if s is None else s} | " + " | ".join(cell(cs.get(c)) for c in counts)
                     + f" | {'' if train_s is None else f'{train_s:.0f}'} |")
    for m in sorted({m for m, s in by_run if s is not None}):
        means = []
        for c in counts:
            accs = [cs[c]["accuracy"] for (mm, s), cs in by_run.items() if mm == m and s is not None and c in cs]
            means.append(f"{100 * sum(accs) / len(accs):.1f}% (min {100 * min(accs):.1f}%)" if accs else "—")
        n = sum(1 for mm, s in by_run if mm == m and s is not None)
        lines.append(f"| {m} | mean of {n} | " + " | ".join(means) + " | |")
    lines += ["", "Apart (answer digit right / first counter right), the verifier needing both:", "",
              f"| method | seed | {head} |", "|---|---|" + "---|" * len(counts)]
    for (m, s), cs in sorted(by_run.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])):
        lines.append(f"| {m} | {'—' if s is None else s} | " + " | ".join(
            f"{100 * cs[c]['answer_digit']:.1f} / {100 * cs[c]['first_counter']:.1f}" if c in cs and "answer_digit" in cs[c]
            else "—" for c in counts) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, train_countdown: int, window: int) -> Path:
    from pte.plots import Line, line_plot

    lines = []
    for m in sorted({r["method"] for r in rows}):
        counts = sorted({r["countdown"] for r in rows if r["method"] == m})
        accs = [[100 * r["accuracy"] for r in rows if r["method"] == m and r["countdown"] == c] for c in counts]
        mean = [sum(a) / len(a) for a in accs]
        lines.append(Line(f"{m} ({len(accs[0])} run{'s' * (len(accs[0]) > 1)})", counts, mean,
                          yerr=([y - min(a) for y, a in zip(mean, accs)], [max(a) - y for y, a in zip(mean, accs)])))
    return line_plot(path, lines, xlabel=f"countdown blocks between the result and its use (trained at {train_countdown})",
                     ylabel=f"greedy accuracy % (window {window} unless named)", log2_x=True, ylim=(-2, 102),
                     title="Generation-length scaling at a fixed window")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default=str(ROOT / "pte/assets/long_range_countdown_base"),
                    help="a base model pretrained on the distance variant")
    ap.add_argument("--methods", default="pte,lora_c,lora")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--train-countdown", type=int, default=9)
    ap.add_argument("--eval-countdowns", default="9,18,36,72")
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-base", action="store_true", help="skip the base model's evaluations")
    ap.add_argument("--set", action="append", default=[], help="config override for every training run, key=value")
    ap.add_argument("--replot", action="store_true", help="only redraw the table and plot from OUT/results.jsonl")
    args = ap.parse_args()
    args.eval_countdowns = [int(c) for c in args.eval_countdowns.split(",")]
    out = Path(args.out)
    if args.replot:
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        rows = [{**r, **diagnose(eval_dir(out, r["method"], r["seed"], r["countdown"], r["window"]), r["countdown"])}
                for r in rows]
        (out / "table.md").write_text(table(rows, args.eval_countdowns, args.train_countdown))
        print(table(rows, args.eval_countdowns, args.train_countdown))
        print(plot(rows, out / "length_scaling.png", args.train_countdown, args.window))
        return 0
    from pte.tasks.long_range import LongRange

    LongRange(hops=HOPS, countdown=args.train_countdown).check_difficulty(layers=4, window=args.window)
    out.mkdir(parents=True, exist_ok=True)
    jobs = {f"{m}-s{s}": functools.partial(run_method, m, int(s), args) for m in args.methods.split(",") if m
            for s in args.seeds.split(",")}
    if not args.no_base:
        jobs["base"] = functools.partial(run_base, args)
    rows, failed = run_jobs(jobs, args.workers, out / "results.jsonl", show=lambda name, new, rows: print(
        table(rows, args.eval_countdowns, args.train_countdown), flush=True))
    if rows:
        (out / "table.md").write_text(table(rows, args.eval_countdowns, args.train_countdown))
        plot(rows, out / "length_scaling.png", args.train_countdown, args.window)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
