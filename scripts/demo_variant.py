"""One demo training run with changed settings, then its greedy accuracy at the demo's window: the sweeps behind
docs/log.md's "Sweeps" and "Seeds and learning rate".

It calls the demo's own ``train_method`` (one thread) and evaluates on the demo's 200 held-out problems, so a run
with no change repeats the demo's PTE row step for step. Settings are ``DemoConfig`` fields:

    python scripts/demo_variant.py --out outputs/variant-seed1 --set seed=1
    python scripts/demo_variant.py --out outputs/variant-lr --set lr=0.0015 --set seed=1
    python scripts/demo_variant.py --out outputs/variant-cos --set schedule=cosine
    python scripts/demo_variant.py --out outputs/variant-1pass --set num_iterations=1 --set steps=160
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from pte.adapter import load as load_adapter
from pte.config import load_dataclass
from pte.lab.demo import EVAL_SEED, DemoConfig, train_method
from pte.evaluate import evaluate
from pte.methods import METHODS
from pte.models import load
from pte.lab.pretrain import SHIPPED_BASE, recipe_task
from pte.rollout import CacheSpec, Sampling
from pte.checkpoint import latest as latest_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", default="pte", choices=[m for m, method in METHODS.items() if method.bounded_cache])
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a DemoConfig field")
    args = ap.parse_args()
    try:
        cfg = load_dataclass(DemoConfig, overrides=args.set)  # pte's one config loader, as `pte demo --set`
    except ValueError as exc:
        raise SystemExit(f"demo_variant: {exc}") from None
    changes = {item.split("=", 1)[0].strip(): getattr(cfg, item.split("=", 1)[0].strip()) for item in args.set}
    out = Path(args.out)
    model, tok = load(str(SHIPPED_BASE), dtype="float32")
    task = recipe_task(SHIPPED_BASE)
    examples = task.examples(cfg.eval_problems, seed=EVAL_SEED)
    max_new = len(tok(task.solution(examples[0]))["input_ids"]) + 4  # as the demo sizes it
    shutil.rmtree(out / f"train-{args.method}", ignore_errors=True)  # metrics.jsonl appends
    last = train_method(SHIPPED_BASE, args.method, cfg.window, cfg, out, max_new, threads=1, progress=True)
    adapter = load_adapter(model, latest_checkpoint(out / f"train-{args.method}"))
    result = evaluate(model, tok, examples, task.score, spec=CacheSpec(window=cfg.window, evict_fraction=cfg.evict_fraction),
                      sampling=Sampling(max_new_tokens=max_new, temperature=0, eos_token_ids=(tok.eos_token_id,)),
                      batch_size=100, adapter=adapter, progress=False, seed=cfg.seed)
    metrics = [json.loads(line) for line in (out / f"train-{args.method}" / "metrics.jsonl").read_text().splitlines()]
    summary = {"changes": changes, "train_seconds": last["train_seconds"], "greedy_accuracy": result.summary.pass1,
               "reward_per_10_steps": [round(sum(m["reward"] for m in metrics[i:i + 10]) / len(metrics[i:i + 10]), 2)
                                       for i in range(0, len(metrics), 10)]}
    (out / "variant.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
