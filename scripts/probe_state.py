"""Is the answer in PTE's state? A linear probe on the per-layer thought states at the answer step.

Feeds the long-range task's worked solutions through the shipped base model under a sliding window with a fresh
(random-init) PTE adapter attached, takes every layer's accumulated evicted state ``sum_k S'_k`` (and the
normalised state ``S``) just before the answer digit, and fits a logistic regression from those numbers to the
answer. High held-out accuracy means the information survives in the state; whether the adapter learns to read
it is what ``pte check-mechanism`` measures. The "answer-dependent share" (the answer classes' mean states around
the grand mean, over the state's norm) is what an adapter, which reads the state without standardising it, has to
work with.

    python scripts/probe_state.py [--window 8] [--train 1500] [--test 500]
"""

import argparse

import torch

from pte.adapter import AdapterConfig, attach
from pte.lab.mechanism import worked_rows
from pte.models import load
from pte.lab.pretrain import SHIPPED_BASE, recipe_task
from pte.rollout import CacheSpec, Decoder, left_pad
from pte.thought import Summary


def states(model, tok, adapter, task, spec, n: int, seed: int):
    """-> (history [n, layers*n_g*r], state [n, layers*n_g*r], answers [n]) at the forward that predicts the answer."""
    examples = task.examples(n, seed=seed)
    rows = worked_rows(tok, task, examples, spec)
    ids, pmask = left_pad([r.prompt_ids for r in rows], tok.pad_token_id)
    completion = torch.tensor([r.completion_ids for r in rows])
    state = adapter.new_state(n)
    dec = Decoder(model, spec.build(model, (state,)))
    with torch.no_grad():
        dec.prefill(ids, pmask)
        for c in range(completion.shape[1] - 2):  # up to the token before the answer digit
            dec.step(completion[:, c:c + 1])
        hist = torch.cat([(h.read() if isinstance(h, Summary) else h).flatten(1) for h in state.history], 1)
        s = torch.cat([slot.state.flatten(1) for slot in adapter.slots], 1)
    adapter.clear_state()
    return hist, s, torch.tensor([int(e.answer) for e in examples])


def probe(x, y, xt, yt, steps: int = 500) -> tuple[float, float]:
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, xt = (x - mu) / sd, (xt - mu) / sd
    w = torch.zeros(x.shape[1], 10, requires_grad=True)
    b = torch.zeros(10, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 1e-3 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((x @ w + b).argmax(1) == y).float().mean().item(), ((xt @ w + b).argmax(1) == yt).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--train", type=int, default=1500)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--attention", default="linear", choices=["linear", "softmax"],
                    help="the state to probe: eq. 4's linear memory (what docs/log.md reports) or the softmax read")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load(str(SHIPPED_BASE))
    task, spec = recipe_task(SHIPPED_BASE), CacheSpec(window=args.window)
    adapter = attach(model, AdapterConfig(method="pte", rank=args.rank, n_global=args.rank,
                                          state_attention=args.attention))
    h, s, y = states(model, tok, adapter, task, spec, args.train, seed=1)
    ht, st, yt = states(model, tok, adapter, task, spec, args.test, seed=2)
    history = "evicted history sum_k S'_k" if args.attention == "linear" else "read of the evicted tokens alone"
    for name, x, xt in ((history, h, ht), ("state S", s, st)):
        train_acc, test_acc = probe(x, y, xt, yt)
        spread = (x.std(0).mean() / x.abs().mean()).item()
        # what an un-standardised read sees: the answer classes' mean states around the grand mean, per norm
        means = torch.stack([x[y == d].mean(0) for d in range(10) if (y == d).any()])
        share = ((means - x.mean(0)).norm(dim=1).mean() / x.norm(dim=1).mean()).item()
        print(f"{name}: probe accuracy train {train_acc:.3f}, held-out {test_acc:.3f} (chance 0.1); "
              f"spread across problems / magnitude {spread:.2f}; answer-dependent share of the norm {share:.3f}")


if __name__ == "__main__":
    main()
