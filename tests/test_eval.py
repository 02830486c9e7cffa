import csv
import itertools
import json
import math

import pytest
import torch

from pte.cache import sliding_eviction_steps
from pte.cli import main
from pte.data import Example
from pte.evaluate import evaluate, parse_sizes, render_prompts, split_budget
from pte.models import char_tokenizer, tiny_model
from pte.rollout import CacheSpec, Sampling, rollout
from pte.tasks.long_range import LongRange

TOK = char_tokenizer()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine run far faster on one thread than on two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_model(seed=3):
    return tiny_model("llama", vocab_size=len(TOK), init_std=0.2, seed=seed, max_positions=512)


def constant_model(char: str):
    """A model that emits ``char`` at every step: attention and MLP outputs are zero, every token embeds to the
    same vector, and only ``char``'s output row is non-zero."""
    model = random_model()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[TOK.convert_tokens_to_ids(char)] = 10.0
    return model


def wilson_reference(successes: float, n: int, z=1.959963984540054):
    p = successes / n
    root = math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return ((p + z * z / (2 * n) - z * root) / (1 + z * z / n), (p + z * z / (2 * n) + z * root) / (1 + z * z / n))


def pass_at_k_brute(n, c, k):
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def problems(n):
    return [Example(f"q{i}=", str(i % 3), f"test#{i}") for i in range(n)]


def test_a_known_score_is_reported_exactly():
    """The constant model writes "777"; the scorer accepts it on problems whose answer is 0: 3 of 7."""
    score = lambda completion, ex: float(completion == "777" and ex.answer == "0")  # noqa: E731
    res = evaluate(constant_model("7"), TOK, problems(7), score, spec=CacheSpec(), n_samples=2, ks=(1, 2),
                   sampling=Sampling(max_new_tokens=3, temperature=1.0), progress=False)
    s = res.summary
    assert [(r.problem, r.sample) for r in res.records] == [(i, j) for i in range(7) for j in range(2)]
    assert {(r.completion, r.extracted, r.length, r.finish_reason, r.evictions) for r in res.records} == \
        {("777", "777", 3, "length", 0)}
    assert [r.correct for r in res.records] == [i % 3 == 0 for i in range(7) for _ in range(2)]
    assert s.pass1 == pytest.approx(3 / 7) and s.pass_at_k == {1: pytest.approx(3 / 7), 2: pytest.approx(3 / 7)}
    assert (s.ci_low, s.ci_high) == pytest.approx(wilson_reference(3, 7))
    assert (s.problems, s.samples, s.window, s.budget, s.label) == (7, 2, None, None, "full")
    assert s.question_tokens == 3 and s.generated_tokens == 42 and s.peak_memory_bytes > 0


def test_summary_matches_a_direct_computation_and_the_engine():
    model, exs = random_model(), problems(6)
    score = lambda c, ex: float(bool(c) and ord(c[0]) % 2 == 0)  # noqa: E731  (about half, varying by sample)
    sampling = Sampling(max_new_tokens=6, temperature=1.0, eos_token_ids=(1,))
    res = evaluate(model, TOK, exs, score, spec=CacheSpec(), sampling=sampling, n_samples=4, ks=(1, 2, 4),
                   batch_size=32, seed=5, progress=False)
    counts = [sum(r.correct for r in res.records if r.problem == i) for i in range(6)]
    assert 0 < sum(counts) < 24, "the scorer should split the samples"
    s = res.summary
    assert s.pass1 == pytest.approx(sum(counts) / 24)
    for k in (1, 2, 4):
        assert s.pass_at_k[k] == pytest.approx(sum(pass_at_k_brute(4, c, k) for c in counts) / 6)
    low, high = wilson_reference(sum(counts) / 4, 6)
    assert (s.ci_low, s.ci_high) == pytest.approx((low, high))
    assert s.mean_length == pytest.approx(sum(r.length for r in res.records) / 24)
    # the same completions as the engine itself, sampled with the same seed
    prompts = [p for p in render_prompts(TOK, exs, chat=False) for _ in range(4)]
    ref = rollout(model, prompts, sampling, CacheSpec(), generator=torch.Generator().manual_seed(5))
    assert [r.completion for r in res.records] == [TOK.decode(r.completion_ids, skip_special_tokens=True)
                                                   for r in ref.rows]
    again = evaluate(model, TOK, exs, score, spec=CacheSpec(), sampling=sampling, n_samples=4, batch_size=32, seed=5,
                     progress=False)
    other = evaluate(model, TOK, exs, score, spec=CacheSpec(), sampling=sampling, n_samples=4, batch_size=32, seed=6,
                     progress=False)
    assert [r.completion for r in again.records] == [r.completion for r in res.records]
    assert [r.completion for r in other.records] != [r.completion for r in res.records]


