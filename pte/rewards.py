"""Rewards: answer extraction and math verification that can neither hang nor crash training.

``math-verify`` is the grader (gold first: ``verify(parse(gold), parse(pred))``). Its own timeouts use
``signal.alarm``, which works only in a process's main thread, so grading runs in a pool of child processes,
each task in the child's main thread, with our own wall-clock timeout on top: a task that overruns scores 0, is
counted, and its pool is replaced. A task that raises scores 0 and is counted too. Nothing is swallowed silently:
the counts go to the training logs.
"""

from __future__ import annotations

import multiprocessing as mp
import re
from dataclasses import dataclass

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces matched."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The model's final answer: last boxed -> 'final answer is' -> '####' -> the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (r"[Ff]inal [Aa]nswer(?: is)?:?\s*\$?([^\n$]+)", r"[Tt]he answer is:?\s*\$?([^\n$]+)", r"####\s*([^\n]+)"):
        found = re.findall(pattern, text)
        if found:
            return found[-1].strip().rstrip(".")
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _verify(pred: str, gold: str) -> float:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_parsed = parse(gold if "$" in gold or "\\" in gold else f"${gold}$", extraction_config=config)
    answer = extract_answer(pred)
    if answer is None or not gold_parsed:
        return 0.0
    pred_parsed = parse(f"${answer}$", extraction_config=config) or parse(answer, extraction_config=config)
    return 1.0 if pred_parsed and verify(gold_parsed, pred_parsed) else 0.0


def _ready(_: int) -> bool:
    import math_verify  # noqa: F401  (the import is what a cold worker spends its first seconds on)

    return True


@dataclass
class GradeStats:
    graded: int = 0
    timeouts: int = 0
    errors: int = 0


class MathGrader:
    """Grades (prediction, gold) pairs in child processes with a per-task timeout (seconds)."""

    def __init__(self, workers: int = 2, timeout: float = 10.0):
        if timeout <= 0:
            raise ValueError(f"grader timeout={timeout}: must be > 0 seconds")
        self.workers, self.timeout = workers, timeout
        self._fn = _verify  # (prediction, gold) -> score; a top-level function, so workers can import it
        self._pool = None
        self.stats = GradeStats()

    def _ensure_pool(self):
        if self._pool is None:
            self._pool = mp.get_context("spawn").Pool(self.workers)
            # start-up (imports) is not grading time: wait for every worker once, then time the tasks
            self._pool.map(_ready, range(self.workers), chunksize=1)
        return self._pool

    def _reset_pool(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def grade(self, preds: list[str], golds: list[str]) -> list[float]:
        if len(preds) != len(golds):
            raise ValueError(f"{len(preds)} predictions for {len(golds)} gold answers")
        pool = self._ensure_pool()
        jobs = [pool.apply_async(self._fn, (p, g)) for p, g in zip(preds, golds)]
        scores, stuck = [], False
        for job in jobs:
            try:
                scores.append(float(job.get(timeout=self.timeout)))
            except mp.TimeoutError:
                scores.append(0.0)
                self.stats.timeouts += 1
                stuck = True
            except Exception:  # a grader crash on a pathological answer scores 0 and is counted
                scores.append(0.0)
                self.stats.errors += 1
        self.stats.graded += len(preds)
        if stuck:
            self._reset_pool()
        return scores

    def close(self) -> None:
        self._reset_pool()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
