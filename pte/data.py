"""Training and evaluation data: local JSONL / Parquet / HF ``save_to_disk`` copies, in their published formats.

A record becomes an :class:`Example` (prompt text, gold answer, where it came from). Fields are configurable and
may be dotted paths (``reward_model.ground_truth``); a prompt field holding a chat list (DAPO-Math-17K's
``[{"role": "user", "content": ...}]``) uses its last user message. Gold answers: ``gsm8k`` takes the text after
``####``, ``boxed`` the last ``\\boxed{}`` of a solution (MATH), ``plain`` the field as it is; ``auto`` picks by
content. A malformed line is an error naming the file and line, never silently dropped.
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


def gold_answer(raw, fmt: str) -> str:
    if isinstance(raw, list):  # OlympiadBench: final_answer is a list
        raw = raw[0] if len(raw) == 1 else ", ".join(map(str, raw))
    text = str(raw).strip()
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
    except KeyError as exc:
        raise ValueError(f"{where}: no field {exc.args[0]!r} (fields: {sorted(record)}); set data.prompt_field / "
                         "data.answer_field") from None
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if not prompt.strip():
        raise ValueError(f"{where}: empty prompt")
    return Example(prompt, answer, where)


def read_jsonl(path: Path):
    """Yield ("file:line", record) for each non-blank line; a line that is not JSON is an error naming it."""
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def load_examples(path: str, prompt_field: str = "question", answer_field: str = "answer",
                  answer_format: str = "auto", limit: int | None = None) -> list[Example]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    out: list[Example] = []
    if p.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError:
            raise ValueError(f"{path} is a directory: reading a HF datasets copy needs `pip install datasets`") from None
        ds = load_from_disk(str(p))
        if hasattr(ds, "keys"):  # a DatasetDict: take its only (or 'train') split
            ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
        for i, rec in enumerate(ds):
            out.append(_to_example(rec, f"{path}#{i}", prompt_field, answer_field, answer_format))
            if limit and len(out) >= limit:
                break
    elif p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading Parquet needs `pip install pyarrow`") from None
        for i, rec in enumerate(pq.read_table(p).to_pylist()):
            out.append(_to_example(rec, f"{path}#{i}", prompt_field, answer_field, answer_format))
            if limit and len(out) >= limit:
                break
    else:
        for where, record in read_jsonl(p):
            out.append(_to_example(record, where, prompt_field, answer_field, answer_format))
            if limit and len(out) >= limit:
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
    return tokenizer(template.format(prompt=text))["input_ids"]
