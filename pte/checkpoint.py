"""Training checkpoints: ``checkpoint-{step:06d}/`` with the adapter, the optimizer, every rank's RNG states and
the data position, written atomically (a temporary directory renamed at the end), so a run killed at any moment
resumes bit-exactly from its last complete checkpoint. Safetensors and JSON only: nothing is unpickled."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pte.adapter import Adapter, read_config
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
         data_position: int, dist: Dist) -> Path:
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
            "step": step, "data_position": data_position, "threads": torch.get_num_threads(), "world_size": dist.world,
            "param_groups": opt["param_groups"], "param_names": [n for n, _ in adapter.named_parameters()],
            "config": to_dict(cfg), "code_version": code_version(),
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(run_dir)[: -cfg.run.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


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
    adapter.load_state_dict(load_file(str(ckpt / "adapter.safetensors")))
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
