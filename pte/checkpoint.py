"""Training checkpoints and the run directory that holds them.

``checkpoint-{step:06d}/`` holds the adapter, the optimizer, every rank's RNG states and the data position, written
atomically (a temporary directory renamed at the end), so a run killed at any moment resumes bit-exactly from its
last complete checkpoint. Safetensors and JSON only: nothing is unpickled.

A run owns only its own files: each run has an id, recorded in its checkpoints; clean-up deletes only checkpoints
with that id, by step number. A directory that holds another run is refused unless the run resumes it or sets
``run.overwrite``; a lock file keeps a second process out while a run writes.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
import random
import re
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pte.adapter import Adapter, read_config, read_tensors
from pte.config import TrainConfig, to_dict
from pte.dist import Dist

PREFIX = "checkpoint-"
_NAME = re.compile(rf"{PREFIX}(\d+)")


def code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def step_of(path: Path) -> int | None:
    """The step of a ``checkpoint-{N}`` directory written by pte; ``None`` for any other name."""
    m = _NAME.fullmatch(path.name)
    return int(m.group(1)) if m and (path / "trainer_state.json").exists() else None


def checkpoints(run_dir: Path) -> list[Path]:
    """pte's checkpoints in ``run_dir``, by step number (never by name: ``checkpoint-1000`` > ``checkpoint-999``)."""
    found = [p for p in run_dir.glob(f"{PREFIX}*") if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def latest(path: Path) -> Path:
    """``path`` itself if it is a checkpoint, else the newest checkpoint in it."""
    if step_of(path) is not None:
        return path
    found = checkpoints(path)
    if not found:
        raise FileNotFoundError(f"--resume {path}: no {PREFIX}N directory with a trainer_state.json there")
    return found[-1]


def save(run_dir: Path, step: int, cfg: TrainConfig, adapter: Adapter, optimizer, gen: torch.Generator,
         data_position: int, dist: Dist, run_id: str | None = None, signal_rate: float | None = None) -> Path:
    """Write ``checkpoint-{step}`` atomically: every rank writes its RNG states into a temporary directory,
    rank 0 adds the adapter, optimizer and state, and renames it at the end."""
    from safetensors.torch import save_file

    final = run_dir / f"{PREFIX}{step:06d}"
    tmp = run_dir / f".tmp-{final.name}"
    if dist.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    np_state = np.random.get_state()
    py_state = random.getstate()
    save_file({"torch": torch.get_rng_state(), "sampling": gen.get_state().cpu(),
               "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))},
              str(tmp / f"rng-rank{dist.rank}.safetensors"))
    (tmp / f"rng-rank{dist.rank}.json").write_text(json.dumps({
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}))
    dist.barrier()
    if dist.rank == 0:
        adapter.save(tmp, cache=asdict(cfg.cache))
        opt = optimizer.state_dict()
        tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous() for i, st in opt["state"].items()
                   for k, v in st.items()}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {
            "step": step, "data_position": data_position, "signal_rate": signal_rate,
            "threads": torch.get_num_threads(), "world_size": dist.world,
            "param_groups": opt["param_groups"], "param_names": [n for n, _ in adapter.named_parameters()],
            "config": to_dict(cfg), "code_version": code_version(), "run_id": run_id,
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        own = [c for c in checkpoints(run_dir) if _state(c).get("run_id") == run_id]
        for old in own[: -cfg.run.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _state(ckpt: Path) -> dict:
    path = ckpt / "trainer_state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc}); the checkpoint is damaged, resume from an earlier one") from None


RUN_FILES = ("metrics.jsonl", "config.json", "reward.png", "tensorboard")  # besides checkpoints


class RunDir:
    """``run.out_dir`` claimed by one run: locked while it writes, refused when it holds another run."""

    def __init__(self, path: Path, run_id: str | None, lock_file=None):
        self.path, self.run_id, self._lock = path, run_id, lock_file
        self._created = False

    @classmethod
    def claim(cls, path: Path, *, resume: Path | None, overwrite: bool, rank: int = 0) -> "RunDir":
        """Rank 0 locks ``path`` and checks what it holds; other ranks only learn the run id."""
        run_id = _state(resume).get("run_id") if resume is not None else uuid.uuid4().hex[:12]  # None: older pte
        if rank != 0:
            return cls(path, run_id)
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        lock = (path / ".pte-lock").open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise ValueError(f"run.out_dir={path}: another pte train (pid {holder}) is writing there; wait for it, "
                             "or choose another run.out_dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        run = cls(path, run_id, lock)
        run._created = created
        held = [p.name for p in checkpoints(path)] + [n for n in RUN_FILES if (path / n).exists()]
        if resume is None and held:
            if not overwrite:
                run.release()
                raise ValueError(f"run.out_dir={path} already holds a run ({', '.join(held[:4])}); resume it with "
                                 f"--resume {path}, choose another run.out_dir, or set run.overwrite=true to replace it")
            for p in checkpoints(path):
                shutil.rmtree(p)
            for name in RUN_FILES:
                target = path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        return run

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines past ``step`` (written after the checkpoint a resume starts from)."""
        from pte.files import write_text_atomic

        log = self.path / "metrics.jsonl"
        if log.exists():
            lines = [line for line in log.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
            if len(kept) != len(lines):
                write_text_atomic(log, "".join(line + "\n" for line in kept))

    def release(self) -> None:
        """Unlock; a run that failed before writing anything leaves no trace (not even the directory it made)."""
        if self._lock is not None:
            (self.path / ".pte-lock").unlink(missing_ok=True)
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None
            if self._created and not any(self.path.iterdir()):
                self.path.rmdir()


def check_resumable(ckpt: Path, cfg: TrainConfig) -> None:
    """A resume must keep the cache and adapter the checkpoint was trained with: name every changed key."""
    saved = _state(ckpt).get("config", {})
    now = to_dict(cfg)
    changed = [f"{section}.{k}: {saved[section][k]!r} -> {now[section][k]!r}"
               for section in ("cache", "adapter") for k in now[section]
               if section in saved and k in saved[section] and _norm(saved[section][k]) != _norm(now[section][k])]
    if changed:
        raise ValueError(f"--resume {ckpt}: this run changes settings the checkpoint was trained with ("
                         + "; ".join(changed) + "); resume with the original values, or start a new run.out_dir")


def finished(ckpt: Path, cfg: TrainConfig) -> dict | None:
    """The last metrics of a run that already reached ``run.steps`` (a resume then has nothing to do), else None."""
    step = _state(ckpt)["step"]
    if step < cfg.run.steps:
        return None
    import sys

    print(f"[pte] {ckpt} is step {step}, and run.steps={cfg.run.steps}: the run is finished; raise run.steps "
          "to train further", file=sys.stderr)
    log = ckpt.parent / "metrics.jsonl"
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
    return next((m for m in reversed(lines) if m.get("step") == step), {"step": step})


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


def restore(ckpt: Path, adapter: Adapter, optimizer, gen: torch.Generator, dist: Dist) -> dict:
    """Load a checkpoint into the run's adapter, optimizer and RNGs; -> its trainer state."""
    from safetensors.torch import load_file

    meta = read_config(ckpt)
    if meta["adapter"] != asdict(adapter.config) | {"targets": list(adapter.config.targets)}:
        raise ValueError(f"{ckpt}: its adapter config {meta['adapter']} differs from this run's "
                         f"{asdict(adapter.config)}; resume with the run's own config")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state.get("world_size", 1) != dist.world:
        raise ValueError(f"{ckpt} was written by {state.get('world_size', 1)} processes, this run has {dist.world}; "
                         "resume with the same number of processes (each rank's RNG state is saved)")
    adapter.load_state_dict(read_tensors(ckpt))  # checksum, finiteness and truncation checked
    opt_state: dict = {"state": {}, "param_groups": state["param_groups"]}
    for key, value in load_file(str(ckpt / "optimizer.safetensors")).items():
        _, i, name = key.split(".", 2)
        opt_state["state"].setdefault(int(i), {})[name] = value
    optimizer.load_state_dict(opt_state)
    rng = load_file(str(ckpt / f"rng-rank{dist.rank}.safetensors"))
    torch.set_rng_state(rng["torch"])
    gen.set_state(rng["sampling"])
    py = json.loads((ckpt / f"rng-rank{dist.rank}.json").read_text())
    version, keys, gauss = py["python"]
    random.setstate((version, tuple(keys), gauss))
    name, pos, has_gauss, cached = py["numpy"]
    np.random.set_state((name, rng["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_num_threads(state["threads"])
    return state
