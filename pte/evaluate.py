"""Accuracy under a bounded KV cache, swept over cache sizes, with confidence intervals: the library behind
``pte eval`` (the command itself, its flags and ``--resume`` checks, is in :mod:`pte.cli`).

**Cache sizing.** A *window* counts thought tokens kept on top of the question, as in ``pte generate``. A
*budget* is the paper's total per sequence: kept question (its "sink") tokens plus the sliding window (Fig. 6:
768 = 512 + 256). Our cache keeps each row's whole question and one window per batch, so a budget is split once
per run, the same way for every row: ``window = budget - Q``, where ``Q`` is the longest rendered prompt of the
evaluated set, or a fixed reservation (``question_tokens``; the paper's Fig. 6 reserves 512) that every prompt
must fit. No row then holds more than ``budget`` tokens, and the window does not depend on how rows are batched.
A budget that leaves no window is an error. Tables report both: for a window run, ``budget = Q + window``, the
most tokens any row holds.

**Accuracy.** Each problem gets ``N`` samples, ``c`` of them correct (``score >= 1``). pass@1 is the mean over
problems of ``c / N``; pass@k the unbiased estimator (:func:`pte.passk.pass_at_k`) averaged over problems. The
95% interval is the Wilson score interval with ``n`` = the number of problems and ``p`` = pass@1. For ``N = 1`` it
is the textbook interval for a binomial proportion; for ``N > 1`` it is conservative, because a per-problem mean
in [0, 1] with mean ``p`` has variance at most ``p (1 - p)``. Either way it measures uncertainty over problems,
the population a benchmark samples, and it stays non-degenerate at 0% and 100%.

**Reproducibility.** Each batch of samples draws from a generator seeded by (seed, batch index), so a sweep gives
every cache size the same random stream, and a resumed run the stream it would have had; results are exactly
repeatable for the same seed, batch size and device.

**Files as they go.** ``pte eval`` appends each batch's records to ``predictions-<label>.jsonl`` (flushed and synced)
as soon as they are scored, with its settings in ``eval_state.json``; the summaries are written atomically at the end.
An interrupted run (SIGTERM, Ctrl-C, a crash) loses at most the batch in progress, and ``--resume`` continues it: the
same settings are required, complete batches are kept and the rest is sampled again, so the results equal an
uninterrupted run's. Without ``--resume`` a previous evaluation's files in ``--out`` (and only those) are removed
before the first new one is written.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pte.data import Example, render_prompt
from pte.files import write_text_atomic
from pte.memory import peak, reset_peak
from pte.passk import pass_at_k
from pte.rewards import extract_answer
from pte.rollout import CacheSpec, Sampling, rollout
from pte.tokens import pad_token_id

Z95 = 1.959963984540054
TASK_PROBLEMS = 100  # problems generated for a task benchmark when --limit is not given
STATE_FILE = "eval_state.json"
OWN_FILES = ("summary.json", "summary.md", "summary.csv", "accuracy.png", STATE_FILE)  # plus predictions-*.jsonl
BATCH_SEED_STRIDE = 1_000_003


@dataclass
class Record:
    """One sample: what a predictions-<label>.jsonl line holds."""

    problem: int
    sample: int
    source: str
    prompt: str
    answer: str  # gold
    completion: str
    extracted: str | None  # extract_answer's reading, for display; the verdict is the scorer's
    score: float
    correct: bool  # score >= 1
    prompt_tokens: int
    length: int  # completion tokens
    evictions: int
    finish_reason: str  # eos | stop | length


@dataclass
class Summary:
    label: str  # "full", "w<window>" or "b<budget>"
    sized_by: str  # full | window | budget
    window: int | None  # thought tokens; None = full cache
    budget: int | None  # question + window; None = full cache
    question_tokens: int  # the longest prompt, kept whole
    problems: int
    samples: int  # per problem
    pass1: float
    ci_low: float
    ci_high: float
    pass_at_k: dict[int, float]
    mean_score: float
    mean_length: float
    mean_evictions: float
    finish_reasons: dict[str, int]
    generated_tokens: int
    tokens_per_s: float  # generated tokens / generation seconds (scoring excluded)
    peak_memory_bytes: int
    memory_kind: str  # cuda_max_allocated | cpu_peak_rss (the whole process, weights included)
    seconds: float  # wall time, scoring included
    resumed: int = 0  # records read back from an interrupted run (tokens/s, memory and seconds exclude them)


@dataclass
class EvalResult:
    records: list[Record]
    summary: Summary


# -- sizing and statistics ----------------------------------------------------------------------------------------
def parse_sizes(text: str, flag: str) -> list[int | None]:
    """``"full,64,32"`` -> ``[None, 64, 32]``."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if part == "full":
            if None in out:
                raise ValueError(f"{flag} {text}: 'full' is listed twice; each size is one run")
            out.append(None)
            continue
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"{flag} {text}: {part!r} is neither an integer nor 'full'") from None
        if value < 1:
            raise ValueError(f"{flag} {value}: a cache must hold at least one thought token; pass a positive "
                             "integer or 'full'")
        if value in out:
            raise ValueError(f"{flag} {text}: {part} is listed twice; each size is one run")
        out.append(value)
    return out


