"""The research scripts' job runner: every finished job's rows reach the results file, a failed job is reported
with its log and stops no other."""

import json
import subprocess

from pte.lab.jobs import run_jobs


def test_failed_job_is_reported_and_the_others_keep_their_rows(tmp_path, capsys):
    def fail():
        raise subprocess.CalledProcessError(3, ["python", "-m", "pte", "train", "--config", "x.yaml"])

    shown = []
    jobs = {"a": lambda: [{"x": 1}, {"x": 2}], "bad": fail, "c": lambda: [{"x": 3}]}
    rows, failed = run_jobs(jobs, 2, tmp_path / "results.jsonl", show=lambda name, new, _: shown.append(name))
    assert sorted(r["x"] for r in rows) == [1, 2, 3]
    assert sorted(json.loads(line)["x"] for line in (tmp_path / "results.jsonl").read_text().splitlines()) == [1, 2, 3]
    assert failed == [f"bad: `pte train` exited 3; see {tmp_path / 'bad.log'}"]
    assert "bad: `pte train` exited 3" in capsys.readouterr().err
    assert sorted(shown) == ["a", "c"]
