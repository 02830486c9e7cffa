import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pte.config import load_config
from pte.data import load_examples
from pte.grpo import TokenBatch, clipped_token_loss, group_advantages
from pte.rewards import MathGrader, extract_answer
from pte.train import train

TINY = ["run.steps=4", "run.save_every=2", "grpo.group_size=4", "grpo.prompts_per_step=2",
        "sampling.max_new_tokens=12", "adapter.rank=4", "adapter.n_global=4", "cache.window=4"]


# -- the objective ----------------------------------------------------------------------------------------------------
def test_advantages_all_equal_are_zero_and_otherwise_normalised():
    adv = group_advantages(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]]))
    assert torch.equal(adv[0], torch.zeros(4)) and not adv.isnan().any()
    assert torch.allclose(adv[1], torch.tensor([-1.0, 1.0, -1.0, 1.0]) / (1 + 4e-6) ** 0.5)  # var 0.25, eps inside sqrt


def _batch(adv, old, ref=None):
    n = old.shape[1]
    return TokenBatch(advantages=torch.tensor(adv)[:, None], old_logp=old, mask=torch.ones(old.shape, dtype=torch.bool),
                      ref_logp=ref, normalizer=float(old.numel()))


def test_loss_gradient_moves_probability_toward_higher_advantage():
    logits = torch.zeros(2, 5, requires_grad=True)  # two completions of one token each, from the same state
    tokens = torch.tensor([1, 3])
    logp = logits.log_softmax(-1).gather(-1, tokens[:, None])  # [2, 1]
    loss, _ = clipped_token_loss(logp, _batch([1.0, -1.0], logp.detach()), slice(0, 1))
    loss.backward()
    with torch.no_grad():
        new = (logits - 0.5 * logits.grad).log_softmax(-1)
    assert new[0, 1] > logp[0, 0] and new[1, 3] < logp[1, 0]


def test_clipping_stops_gradient_beyond_the_trust_region():
    old = torch.log(torch.tensor([[0.2, 0.2]]))
    for ratio, adv, expect_zero in [(1.5, 1.0, True), (0.5, 1.0, False), (0.5, -1.0, True), (1.5, -1.0, False)]:
        logp = (old + torch.log(torch.tensor(ratio))).clone().requires_grad_(True)
        loss, stats = clipped_token_loss(logp, _batch([adv], old), slice(0, 2), clip_low=0.2, clip_high=0.2)
        loss.backward()
        assert (logp.grad.abs().max() == 0) == expect_zero, (ratio, adv)
        assert stats["clipped_tokens"] == (2.0 if expect_zero else 0.0)


def test_k3_kl_is_zero_at_the_reference_and_matches_its_formula():
    old = torch.log(torch.tensor([[0.3, 0.6]]))
    logp = old.clone().requires_grad_(True)
    loss, stats = clipped_token_loss(logp, _batch([0.0], old, ref=old.clone()), slice(0, 2), beta=0.5)
    loss.backward()
    assert stats["kl_sum"] == 0.0 and logp.grad.abs().max() == 0
    ref = torch.log(torch.tensor([[0.1, 0.9]]))
    _, stats = clipped_token_loss(old, _batch([0.0], old, ref=ref), slice(0, 2), beta=0.5)
    d = ref - old
    assert abs(stats["kl_sum"] - float((d.exp() - d - 1).sum())) < 1e-6
    with pytest.raises(ValueError, match="beta > 0 needs reference"):
        clipped_token_loss(old, _batch([0.0], old), slice(0, 2), beta=0.5)


# -- rewards -------------------------------------------------------------------------------------------------------------
GRADING = [
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("The total is 72 dollars.", "72", 1.0),
    ("#### 1,234", "1234", 1.0),
    ("The answer is 3.75", "15/4", 1.0),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    ("\\boxed{7}", "8", 0.0),
    ("I think it's 12, no wait, 13", "12", 0.0),
    ("}}}{{{\\boxed{", "3", 0.0),
    ("", "3", 0.0),
]


def test_grading_table():
    with MathGrader(workers=2, timeout=20) as grader:
        scores = grader.grade([p for p, _, _ in GRADING], [g for _, g, _ in GRADING])
    assert scores == [s for _, _, s in GRADING]
    assert extract_answer("\\boxed{\\frac{a}{b}} then \\boxed{{1}+2}") == "{1}+2"


