"""Training and evaluation data: local JSONL / Parquet / HF ``save_to_disk`` copies, in their published formats.

A record becomes an :class:`Example` (prompt text, gold answer, where it came from). Fields are configurable and
may be dotted paths (``reward_model.ground_truth``); a prompt field holding a chat list (DAPO-Math-17K's
``[{"role": "user", "content": ...}]``) uses its last user message. Gold answers: ``gsm8k`` takes the text after
``####``, ``boxed`` the last ``\\boxed{}`` of a solution (MATH), ``plain`` the field as it is; ``auto`` picks by
content. A malformed line, a line that is not UTF-8 and an empty or ``null`` gold answer are errors naming the file
and line, never silently dropped (an empty gold answer would train at reward 0).

An HF ``save_to_disk`` directory is read with pyarrow alone (its ``state.json`` lists Arrow stream files; a
``DatasetDict`` has ``dataset_dict.json`` and a directory per split), so ``datasets`` is not needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pte.rewards import last_boxed


@dataclass
class Example:
    prompt: str
    answer: str
    source: str  # "file:line" or "file#row"
    meta: dict | None = None  # the generator's own record, for task scorers that need it


def _get(record: dict, path: str):
    value = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(path)
        value = value[part]
    return value


def check_limit(limit, name: str = "--limit") -> None:
    """The one rule for every limit: an integer >= 1, or absent (None: all)."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"{name}={limit!r}: a limit is an integer >= 1; leave it out to use everything")


def check_template(template: str, name: str = "data.template") -> None:
    """``"chat"``, or a format string whose only field is ``{prompt}`` (without it every prompt is the same)."""
    if template == "chat":
        return
    try:
        template.format(prompt="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"{name}={template!r}: not a valid template ({type(exc).__name__}: {exc}); use {{prompt}} "
                         "for the question and double other braces ({{ }})") from None
    if template.format(prompt="\0") == template.format(prompt=""):
        raise ValueError(f"{name}={template!r}: has no {{prompt}}, so every prompt would be the same text; write "
                         "e.g. '{prompt}' or 'Question: {prompt}\\nAnswer:' (or 'chat')")


def gold_answer(raw, fmt: str) -> str:
    if isinstance(raw, list):  # OlympiadBench: final_answer is a list
        raw = raw[0] if len(raw) == 1 else ", ".join(map(str, raw))
    if raw is None:
        raise ValueError("the gold answer is null; fill it in or drop the line")
    text = str(raw).strip()
    if not text:
        raise ValueError("the gold answer is empty; fill it in or drop the line")
    if fmt == "auto":
        fmt = "gsm8k" if "####" in text else ("boxed" if "\\boxed" in text else "plain")
    if fmt == "gsm8k":
        if "####" not in text:
            raise ValueError("no '####' in a gsm8k answer")
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    if fmt == "boxed":
        boxed = last_boxed(text)
        if boxed is None:
            raise ValueError("no \\boxed{} in the solution")
        return boxed
    if fmt == "plain":
        return text
    raise ValueError(f"answer_format={fmt!r}: choose auto, gsm8k, boxed or plain")


def _prompt_text(raw) -> str:
    if isinstance(raw, list):
        users = [m.get("content", "") for m in raw if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise ValueError("a chat-list prompt with no user message")
        return users[-1]
    if not isinstance(raw, str):
        raise ValueError(f"prompt is a {type(raw).__name__}, expected text or a chat list")
    return raw


def _to_example(record, where: str, prompt_field: str, answer_field: str, answer_format: str) -> Example:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    try:
        prompt = _prompt_text(_get(record, prompt_field))
        answer = gold_answer(_get(record, answer_field), answer_format)
        if not answer.strip():
            raise ValueError(f"the gold answer in {answer_field!r} is empty after reading it as {answer_format}; "
                             "fill it in or drop the line")
    except KeyError as exc:
        raise ValueError(f"{where}: no field {exc.args[0]!r} (fields: {sorted(record)}); set data.prompt_field / "
                         "data.answer_field") from None
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if not prompt.strip():
        raise ValueError(f"{where}: empty prompt")
    return Example(prompt, answer, where)


def read_jsonl(path: Path):
    """Yield ("file:line", record) for each non-blank line; a line that is not UTF-8 or not JSON is an error
    naming it."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected a JSONL file")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where}: not UTF-8 text (byte {exc.start + 1} of the line is {raw[exc.start]:#04x}); "
                                 "a JSONL file must be UTF-8: convert it (e.g. iconv -f latin1 -t utf-8)") from None
            if "\0" in line:
                raise ValueError(f"{where}: a NUL byte; this looks like a binary file, not JSONL")
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def _arrow(path: Path, error: str):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ValueError(f"{path}: reading {error} needs pyarrow (`pip install pyarrow`; `make setup` installs it)") \
            from None


def read_parquet(path: Path):
    """Yield ("file#row", record) for each row of a Parquet file."""
    _arrow(path, "Parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({exc}); re-export it") from None
    for i, rec in enumerate(rows):
        yield f"{path}#{i}", rec


def read_saved_dataset(path: Path):
    """Yield ("dir/split#row", record) from an HF ``save_to_disk`` directory (a Dataset, or a DatasetDict's
    'train' split, else its first)."""
    _arrow(path, "a save_to_disk directory")
    import pyarrow as pa

    splits_file = path / "dataset_dict.json"
    if splits_file.exists():
        splits = _json_file(splits_file).get("splits") or []
        if not splits:
            raise ValueError(f"{splits_file}: lists no splits")
        path = path / ("train" if "train" in splits else splits[0])
    state_file = path / "state.json"
    if not state_file.exists():
        raise ValueError(f"{path} is a directory but not an HF save_to_disk copy (no state.json or dataset_dict.json); "
                         "pass a JSONL or Parquet file, or a directory written by Dataset.save_to_disk")
    files = [f.get("filename") for f in _json_file(state_file).get("_data_files", [])]
    if not files or not all(isinstance(f, str) for f in files):
        raise ValueError(f"{state_file}: no _data_files; re-save the dataset with save_to_disk")
    i = 0
    for name in files:
        shard = path / name
        try:
            with pa.memory_map(str(shard)) as source:
                table = pa.ipc.open_stream(source).read_all()
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{shard}: not a readable Arrow file ({exc}); re-save the dataset") from None
        for rec in table.to_pylist():
            yield f"{path}#{i}", rec
            i += 1


def _json_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def read_records(path: str | Path):
    """(where, record) pairs of a JSONL / Parquet file or a save_to_disk directory."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if p.is_dir():
        return read_saved_dataset(p)
    if p.suffix == ".parquet":
        return read_parquet(p)
    return read_jsonl(p)


def load_examples(path: str, prompt_field: str = "question", answer_field: str = "answer",
                  answer_format: str = "auto", limit: int | None = None) -> list[Example]:
    check_limit(limit)
    out: list[Example] = []
    for where, record in read_records(path):
        out.append(_to_example(record, where, prompt_field, answer_field, answer_format))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def render_prompt(tokenizer, text: str, template: str) -> list[int]:
    """``template="chat"`` applies the tokenizer's chat template; otherwise ``template`` is a format string
    with ``{prompt}``."""
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.template='chat' but the tokenizer has no chat template; use a plain template "
                             "such as '{prompt}\\n'")
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    check_template(template)
    return tokenizer(template.format(prompt=text))["input_ids"]
