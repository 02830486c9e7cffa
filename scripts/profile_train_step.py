"""Profile one GRPO step of a method on `pte bench train-step`'s rows (docs/train_step.md).

    python scripts/profile_train_step.py [--setting demo] [--method pte] [--top 25]

Prints torch.profiler's ops by self CPU time (what the dispatcher runs) and cProfile's Python functions by
cumulative and own time (which of pte's calls issue them), for one step after a warm-up step.
"""

import argparse
import cProfile
import io
import pstats

import torch

from pte.lab.bench import TrainStep

ap = argparse.ArgumentParser()
ap.add_argument("--setting", default="demo")
ap.add_argument("--method", default="pte")
ap.add_argument("--top", type=int, default=25)
ap.add_argument("--threads", type=int, default=1)
args = ap.parse_args()
torch.set_num_threads(args.threads)
bench = TrainStep(args.setting)
print("warm-up", bench.run(args.method))
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    print("profiled", bench.run(args.method))
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
pr = cProfile.Profile()
pr.enable()
print("cProfiled", bench.run(args.method))
pr.disable()
for key in ("cumulative", "tottime"):
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats(key).print_stats(args.top)
    print(buf.getvalue())