def test_grader_timeout_and_crash_score_zero_without_hanging():
    sys.path.insert(0, str(Path(__file__).parent))
    import grading_fixtures as helpers

    grader = MathGrader(workers=1, timeout=1.0)
    grader._fn = helpers.slow_grade
    start = time.perf_counter()
    try:
        assert grader.grade(["\\boxed{1}", "\\boxed{1}"], ["1", "1"]) == [0.0, 0.0]
        assert time.perf_counter() - start < 15 and grader.stats.timeouts == 2
        grader._fn = helpers.crashing_grade
        assert grader.grade(["x"], ["1"]) == [0.0] and grader.stats.errors == 1
    finally:
        grader.close()


# -- data ------------------------------------------------------------------------------------------------------------------
def test_gsm8k_format_loads_and_bad_lines_name_file_and_line(tmp_path):
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"question": "2+2?", "answer": "Add.\n#### 4"}) + "\n\n"
                  + json.dumps({"question": "3*3?", "answer": "#### 1,009"}) + "\n")
    ex = load_examples(str(ok))
    assert [(e.prompt, e.answer) for e in ex] == [("2+2?", "4"), ("3*3?", "1009")] and ex[1].source.endswith(":3")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_examples(str(bad))
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"problem": "q", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"missing.jsonl:1: no field 'question'"):
        load_examples(str(missing))


def test_math_and_dapo_formats(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"problem": "p", "solution": "so \\boxed{\\frac{3}{4}}."}) + "\n")
    assert load_examples(str(f), "problem", "solution")[0].answer == "\\frac{3}{4}"
    d = tmp_path / "dapo.jsonl"
    d.write_text(json.dumps({"prompt": [{"role": "user", "content": "Find x."}], "reward_model": {"ground_truth": "34"}}) + "\n")
    e = load_examples(str(d), "prompt", "reward_model.ground_truth")[0]
    assert (e.prompt, e.answer) == ("Find x.", "34")


def test_shared_gsm8k_copy_loads():
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
    if not path.exists():
        pytest.fail(f"{path} missing: CI and developers have ../shared beside the project")
    ex = load_examples(str(path), limit=50)
    assert len(ex) == 50 and all(e.answer.replace("-", "").replace(".", "").isdigit() for e in ex)


# -- config ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["optim.lr=0"], "optim.lr=0"),
    (["grpo.group_size=1"], "grpo.group_size=1"),
    (["grpo.wobble=3"], "unknown config key 'grpo.wobble'"),
    (["cache.window=0"], "cache.window=0"),
    (["adapter.method=lora"], "trains with a full cache"),
    (["adapter.rank=-2"], "adapter.rank=-2"),
])
def test_bad_config_fails_before_any_model_loads(overrides, message, monkeypatch):
    import pte.train

    monkeypatch.setattr(pte.train, "build_model", lambda cfg: pytest.fail("model loaded"))
    with pytest.raises(ValueError, match=message):
        train(load_config(None, overrides))


def test_unknown_key_in_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  steps: 2\n  stepz: 3\n")
    with pytest.raises(ValueError, match="unknown config key 'run.stepz'"):
        load_config(str(f))


# -- checkpoints ---------------------------------------------------------------------------------------------------------
def _adapter_tensors(ckpt):
    from safetensors.torch import load_file

    return load_file(str(ckpt / "adapter.safetensors"))