def test_window_runs_evict_full_runs_do_not_and_budgets_split():
    model, exs = random_model(), [Example("1 +2 =", "3", "a"), Example("4 *3 +1 =", "3", "b")]
    sampling = Sampling(max_new_tokens=20, temperature=1.0)  # no EOS: every sample runs 20 tokens
    zero = lambda c, ex: 0.0  # noqa: E731
    full = evaluate(model, TOK, exs, zero, spec=CacheSpec(), sampling=sampling, progress=False).summary
    win = evaluate(model, TOK, exs, zero, spec=CacheSpec(window=4), sampling=sampling, progress=False)
    assert full.mean_evictions == 0
    assert {r.evictions for r in win.records} == {len(sliding_eviction_steps(19, 4))}  # the last token is not fed
    assert (win.summary.window, win.summary.question_tokens, win.summary.budget, win.summary.label) == (4, 9, 13, "w4")
    window = split_budget(15, [len(p) for p in render_prompts(TOK, exs, chat=False)])
    bud = evaluate(model, TOK, exs, zero, spec=CacheSpec(window=window), sampling=sampling, budget=15,
                   progress=False).summary
    assert (bud.window, bud.budget, bud.sized_by, bud.label) == (6, 15, "budget", "b15")
    with pytest.raises(ValueError, match="cannot hold the longest prompt"):
        evaluate(model, TOK, exs, zero, spec=CacheSpec(window=7), sampling=sampling, budget=15, progress=False)


def test_budget_split_and_size_parsing():
    assert split_budget(768, [300, 512]) == 256  # the paper's Fig. 6: 512 question/sink + 256 window
    assert split_budget(768, [100, 40], question_tokens=512) == 256
    with pytest.raises(ValueError, match="leaves no thought window.*above 512"):
        split_budget(512, [512, 20])
    with pytest.raises(ValueError, match="smaller than the longest prompt"):
        split_budget(768, [600], question_tokens=512)
    assert parse_sizes("full,64, 32", "--cache-window") == [None, 64, 32]
    for bad, message in [("0", "at least one thought token"), ("64,x", "neither an integer"), ("8,8", "twice"),
                         ("full,full", "twice")]:
        with pytest.raises(ValueError, match=message):
            parse_sizes(bad, "--cache-window")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    random_model().save_pretrained(path)
    TOK.save_pretrained(path)
    return path


def eval_cli(model, out, *extra):
    argv = ["eval", "--model", str(model), "--benchmark", "long_range", "--limit", "5", "--n", "2", "--k", "1,2",
            "--max-new-tokens", "30", "--out", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / "summary.json").read_text())


def test_cli_writes_consistent_files(saved_model, tmp_path, capsys):
    data = eval_cli(saved_model, tmp_path, "--cache-window", "full,6")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "eval_state.json", "predictions-full.jsonl",
                                                           "predictions-w6.jsonl", "summary.csv", "summary.json",
                                                           "summary.md"]
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    task, examples = LongRange(), LongRange().examples(5, seed=0)
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["label"] for r in rows] == ["full", "w6"]
    for summary, row in zip(data["runs"], rows):
        records = [json.loads(line) for line in (tmp_path / f"predictions-{summary['label']}.jsonl").open()]
        assert [(r["problem"], r["sample"]) for r in records] == [(i, j) for i in range(5) for j in range(2)]
        for r in records:
            assert r["prompt"] == examples[r["problem"]].prompt
            assert r["score"] == task.score(r["completion"], examples[r["problem"]])
        assert summary["pass1"] == pytest.approx(sum(r["correct"] for r in records) / 10)
        assert summary["mean_evictions"] == pytest.approx(sum(r["evictions"] for r in records) / 10)
        assert float(row["pass1"]) == pytest.approx(summary["pass1"])
        assert row["window"] == str(summary["window"] or "full")
    assert data["runs"][0]["mean_evictions"] == 0 < data["runs"][1]["mean_evictions"]
    q = max(len(TOK(e.prompt)["input_ids"]) for e in examples)  # the longest prompt, kept whole
    assert data["runs"][1]["question_tokens"] == q and data["runs"][1]["budget"] == q + 6
    assert data["config"]["method"] == "base"
    md = (tmp_path / "summary.md").read_text()
    assert f"| w6 | 6 | {q + 6} | {q} | 5 | 2 |" in md and md in capsys.readouterr().out


