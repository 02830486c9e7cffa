"""A refactor guard: short training runs over every method and state variant, fingerprinted, so that a change
meant to keep behaviour can be checked to keep it bit for bit.

Run it on the code before and after the change (a snapshot worktree for "before"), then compare:

    PYTHONPATH=/path/to/before python scripts/same_numbers.py --out before.json
    python scripts/same_numbers.py --out after.json
    python scripts/same_numbers.py --compare before.json after.json

Each run is a few GRPO steps of ``pte train`` on one thread; its fingerprint is the SHA-256 of the final
adapter tensors and the logged rewards and losses. Bit-for-bit equality holds only on one machine and thread
count, so compare files made on the same machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TINY = ["run.steps=3", "run.save_every=3", "grpo.group_size=4", "grpo.prompts_per_step=2",
        "sampling.max_new_tokens=12", "adapter.rank=4", "adapter.n_global=4", "cache.window=4"]
LONG = ["--config", "configs/long_range_pte.yaml", "run.steps=2", "run.save_every=2", "grpo.prompts_per_step=2"]
RUNS = {
    "tiny-pte-softmax": TINY,
    "tiny-pte-softmax-segment": TINY + ["grpo.state_grad=segment"],
    "tiny-pte-linear": TINY + ["adapter.state_attention=linear"],
    "tiny-pte-linear-recursive": TINY + ["adapter.state_attention=linear", "adapter.state_update=recursive",
                                         "grpo.state_grad=segment"],
    "tiny-pte-global0": TINY + ["adapter.ablation=global0"],
    "tiny-pte-global0-linear": TINY + ["adapter.ablation=global0", "adapter.state_attention=linear"],
    "tiny-pte-global-only": TINY + ["adapter.ablation=global_only"],
    "tiny-pte-rotated-learnable": TINY + ["adapter.key_rope=rotated", "adapter.state_scale=learnable"],
    "tiny-lora_c": TINY + ["adapter.method=lora_c"],
    "tiny-lora": TINY + ["adapter.method=lora", "cache.window=null"],
    "long-pte": LONG,
    "long-pte-linear": LONG + ["adapter.state_attention=linear"],
    "long-lora": LONG + ["adapter.method=lora", "cache.window=null"],
    "long-lora_c-kl": LONG + ["adapter.method=lora_c", "grpo.beta=0.05", "grpo.kl_reference=bounded"],
}


def fingerprint(out_dir: Path) -> dict:
    from safetensors.torch import load_file

    ckpt = sorted(out_dir.glob("checkpoint-*"))[-1]
    tensors = load_file(ckpt / "adapter.safetensors")
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(-1).numpy().tobytes())
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    logged = [{k: m.get(k) for k in ("step", "reward", "loss")} for m in metrics]
    return {"checkpoint": ckpt.name, "adapter_sha256": h.hexdigest(), "metrics": logged}


def run_all(names: list[str]) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = Path(tmp) / name
            cmd = [sys.executable, "-m", "pte", "train", "--set", f"run.out_dir={out}", "--set", "run.threads=1"]
            items = RUNS[name]
            if items[0] == "--config":
                cmd, items = cmd + items[:2], items[2:]
            for item in items:
                cmd += ["--set", item]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{name}: pte train failed:\n{proc.stderr[-2000:]}")
            results[name] = fingerprint(out)
            print(f"{name}: {results[name]['adapter_sha256'][:16]}", flush=True)
    return results


def compare(a: Path, b: Path) -> int:
    x, y = json.loads(a.read_text()), json.loads(b.read_text())
    differ = [k for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
    for k in sorted(set(x) | set(y)):
        print(f"{'same   ' if k not in differ else 'DIFFERS'} {k}")
    return 1 if differ else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the fingerprints here (JSON)")
    ap.add_argument("--only", default="", help="comma-separated run names (default: all)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two fingerprint files")
    args = ap.parse_args()
    if args.compare:
        raise SystemExit(compare(Path(args.compare[0]), Path(args.compare[1])))
    if not args.out:
        ap.error("--out is required (or --compare A B)")
    names = [n for n in args.only.split(",") if n] or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        ap.error(f"unknown run(s) {unknown}; choose from {list(RUNS)}")
    Path(args.out).write_text(json.dumps(run_all(names), indent=1) + "\n")


if __name__ == "__main__":
    main()