def size_label(window: int | None, budget: int | None) -> str:
    return "full" if window is None else f"b{budget}" if budget is not None else f"w{window}"


def split_budget(budget: int, prompt_lengths: list[int], question_tokens: int | None = None) -> int:
    """The thought window a total ``budget`` leaves: ``budget - Q`` (see the module docstring)."""
    longest = max(prompt_lengths)
    if question_tokens is not None and question_tokens < longest:
        raise ValueError(f"--question-tokens {question_tokens} is smaller than the longest prompt ({longest} tokens); "
                         f"reserve at least {longest} or leave it out")
    q = longest if question_tokens is None else question_tokens
    if budget <= q:
        raise ValueError(f"--cache-budget {budget} leaves no thought window: the question takes {q} tokens; pass a "
                         f"budget above {q} or size the window directly with --cache-window")
    return budget - q


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if p <= 0 else max(0.0, center - half)  # exact bounds at 0% / 100% (no 1e-18 rounding residue)
    return low, 1.0 if p >= 1 else min(1.0, center + half)


def check_ks(ks, n_samples: int) -> None:
    if n_samples < 1:
        raise ValueError(f"--n {n_samples}: draw at least one sample per problem")
    for k in ks:
        if not 1 <= k <= n_samples:
            raise ValueError(f"pass@{k} needs k <= n samples per problem (n={n_samples}); raise --n to at least {k} "
                             "or drop that k")


def accuracy(correct: list[list[bool]], ks) -> dict:
    """Per problem a list of N verdicts -> pass@1, its Wilson interval, pass@k for each k."""
    n = len(correct[0])
    counts = [sum(c) for c in correct]
    pass1 = sum(counts) / (n * len(counts))
    low, high = wilson_interval(pass1, len(counts))
    return dict(pass1=pass1, ci_low=low, ci_high=high,
                pass_at_k={k: sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in ks})


# -- the evaluation loop --------------------------------------------------------------------------------------------
def render_prompts(tokenizer, examples: list[Example], chat: bool) -> list[list[int]]:
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; drop --chat")
    return [render_prompt(tokenizer, ex.prompt, "chat" if chat else "{prompt}") for ex in examples]


def check_done(records: list[Record], jobs: list[tuple[int, int]], batch_size: int) -> None:
    """An interrupted run's records must be its first complete batches, in order, to be resumed from."""
    n = len(records)
    if n % batch_size and n != len(jobs) or n > len(jobs) or [(r.problem, r.sample) for r in records] != jobs[:n]:
        raise ValueError(f"{n} earlier records do not match this run's complete batches "
                         f"({len(jobs)} samples in batches of {batch_size}); start over without them")


def scored(problem: int, sample: int, row, example: Example, prompt_tokens: int, tokenizer, score) -> Record:
    """One sampled completion (a :class:`pte.rollout.RolloutRow`), decoded and scored."""
    text = tokenizer.decode(row.completion_ids, skip_special_tokens=True)
    s = float(score(text, example))
    return Record(problem, sample, example.source, example.prompt, example.answer, text, extract_answer(text), s,
                  s >= 1.0, prompt_tokens, len(row.completion_ids), len(row.eviction_steps), row.finish_reason)


