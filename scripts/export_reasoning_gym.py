"""Export a seeded reasoning-gym set to JSONL (question, answer) for `pte eval --benchmark FILE`.

Why a file: it fixes the exact problems and prompt wording of a measurement, so it can be re-run and shared;
and it lets the question carry an answer-format instruction (the generators' own wording asks for none), which
keeps a verbose chat model's completions short enough to measure on a CPU. Scored by math-verify in `pte eval`.

  python scripts/export_reasoning_gym.py --name basic_arithmetic \
      --config '{"min_terms": 3, "max_terms": 4, "min_digits": 1, "max_digits": 2}' --n 200 --seed 1 \
      --out /work/models/data/basic_arith_200.jsonl
"""

import argparse
import json
from pathlib import Path

INSTRUCTION = " Show brief steps, then give the final answer as \\boxed{N}."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="a reasoning-gym generator, e.g. basic_arithmetic, chain_sum")
    ap.add_argument("--config", default="{}", help="the generator's options as JSON")
    ap.add_argument("--n", type=int, required=True, help="number of problems")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--instruction", default=INSTRUCTION, help="appended to every question ('' for none)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import reasoning_gym

    try:
        ds = reasoning_gym.create_dataset(args.name, size=args.n, seed=args.seed, **json.loads(args.config))
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"reasoning_gym {args.name!r} with config {args.config}: {exc}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for i, e in enumerate(ds):
            fh.write(json.dumps({"question": e["question"] + args.instruction, "answer": str(e["answer"]),
                                 "source": f"reasoning_gym:{args.name}(seed={args.seed})#{i}"}) + "\n")
    print(f"wrote {args.n} problems to {out}")


if __name__ == "__main__":
    main()
