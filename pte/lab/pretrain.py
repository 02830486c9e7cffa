"""``pte pretrain-task``: the tiny base reasoning model of the demo, trained from scratch on the long-range task.

Supervised training on the task's worked solutions (teacher forcing, full attention, loss on the thought and the
answer only) of a small Llama built in code, with the task's tokenizer (:func:`pte.tasks.long_range.tokenizer`).
The result is a ``save_pretrained`` directory (model + tokenizer) plus ``recipe.json`` (this config, the command,
the wall time and the measured accuracy), so the demo needs no download. pte ships one, built by the default
command, in ``pte/assets/long_range_base``.

Init std 0.1 rather than transformers' 0.02: at width 128 the smaller init left every attention pattern flat
(docs/design.md, "The base model").
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pte.cache import window_visibility
from pte.models import tiny_model
from pte.tasks.long_range import MAX_COUNTDOWN, LongRange, tokenizer

COUNT_DRAWS = ("log-uniform", "uniform")
SHIPPED_BASE = Path(__file__).resolve().parents[1] / "assets" / "long_range_base"


@dataclass
class PretrainConfig:
    out: str = "outputs/long_range_base"
    hops: int = 6
    filler: int = 40
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    steps: int = 400
    batch: int = 128
    lr: float = 3e-3
    init_std: float = 0.1
    seed: int = 0
    eval_problems: int = 500  # held-out, greedy, full cache
    # calibration: this share of each batch is trained under the sliding window (the bounded cache's exact mask),
    # where the answer is out of reach, so the model learns to spread its probability there instead of guessing
    # one digit with confidence (a confident guess gives GRPO no spread within a group, so nothing to learn from)
    window_fraction: float = 0.0
    window: int = 8
    evict_fraction: float = 0.25
    init: str | None = None  # continue from this base model directory instead of a random init
    # the distance variant (pte.tasks.long_range, Fig. 5): "LO-HI" counted filler blocks, one count drawn per step
    # (a batch shares it, so its rows keep one length); replaces filler. count_draw "log-uniform" draws short
    # counts, where RL trains, often and the long ones at a fraction of a uniform draw's cost
    countdown: str | None = None
    block: int = 4
    # "uniform" instead: every count as often, so a count is not learnt as its own fact (a log-uniform draw from 1-5
    # left the rare 5 starting its countdown at the wrong counter: docs/ablations.md, "Reasoning length")
    count_draw: str = "log-uniform"

    def validate(self) -> None:
        if not 0 <= self.window_fraction <= 1:
            raise ValueError(f"window_fraction={self.window_fraction}: must lie in [0, 1]")
        if self.count_draw not in COUNT_DRAWS:
            raise ValueError(f"count_draw={self.count_draw!r}: choose one of {', '.join(COUNT_DRAWS)}")
        self.countdown_range()

    def draw_count(self, rng: random.Random) -> int | None:
        """The distance variant's count for one step (None for the plain task)."""
        span = self.countdown_range()
        if span is None:
            return None
        if self.count_draw == "uniform":
            return rng.randint(*span)
        return round(math.exp(rng.uniform(*map(math.log, span))))

    def countdown_range(self) -> tuple[int, int] | None:
        if self.countdown is None:
            return None
        try:
            lo, hi = (int(x) for x in str(self.countdown).split("-"))
        except ValueError:
            raise ValueError(f"countdown={self.countdown!r}: expected LO-HI, e.g. countdown=1-80") from None
        if not 1 <= lo <= hi <= MAX_COUNTDOWN:
            raise ValueError(f"countdown={self.countdown!r}: need 1 <= LO <= HI <= {MAX_COUNTDOWN}")
        return lo, hi

    def task(self, countdown: int | None = None) -> LongRange:
        return LongRange(hops=self.hops, filler=self.filler, countdown=countdown, block=self.block)

    def eval_tasks(self) -> list[LongRange]:
        """The plain task, or the distance variant at the shortest, middle and longest count trained on."""
        span = self.countdown_range()
        return [self.task()] if span is None else [self.task(c) for c in sorted({span[0], sum(span) // 2, span[1]})]


def encode(tok, task: LongRange, examples) -> tuple[torch.Tensor, int]:
    """-> ids [n, L] (question + worked thought + EOS; every row has the same length) and the question length."""
    prompts = [tok(e.prompt)["input_ids"] for e in examples]
    rows = [p + tok(task.solution(e))["input_ids"] + [tok.eos_token_id] for p, e in zip(prompts, examples)]
    if len({len(r) for r in rows}) != 1 or len({len(p) for p in prompts}) != 1:
        raise AssertionError("long-range rows are expected to have one length")
    return torch.tensor(rows), len(prompts[0])


def pretrain(cfg: PretrainConfig, log=print) -> Path:
    cfg.validate()
    torch.manual_seed(cfg.seed)
    span = cfg.countdown_range()
    tok = tokenizer(countdown=span is not None)
    counts = random.Random(cfg.seed)  # the distance variant's count per step
    if cfg.init:
        from pte.models import load

        model = extend_vocabulary(load(cfg.init, dtype="float32")[0], len(tok)).train()
    else:
        model = tiny_model("llama", vocab_size=len(tok), hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                           kv_heads=cfg.heads, seed=cfg.seed, max_positions=1024, init_std=cfg.init_std).train()
    n_windowed = round(cfg.batch * cfg.window_fraction)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    # torch's OneCycleLR divides by zero when pct_start * total_steps == 1 (steps=10 at 0.1)
    pct_start = 0.1 if abs(0.1 * cfg.steps - 1) > 1e-9 else 0.15
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=pct_start)
    start = time.perf_counter()
    for step in range(cfg.steps):
        # training problems: seeds 1..steps (+ the run seed); evaluation uses a seed no step reaches
        task = cfg.task(cfg.draw_count(counts))
        ids, q = encode(tok, task, task.examples(cfg.batch, seed=1 + step + cfg.seed * 1_000_003))
        inputs = ids[:, :-1]
        if n_windowed:
            mask = window_visibility(q, inputs.shape[1] - q, cfg.window, cfg.evict_fraction)
            windowed = model(input_ids=inputs[:n_windowed], attention_mask=mask.expand(n_windowed, 1, -1, -1)).logits
            full = model(input_ids=inputs[n_windowed:]).logits if n_windowed < cfg.batch else windowed[:0]
            logits = torch.cat([windowed, full])[:, q - 1:]  # predictions of the thought + EOS
        else:
            logits = model(input_ids=inputs).logits[:, q - 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, q:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == cfg.steps - 1:
            answer_acc = (logits[n_windowed:, -2].argmax(-1) == ids[n_windowed:, -2]).float().mean().item()
            log(f"step {step + 1}/{cfg.steps}  loss {loss.item():.4f}  teacher-forced answer acc (full cache) {answer_acc:.2f}  "
                f"({time.perf_counter() - start:.0f}s)")
    seconds = time.perf_counter() - start
    model.eval()
    accs, window_accs = {}, {}
    for task in cfg.eval_tasks():
        where = "" if task.countdown is None else f", countdown {task.countdown}"
        accs[task.countdown] = task_accuracy(model, tok, task, cfg.eval_problems, seed=EVAL_SEED, window=None)
        log(f"held-out greedy accuracy, full cache{where}: {accs[task.countdown]:.3f} ({cfg.eval_problems} problems)")
        if n_windowed:
            window_accs[task.countdown] = task_accuracy(model, tok, task, cfg.eval_problems, seed=EVAL_SEED,
                                                        window=cfg.window)
            log(f"held-out greedy accuracy, window {cfg.window}{where}: {window_accs[task.countdown]:.3f}")
    plain = span is None  # one number each; the distance variant's by count
    recipe = {"config": asdict(cfg), "train_seconds": round(seconds, 1),
              "full_cache_accuracy": accs[None] if plain else accs,
              "window_accuracy": (window_accs[None] if plain else window_accs) if n_windowed else None,
              "command": f"pte pretrain-task --out {cfg.out} --steps {cfg.steps} --seed {cfg.seed}"
                         + (f" --batch {cfg.batch}" if cfg.batch != PretrainConfig.batch else "")
                         + (f" --lr {cfg.lr}" if cfg.lr != PretrainConfig.lr else "")
                         + (f" --window-fraction {cfg.window_fraction} --window {cfg.window}" if n_windowed else "")
                         + (f" --init {cfg.init}" if cfg.init else "")
                         + (f" --set countdown={cfg.countdown} --set block={cfg.block}" if span else "")
                         + (f" --set count_draw={cfg.count_draw}" if cfg.count_draw != PretrainConfig.count_draw else ""),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    if cfg.init and (Path(cfg.init) / "recipe.json").exists():
        recipe["init_recipe"] = json.loads((Path(cfg.init) / "recipe.json").read_text())  # how the start was made
    return save(model, tok, recipe, Path(cfg.out))


def extend_vocabulary(model, vocab_size: int):
    """Grow the embedding and output rows to ``vocab_size`` (e.g. a plain base continued on the distance variant,
    whose counters come after every other id), so every existing token keeps its embedding and logit."""
    if vocab_size < model.config.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} tokens, fewer than the model's {model.config.vocab_size}: "
                         "continue from a base model trained with the same task variant")
    if vocab_size > model.config.vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=True)
    return model


EVAL_SEED = 10_000_019  # held-out problems (training seeds are 1..steps)


def recipe_task(base: str | Path) -> LongRange:
    """The task a base model was pre-trained on (its ``recipe.json``), so later stages use the same filler; for the
    distance variant, at the shortest count it was trained on."""
    recipe = Path(base) / "recipe.json"
    if not recipe.exists():
        return LongRange()
    cfg = json.loads(recipe.read_text())["config"]
    known = {k: cfg[k] for k in ("hops", "filler", "block") if k in cfg}
    span = PretrainConfig(countdown=cfg.get("countdown")).countdown_range()
    return LongRange(**known, countdown=None if span is None else span[0])


def save(model, tok, recipe: dict, out: Path) -> Path:
    """Atomically: a temporary sibling directory renamed over ``out``."""
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


@torch.no_grad()
def task_accuracy(model, tok, task: LongRange, n: int, seed: int, window: int | None, batch: int = 100,
                  evict_fraction: float = 0.25, adapter=None) -> float:
    """Greedy answer accuracy (``pte eval``'s pass@1) on ``n`` generated problems under a window (``None``: full)."""
    from pte.evaluate import evaluate
    from pte.rollout import CacheSpec, Sampling

    examples = task.examples(n, seed=seed)
    max_new = len(tok(task.solution(examples[0]))["input_ids"]) + 2
    result = evaluate(model, tok, examples, task.score, spec=CacheSpec(window=window, evict_fraction=evict_fraction),
                      sampling=Sampling(max_new_tokens=max_new, temperature=0, eos_token_ids=(tok.eos_token_id,)),
                      batch_size=batch, adapter=adapter, progress=False)
    return result.summary.pass1
