"""A training run's metrics: one JSON line per step in ``metrics.jsonl``, TensorBoard scalars, a progress bar,
and the reward plot. Only rank 0 writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path


class RunLog:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, *, enabled: bool = True,
                 progress: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.path = self.run_dir / "metrics.jsonl"
        self.writer = self.bar = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run's TensorBoard drops the events logged after its checkpoint
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if enabled and progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="pte train", unit="step", file=sys.stderr)

    def write(self, metrics: dict) -> None:
        """``metrics["step"]`` is the 1-based step; other numbers become TensorBoard scalars."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self.writer.add_scalar(key, value, metrics["step"])
        self.writer.flush()
        if self.bar is not None:
            reward = metrics.get("reward")
            self.bar.set_postfix(reward="-" if reward is None else f"{reward:.3f}",
                                 tok_s=f"{metrics['rollout_tokens_per_s']:.0f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def plot(self) -> Path | None:
        return plot_metrics(self.run_dir) if self.enabled else None


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Reward (and accuracy) per step from ``metrics.jsonl`` -> a PNG."""
    from pte.plots import Line, line_plot

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    steps = [r["step"] for r in rows]
    lines = [Line("mean reward", steps, [r["reward"] for r in rows]),
             Line("reward = 1 (fraction)", steps, [r["accuracy"] for r in rows])]
    return line_plot(Path(out) if out else run_dir / "reward.png", lines, xlabel="GRPO step", ylim=(-0.02, 1.02),
                     marker=".", size=(6, 3.5))
