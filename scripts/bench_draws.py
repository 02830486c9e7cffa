"""One draw per rollout against ``grpo.adaptive_draws``, side by side in one process, on a trained adapter.

    python scripts/bench_draws.py --method pte --adapter runs/long_range_pte/checkpoint-000100 [--steps 8]

Both runs load the method's recipe (``configs/long_range_{method}.yaml``) and the same adapter, and draw the same
prompt stream; they alternate step by step (sequential, adaptive, sequential, ...), so a shared machine's load hits
both alike. Per step: the sampling (``collect``: rollouts, scoring, advantages) and the GRPO update
(``grpo_step``: 2 replay passes and Adam steps on a copy of the adapter that each run owns). Prints each phase's
median, the draws and rollouts of every step, and the adaptive / sequential ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="pte", choices=["pte", "lora_c", "lora"])
    ap.add_argument("--adapter", required=True, help="a checkpoint directory of that method's recipe")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()

    from pte.adapter import read_tensors
    from pte.config import load_config
    from pte.train import PromptStream, collect, grpo_step, setup

    runs = {}
    for adaptive in (False, True):
        cfg = load_config(str(ROOT / f"configs/long_range_{args.method}.yaml"),
                          [f"grpo.adaptive_draws={str(adaptive).lower()}"])
        run = setup(cfg)
        run.adapter.load_state_dict(read_tensors(args.adapter))
        runs[adaptive] = (run, PromptStream(run.examples, cfg.grpo.prompts_per_step, cfg.run.seed, run.dist))
    times = {a: {"sampling": [], "update": []} for a in runs}
    draws = {a: [] for a in runs}
    for _ in range(args.steps):
        for adaptive, (run, prompts) in runs.items():
            t0 = time.perf_counter()
            traj = collect(run, prompts)
            t1 = time.perf_counter()
            grpo_step(run, traj)
            times[adaptive]["sampling"].append(t1 - t0)
            times[adaptive]["update"].append(time.perf_counter() - t1)
            draws[adaptive].append(f"{traj.stats['sampling_rounds']}/{traj.stats['rollouts']}/{len(traj.kept)}")
    print("| draws per rollout | sampling s | update s | step s | draws/rollouts/replayed rows per step |")
    print("|---|---:|---:|---:|---|")
    med = {}
    for adaptive in runs:
        t = times[adaptive]
        med[adaptive] = {k: statistics.median(v) for k, v in t.items()}
        med[adaptive]["step"] = statistics.median([a + b for a, b in zip(t["sampling"], t["update"])])
        m = med[adaptive]
        print(f"| {'adaptive' if adaptive else 'one'} | {m['sampling']:.3f} | {m['update']:.3f} | {m['step']:.3f} | "
              f"{' '.join(draws[adaptive])} |")
    print("adaptive / one: " + ", ".join(f"{k} {med[True][k] / med[False][k]:.2f}" for k in ("sampling", "update", "step")))


if __name__ == "__main__":
    main()