def evaluate(model, tokenizer, examples: list[Example], score, *, spec: CacheSpec, sampling: Sampling,
             n_samples: int = 1, ks=(1,), batch_size: int = 16, adapter=None, chat: bool = False,
             progress: bool = True, seed: int = 0, budget: int | None = None, label: str | None = None,
             predictions: str | Path | None = None, done: list[Record] = ()) -> EvalResult:
    """Sample ``n_samples`` completions of every example under ``spec`` and score them.

    ``score(completion, example) -> float`` (1.0 is correct). ``sampling`` carries the stop tokens (see
    :func:`pte.tokens.stop_token_ids`). ``budget``, when the window was split from one, is checked and reported.
    ``predictions``: a JSONL file each batch's records are appended to as soon as they are scored. ``done``: the
    records of complete batches of an interrupted run with the same settings (see :func:`read_predictions`);
    their samples are not drawn again.
    """
    from pte.models import check_positions

    check_ks(ks, n_samples)
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be >= 1")
    if not examples:
        raise ValueError("no examples to evaluate")
    spec.validate()
    sampling.validate()
    prompts = render_prompts(tokenizer, examples, chat)
    longest = max(map(len, prompts))
    check_positions(model, longest, sampling.max_new_tokens, "max_new_tokens")
    if budget is not None and (spec.window is None or longest + spec.window > budget):
        raise ValueError(f"budget {budget} cannot hold the longest prompt ({longest} tokens) plus window "
                         f"{spec.window}; split it with split_budget")
    jobs = [(i, j) for i in range(len(examples)) for j in range(n_samples)]
    records = list(done)
    check_done(records, jobs, batch_size)
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer, sampling.eos_token_ids)
    gen = torch.Generator(device=device)
    rollout(model, [prompts[0]], Sampling(2, temperature=0), spec, pad_token_id=pad, adapter=adapter)  # warm-up
    reset_peak(device)
    label = label or size_label(spec.window, budget)
    generated, gen_seconds = 0, 0.0
    start = time.perf_counter()
    from tqdm import tqdm

    sink = open(predictions, "a", encoding="utf-8") if predictions is not None else None
    try:
        with tqdm(total=len(jobs), initial=len(records), desc=f"pte eval {label}", unit="sample", file=sys.stderr,
                  disable=not progress) as bar:
            for b in range(len(records), len(jobs), batch_size):
                batch = jobs[b:b + batch_size]
                gen.manual_seed(seed + BATCH_SEED_STRIDE * (b // batch_size))
                res = rollout(model, [prompts[i] for i, _ in batch], sampling, spec, pad_token_id=pad,
                              tokenizer=tokenizer, generator=gen, adapter=adapter)
                generated, gen_seconds = generated + res.generated_tokens, gen_seconds + res.seconds
                new = [scored(i, j, row, examples[i], len(prompts[i]), tokenizer, score)
                       for (i, j), row in zip(batch, res.rows)]
                if sink is not None:
                    sink.write("".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in new))
                    sink.flush()
                    os.fsync(sink.fileno())
                records += new
                bar.update(len(batch))
    finally:
        if sink is not None:
            sink.close()
    seconds = time.perf_counter() - start
    peak_bytes, memory_kind = peak(device)
    verdicts = [[r.correct for r in records[i * n_samples:(i + 1) * n_samples]] for i in range(len(examples))]
    reasons = dict(Counter(r.finish_reason for r in records))
    summary = Summary(
        label=label, sized_by="full" if spec.window is None else "budget" if budget is not None else "window",
        window=spec.window, budget=None if spec.window is None else budget or longest + spec.window,
        question_tokens=longest, problems=len(examples), samples=n_samples, **accuracy(verdicts, ks),
        mean_score=sum(r.score for r in records) / len(records),
        mean_length=sum(r.length for r in records) / len(records),
        mean_evictions=sum(r.evictions for r in records) / len(records), finish_reasons=reasons,
        generated_tokens=generated + sum(r.length for r in done), tokens_per_s=generated / max(gen_seconds, 1e-9),
        peak_memory_bytes=peak_bytes, memory_kind=memory_kind, seconds=seconds, resumed=len(done),
    )
    return EvalResult(records, summary)


def read_predictions(path: Path, batch_size: int, total: int) -> list[Record]:
    """The complete batches of an interrupted run's predictions file; the file is cut back to them (a partial batch
    or a half-written last line is sampled again)."""
    if not path.exists():
        return []
    records, lines = [], path.read_text(encoding="utf-8").splitlines(keepends=True)
    for n, line in enumerate(lines, 1):
        try:
            records.append(Record(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            if n == len(lines):  # the line being written when the run stopped
                break
            raise ValueError(f"{path}:{n}: not a prediction record; this file was not written by pte eval: remove "
                             "it or start over without --resume") from None
    keep = len(records) if len(records) == total else len(records) // batch_size * batch_size
    if keep != len(lines):
        write_text_atomic(path, "".join(lines[:keep]))
    return records[:keep]


def check_out(out: str | Path) -> None:
    """``--out`` must be, or become, a writable directory: checked before anything is evaluated."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory (it is created if missing)")
    parent = next((a for a in [p, *p.parents] if a.exists()), Path("."))
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file; pass a directory path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {parent} is not writable; pass a directory you can write to")


def clear_previous(out: Path) -> list[str]:
    """Remove a previous evaluation's files (only those pte eval writes). -> their names."""
    if not out.is_dir():
        return []
    gone = sorted(p.name for p in out.iterdir() if p.is_file() and (p.name in OWN_FILES or (
        p.name.startswith("predictions-") and p.suffix == ".jsonl")))
    for name in gone:
        (out / name).unlink()
    return gone


class Interrupted(KeyboardInterrupt):
    """SIGTERM or Ctrl-C during ``pte eval``; the message says what was kept and how to continue."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


class sigterm_raises:
    """SIGTERM raises :class:`Interrupted` in the main thread (as Ctrl-C raises KeyboardInterrupt), so the batch
    in progress is abandoned and everything written so far stays."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                raise Interrupted("terminated", signal.SIGTERM)

            self.previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


# -- what to evaluate ------------------------------------------------------------------------------------------------
class MathScorer:
    """Scores with math-verify in :class:`pte.rewards.MathGrader`'s pool (gold first, timeouts); close it after.
    One sample at a time, so one worker (each worker's start-up costs seconds)."""

    def __init__(self):
        from pte.rewards import MathGrader

        self.grader = MathGrader(workers=1)

    def __call__(self, completion: str, example: Example) -> float:
        return self.grader.grade([completion], [example.answer])[0]

    def close(self) -> None:
        self.grader.close()


def load_problems(benchmark: str, *, data_dir: str | None = None, limit: int | None = None, seed: int = 0,
                  prompt_field: str | None = None, answer_field: str = "answer", answer_format: str = "auto",
                  task_options: dict | None = None):
    """``benchmark``: a registry name (math-verify scoring), a task of :mod:`pte.tasks` (its own scorer,
    ``limit`` problems generated with ``seed``) or a JSONL / Parquet / HF ``save_to_disk`` path.
    -> (examples, score)."""
    from pte.benchmarks import REGISTRY, load_benchmark
    from pte.data import load_examples, read_jsonl
    from pte.tasks import TASKS, make_task

    if benchmark in REGISTRY:
        return load_benchmark(benchmark, data_dir=data_dir, limit=limit), MathScorer()
    if benchmark in TASKS:
        task = make_task(benchmark, **(task_options or {}))
        return task.examples(limit or TASK_PROBLEMS, seed=seed), task.score
    path = Path(benchmark)
    if not path.exists():
        raise ValueError(f"unknown benchmark {benchmark!r}: not a registered benchmark {sorted(REGISTRY)}, not a "
                         f"task {sorted(TASKS)}, and no such file; pass one of those or the path of a JSONL file")
    if prompt_field is None:
        prompt_field = "question"
        if path.is_file() and path.suffix != ".parquet":
            first = next((rec for _, rec in read_jsonl(path)), {})
            prompt_field = next((f for f in ("problem", "question", "prompt") if f in first), "question")
    return load_examples(str(path), prompt_field, answer_field, answer_format, limit), MathScorer()


# -- files ------------------------------------------------------------------------------------------------------------
def _write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _size_key(s: dict) -> tuple[float, str]:
    size = s["budget"] if s["sized_by"] == "budget" else s["window"]
    return (math.inf if size is None else size, s["label"])


def write_tables(out: Path, entries: list[tuple[str | None, str | None, dict]], title: str) -> str:
    """``entries``: (run, method, summary dict) rows; run/method are None for a single run.
    Writes summary.md and summary.csv; returns the markdown."""
    ks = sorted({int(k) for _, _, s in entries for k in s["pass_at_k"]} - {1})
    lead = ["run", "method"] if entries[0][0] is not None else []
    head = lead + ["label", "window", "budget", "question tokens", "problems", "samples", "pass@1 % (95% CI)"] + \
        [f"pass@{k} %" for k in ks] + ["mean length", "evictions/sample", "tokens/s", "peak memory MiB", "seconds"]
    md = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(lead + ["label", "sized_by", "window", "budget", "question_tokens", "problems", "samples", "pass1",
                       "ci_low", "ci_high"] + [f"pass@{k}" for k in ks] +
               ["mean_length", "mean_evictions", "tokens_per_s", "peak_memory_mib", "memory_kind", "seconds"])
    for run, method, s in entries:
        pk = {int(k): v for k, v in s["pass_at_k"].items()}
        window = "full" if s["window"] is None else s["window"]
        budget = "full" if s["budget"] is None else s["budget"]
        mib = s["peak_memory_bytes"] / 2**20
        pre = [run, method] if lead else []
        md.append("| " + " | ".join(map(str, pre + [
            s["label"], window, budget, s["question_tokens"], s["problems"], s["samples"],
            f"{_pct(s['pass1'])} ({_pct(s['ci_low'])}–{_pct(s['ci_high'])})"] +
            [_pct(pk[k]) if k in pk else "" for k in ks] +
            [f"{s['mean_length']:.1f}", f"{s['mean_evictions']:.1f}", f"{s['tokens_per_s']:.0f}", f"{mib:.0f}",
             f"{s['seconds']:.1f}"])) + " |")
        w.writerow(pre + [s["label"], s["sized_by"], window, budget, s["question_tokens"], s["problems"], s["samples"],
                          s["pass1"], s["ci_low"], s["ci_high"]] + [pk.get(k, "") for k in ks] +
                   [s["mean_length"], s["mean_evictions"], s["tokens_per_s"], round(mib, 1), s["memory_kind"],
                    s["seconds"]])
    text = "\n".join(md) + "\n"
    _write_text(out / "summary.md", text)
    _write_text(out / "summary.csv", buf.getvalue())
    return text


def plot_accuracy(path: Path, lines: dict[str, list[dict]], title: str) -> None:
    """pass@1 (with its 95% interval) per cache size, one line per run; sizes on a shared categorical axis."""
    from pte.plots import Line, line_plot

    keys = sorted({_size_key(s) for runs in lines.values() for s in runs})
    labels = list(dict.fromkeys(label for _, label in keys))
    x = {label: i for i, label in enumerate(labels)}
    drawn = []
    for n, (name, runs) in enumerate(lines.items()):
        runs = sorted(runs, key=_size_key)
        ys = [100 * s["pass1"] for s in runs]
        err = ([max(0.0, y - 100 * s["ci_low"]) for y, s in zip(ys, runs)],  # max: float rounding at 0% / 100%
               [max(0.0, 100 * s["ci_high"] - y) for y, s in zip(ys, runs)])
        dodge = 0.06 * (n - (len(lines) - 1) / 2)  # so equal points and their intervals stay visible
        drawn.append(Line(name, [x[s["label"]] + dodge for s in runs], ys, yerr=err))
    line_plot(path, drawn, xlabel="cache size (wN: thought window N, bN: total budget N, full: no eviction)",
              ylabel="pass@1 % (95% Wilson CI)", title=title, title_size=10, ylim=(-3, 103), xticks=labels,
              size=(6.5, 4), dpi=120)


def write_run(out: str | Path, results: list[EvalResult], config: dict, predictions: bool = True) -> str:
    """predictions-<label>.jsonl per result (unless they were written as they went), then summary.json/.md/.csv and
    accuracy.png. -> the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for res in results if predictions else ():
        lines = "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in res.records)
        _write_text(out / f"predictions-{res.summary.label}.jsonl", lines)
    summaries = [asdict(r.summary) for r in results]
    _write_text(out / "summary.json", json.dumps({"config": config, "runs": summaries}, indent=1))
    title = f"{config.get('model')} {config.get('method')} on {config.get('benchmark')}"
    text = write_tables(out, [(None, None, s) for s in summaries], title)
    plot_accuracy(out / "accuracy.png", {config.get("method") or "run": summaries}, title)
    return text


def compare(dirs: list[str], out: str | Path) -> str:
    """One table and one plot (a line per run, named by its directory) from earlier runs' summary.json."""
    loaded = []
    for d in dirs:
        f = Path(d) / "summary.json"
        if not f.exists():
            raise FileNotFoundError(f"--compare {d}: no summary.json there; pass a directory written by "
                                    "`pte eval --out DIR`")
        loaded.append((Path(d).resolve().name, json.loads(f.read_text())))
    names: dict[str, int] = {}
    entries, lines = [], {}
    for name, data in loaded:
        names[name] = names.get(name, 0) + 1
        name = name if names[name] == 1 else f"{name} ({names[name]})"
        method = data["config"].get("method") or "base"
        entries += [(name, method, s) for s in data["runs"]]
        lines[name] = data["runs"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = "comparison: " + ", ".join(lines)
    text = write_tables(out, entries, title)
    # the legend names every run, so a title too long for the figure's width shortens to a count
    plot_accuracy(out / "accuracy.png", lines, title if len(title) <= 80 else f"comparison of {len(lines)} runs")
    return text

