"""How a base model spreads its answer where the window has evicted it: what GRPO can explore from.

Feeds the long-range task's worked solutions through the bounded cache up to the answer digit and prints, over the
ten digits: the mean entropy of the answer distribution (uniform: 2.30 nats), its mean top probability, the mean
probability of the right digit, and the chance that a group of G samples holds at least one right answer (the
groups whose advantages are not all zero).

    python scripts/answer_spread.py [--model pte/assets/long_range_base] [--window 8] [--n 128] [--group 8]
"""

from __future__ import annotations

import argparse

import torch

from pte.lab.mechanism import worked_rows
from pte.models import load
from pte.lab.pretrain import SHIPPED_BASE, recipe_task
from pte.rollout import CacheSpec, Decoder, left_pad


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(SHIPPED_BASE))
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--group", type=int, default=8)
    args = ap.parse_args()
    model, tok = load(args.model, dtype="float32")
    task, spec = recipe_task(args.model), CacheSpec(window=args.window)
    examples = task.examples(args.n, seed=7)
    rows = worked_rows(tok, task, examples, spec)
    ids, pmask = left_pad([r.prompt_ids for r in rows], tok.pad_token_id)
    completion = torch.tensor([r.completion_ids for r in rows])
    dec = Decoder(model, spec.build(model, ()))
    dec.prefill(ids, pmask)
    for c in range(completion.shape[1] - 2):  # up to the token before the answer digit
        logits = dec.step(completion[:, c:c + 1])
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    p = logits[:, -1].softmax(-1)[:, digits]
    p = p / p.sum(-1, keepdim=True)  # [n, 10]
    gold = p[torch.arange(args.n), torch.tensor([int(e.answer) for e in examples])]
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    print(f"{args.model}, window {args.window}, {args.n} problems: answer entropy {entropy.mean():.2f} nats "
          f"(uniform 2.30), top probability {p.max(-1).values.mean():.2f}, p(right) {gold.mean():.3f}, "
          f"P(a group of {args.group} holds a right answer) {(1 - (1 - gold) ** args.group).mean():.2f}")


if __name__ == "__main__":
    main()
