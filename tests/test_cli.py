import json
import subprocess
import sys

import pytest
import torch

from pte.cli import main
from pte.models import char_tokenizer, tiny_model
from pte.rollout import CacheSpec, Sampling, rollout


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny model and tokenizer written by save_pretrained, as a user's local checkpoint would be."""
    path = tmp_path_factory.mktemp("tiny")
    tok = char_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok), init_std=0.2, seed=2, max_positions=256)
    with torch.no_grad():  # zero logits for <pad>/<eos>/<bos>, below the max of ~95 random ones: runs to the limit
        model.lm_head.weight[:3] = 0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_json_matches_the_engine(saved_model, capsys):
    path, model, tok = saved_model
    out = run_json(capsys, ["generate", "--model", str(path), "--prompt", "Q: 12+7=?", "--cache-window", "8",
                            "--max-new-tokens", "40", "--temperature", "0", "--json"])
    ids = tok("Q: 12+7=?")["input_ids"]
    ref = rollout(model, [ids], Sampling(max_new_tokens=40, temperature=0, eos_token_ids=(tok.eos_token_id,)),
                  CacheSpec(window=8)).rows[0]
    assert out["completion_ids"] == ref.completion_ids
    assert out["evictions"] == len(ref.eviction_steps) > 0
    assert out["peak_cache_tokens"] == len(ids) + 8
    assert out["peak_cache_bytes"] > 0 and out["tokens_per_s"] > 0
    assert out["completion"] == tok.decode(ref.completion_ids, skip_special_tokens=True)


