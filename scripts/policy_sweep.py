"""Eviction policies swapped in at inference on trained adapters (the paper's Fig. 4d), on the long-range task.

    python scripts/policy_sweep.py --study runs/seed_study --out runs/policies \
        [--policies sliding,keynorm,h2o,snapkv,pyramidkv] [--windows 4,8,16] [--workers 2] [--replot]

``--study`` is a directory written by ``scripts/seed_study.py``: every run in its ``results.jsonl`` (method, seed,
checkpoint) is evaluated with every policy, and so is the base model without an adapter. Each evaluation is one
README command, run as a subprocess with one thread:

    pte eval --model pte/assets/long_range_base [--adapter CKPT] --benchmark long_range --seed 30000001 \
        --limit 200 --temperature 0 --max-new-tokens N --batch-size 200 --out DIR --policy P --cache-window 4,8,16

(``N``: the run's ``sampling.max_new_tokens``, 66 in the shipped recipes.)

One JSON line per (run, policy, window) goes to OUT/results.jsonl; OUT/table.md has every seed with its 95%
interval and each method's mean; OUT/policies.png plots each method's mean accuracy per window and policy, with
bars to its lowest and highest seed. ``--replot`` redraws both from OUT/results.jsonl.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

from pte.config import load_config
from pte.eviction import POLICIES
from pte.lab.jobs import ONE_THREAD, held_out_eval, run_jobs

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "pte/assets/long_range_base"


def _label(run: dict) -> str:
    return "base" if run["seed"] is None else f"{run['method']}-s{run['seed']}"


def evaluate(run: dict, policy: str, args, out: Path) -> list[dict]:
    """One policy over every window for one run (``run["checkpoint"]`` None: the base model)."""
    label = _label(run)
    eval_dir = out / f"{label}-{policy}"
    cmd = held_out_eval(BASE, eval_dir, max_new_tokens=run["max_new_tokens"], limit=args.limit,
                        adapter=run["checkpoint"], windows=",".join(map(str, args.windows)), extra=("--policy", policy))
    t0 = time.perf_counter()
    with (out / f"{label}-{policy}.log").open("w") as log:  # the job's log (pte.lab.jobs)
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=ONE_THREAD)
    seconds = round(time.perf_counter() - t0, 1)
    summaries = json.loads((eval_dir / "summary.json").read_text())["runs"]
    return [{"method": run["method"], "seed": run["seed"], "policy": policy, "window": s["window"],
             "accuracy": s["pass1"], "ci": [s["ci_low"], s["ci_high"]], "command_seconds": seconds}
            for s in summaries]


def _cell(r: dict | None) -> str:
    return "—" if r is None else f"{100 * r['accuracy']:.1f} ({100 * r['ci'][0]:.0f}–{100 * r['ci'][1]:.0f})"


def table(rows: list[dict], policies: list[str], windows: list[int]) -> str:
    """Per method: the mean over its seeds per policy and window, then every seed with its 95% interval."""
    at = {(r["method"], r["seed"], r["policy"], r["window"]): r for r in rows}
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "base", m))
    head = " | ".join(f"window {w}" for w in windows)
    lines = [f"| method | policy | {head} | seeds |", "|---|---|" + "---|" * len(windows) + "---|"]
    for m in methods:
        seeds = sorted({r["seed"] for r in rows if r["method"] == m}, key=lambda s: -1 if s is None else s)
        for p in policies:
            cells = []
            for w in windows:
                accs = [at[m, s, p, w]["accuracy"] for s in seeds if (m, s, p, w) in at]
                cells.append(f"{100 * sum(accs) / len(accs):.1f}" if accs else "—")
            lines.append(f"| {m} | {p} | " + " | ".join(cells) + f" | {'—' if m == 'base' else len(seeds)} |")
    lines += ["", f"Every run, greedy accuracy % (95% Wilson interval), windows {' / '.join(map(str, windows))}:", "",
              "| run | " + " | ".join(policies) + " |", "|---|" + "---|" * len(policies)]
    for m in methods:
        for s in sorted({r["seed"] for r in rows if r["method"] == m}, key=lambda s: -1 if s is None else s):
            name = m if s is None else f"{m}-s{s}"
            lines.append(f"| {name} | " + " | ".join(
                "<br>".join(_cell(at.get((m, s, p, w))) for w in windows) for p in policies) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, policies: list[str], windows: list[int]) -> Path:
    from pte.plots import Line, Panel, figure

    panels = []
    for m in sorted({r["method"] for r in rows}, key=lambda m: (m != "pte", m == "base", m)):
        lines = []
        for p in policies:
            accs = [[100 * r["accuracy"] for r in rows if r["method"] == m and r["policy"] == p and r["window"] == w]
                    for w in windows]
            if not all(accs):
                continue
            mean = [sum(a) / len(a) for a in accs]
            lines.append(Line(p, list(range(len(windows))), mean, yerr=([y - min(a) for y, a in zip(mean, accs)],
                                                      [max(a) - y for y, a in zip(mean, accs)])))
        n = len({r["seed"] for r in rows if r["method"] == m})
        title = m if m == "base" else f"{m} (mean of {n} seed{'s' * (n > 1)}, bars: min-max)"
        panels.append(Panel(lines, xlabel="window (thought tokens)", ylabel="greedy accuracy %", title=title,
                            ylim=(-2, 102), xticks=[str(w) for w in windows]))
    return figure(path, panels, size=(5.5 * len(panels), 4.2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", help="a scripts/seed_study.py output directory (its results.jsonl)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--windows", default="4,8,16")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-base", action="store_true", help="skip the base model")
    ap.add_argument("--replot", action="store_true", help="only redraw the table and plot from OUT/results.jsonl")
    args = ap.parse_args()
    args.windows = [int(w) for w in args.windows.split(",")]
    policies = [p for p in args.policies.split(",") if p]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        ap.error(f"--policies: unknown {unknown}; choose from {list(POLICIES)}")
    out = Path(args.out)
    if args.replot:
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        (out / "table.md").write_text(table(rows, policies, args.windows))
        print(table(rows, policies, args.windows))
        print(plot(rows, out / "policies.png", policies, args.windows))
        return 0
    if not args.study:
        ap.error("--study DIR is needed (or --replot)")
    study = Path(args.study) / "results.jsonl"
    if not study.exists():
        ap.error(f"--study {args.study}: no results.jsonl there; pass a directory written by scripts/seed_study.py")
    runs = [json.loads(line) for line in study.read_text().splitlines()]
    # each run is evaluated at the length it was trained with (its config.json), the base at the PTE recipe's
    runs = [{"method": r["method"], "seed": r["seed"], "checkpoint": r["checkpoint"], "max_new_tokens": json.loads(
        (Path(r["checkpoint"]).parent / "config.json").read_text())["sampling"]["max_new_tokens"]} for r in runs]
    if not args.no_base:
        recipe = load_config(str(ROOT / "configs/long_range_pte.yaml"))
        runs.append({"method": "base", "seed": None, "checkpoint": None,
                     "max_new_tokens": recipe.sampling.max_new_tokens})
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("")
    jobs = {f"{_label(r)}-{p}": functools.partial(evaluate, r, p, args, out) for r in runs for p in policies}
    rows, failed = run_jobs(jobs, args.workers, out / "results.jsonl", show=lambda name, new, _: print(
        f"{name}: " + "  ".join(f"w{r['window']} {100 * r['accuracy']:.1f}%" for r in new), flush=True))
    if rows:
        (out / "table.md").write_text(table(rows, policies, args.windows))
        print(table(rows, policies, args.windows))
        print(plot(rows, out / "policies.png", policies, args.windows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