@pytest.mark.parametrize("sampling", [[], ["grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=3",
                                            "grpo.adaptive_draws=true"]], ids=["plain", "adaptive_draws"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, sampling):
    """Also: memory is measured only on the steps due, and measuring it changes nothing; adaptive draws resume with
    the saved signal rate."""
    args = TINY + ["run.memory_every=3"] + sampling
    full = tmp_path / "full"
    train(load_config(None, args + [f"run.out_dir={full}"]), progress=False)
    part = tmp_path / "part"
    stop = 3 if sampling else 2  # adaptive: step 3 sets the rate that step 4's draws depend on
    train(load_config(None, args + [f"run.out_dir={part}", f"run.steps={stop}"]), progress=False)
    train(load_config(None, args + [f"run.out_dir={part}"]), resume=str(part), progress=False)
    a, b = _adapter_tensors(full / "checkpoint-000004"), _adapter_tensors(part / "checkpoint-000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_full = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    log_part = [json.loads(l) for l in (part / "metrics.jsonl").read_text().splitlines()]
    assert [l["reward"] for l in log_full] == [l["reward"] for l in log_part]
    assert [l["rollouts"] for l in log_full] == [l["rollouts"] for l in log_part]
    assert [l["peak_bytes_replay"] is not None for l in log_full] == [True, False, True, True]
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000004"]
    events = list((full / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.value for e in acc.Scalars("reward")] == pytest.approx([l["reward"] for l in log_full])


def test_killed_run_resumes(tmp_path):
    """A process killed mid-run (SIGKILL) leaves only complete checkpoints; resuming reaches the same adapter
    (with a cosine schedule, which must continue from the step it stopped at)."""
    ref = tmp_path / "ref"
    args = TINY + ["run.steps=6", "run.save_every=1", "optim.schedule=cosine", "optim.lr=0.02"]
    train(load_config(None, args + [f"run.out_dir={ref}"]), progress=False)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pte", "train", *sum([["--set", a] for a in args + [f"run.out_dir={run}"]], [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoint-000002").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in run.glob("checkpoint-*"))
    assert done and done[-1] != "checkpoint-000006", "the run finished before it was killed; nothing tested"
    train(load_config(None, args + [f"run.out_dir={run}"]), resume=str(run), progress=False)
    a, b = _adapter_tensors(ref / "checkpoint-000006"), _adapter_tensors(run / "checkpoint-000006")
    assert all(torch.equal(a[k], b[k]) for k in a)
    def lr_by_step(path):  # the resumed run re-logs the steps after its checkpoint: the last line of a step counts
        return {(m := json.loads(line))["step"]: m["lr"] for line in (path / "metrics.jsonl").read_text().splitlines()}

    assert lr_by_step(run) == lr_by_step(ref) and len(set(lr_by_step(ref).values())) == 6


def test_cosine_schedule_runs_from_lr_to_its_final_fraction():
    from pte.train import learning_rate

    cfg = load_config(None, ["optim.schedule=cosine", "optim.lr=0.02", "optim.final_lr_fraction=0.1", "run.steps=4"])
    lrs = [learning_rate(cfg, s) for s in range(4)]
    assert lrs == pytest.approx([0.02, 0.002 + 0.018 * 0.75, 0.002 + 0.018 * 0.25, 0.002])  # cos(pi/3) = 1/2
    assert learning_rate(load_config(None, ["optim.lr=0.02"]), 3) == 0.02


def test_two_process_run_keeps_ranks_identical(tmp_path):
    """torchrun / `accelerate launch --multi_gpu` with 2 CPU processes (gloo): stop strings give the ranks
    different completion lengths, hence different numbers of replay segments; the run must end and the ranks'
    adapters must agree after every step."""
    out = tmp_path / "ddp"
    args = TINY + ["run.steps=4", f"run.out_dir={out}", "sampling.stop=['7', 'a', 'e', '3', 'x']",
                   "sampling.max_new_tokens=24", "grpo.group_size=2", "grpo.prompts_per_step=1", "run.threads=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "pte", "train", *sum([["--set", a] for a in args], [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(l["world_size"] == 2 and l["ranks_identical"] for l in log)
    assert any(len(set(l["segments_per_rank"])) > 1 for l in log), "ranks never differed; the test proved nothing"
    assert (out / "checkpoint-000004" / "rng-rank1.safetensors").exists()


@pytest.mark.parametrize("reference", ["bounded", "full"])
def test_kl_reference_is_the_base_model(tmp_path, reference):
    """At step 1 the adapter is zero, so the policy is the base model under the cache: KL to the base under the
    same cache is exactly 0; KL to the base over the full context is not (evictions change the distribution)."""
    out = tmp_path / reference
    last = train(load_config(None, TINY + ["run.steps=1", f"run.out_dir={out}", "grpo.beta=0.1",
                                           f"grpo.kl_reference={reference}"]), progress=False)
    assert last["evictions_per_sample"] > 0 and last["peak_bytes_reference"] > 0
    if reference == "bounded":
        assert last["kl"] == 0.0
    else:
        assert last["kl"] > 1e-4


def test_reasoning_gym_source_is_seeded_and_scored_by_its_generator():
    from pte.tasks import make_task

    task = make_task("reasoning_gym", name="chain_sum")
    a, b = task.examples(5, seed=3), make_task("reasoning_gym", name="chain_sum").examples(5, seed=3)
    assert [e.prompt for e in a] == [e.prompt for e in b] and a[0].prompt != task.examples(5, seed=4)[0].prompt
    ex = a[0]
    assert task.score(f"so the answer is \\boxed{{{ex.answer}}}", ex) == 1.0
    assert task.score(f"\\boxed{{{int(ex.answer) + 1}}}", ex) < 1.0
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_task("nope")
    with pytest.raises(ValueError, match="task_options for copy_digit"):
        make_task("copy_digit", bogus=1)


def test_a_batch_without_signal_skips_the_replay_and_leaves_the_adapter_unchanged(tmp_path):
    """4 new tokens never reach `ans`: every reward is 0, every advantage 0, so no replay runs (logged as no
    mismatch) and Adam, stepping on zero gradients, leaves A at its zero init."""
    from pte.adapter import load as load_adapter
    from pte.models import load as load_model
    from pte.lab.pretrain import SHIPPED_BASE
    from pte.checkpoint import latest as latest_checkpoint

    out = tmp_path / "run"
    cfg = load_config(None, [f"model.name={SHIPPED_BASE}", "data.task=long_range", "sampling.max_new_tokens=4",
                             "cache.window=8", "run.steps=2", "run.save_every=2", "grpo.group_size=2",
                             "grpo.prompts_per_step=2", "adapter.rank=4", "adapter.n_global=4", f"run.out_dir={out}"])
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in rows] == [0.0, 0.0]
    assert all(r["logprob_mismatch"] is None and r["grad_norm"] == 0.0 for r in rows)
    model, _ = load_model(str(SHIPPED_BASE))
    adapter = load_adapter(model, latest_checkpoint(out))
    assert all(lin.A.abs().max() == 0 for lin in adapter.linears.values())


# -- the run directory and preemption -------------------------------------------------------------------------------
def test_sigterm_saves_and_the_resumed_run_is_bit_exact(tmp_path):
    """SIGTERM mid-run: the step in progress finishes, a checkpoint of it is written, one line says how to resume,
    the exit code is 143; resuming gives the uninterrupted run's adapter and metrics without duplicate steps."""
    args = TINY + ["run.steps=6", "run.save_every=100"]
    ref = tmp_path / "ref"
    train(load_config(None, args + [f"run.out_dir={ref}"]), progress=False)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pte", "train", *sum([["--set", a] for a in args + [f"run.out_dir={run}"]], [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (
            (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 1):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    saved = sorted(p.name for p in run.glob("checkpoint-*"))
    assert len(saved) == 1 and saved[0] != "checkpoint-000006", saved
    assert "stopped by SIGTERM" in err and f"--resume {run}" in err
    train(load_config(None, args + [f"run.out_dir={run}"]), resume=str(run), progress=False)
    a, b = _adapter_tensors(ref / "checkpoint-000006"), _adapter_tensors(run / "checkpoint-000006")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    ref_rewards = [json.loads(l)["reward"] for l in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [json.loads(l)["reward"] for l in (run / "metrics.jsonl").read_text().splitlines()] == ref_rewards


def test_foreign_checkpoints_are_untouched_and_the_runs_own_are_kept(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint-best", "checkpoint-1000"):  # a user's copies; not pte checkpoints of this run
        (out / name).mkdir()
        (out / name / "note.txt").write_text("mine")
    train(load_config(None, TINY + [f"run.out_dir={out}", "run.save_every=1", "run.keep_last=2"]), progress=False)
    assert (out / "checkpoint-best" / "note.txt").read_text() == "mine"
    assert (out / "checkpoint-1000" / "note.txt").read_text() == "mine"
    assert sorted(p.name for p in out.glob("checkpoint-0*")) == ["checkpoint-000003", "checkpoint-000004"]


def test_an_older_longer_run_is_refused_then_overwritten_and_its_checkpoints_never_delete_ours(tmp_path):
    out = tmp_path / "run"
    train(load_config(None, TINY + [f"run.out_dir={out}", "run.steps=6", "run.save_every=3"]), progress=False)
    with pytest.raises(ValueError, match=r"already holds a run .*--resume .*run.overwrite=true"):
        train(load_config(None, TINY + [f"run.out_dir={out}"]), progress=False)
    train(load_config(None, TINY + [f"run.out_dir={out}", "run.overwrite=true"]), progress=False)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000004"]
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_a_second_process_is_locked_out(tmp_path):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with (out / ".pte-lock").open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="another pte train .* is writing there"):
            train(load_config(None, TINY + [f"run.out_dir={out}"]), progress=False)


def test_resume_refuses_changed_cache_and_adapter_settings_and_a_finished_run_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    last = train(load_config(None, TINY + [f"run.out_dir={out}", "run.steps=2"]), progress=False)
    with pytest.raises(ValueError, match=r"cache.window: 4 -> 6.*cache.evict_fraction: 0.25 -> 0.5"):
        train(load_config(None, TINY + [f"run.out_dir={out}", "cache.window=6", "cache.evict_fraction=0.5"]),
              resume=str(out), progress=False)
    with pytest.raises(ValueError, match=r"adapter.rank: 4 -> 8"):
        train(load_config(None, TINY + [f"run.out_dir={out}", "adapter.rank=8", "adapter.n_global=8"]),
              resume=str(out), progress=False)
    again = train(load_config(None, TINY + [f"run.out_dir={out}", "run.steps=2"]), resume=str(out), progress=False)
    assert again == json.loads(json.dumps(last)) and "the run is finished" in capsys.readouterr().err