def test_compare_merges_runs(saved_model, tmp_path):
    a = eval_cli(saved_model, tmp_path / "sliding", "--cache-window", "full,6")
    q = max(len(TOK(e.prompt)["input_ids"]) for e in LongRange().examples(5, seed=1))
    b = eval_cli(saved_model, tmp_path / "other", "--cache-budget", f"{q + 9},full", "--seed", "1")
    assert [(s["label"], s["window"]) for s in b["runs"]] == [(f"b{q + 9}", 9), ("full", None)]
    out = tmp_path / "cmp"
    assert main(["eval", "--compare", str(tmp_path / "sliding"), str(tmp_path / "other"), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["run"], r["label"]) for r in rows] == [("sliding", "full"), ("sliding", "w6"), ("other", f"b{q + 9}"),
                                                      ("other", "full")]
    assert [float(r["pass1"]) for r in rows] == pytest.approx([s["pass1"] for s in a["runs"] + b["runs"]])
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG" and f"| other | base | b{q + 9} |" in \
        (out / "summary.md").read_text()


def test_adapters_are_applied_and_labelled(saved_model, tmp_path):
    """A fresh PTE adapter (zero A) is the base model exactly, even as its state updates on eviction; one with a
    non-zero A changes the completions."""
    from pte.adapter import AdapterConfig, attach

    adapter = attach(random_model(), AdapterConfig(method="pte", rank=4, n_global=4))
    adapter.save(tmp_path / "fresh")
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if name.endswith(".A"):
                p.normal_(0, 0.5)
    adapter.save(tmp_path / "moved")
    runs = {d: eval_cli(saved_model, tmp_path / "eval" / d, "--cache-window", "6",
                        *(["--adapter", str(tmp_path / d)] if d != "base" else [])) for d in ("base", "fresh", "moved")}
    assert [runs[d]["config"]["method"] for d in runs] == ["base", "pte", "pte"]
    completions = {d: [json.loads(line)["completion"] for line in (tmp_path / "eval" / d / "predictions-w6.jsonl")
                       .open()] for d in runs}
    assert completions["fresh"] == completions["base"] != completions["moved"]
    assert runs["fresh"]["runs"][0]["mean_evictions"] > 0


