"""Bad inputs for ``pte train``, ``pte eval`` and ``pte generate``, as a new (or careless) user gives them.

Each row runs ``pte.cli.main`` in-process and asserts both its stderr (exactly one ``error:`` line, matching the
row's pattern, no traceback) and its file-system outcome (by default: nothing in the workspace changed).
"""

import hashlib
import json
import re
import shutil

import pytest
import torch

from pte.adapter import AdapterConfig, attach, read_config
from pte.cli import main
from pte.models import char_tokenizer, load, tiny_model

MAX_POSITIONS = 128


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A saved tiny model, and adapters for it: good, trained on another model name."""
    root = tmp_path_factory.mktemp("assets")
    tok = char_tokenizer()
    tiny_model("qwen2", vocab_size=len(tok), init_std=0.2, seed=2, max_positions=MAX_POSITIONS).save_pretrained(
        root / "model")
    tok.save_pretrained(root / "model")
    model, _ = load(str(root / "model"))
    adapter = attach(model, AdapterConfig(method="pte", rank=4, n_global=4))
    adapter.save(root / "ad", cache={"window": 6})
    model.config._name_or_path = "org/other"
    adapter.save(root / "ad_other")
    return root


def _workspace(ws, assets):
    """The files the rows point at."""
    (ws / "adir").mkdir()
    (ws / "afile").write_text("not a directory")
    (ws / "q.txt").write_text("Q: 1+1=?")
    (ws / "good.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    (ws / "null.jsonl").write_text(json.dumps({"question": "a?", "answer": "1"}) + "\n" +
                                   json.dumps({"question": "b?", "answer": None}) + "\n")
    (ws / "latin.jsonl").write_bytes('{"question": "caf\xe9?", "answer": "1"}\n'.encode("latin-1"))
    (ws / "bin.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (ws / "bad.yaml").write_text("optim:\n  lr: 0.1\n  betas: [0.9\n")
    (ws / "scalar.yaml").write_text("optim: 0.01\n")
    shutil.copytree(assets / "model", ws / "corrupt")
    weights = ws / "corrupt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for name in ("ad_trunc", "ad_edited", "ad_badjson", "ad_nan"):
        shutil.copytree(assets / "ad", ws / name)
    f = ws / "ad_trunc" / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    meta = read_config(ws / "ad_edited")
    meta["adapter"]["alpha"] = 64.0
    (ws / "ad_edited" / "adapter_config.json").write_text(json.dumps(meta))
    (ws / "ad_badjson" / "adapter_config.json").write_text('{"format": "pte-adapter", ')
    from safetensors.torch import load_file, save_file

    meta = read_config(ws / "ad_nan")
    del meta["checksum"]  # as an adapter from before checksums
    (ws / "ad_nan" / "adapter_config.json").write_text(json.dumps(meta))
    tensors = load_file(str(ws / "ad_nan" / "adapter.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, str(ws / "ad_nan" / "adapter.safetensors"))
    shutil.copytree(assets / "ad_other", ws / "ad_other")
    (ws / "evalout").mkdir()
    (ws / "evalout" / "predictions-w99.jsonl").write_text("{}\n")
    (ws / "evalout" / "summary.json").write_text("{}")
    (ws / "evalout" / "notes.txt").write_text("mine")


def snapshot(root):
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*")}


def train(*sets):
    argv = ["train", "--set", "run.threads=1", "--set", "run.out_dir={ws}/run", "--set", "data.limit=4"]
    for s in sets:
        argv += ["--set", s] if "=" in s or not s.startswith("--") else [s]
    return argv


def train_flags(*flags):
    return ["train", "--set", "run.threads=1", "--set", "run.out_dir={ws}/run", *flags]


def gen(*extra):
    flags = list(extra)
    if "--prompt" not in flags and "--prompt-file" not in flags and "--no-prompt" not in flags:
        flags += ["--prompt", "Q: 2+2=?"]
    flags = [f for f in flags if f != "--no-prompt"]
    if "--model" not in flags:
        flags = ["--model", "{model}"] + flags
    if "--max-new-tokens" not in flags:
        flags += ["--max-new-tokens", "4"]
    return ["generate", *flags]


def ev(*extra):
    flags = list(extra)
    defaults = {"--model": "{model}", "--benchmark": "long_range", "--limit": "2", "--max-new-tokens": "4",
                "--out": "{ws}/out"}
    for key, value in defaults.items():
        if key not in flags:
            flags += [key, value]
    return ["eval", *flags]


CUDA = r"--device cuda:99: (this torch build has no CUDA support|no CUDA device is visible|only \d+ CUDA device)"
ROWS = [
    # -- pte train: config values, before any model loads ------------------------------------------------------------
    ("train-lr-string", train("optim.lr=abc"), r"optim\.lr='abc': expected a float$"),
    ("train-lr-nan", train("optim.lr=.nan"), r"optim\.lr=nan: expected a float \(finite\)"),
    ("train-lr-inf", train("optim.lr=.inf"), r"optim\.lr=inf: expected a float \(finite\)"),
    ("train-lr-negative", train("optim.lr=-1e-5"), r"optim\.lr=-1e-05: must be a finite number > 0"),
    ("train-betas-length", train("optim.betas=[0.9]"), r"optim\.betas=\[0\.9\]: expected a list of 2 floats"),
    ("train-betas-range", train("optim.betas=[0.9, 1.0]"), r"optim\.betas=\(0\.9, 1\.0\): each must lie in \[0, 1\)"),
    ("train-limit-negative", train("data.limit=-1"), r"data\.limit=-1: a limit is an integer >= 1"),
    ("train-limit-zero", train("data.limit=0"), r"data\.limit=0: a limit is an integer >= 1"),
    ("train-limit-float", train("data.limit=2.5"), r"data\.limit=2\.5: expected an integer or null"),
    ("train-template", train("data.template=Solve this."), r"data\.template='Solve this\.': has no \{prompt\}"),
    ("train-template-field", train("data.template={question}"), r"data\.template=\{'question': None\}: expected a "
                                                                r"string \(YAML reads \{\.\.\.\} as a mapping"),
    ("train-template-unknown-field", train("data.template='{question}'"),
     r"data\.template='\{question\}': not a valid template \(KeyError: 'question'\)"),
    ("train-section-scalar", train("model=3"), r"model: expected a section \(a mapping of keys\), got 3"),
    ("train-section-scalar-yaml", train_flags("--config", "{ws}/scalar.yaml"), r"optim: expected a section"),
    ("train-yaml-syntax", train_flags("--config", "{ws}/bad.yaml"), r"bad\.yaml:4:1: YAML syntax error"),
    ("train-config-dir", train_flags("--config", "{ws}/adir"), r"config .*adir is a directory; pass a YAML file"),
    ("train-config-missing", train_flags("--config", "{ws}/nope.yaml"), r"config .*nope\.yaml: no such file"),
    ("train-unknown-key", train("grpo.wobble=1"), r"unknown config key 'grpo\.wobble'"),
    ("train-set-no-equals", train_flags("--set", "optim.lr"), r"--set 'optim\.lr': expected key=value"),
    ("train-set-yaml", train("optim.lr=[1"), r"--set optim\.lr=\[1:1:3: YAML syntax error"),
    ("train-bool-int", train("run.steps=true"), r"run\.steps=True: expected an integer"),
    ("train-group-size", train("grpo.group_size=1"), r"grpo\.group_size=1: must be >= 2"),
    ("train-window-zero", train("cache.window=0"), r"cache\.window=0: an int >= 1"),
    ("train-rank-string", train("adapter.rank=big"), r"adapter\.rank='big': expected an integer"),
    ("train-targets-scalar", train("adapter.targets=q_proj"), r"adapter\.targets='q_proj': expected a list of strings"),
    ("train-str-number", train("model.name=7"), r"model\.name=7: expected a string \(quote it: '7'\)"),
    ("train-out-dir-file", train("run.out_dir={ws}/afile"), r"run\.out_dir='.*afile' is a file; set run\.out_dir"),
    ("train-resume-missing", train_flags("--resume", "{ws}/norun"), r"--resume .*norun: no such run directory"),
    # -- pte train: data and model, before the run directory is made ---------------------------------------------------
    ("train-null-answer", train("data.path={ws}/null.jsonl", "reward.kind=math"),
     r"null\.jsonl:2: the gold answer is null; fill it in or drop the line"),
    ("train-latin1", train("data.path={ws}/latin.jsonl", "reward.kind=math"), r"latin\.jsonl:1: not UTF-8 text"),
    ("train-binary", train("data.path={ws}/bin.jsonl", "reward.kind=math"), r"bin\.jsonl:1: not UTF-8 text|NUL byte"),
    ("train-data-dir", train("data.path={ws}/adir", "reward.kind=math"), r"adir is a directory but not an HF "
                                                                          r"save_to_disk copy"),
    ("train-data-missing", train("data.path={ws}/nope.jsonl", "reward.kind=math"), r"nope\.jsonl: no such file"),
    ("train-model-missing", train("model.name={ws}/nomodel"), r"model .*nomodel: no such directory; pass a directory "
                                                              r"written by save_pretrained"),
    ("train-model-corrupt", train("model.name={ws}/corrupt"), r"model .*corrupt: could not read its weights"),
    # -- pte generate ----------------------------------------------------------------------------------------------------
    ("gen-prompt-and-file", gen("--prompt", "hi", "--prompt-file", "{ws}/q.txt"),
     r"argument --prompt-file: not allowed with argument --prompt"),
    ("gen-no-prompt", gen("--no-prompt"), r"no prompt: pass --prompt TEXT or --prompt-file FILE"),
    ("gen-prompt-file-dir", gen("--prompt-file", "{ws}/adir"), r"--prompt-file .*adir is a directory; pass a text file"),
    ("gen-prompt-file-missing", gen("--prompt-file", "{ws}/nope.txt"), r"--prompt-file .*nope\.txt: no such file"),
    ("gen-prompt-file-latin1", gen("--prompt-file", "{ws}/latin.jsonl"), r"--prompt-file .*: not UTF-8 text"),
    ("gen-model-missing", gen("--model", "{ws}/nomodel"), r"model .*nomodel: no such directory"),
    ("gen-model-relative-missing", gen("--model", "./nowhere/model"), r"model \./nowhere/model: no such directory"),
    ("gen-model-file", gen("--model", "{ws}/afile"), r"model .*afile is a file; pass the directory"),
    ("gen-model-empty-dir", gen("--model", "{ws}/adir"), r"adir: no config\.json there"),
    ("gen-model-corrupt", gen("--model", "{ws}/corrupt"), r"could not read its weights .*save or copy the model again"),
    ("gen-device-cuda", gen("--device", "cuda:99"), CUDA),
    ("gen-device-bogus", gen("--device", "gpu0"), r"--device gpu0: not a device; use cpu, cuda or cuda:N"),
    ("gen-max-positions", gen("--max-new-tokens", "200"),
     rf"--max-new-tokens 200: a 8-token prompt plus 200 new tokens needs 207 positions, more than the model's "
     rf"{MAX_POSITIONS} \(max_position_embeddings\); lower --max-new-tokens to 121 or less"),
    ("gen-max-new-tokens-zero", gen("--max-new-tokens", "0"), r"argument --max-new-tokens: 0: must be >= 1"),
    ("gen-temperature-nan", gen("--temperature", "nan"), r"argument --temperature: nan: must be a finite number"),
    ("gen-window-zero", gen("--cache-window", "0"), r"argument --cache-window: 0: must be >= 1"),
    ("gen-adapter-truncated", gen("--adapter", "{ws}/ad_trunc"),
     r"ad_trunc/adapter\.safetensors: not a readable safetensors file .*truncated or damaged"),
    ("gen-adapter-edited", gen("--adapter", "{ws}/ad_edited"),
     r"ad_edited/adapter_config\.json was edited after saving: adapter\.alpha=64\.0 \(saved as None\)"),
    ("gen-adapter-bad-json", gen("--adapter", "{ws}/ad_badjson"), r"ad_badjson/adapter_config\.json:1:\d+: not valid "
                                                                  r"JSON"),
    ("gen-adapter-nan", gen("--adapter", "{ws}/ad_nan"), r"ad_nan/adapter\.safetensors: \d+ tensor\(s\) hold NaN/inf"),
    ("gen-adapter-file", gen("--adapter", "{ws}/afile"), r"adapter .*afile is a file; pass the directory"),
    ("gen-adapter-missing", gen("--adapter", "{ws}/noad"), r"adapter .*noad: no such directory"),
    ("gen-adapter-other-strict", gen("--adapter", "{ws}/ad_other", "--strict"),
     r"was trained on org/other, not .*model \(same architecture, different model\?\); load it with the model it was "
     r"trained on, or drop --strict"),
    # -- pte eval --------------------------------------------------------------------------------------------------------
    ("eval-limit-zero", ev("--limit", "0"), r"argument --limit: '0': a limit is an integer >= 1"),
    ("eval-limit-negative", ev("--limit", "-1"), r"argument --limit: '-1': a limit is an integer >= 1"),
    ("eval-out-file", ev("--out", "{ws}/afile"), r"--out .*afile is a file; pass a directory"),
    ("eval-out-under-file", ev("--out", "{ws}/afile/sub"), r"afile is a file; pass a directory path"),
    ("eval-null-answer", ev("--benchmark", "{ws}/null.jsonl"), r"null\.jsonl:2: the gold answer is null"),
    ("eval-latin1", ev("--benchmark", "{ws}/latin.jsonl"), r"latin\.jsonl:1: not UTF-8 text"),
    ("eval-benchmark-unknown", ev("--benchmark", "nosuch"), r"unknown benchmark 'nosuch'"),
    ("eval-resume-nothing", ev("--resume"), r"--resume: .*out holds no evaluation to continue"),
    ("eval-max-positions", ev("--max-new-tokens", "500"), r"--max-new-tokens 500: a \d+-token prompt plus 500 new "
                                                          r"tokens needs \d+ positions"),
    ("eval-model-missing", ev("--model", "{ws}/nomodel"), r"model .*nomodel: no such directory"),
    ("eval-adapter-truncated", ev("--adapter", "{ws}/ad_trunc"), r"adapter\.safetensors: not a readable safetensors"),
    ("eval-batch-size-zero", ev("--batch-size", "0"), r"argument --batch-size: 0: must be >= 1"),
    ("eval-n-zero", ev("--n", "0"), r"argument --n: 0: must be >= 1"),
    ("eval-k-text", ev("--k", "1,x"), r"--k 1,x: expected comma-separated integers"),
    ("eval-window-and-budget", ev("--cache-window", "8", "--cache-budget", "40"), r"not both"),
    ("eval-device-cuda", ev("--device", "cuda:99"), CUDA),
    ("eval-top-p-inf", ev("--top-p", "inf"), r"argument --top-p: inf: must be a finite number"),
]


@pytest.fixture
def workspace(tmp_path, assets):
    _workspace(tmp_path, assets)
    return tmp_path


def run(argv, assets, ws, capsys):
    argv = [a.replace("{ws}", str(ws)).replace("{model}", str(assets / "model")) for a in argv]
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv,pattern", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_and_changes_nothing(argv, pattern, assets, workspace, capsys):
    before = snapshot(workspace)
    rc, err = run(argv, assets, workspace, capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2 and "Traceback" not in err and len(errors) == 1, err
    assert re.match(r"^pte [a-z-]+: error: ", errors[0]) and re.search(pattern, errors[0]), errors[0]
    assert snapshot(workspace) == before


def test_a_reused_eval_out_replaces_only_its_own_files(assets, workspace, capsys):
    out = workspace / "evalout"
    rc, err = run(ev("--out", str(out)), assets, workspace, capsys)
    assert rc == 0 and "replaced a previous evaluation (2 files)" in err
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "eval_state.json", "notes.txt",
                                                     "predictions-full.jsonl", "summary.csv", "summary.json",
                                                     "summary.md"]
    assert (out / "notes.txt").read_text() == "mine"


def test_an_adapter_of_another_model_name_warns_in_one_line(assets, workspace, capsys):
    before = snapshot(workspace)
    rc, err = run(gen("--adapter", "{ws}/ad_other"), assets, workspace, capsys)
    warnings = [line for line in err.splitlines() if "warning" in line.lower()]
    assert rc == 0 and len(warnings) == 1 and snapshot(workspace) == before
    assert re.fullmatch(r"\[pte\] warning: adapter .*ad_other was trained on org/other, not .*model \(same "
                        r"architecture, different model\?\); pass --strict \(strict=True\) to refuse", warnings[0])


def test_debug_shows_the_traceback(assets, workspace):
    argv = [a.replace("{ws}", str(workspace)).replace("{model}", str(assets / "model"))
            for a in gen("--model", "{ws}/nomodel", "--debug")]
    with pytest.raises(FileNotFoundError, match="nomodel: no such directory"):
        main(argv)
