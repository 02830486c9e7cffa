"""What the research scripts (``scripts/seed_study.py``, ``length_scaling.py``, ``policy_sweep.py``) share: the
held-out evaluation command, and the job runner. A job is a few README commands run as subprocesses, some at once;
each job's rows go to a JSONL file as the job ends, so an interrupted study keeps what finished, and one failed job
stops no other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from pte.lab.demo import EVAL_SEED

# evaluations run with one thread, as the training runs: a default-threaded eval beside another run oversubscribes
# the cores (docs/log.md, 2026-12-07)
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def held_out_eval(model: str | Path, out: str | Path, *, max_new_tokens: int, limit: int = 200,
                  adapter: str | Path | None = None, windows: str | None = None, extra: tuple[str, ...] = ()) -> list:
    """The ``pte eval`` command of the demo's held-out long-range problems: greedy, in one batch; ``windows`` (e.g.
    "4,8,16") None is a full cache; ``extra``: more flags (``--policy``, ``--task-option``)."""
    cmd = [sys.executable, "-m", "pte", "eval", "--model", str(model), "--benchmark", "long_range", "--seed",
           str(EVAL_SEED), "--limit", str(limit), "--temperature", "0", "--max-new-tokens", str(max_new_tokens),
           "--batch-size", str(limit), "--out", str(out), *extra]
    cmd += ["--adapter", str(adapter)] if adapter else []
    return cmd + (["--cache-window", windows] if windows else [])


def run_jobs(jobs: dict[str, Callable[[], list[dict]]], workers: int, results: Path,
             show: Callable[[str, list[dict], list[dict]], None] | None = None) -> tuple[list[dict], list[str]]:
    """Run ``jobs`` (name -> a call returning rows) in ``workers`` threads; append each job's rows to ``results``
    and call ``show(name, its rows, all rows so far)``. A job's log is ``results.parent / f"{name}.log"``.
    -> (every row, one line per failed job)."""
    rows, failed = [], []
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(fn): name for name, fn in jobs.items()}
        for f in as_completed(futures):
            name = futures[f]
            try:
                new = f.result()
            except subprocess.CalledProcessError as err:
                failed.append(f"{name}: `{' '.join(map(str, err.cmd[2:4]))}` exited {err.returncode}; "
                              f"see {results.parent / f'{name}.log'}")
                print(failed[-1], file=sys.stderr, flush=True)
                continue
            rows += new
            with results.open("a") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in new)
            if show is not None:
                show(name, new, rows)
    return rows, failed
