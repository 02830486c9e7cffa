import json

from pte.lab.bench import bench_rollout


def test_rollout_bench_writes_json_and_plot(tmp_path, capsys):
    """The benchmark driver end to end on a tiny length: fresh subprocess per configuration, JSON, PNG, table."""
    out = tmp_path / "rollout.json"
    rows = bench_rollout(str(out), lengths=(160,), window=64, batch=2, engines=("ours_full", "ours_bounded"))
    assert json.loads(out.read_text()) == rows and out.with_suffix(".png").exists()
    full, bounded = rows
    assert full["length"] == bounded["length"] == 160 and full["window"] is None and bounded["window"] == 64
    assert bounded["cache_bytes"] < full["cache_bytes"]  # prompt 32 + 64 window vs 32 + 160 tokens held


def test_train_step_bench_times_both_methods(tmp_path, capsys):
    """`pte bench train-step` end to end on a short setting: both methods, every phase, medians and ratios."""
    from pte.lab.bench import TRAIN_STEP_PHASES, bench_train_step

    out = tmp_path / "step.json"
    (r,) = bench_train_step(str(out), settings=("long",), reps=1, rows=2, length=24, window=8)
    assert json.loads(out.read_text()) == [r]
    for p in TRAIN_STEP_PHASES:
        assert r["median_s"]["lora_c"][p] > 0 and r["median_s"]["pte"][p] > 0
        assert abs(r["ratio"][p] - r["median_s"]["pte"][p] / r["median_s"]["lora_c"][p]) < 1e-12
    assert "| rollout |" in capsys.readouterr().out
