"""Bad inputs caught where they enter: config values, data files (JSONL, Parquet, save_to_disk), adapter files,
and the grader's timeout accounting."""

import json
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pte.adapter import AdapterConfig, AdapterWarning, attach, read_config
from pte.adapter import load as load_adapter
from pte.config import load_config
from pte.data import load_examples
from pte.models import tiny_model
from pte.rewards import MathGrader, timed_grade

sys.path.insert(0, str(Path(__file__).parent))
import grading_fixtures  # noqa: E402


# -- config -----------------------------------------------------------------------------------------------------------
def test_yaml_and_set_read_exponent_floats(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 1e-5\n  betas: [0.9, 0.95]\nsampling:\n  temperature: 1\n")
    cfg = load_config(str(f), ["grpo.beta=4E-2"])
    assert (cfg.optim.lr, cfg.optim.betas, cfg.grpo.beta) == (1e-5, (0.9, 0.95), 0.04)
    assert type(cfg.sampling.temperature) is float
    with pytest.raises(ValueError, match=r"run\.out_dir=100000\.0: expected a string \(quote it"):
        load_config(None, ["run.out_dir=1e5"])
    assert load_config(None, ["run.out_dir='1e5'"]).run.out_dir == "1e5"
    assert load_config(None, ["data.template=v1e5 {prompt}"]).data.template == "v1e5 {prompt}"


@pytest.mark.parametrize("overrides,message", [
    (["optim.lr=abc"], r"^optim\.lr='abc': expected a float$"),
    (["optim.lr=.inf"], r"optim\.lr=inf: expected a float \(finite\)"),
    (["optim.betas=[0.9]"], r"optim\.betas=\[0\.9\]: expected a list of 2 floats"),
    (["optim.betas=[0.9, 1.5]"], r"optim\.betas=\(0\.9, 1\.5\): each must lie in \[0, 1\)"),
    (["run.steps=2.5"], r"run\.steps=2\.5: expected an integer"),
    (["run.steps=true"], r"run\.steps=True: expected an integer"),
    (["adapter.rank=abc"], r"adapter\.rank='abc': expected an integer"),
    (["adapter.targets=q_proj"], r"adapter\.targets='q_proj': expected a list of strings"),
    (["model=3"], r"^model: expected a section"),
    (["data.limit=-1"], r"data\.limit=-1: a limit is an integer >= 1"),
    (["data.limit=0"], r"data\.limit=0: a limit is an integer >= 1"),
    (["data.template=Solve it."], r"data\.template='Solve it\.': has no \{prompt\}"),
    (["data.template=Q {prompt} {x}"], r"data\.template=.*not a valid template \(KeyError"),
    (["optim.lr=[1"], r"--set optim\.lr=\[1:1:3: YAML syntax error"),
])
def test_bad_config_values_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_yaml_syntax_error_and_scalar_section_name_the_file_and_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.1\nrun:\n  steps: [3\n")
    with pytest.raises(ValueError, match=rf"^{f}:5:1: YAML syntax error"):
        load_config(str(f))
    f.write_text("optim: 0.01\n")
    with pytest.raises(ValueError, match=r"^optim: expected a section \(a mapping of keys\), got 0\.01"):
        load_config(str(f))
    with pytest.raises(ValueError, match="is a directory"):
        load_config(str(tmp_path))


def test_a_config_built_in_python_is_type_checked_too():
    cfg = load_config(None)
    cfg.optim.lr = "1e-5"
    with pytest.raises(ValueError, match=r"optim\.lr='1e-5': expected a float"):
        cfg.validate()


# -- data files -------------------------------------------------------------------------------------------------------
def jsonl(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("answer,message", [
    (None, "the gold answer is null"),
    ("", "the gold answer is empty"),
    ("   ", "the gold answer is empty"),
    ([], "the gold answer is empty"),
    ("work\n#### ", "empty after reading it as auto"),
])
def test_empty_or_null_gold_answers_fail_naming_file_and_line(tmp_path, answer, message):
    f = jsonl(tmp_path / "d.jsonl", {"question": "a?", "answer": "1"}, {"question": "b?", "answer": answer})
    with pytest.raises(ValueError, match=rf"^{f}:2: .*{message}"):
        load_examples(str(f))


def test_non_utf8_and_binary_files_name_file_and_line(tmp_path):
    f = tmp_path / "latin.jsonl"
    f.write_bytes(json.dumps({"question": "ok", "answer": "1"}).encode() + b"\n" +
                  '{"question": "caf\xe9", "answer": "2"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^{f}:2: not UTF-8 text \(byte 18 of the line is 0xe9\).*iconv"):
        load_examples(str(f))
    b = tmp_path / "blob.jsonl"
    b.write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(ValueError, match=rf"^{b}:1: a NUL byte"):
        load_examples(str(b))
    bom = jsonl(tmp_path / "bom.jsonl", {"question": "q", "answer": "3"})
    bom.write_bytes(b"\xef\xbb\xbf" + bom.read_bytes())  # a UTF-8 BOM, as some editors write
    assert load_examples(str(bom))[0].answer == "3"


@pytest.mark.parametrize("limit", [0, -1, True, 2.0])
def test_limits_below_one_are_refused(tmp_path, limit):
    f = jsonl(tmp_path / "d.jsonl", {"question": "a?", "answer": "1"})
    with pytest.raises(ValueError, match="a limit is an integer >= 1"):
        load_examples(str(f), limit=limit)


DAPO = [  # DAPO-Math-17K's published schema: a chat-list prompt, the answer in reward_model.ground_truth
    {"data_source": "math_dapo", "prompt": [{"content": "Solve 2+2. Put the answer in \\boxed{}.", "role": "user"}],
     "ability": "MATH", "reward_model": {"ground_truth": "4", "style": "rule-lighteval/MATH_v2"},
     "extra_info": {"index": "a1"}},
    {"data_source": "math_dapo", "prompt": [{"content": "Find 3*3.", "role": "user"}], "ability": "MATH",
     "reward_model": {"ground_truth": "9", "style": "rule-lighteval/MATH_v2"}, "extra_info": {"index": "a2"}},
]


def test_parquet_in_dapo_schema(tmp_path):
    f = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(DAPO), f)
    ex = load_examples(str(f), "prompt", "reward_model.ground_truth")
    assert [(e.prompt, e.answer, e.source) for e in ex] == [
        ("Solve 2+2. Put the answer in \\boxed{}.", "4", f"{f}#0"), ("Find 3*3.", "9", f"{f}#1")]
    assert len(load_examples(str(f), "prompt", "reward_model.ground_truth", limit=1)) == 1
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(f.read_bytes()[:50])
    with pytest.raises(ValueError, match=rf"^{bad}: not a readable Parquet file"):
        load_examples(str(bad), "prompt", "reward_model.ground_truth")


def save_to_disk(directory: Path, records: list[dict]) -> Path:
    """The layout ``datasets.Dataset.save_to_disk`` writes: Arrow stream shards listed in state.json."""
    directory.mkdir(parents=True)
    table = pa.Table.from_pylist(records)
    half = len(records) // 2
    names = [f"data-0000{i}-of-00002.arrow" for i in range(2)]
    for name, part in zip(names, (table.slice(0, half), table.slice(half))):
        with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, part.schema) as writer:
            writer.write_table(part)
    (directory / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_fingerprint": "0123456789abcdef",
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
        "_split": "train"}))
    (directory / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": {}}))
    return directory


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    records = DAPO + [dict(DAPO[0], reward_model={"ground_truth": "12", "style": "x"})]
    single = save_to_disk(tmp_path / "single", records)
    assert [e.answer for e in load_examples(str(single), "prompt", "reward_model.ground_truth")] == ["4", "9", "12"]
    dd = tmp_path / "dict"
    save_to_disk(dd / "test", DAPO[:1])
    save_to_disk(dd / "train", DAPO[1:])
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["test", "train"]}))
    ex = load_examples(str(dd), "prompt", "reward_model.ground_truth")
    assert [(e.answer, e.source) for e in ex] == [("9", f"{dd / 'train'}#0")]
    (single / "data-00001-of-00002.arrow").write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="data-00001-of-00002.arrow: not a readable Arrow file"):
        load_examples(str(single), "prompt", "reward_model.ground_truth")
    with pytest.raises(ValueError, match="not an HF save_to_disk copy"):
        load_examples(str(tmp_path))


