"""Rewards: answer extraction and math verification that can neither hang nor crash training.

``math-verify`` is the grader (gold first: ``verify(parse(gold), parse(pred))``). Grading runs in a pool of child
processes, each task in the child's main thread, under one timeout (``reward.timeout`` seconds per grade):

- the worker arms a ``SIGALRM`` timer for the whole grade and turns math-verify's own per-call timeouts off (they
  share that one timer, and math-verify turns its timeouts into a silent ``False``, so a hung grade scored 0
  without being counted);
- the parent waits ``GRACE`` seconds more, for native code that no signal interrupts, then replaces the pool.

Either way the grade scores 0 and counts as a timeout. A task that raises scores 0 and counts as an error.
Nothing is swallowed silently: the counts go to the training logs.
"""

from __future__ import annotations

import multiprocessing as mp
import re
import signal
from dataclasses import dataclass

GRACE = 2.0  # seconds the parent waits past the worker's own deadline

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
    off = dict(parsing_timeout=None)  # the worker's own deadline covers the whole grade (see the module docstring)
    gold_parsed = parse(gold if "$" in gold or "\\" in gold else f"${gold}$", extraction_config=config, **off)
    answer = extract_answer(pred)
    if answer is None or not gold_parsed:
        return 0.0
    pred_parsed = parse(f"${answer}$", extraction_config=config, **off) or parse(answer, extraction_config=config, **off)
    return 1.0 if pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None) else 0.0


class GradeTimeout(BaseException):
    """Raised by the worker's timer. A BaseException, so math-verify's ``except Exception`` cannot swallow it."""


def _on_alarm(signum, frame):
    raise GradeTimeout


def timed_grade(fn, pred: str, gold: str, timeout: float) -> tuple[str, float]:
    """Run ``fn(pred, gold)`` under a ``timeout``-second timer (main thread only). -> ("ok" | "timeout" |
    "error", score)."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            return "ok", float(fn(pred, gold))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)  # disarmed before any handler below runs
    except GradeTimeout:
        return "timeout", 0.0
    except Exception:  # a grader crash on a pathological answer scores 0 and is counted
        return "error", 0.0
    finally:
        signal.signal(signal.SIGALRM, previous)


def _ready(_: int) -> bool:
    import logging

    import math_verify  # noqa: F401  (the import is what a cold worker spends its first seconds on)

    # math-verify warns once that its timeouts are off; they are, on purpose, and timeouts are counted instead
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return True


@dataclass
class GradeStats:
    graded: int = 0
    timeouts: int = 0
    errors: int = 0


class MathGrader:
    """Grades (prediction, gold) pairs in child processes, ``timeout`` seconds per grade (see the module docstring)."""

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
        jobs = [pool.apply_async(timed_grade, (self._fn, p, g, self.timeout)) for p, g in zip(preds, golds)]
        scores, stuck = [], False
        for job in jobs:
            try:
                status, score = job.get(timeout=self.timeout + GRACE)
            except mp.TimeoutError:
                status, score, stuck = "timeout", 0.0, True
            except Exception:  # the task could not even be sent or returned
                status, score = "error", 0.0
            scores.append(score)
            self.stats.timeouts += status == "timeout"
            self.stats.errors += status == "error"
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
