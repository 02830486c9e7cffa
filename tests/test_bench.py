import json

from pte.bench import bench_rollout


def test_rollout_bench_writes_json_and_plot(tmp_path, capsys):
    """The benchmark driver end to end on a tiny length: fresh subprocess per configuration, JSON, PNG, table."""
    out = tmp_path / "rollout.json"
    rows = bench_rollout(str(out), lengths=(160,), window=64, batch=2, engines=("ours_full", "ours_bounded"))
    assert json.loads(out.read_text()) == rows and out.with_suffix(".png").exists()
    full, bounded = rows
    assert full["length"] == bounded["length"] == 160 and full["window"] is None and bounded["window"] == 64
    assert bounded["cache_bytes"] < full["cache_bytes"]  # prompt 32 + 64 window vs 32 + 160 tokens held