# -- adapter files ----------------------------------------------------------------------------------------------------
def model(name="org/base", seed=0):
    m = tiny_model("llama", init_std=0.2, seed=seed)
    m.config._name_or_path = name
    return m


@pytest.fixture
def saved(tmp_path):
    adapter = attach(model(), AdapterConfig(method="pte", rank=4, n_global=4))
    with torch.no_grad():
        for lin in adapter.linears.values():
            lin.A.normal_(0, 0.1)
    return adapter.save(tmp_path / "ad", cache={"window": 8})


def test_checksums_are_recorded_and_a_clean_adapter_loads(saved):
    meta = read_config(saved)
    assert set(meta["checksum"]) == {"tensors_sha256", "config_sha256"} and meta["base_model"] == "org/base"
    a = load_adapter(model(), saved)
    b = attach(model(), AdapterConfig(method="pte", rank=4, n_global=4))
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


@pytest.mark.parametrize("key,value", [("state_attention", "linear"), ("alpha", 2.0), ("ablation", "global_only")])
def test_hand_edited_config_values_are_named(saved, key, value):
    path = saved / "adapter_config.json"
    meta = json.loads(path.read_text())
    meta["adapter"][key] = value
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"adapter_config.json was edited after saving: adapter\.{key}={value!r}"):
        load_adapter(model(), saved)


