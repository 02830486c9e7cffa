"""The paper's evaluation sets (plus GSM8K) in their published layouts: a registry of loaders.

Each entry names the candidate prompt fields (published copies differ: AMC23 appears with ``problem`` or
``question``), the answer field and how to read the gold answer. ``--benchmark NAME`` looks for
``NAME/test.jsonl`` under ``--data-dir`` (default ``../shared/data`` beside the project, then ``./data``);
``--benchmark FILE`` reads a file with the fields given explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pte.data import Example, _to_example, read_jsonl


@dataclass(frozen=True)
class Benchmark:
    name: str
    prompt_fields: tuple[str, ...]
    answer_field: str
    answer_format: str  # gsm8k | boxed | plain (see pte.data.gold_answer)
    rows: int  # as published (what the shared copy holds)


REGISTRY = {b.name: b for b in [
    Benchmark("gsm8k", ("question",), "answer", "gsm8k", 1319),
    Benchmark("math500", ("problem",), "answer", "plain", 500),
    Benchmark("aime24", ("problem",), "answer", "plain", 30),
    Benchmark("aime25", ("problem",), "answer", "plain", 30),
    Benchmark("amc23", ("problem", "question"), "answer", "plain", 40),
    Benchmark("minerva_math", ("problem",), "solution", "boxed", 272),
    Benchmark("olympiadbench", ("question",), "final_answer", "plain", 675),
]}


def default_data_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent.parent
    return [here.parent / "shared" / "data", here / "data"]


def find_benchmark_file(name: str, data_dir: str | None = None) -> Path:
    dirs = [Path(data_dir)] if data_dir else default_data_dirs()
    for d in dirs:
        candidate = d / name / "test.jsonl"
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"benchmark {name!r}: no {name}/test.jsonl under {', '.join(map(str, dirs))}; "
                            "pass --data-dir or point --benchmark at your copy")


def load_benchmark(name: str, path: str | Path | None = None, data_dir: str | None = None,
                   limit: int | None = None) -> list[Example]:
    if name not in REGISTRY:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(REGISTRY)} (or pass a file)")
    spec = REGISTRY[name]
    file = Path(path) if path else find_benchmark_file(name, data_dir)
    out = []
    for where, record in read_jsonl(file):
        field = next((p for p in spec.prompt_fields if isinstance(record, dict) and p in record), spec.prompt_fields[0])
        out.append(_to_example(record, where, field, spec.answer_field, spec.answer_format))
        if limit and len(out) >= limit:
            break
    return out
