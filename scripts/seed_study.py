"""Train a recipe on several seeds and evaluate each run greedily on the long-range task's held-out problems.

    python scripts/seed_study.py --methods pte,lora_c --seeds 0,1,2,3,4 --out runs/seed_study [--workers 2]
        [--set grpo.dynamic_sampling=false ...]

Each (method, seed) is exactly the two README commands, run as subprocesses (the eval with OMP_NUM_THREADS=1):

    pte train --config configs/long_range_{method}.yaml --set run.seed=S --set run.out_dir=OUT/{method}-s{S}
    pte eval --model pte/assets/long_range_base --adapter OUT/{method}-s{S}/checkpoint-000100 \
        --benchmark long_range --seed 30000001 --limit 200 --cache-window 8 --temperature 0 --max-new-tokens 66 \
        --batch-size 200 --out OUT/{method}-s{S}/eval

(Greedy decoding under the bounded cache does not depend on the batch: docs/ablations.md.)

The ablations of the paper's Fig. 4c and of the state read run the same way, as named variants of PTE's recipe
(:data:`VARIANTS`, each a set of config overrides):

    python scripts/seed_study.py --methods pte --variants global0,global4,global16,global32,global_only,linear \
        --seeds 0,1,2 --out runs/ablations

One JSON line per run goes to OUT/results.jsonl (accuracy, 95% interval, training reward per 10 steps, wall times);
a markdown table of every seed and the mean to OUT/table.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

from pte.lab.jobs import ONE_THREAD, held_out_eval, run_jobs

ROOT = Path(__file__).resolve().parents[1]
# ablations at rank 8: the number of global tokens (Fig. 4c; "global0" is the paper's #Global-0, a state that is
# zero until the first eviction), the state without its eviction update (Global-Only), and the state reads
VARIANTS = {
    "global0": ["adapter.ablation=global0"],
    **{f"global{n}": [f"adapter.n_global={n}"] for n in (4, 8, 16, 32)},
    "global_only": ["adapter.ablation=global_only"],
    "linear": ["adapter.state_attention=linear"],
    "linear_recursive": ["adapter.state_attention=linear", "adapter.state_update=recursive",
                         "grpo.state_grad=segment"],
}


def run_one(method: str, seed: int, out: Path, overrides: list[str], window: int, limit: int,
            variant: str | None = None) -> list[dict]:
    name = method if variant is None else f"{method}-{variant}"
    run_dir = out / f"{name}-s{seed}"
    overrides = [*VARIANTS.get(variant, []), *overrides]
    sets = [f"run.seed={seed}", f"run.out_dir={run_dir}", *overrides]
    train = [sys.executable, "-m", "pte", "train", "--config", str(ROOT / f"configs/long_range_{method}.yaml"),
             *sum([["--set", s] for s in sets], [])]
    t0 = time.perf_counter()
    log = (out / f"{name}-s{seed}.log").open("w")
    subprocess.run(train, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    train_s = time.perf_counter() - t0
    from pte.checkpoint import latest

    ckpt = latest(run_dir)
    max_new = json.loads((run_dir / "config.json").read_text())["sampling"]["max_new_tokens"]
    ev = held_out_eval(ROOT / "pte/assets/long_range_base", run_dir / "eval", max_new_tokens=max_new, limit=limit,
                       adapter=ckpt, windows=str(window))
    t1 = time.perf_counter()
    subprocess.run(ev, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=ONE_THREAD)
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())["runs"][0]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["reward"] for m in metrics if m.get("reward") is not None]
    per10 = [round(sum(rewards[i:i + 10]) / len(rewards[i:i + 10]), 2) for i in range(0, len(rewards), 10)]
    return [{"method": name, "seed": seed, "accuracy": summary["pass1"], "ci": [summary["ci_low"], summary["ci_high"]],
            "reward_per_10_steps": per10, "train_seconds": round(train_s, 1),
            "eval_seconds": round(time.perf_counter() - t1, 1), "checkpoint": str(ckpt), "overrides": overrides,
            "skipped_steps": sum(bool(m.get("skipped_step")) for m in metrics),
            "sampled_groups": sum(m.get("sampled_groups", 0) for m in metrics)}]


def table(rows: list[dict]) -> str:
    lines = ["| method | seed | greedy accuracy, window 8 (95% CI) | training reward per 10 steps | train s |",
             "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], r["seed"])):
        lo, hi = r["ci"]
        lines.append(f"| {r['method']} | {r['seed']} | {100 * r['accuracy']:.1f}% ({100 * lo:.0f}–{100 * hi:.0f}) | "
                     f"{' '.join(f'{x:.2f}' for x in r['reward_per_10_steps'])} | {r['train_seconds']:.0f} |")
    for m in sorted({r["method"] for r in rows}):
        accs = [r["accuracy"] for r in rows if r["method"] == m]
        lines.append(f"| {m} | mean of {len(accs)} | {100 * sum(accs) / len(accs):.1f}% (min {100 * min(accs):.1f}%) | | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="pte,lora_c")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--variants", default="", help=f"comma-separated ablations of the recipe, from {list(VARIANTS)}")
    ap.add_argument("--set", action="append", default=[], help="config override for every run, key=value")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v] or [None]
    unknown = [v for v in variants if v is not None and v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = {f"{m if v is None else f'{m}-{v}'}-s{s}": functools.partial(run_one, m, int(s), out, args.set,
                                                                          args.window, args.limit, v)
            for m in args.methods.split(",") for v in variants for s in args.seeds.split(",")}
    rows, failed = run_jobs(jobs, args.workers, out / "results.jsonl",
                            show=lambda name, new, _: print(json.dumps(new[0]), flush=True))
    if rows:
        (out / "table.md").write_text(table(rows))
        print(table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