def test_damaged_tensors_are_refused_naming_the_file(saved):
    f = saved / "adapter.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"adapter.safetensors: the tensors do not match the checksum"):
        load_adapter(model(), saved)
    f.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match=r"adapter.safetensors: not a readable safetensors file.*truncated"):
        load_adapter(model(), saved)


def test_invalid_json_names_the_file_and_line(saved):
    (saved / "adapter_config.json").write_text('{"format": "pte-adapter",\n "version": 1,,}')
    with pytest.raises(ValueError, match=r"adapter_config.json:2:15: not valid JSON"):
        load_adapter(model(), saved)


def test_non_finite_tensors_are_refused_at_save_and_load(tmp_path, saved):
    from safetensors.torch import save_file

    adapter = attach(model(), AdapterConfig(method="pte", rank=4, n_global=4))
    with torch.no_grad():
        next(iter(adapter.linears.values())).A.fill_(float("nan"))
    with pytest.raises(ValueError, match="refusing to save .*NaN/inf"):
        adapter.save(tmp_path / "nan")
    assert not (tmp_path / "nan" / "adapter.safetensors").exists()
    # an adapter from before checksums, holding NaN: a warning about the missing checksum, then a refusal
    meta = read_config(saved)
    del meta["checksum"]
    (saved / "adapter_config.json").write_text(json.dumps(meta))
    save_file({k: v.clone().fill_(float("nan")) for k, v in adapter.state_dict().items()}, str(saved / "adapter.safetensors"))
    with pytest.warns(AdapterWarning, match="no checksums"), pytest.raises(ValueError, match="hold NaN/inf values"):
        load_adapter(model(), saved)


def test_old_adapters_without_checksums_still_load(saved):
    meta = read_config(saved)
    del meta["checksum"]
    (saved / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.warns(AdapterWarning, match="no checksums .*save it again"):
        load_adapter(model(), saved)


def test_another_base_model_warns_and_strict_refuses(saved):
    with pytest.warns(AdapterWarning, match="trained on org/base, not org/other"):
        load_adapter(model("org/other"), saved)
    with pytest.raises(ValueError, match="trained on org/base, not org/other.*drop --strict"):
        load_adapter(model("org/other"), saved, strict=True)
    load_adapter(model("org/base"), saved, strict=True)


# -- grader -----------------------------------------------------------------------------------------------------------
def test_a_hung_grade_is_a_timeout_even_inside_math_verify(monkeypatch):
    """math-verify turns its own timeouts into a silent False; with them off, the worker's one timer counts it."""
    import math_verify.grader

    from pte.rewards import _verify

    assert timed_grade(_verify, "\\boxed{4}", "4", 5.0) == ("ok", 1.0)
    monkeypatch.setattr(math_verify.grader, "sympy_expr_eq", lambda *a, **k: time.sleep(30))
    start = time.perf_counter()
    assert timed_grade(_verify, "\\boxed{4}", "4", 0.3) == ("timeout", 0.0)
    assert time.perf_counter() - start < 3
    assert timed_grade(grading_fixtures.crashing_grade, "x", "1", 1.0) == ("error", 0.0)


def test_both_timeouts_count_in_the_pool():
    grader = MathGrader(workers=1, timeout=0.5)
    try:
        grader._fn = grading_fixtures.slow_grade  # the worker's timer interrupts it
        assert grader.grade(["a", "b"], ["1", "1"]) == [0.0, 0.0] and grader.stats.timeouts == 2
        grader._fn = grading_fixtures.deaf_grade  # only the parent's deadline ends it
        start = time.perf_counter()
        assert grader.grade(["a"], ["1"]) == [0.0] and grader.stats.timeouts == 3
        assert time.perf_counter() - start < 20 and grader.stats.errors == 0 and grader.stats.graded == 3
    finally:
        grader.close()