def test_generate_seeded_sampling_and_prompt_file(saved_model, capsys, tmp_path):
    path, _, _ = saved_model
    f = tmp_path / "q.txt"
    f.write_text("What is 3*4?")
    args = ["generate", "--model", str(path), "--prompt-file", str(f), "--max-new-tokens", "20",
            "--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--json"]
    assert run_json(capsys, args)["completion_ids"] == run_json(capsys, args)["completion_ids"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--cache-window", "0"], "--cache-window: 0: must be >= 1"),
        (["--evict-fraction", "1.5"], r"must lie in \(0, 1\]"),
        (["--policy", "lru"], "unknown eviction policy 'lru'"),
        (["--prompt", "   "], "empty prompt"),
        (["--prompt", "9" * 300], "longer than the model's maximum"),
    ],
)
def test_generate_bad_input_is_a_clear_error(saved_model, capsys, extra, message):
    path, _, _ = saved_model
    argv = ["generate", "--model", str(path), "--prompt", "hi", "--max-new-tokens", "4", *extra]
    assert main(argv) == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_generate_missing_model_dir(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "4"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_console_script_runs(saved_model):
    path, _, _ = saved_model
    proc = subprocess.run([sys.executable, "-m", "pte", "generate", "--model", str(path), "--prompt", "ab",
                           "--max-new-tokens", "5", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["generated_tokens"] == 5


def test_demo_quick_runs_end_to_end(capsys, tmp_path):
    """The README's main command in its short form: exactness, GRPO from the shipped recipes (PTE on two seeds),
    evaluation, the table with the mean over PTE's seeds."""
    import json as _json

    from pte.lab.demo import DemoConfig, demo

    assert demo(quick=True, out=str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "max |logit - masked full forward|" in out and "| pte-s1 | window 8 |" in out
    assert "lora-s0 2/2" in out and "pte-s1 2/2" in out  # the progress display's last line
    result = _json.loads((tmp_path / "demo.json").read_text())
    runs = {"lora-s0", "lora_c-s0", "pte-s0", "pte-s1"}
    assert set(result["eval"]) == {"base"} | runs and set(result["train_last_step"]) == runs
    assert [s["window"] for s in result["eval"]["pte-s0"]] == [None, 8]
    assert result["train_last_step"]["lora-s0"]["window"] is None and result["train_last_step"]["pte-s1"]["window"] == 8
    mean_w8 = (result["eval"]["pte-s0"][1]["pass1"] + result["eval"]["pte-s1"][1]["pass1"]) / 2
    mean_row = next(line for line in out.splitlines() if line.startswith("| **pte: mean of 2 seeds**"))
    assert mean_row.split("|")[4].strip() == f"**{100 * mean_w8:.1f}**"
    assert (tmp_path / "compare" / "accuracy.png").stat().st_size > 0
    for run in runs:
        assert len((tmp_path / f"train-{run}" / "metrics.jsonl").read_text().splitlines()) == 2
        assert _json.loads((tmp_path / f"train-{run}" / "config.json").read_text())["run"]["seed"] == int(run[-1])
    # the shipped recipe, shortened by the quick preset's --set items only
    config = _json.loads((tmp_path / "train-pte-s0" / "config.json").read_text())
    assert config["grpo"]["dynamic_sampling"] and config["grpo"]["num_iterations"] == 2
    assert config["run"]["steps"] == 2 and DemoConfig.quick().train[0] == "run.steps=2"


def test_generate_with_adapter_runs_the_trained_policy(saved_model, capsys, tmp_path):
    """`--adapter` loads a PTE adapter and applies its state updates: the same tokens as the API rollout."""
    from pte.adapter import AdapterConfig, attach
    from pte.models import load

    path, _, tok = saved_model
    model, _ = load(str(path))
    adapter = attach(model, AdapterConfig(method="pte", rank=4, n_global=4, seed=3))
    with torch.no_grad():
        for lin in adapter.linears.values():
            lin.A.normal_(0, 0.5)
    adapter.save(tmp_path / "ad", cache={"window": 6, "evict_fraction": 0.25, "policy": "sliding"})
    ids = tok("Q: 5*5=?")["input_ids"]
    s = Sampling(max_new_tokens=30, temperature=0, eos_token_ids=(tok.eos_token_id,))
    ref = rollout(model, [ids], s, CacheSpec(window=6), adapter=adapter).rows[0]
    base = rollout(model, [ids], s, CacheSpec(window=6)).rows[0]
    assert ref.completion_ids != base.completion_ids  # the adapter changes the policy
    out = run_json(capsys, ["generate", "--model", str(path), "--adapter", str(tmp_path / "ad"), "--prompt", "Q: 5*5=?",
                            "--cache-window", "6", "--max-new-tokens", "30", "--temperature", "0", "--json"])
    assert out["completion_ids"] == ref.completion_ids


def test_export_peft_command(saved_model, tmp_path, capsys):
    from pte.adapter import AdapterConfig, attach
    from pte.models import load

    path, _, _ = saved_model
    model, _ = load(str(path))
    attach(model, AdapterConfig(method="lora_c", rank=4, n_global=4)).save(tmp_path / "ad")
    assert main(["export", "--peft", "--model", str(path), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "p")]) == 0
    assert {p.name for p in (tmp_path / "p").iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    attach(load(str(path))[0], AdapterConfig(method="pte", rank=4, n_global=4)).save(tmp_path / "ad2")
    assert main(["export", "--peft", "--model", str(path), "--adapter", str(tmp_path / "ad2"), "--out", str(tmp_path / "q")]) == 2
    assert "input-dependent state" in capsys.readouterr().err


def test_training_rollouts_stop_at_the_ids_generate_and_eval_stop_at(tmp_path, monkeypatch):
    """A chat model ends its turn with an id listed only in its generation config: `pte train` must stop there
    too, as `pte generate` and `pte eval` do (they once disagreed)."""
    import importlib

    import pte.cli
    import pte.evaluate
    import pte.train
    from pte.config import load_config

    rollout_module = importlib.import_module("pte.rollout")  # `pte.rollout` is the function, re-exported

    path = tmp_path / "chat"
    tok = char_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok), init_std=0.2, seed=2, max_positions=256)
    model.generation_config.eos_token_id = [tok.eos_token_id, 7]  # <|end of turn|> stand-in
    model.save_pretrained(path)
    tok.save_pretrained(path)
    seen = {}
    real = rollout_module.rollout

    def spy(name):
        def wrapped(model, prompts, sampling, *a, **kw):
            seen[name] = sampling.eos_token_ids  # the last call: eval warms up without stop ids
            return real(model, prompts, sampling, *a, **kw)
        return wrapped

    monkeypatch.setattr(pte.train, "rollout", spy("train"))
    monkeypatch.setattr(rollout_module, "rollout", spy("generate"))  # generate imports it at call time
    assert main(["generate", "--model", str(path), "--prompt", "Q: 1", "--max-new-tokens", "4"]) == 0
    monkeypatch.setattr(pte.evaluate, "rollout", spy("eval"))
    assert main(["eval", "--model", str(path), "--benchmark", "copy_digit", "--limit", "2", "--max-new-tokens", "4",
                 "--out", str(tmp_path / "ev")]) == 0
    pte.train.train(load_config(None, [f"model.name={path}", "data.task=copy_digit", "run.steps=1",
                                       "grpo.group_size=2", "grpo.prompts_per_step=1", "sampling.max_new_tokens=4",
                                       "cache.window=4", "adapter.rank=4", "adapter.n_global=4",
                                       f"run.out_dir={tmp_path / 'run'}"]), progress=False)
    assert seen["train"] == seen["generate"] == seen["eval"] == (tok.eos_token_id, 7)


def test_lab_commands_load_their_config_with_flags_then_set(capsys):
    """pretrain-task, check-mechanism and demo: defaults are the dataclass's, flags map onto fields, --set wins."""
    from pte.cli import _command_config, build_parser
    from pte.lab.demo import DemoConfig
    from pte.lab.mechanism import MechanismConfig
    from pte.lab.pretrain import PretrainConfig

    parse = build_parser().parse_args
    assert _command_config(PretrainConfig, parse(["pretrain-task"])) == PretrainConfig()
    assert _command_config(MechanismConfig, parse(["check-mechanism"])) == MechanismConfig()
    cfg = _command_config(PretrainConfig, parse(["pretrain-task", "--steps", "5", "--set", "steps=60",
                                                 "--set", "window_fraction=0.5"]))
    assert (cfg.steps, cfg.window_fraction) == (60, 0.5)
    cfg = _command_config(MechanismConfig, parse(["check-mechanism", "--rank", "4", "--no-truncate", "--model", "m",
                                                  "--problems", "7", "--variants", "pte,lora_c", "--set", "lr=0.01"]))
    assert (cfg.rank, cfg.n_global, cfg.truncate, cfg.base, cfg.eval_problems, cfg.variants, cfg.lr) == \
        (4, 4, False, "m", 7, ["pte", "lora_c"], 0.01)
    cfg = _command_config(DemoConfig, parse(["demo", "--set", "pte_seeds=[3, 4]"]))
    assert cfg == DemoConfig(pte_seeds=(3, 4))
    cfg = _command_config(DemoConfig, parse(["demo", "--quick", "--set", "eval_windows=[null, 4]"]),
                          preset=DemoConfig.quick())
    assert cfg.eval_windows == (None, 4) and cfg.train == DemoConfig.quick().train
    assert main(["check-mechanism", "--set", "stepz=1"]) == 2
    assert "unknown config key 'stepz'" in capsys.readouterr().err
    assert main(["demo", "--set", "eval_problems=many"]) == 2
    assert "eval_problems='many': expected an integer" in capsys.readouterr().err