def test_math_file_benchmark_is_graded_by_math_verify(tmp_path):
    """A JSONL file (GSM8K layout): the constant model answers 7; math-verify accepts 7 and 7.0, not 8."""
    model_dir = tmp_path / "seven"
    constant_model("7").save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"question": q, "answer": f"work\n#### {a}"}) + "\n"
                         for q, a in [("a?", "7"), ("b?", "7.0"), ("c?", "8")]))
    data = eval_cli(model_dir, tmp_path / "out", "--benchmark", str(f), "--max-new-tokens", "1", "--n", "1", "--k", "1")
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions-full.jsonl").open()]
    assert [(r["completion"], r["answer"], r["correct"]) for r in records] == [("7", "7", True), ("7", "7.0", True),
                                                                            ("7", "8", False)]
    assert data["runs"][0]["pass1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("extra, message", [
    (["--n", "2", "--k", "1,4"], "pass@4 needs k <= n"),
    (["--benchmark", "nosuch"], "unknown benchmark 'nosuch'"),
    (["--cache-window", "0"], "at least one thought token"),
    (["--cache-window", "8", "--cache-budget", "40"], "not both"),
    (["--cache-budget", "10"], "--cache-budget 10 leaves no thought window: the question takes"),
])
def test_bad_input_is_a_clear_error(saved_model, tmp_path, capsys, extra, message):
    argv = ["eval", "--model", str(saved_model), "--benchmark", "long_range", "--limit", "2",
            "--max-new-tokens", "4", "--out", str(tmp_path), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_compare_without_a_summary_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--compare", str(tmp_path), "--out", str(tmp_path / "cmp")]) == 2
    assert "no summary.json there" in capsys.readouterr().err


def test_interval_is_exact_at_the_ends_and_the_plot_accepts_them(tmp_path):
    from pte.evaluate import plot_accuracy, wilson_interval

    for n in (20, 100, 200, 500):
        assert wilson_interval(0.0, n)[0] == 0.0 and wilson_interval(1.0, n)[1] == 1.0
        low, high = wilson_interval(0.5, n)
        assert low < 0.5 < high and abs((0.5 - low) - (high - 0.5)) < 1e-12
    runs = [{"label": lb, "window": w, "budget": None, "sized_by": "window" if w else "full", "pass1": p, "ci_low": wilson_interval(p, 200)[0],
             "ci_high": wilson_interval(p, 200)[1]} for lb, w, p in (("full", None, 1.0), ("w8", 8, 0.0))]
    plot_accuracy(tmp_path / "a.png", {"run": runs}, "edges")
    assert (tmp_path / "a.png").stat().st_size > 0


# -- predictions as they go, --resume -----------------------------------------------------------------------------------
STABLE = ("label", "window", "budget", "question_tokens", "problems", "samples", "pass1", "ci_low", "ci_high",
          "pass_at_k", "mean_score", "mean_length", "mean_evictions", "finish_reasons", "generated_tokens")


def resume_args(model, out, *extra):
    return ["eval", "--model", str(model), "--benchmark", "long_range", "--limit", "5", "--n", "2", "--k", "1,2",
            "--max-new-tokens", "30", "--cache-window", "full,6", "--batch-size", "3", "--out", str(out), *extra]


def predictions(out):
    return {p.name: [json.loads(line) for line in p.open()] for p in sorted(out.glob("predictions-*.jsonl"))}


@pytest.fixture(scope="module")
def uninterrupted(saved_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert main(resume_args(saved_model, out)) == 0
    return json.loads((out / "summary.json").read_text()), predictions(out)


@pytest.mark.parametrize("how,signum", [("ctrl-c", 2), ("sigterm", 15)])
def test_an_interrupted_eval_keeps_complete_batches_and_resumes_to_the_same_result(
        saved_model, uninterrupted, tmp_path, monkeypatch, capsys, how, signum):
    import os
    import signal

    summary, records = uninterrupted
    calls = {"n": 0}
    score = LongRange.score

    def stop_at_the_eighth(self, completion, example):
        calls["n"] += 1
        if calls["n"] == 8:  # inside the full run's third batch (samples 7-9): two batches are saved
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise KeyboardInterrupt
        return score(self, completion, example)

    monkeypatch.setattr(LongRange, "score", stop_at_the_eighth)
    assert main(resume_args(saved_model, tmp_path)) == 128 + signum
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"pte eval: interrupted ({signal.Signals(signum).name}); 6 samples are saved in {tmp_path}: run the " \
                  "same command with --resume to continue"
    assert predictions(tmp_path) == {"predictions-full.jsonl": records["predictions-full.jsonl"][:6]}
    assert not (tmp_path / "summary.json").exists()
    monkeypatch.setattr(LongRange, "score", score)
    assert main(resume_args(saved_model, tmp_path, "--resume")) == 0
    assert predictions(tmp_path) == records
    got = json.loads((tmp_path / "summary.json").read_text())
    assert [{k: s[k] for k in STABLE} for s in got["runs"]] == [{k: s[k] for k in STABLE} for s in summary["runs"]]
    assert [s["resumed"] for s in got["runs"]] == [6, 0]


def test_a_half_written_batch_is_sampled_again(saved_model, uninterrupted, tmp_path):
    summary, records = uninterrupted
    assert main(resume_args(saved_model, tmp_path)) == 0
    f = tmp_path / "predictions-w6.jsonl"
    lines = f.read_text().splitlines(keepends=True)
    f.write_text("".join(lines[:4]) + lines[4][:25])  # one batch, one record of the next, half a line
    (tmp_path / "summary.json").unlink()
    assert main(resume_args(saved_model, tmp_path, "--resume")) == 0
    assert predictions(tmp_path) == records
    assert [s["resumed"] for s in json.loads((tmp_path / "summary.json").read_text())["runs"]] == [10, 3]


def test_resume_refuses_other_flags_and_a_fresh_run_replaces_only_its_own_files(saved_model, tmp_path, capsys):
    assert main(resume_args(saved_model, tmp_path, "--resume")) == 2
    assert "holds no evaluation to continue (no eval_state.json); run without --resume" in capsys.readouterr().err
    assert main(resume_args(saved_model, tmp_path)) == 0
    assert main(resume_args(saved_model, tmp_path, "--resume", "--seed", "4")) == 2
    assert "--resume: the flags differ from the run in" in capsys.readouterr().err
    (tmp_path / "predictions-w99.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    argv = resume_args(saved_model, tmp_path)
    argv[argv.index("full,6") ] = "6"
    assert main(argv) == 0
    assert "replaced a previous evaluation (8 files)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "eval_state.json", "notes.txt",
                                                           "predictions-w6.jsonl", "summary.csv", "summary.json",
                                                           "summary.md"]


def test_out_is_checked_before_the_model_loads(saved_model, tmp_path, monkeypatch, capsys):
    import pte.models

    monkeypatch.setattr(pte.models, "load", lambda *a, **k: pytest.fail("model loaded"))
    f = tmp_path / "taken"
    f.write_text("x")
    assert main(resume_args(saved_model, f)) == 2
    assert capsys.readouterr().err.strip() == f"pte eval: error: --out {f} is a file; pass a directory (it is created " \
                                              "if missing)"
    assert main(resume_args(saved_model, f / "sub")) == 2
    assert f"{f} is a file" in capsys.readouterr().err and f.read_text() == "x"
