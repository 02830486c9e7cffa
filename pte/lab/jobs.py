"""The research scripts' job runner (``scripts/seed_study.py``, ``length_scaling.py``, ``policy_sweep.py``): named
jobs, each a few README commands run as subprocesses, some at once; each job's rows go to a JSONL file as the job
ends, so an interrupted study keeps what finished, and one failed job stops no other."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path


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
