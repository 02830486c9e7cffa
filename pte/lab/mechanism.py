"""``pte check-mechanism``: can an adapter carry what the window drops? The diagnostic before RL.

Teacher-forced training (supervised, on the long-range task's worked solutions) of LoRA_c, PTE and PTE without
the evicted part of its state (``ablation=global_only``) — optionally PTE with eq. 4's linear state
(``pte_linear``) — each under the same bounded cache, the same steps, batch, learning rate, clipping and loss,
through the same segment-by-segment replay GRPO uses (:func:`pte.replay.replay`, truncated). Then greedy answer
accuracy under that cache on held-out problems.

Reading it: the answer was written ``filler`` tokens before it is needed, more than ``layers x window``, so
neither the window nor a relay through the layers reaches it. LoRA_c's static update cannot recover it (chance,
10%); PTE's state is built from the evicted keys/values, so if it carries the answer PTE wins; without the
evicted part (the ablation) PTE is a re-parametrised static adapter and must fall back to chance. If PTE cannot
win here, GRPO, whose signal is far weaker than teacher forcing, will not either.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from pte.adapter import AdapterConfig, attach
from pte.cache import sliding_eviction_steps
from pte.methods import METHODS
from pte.models import load
from pte.lab.pretrain import SHIPPED_BASE, recipe_task, task_accuracy
from pte.replay import replay
from pte.rollout import CacheSpec, RolloutRow
from pte.tasks.long_range import LongRange

VARIANTS = {  # name -> adapter config overrides
    "lora_c": dict(method="lora_c"),
    "pte": dict(method="pte"),
    "pte_no_evicted": dict(method="pte", ablation="global_only"),
    "pte_linear": dict(method="pte", state_attention="linear"),  # eq. 4 as printed (no softmax)
}
DEFAULT_VARIANTS = ["lora_c", "pte", "pte_no_evicted"]
LOSSES = ("thought+answer", "thought", "answer")
HELD_OUT_SEED = 20_000_003  # neither pre-training (1..steps) nor this check's training seeds reach it


@dataclass
class MechanismConfig:
    base: str = str(SHIPPED_BASE)
    window: int = 8
    evict_fraction: float = 0.25
    rank: int = 8
    n_global: int = 8
    steps: int = 120
    batch: int = 128
    lr: float = 3e-3
    truncate: bool = True
    state_grad: str = "history"  # | "segment": see pte.history
    # thought: mean NLL over the worked thought (the answer is 1 of ~63 tokens) | answer: the answer digit only
    # (the rest of the thought drifts, so generation breaks) | thought+answer: the sum of the two
    loss: str = "thought+answer"
    max_grad_norm: float = 1.0  # 0: no clipping
    key_rope: str = "unrotate"
    eval_problems: int = 200
    seed: int = 0
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: choose one of {list(LOSSES)}")
        for v in self.variants:
            if v not in VARIANTS:
                raise ValueError(f"unknown variant {v!r}; choose from {list(VARIANTS)}")


def worked_rows(tok, task: LongRange, examples, spec: CacheSpec) -> list[RolloutRow]:
    """The worked solutions as rollout rows: the evictions a sliding window makes while feeding them."""
    rows = []
    for e in examples:
        completion = tok(task.solution(e))["input_ids"] + [tok.eos_token_id]
        steps = sliding_eviction_steps(len(completion) - 1, spec.window, spec.evict_fraction)
        rows.append(RolloutRow(tok(e.prompt)["input_ids"], completion, [], spec.window, steps, "eos"))
    return rows


def train_variant(model, tok, task: LongRange, cfg: MechanismConfig, variant: str, log=print) -> dict:
    spec = CacheSpec(window=cfg.window, evict_fraction=cfg.evict_fraction)
    rank = cfg.rank
    stateful = METHODS[VARIANTS[variant]["method"]].stateful
    pte_only = dict(key_rope=cfg.key_rope) if stateful else {}
    adapter = attach(model, AdapterConfig(rank=rank, n_global=cfg.n_global if stateful else rank,
                                          seed=cfg.seed, **VARIANTS[variant], **pte_only))
    try:
        opt = torch.optim.Adam(adapter.parameters(), lr=cfg.lr)
        start = time.perf_counter()
        p_gold = float("nan")
        for step in range(cfg.steps):
            rows = worked_rows(tok, task, task.examples(cfg.batch, seed=cfg.seed * 7919 + 100 + step), spec)
            n_tokens = sum(len(r.completion_ids) for r in rows)

            answer = len(rows[0].completion_ids) - 2  # the answer digit (before EOS); rows have one length

            def nll(logp, _rows, cols):  # logp [batch, cols] (the replay is not micro-batched) -> this segment's loss
                loss = logp.sum() * 0.0
                if cfg.loss != "answer":
                    loss = loss - logp.sum() / n_tokens
                if cfg.loss != "thought" and cols.start <= answer < cols.stop:
                    loss = loss - logp[:, answer - cols.start].mean()
                return loss

            opt.zero_grad(set_to_none=True)
            res = replay(model, rows, spec, adapter=adapter, loss_fn=nll, truncate=cfg.truncate, state_grad=cfg.state_grad,
                         pad_token_id=tok.pad_token_id)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(adapter.parameters(), cfg.max_grad_norm)
            opt.step()
            p_gold = res.logprobs[:, -2].exp().mean().item()  # the answer digit (before EOS), teacher-forced
            if step % 10 == 0 or step == cfg.steps - 1:
                log(f"{variant}: step {step + 1}/{cfg.steps}  loss ({cfg.loss}) {res.loss:.4f}  "
                    f"answer p(gold) {p_gold:.2f}  ({time.perf_counter() - start:.0f}s)")
        seconds = time.perf_counter() - start
        acc = task_accuracy(model, tok, task, cfg.eval_problems, HELD_OUT_SEED, cfg.window, adapter=adapter,
                            evict_fraction=cfg.evict_fraction)
        return {"variant": variant, "accuracy": acc, "final_p_gold": round(p_gold, 4), "train_seconds": round(seconds, 1)}
    finally:
        adapter.detach()


def check_mechanism(cfg: MechanismConfig, log=print) -> dict:
    cfg.validate()
    model, tok = load(cfg.base, dtype="float32")
    task = recipe_task(cfg.base)
    task.check_difficulty(model.config.num_hidden_layers, cfg.window)
    start = time.perf_counter()
    results = {"config": asdict(cfg),
               "base_full": task_accuracy(model, tok, task, cfg.eval_problems, HELD_OUT_SEED, None),
               "base_window": task_accuracy(model, tok, task, cfg.eval_problems, HELD_OUT_SEED, cfg.window,
                                            evict_fraction=cfg.evict_fraction)}
    log(f"base: full cache {results['base_full']:.3f}, window {cfg.window}: {results['base_window']:.3f}")
    results["variants"] = []
    for v in cfg.variants:
        torch.manual_seed(cfg.seed)
        r = train_variant(model, tok, task, cfg, v, log)
        log(f"{v}: answer accuracy under window {cfg.window}: {r['accuracy']:.3f} (trained {r['train_seconds']}s)")
        results["variants"].append(r)
    results["seconds"] = round(time.perf_counter() - start, 1)
    return results

