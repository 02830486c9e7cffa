"""``pte train``: cache-aware GRPO (paper eq. 3) for LoRA, LoRA_c and PTE — one loop, the method is a config field.

Each step, read as the algorithm (:func:`train`):
  1. :func:`collect`: take ``prompts_per_step`` prompts; sample ``group_size`` completions of each under the
     method's cache policy (the rollout engine, no grad, PTE's state updated on every eviction); score them;
     group-normalised advantages;
  2. optionally (``grpo.beta > 0``), reference log-probs of the frozen base model (adapter disabled), over the
     full context or under the same cache policy (``grpo.kl_reference``), in a no-grad pass;
  3. :func:`grpo_step`: for ``num_iterations`` passes, replay the completions under the same cache policy with the
     clipped token-level loss (rollout log-probs as pi_old), backward once per segment; sum gradients over ranks;
     clip the gradient norm; Adam step;
  4. log (:class:`pte.runlog.RunLog`);
  5. every ``save_every`` steps write an atomic checkpoint (:mod:`pte.checkpoint`).
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pte import checkpoint
from pte.adapter import Adapter, attach
from pte.config import TrainConfig, to_dict
from pte.data import Example, load_examples, render_prompt
from pte.dist import Dist
from pte.grpo import TokenBatch, clipped_token_loss, group_advantages
from pte.memory import LiveTensorBytes
from pte.replay import replay
from pte.rollout import CacheSpec, RolloutRow, Sampling, right_pad, rollout
from pte.runlog import RunLog
from pte.tokens import pad_token_id, stop_token_ids


# -- set-up -----------------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, device: str | None = None):
    from pte.models import char_tokenizer, load, tiny_model

    device = device or cfg.model.device
    if cfg.model.name == "tiny-char":
        tok = char_tokenizer()
        # init std 0.2: with transformers' default 0.02 the final RMSNorm caps how far any hidden state can move
        # a logit (|h| * |w_token| ~ 8 * 0.16), so no adapter could make a token likely
        model = tiny_model("llama", vocab_size=len(tok), hidden=64, layers=2, heads=4, kv_heads=2,
                           seed=cfg.model.tiny_seed, max_positions=4096, init_std=0.2)
        return model.to(device=device, dtype=getattr(torch, cfg.model.dtype)), tok
    return load(cfg.model.name, dtype=cfg.model.dtype, device=device, attn=cfg.model.attn)


def build_examples(cfg: TrainConfig) -> tuple[list[Example], object | None]:
    if cfg.data.path:
        return load_examples(cfg.data.path, cfg.data.prompt_field, cfg.data.answer_field, cfg.data.answer_format,
                             cfg.data.limit), None
    from pte.tasks import make_task

    task = make_task(cfg.data.task, **cfg.data.task_options)
    return task.examples(cfg.data.limit or 10_000, seed=cfg.run.seed), task


def example_at(examples: list[Example], position: int, seed: int) -> Example:
    """The example at a global position: epoch e visits a permutation seeded by (seed, e)."""
    epoch, i = divmod(position, len(examples))
    return examples[_epoch_order(len(examples), seed, epoch)[i]]


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


class Rewarder:
    def __init__(self, cfg: TrainConfig, task):
        self.task, self.grader = task, None
        if cfg.reward.kind == "task" and task is None:
            raise ValueError("reward.kind=task needs data.task (a synthetic task); use reward.kind=math for data.path")
        if cfg.reward.kind == "math":
            from pte.rewards import MathGrader

            self.grader = MathGrader(workers=cfg.reward.workers, timeout=cfg.reward.timeout)

    def __call__(self, completions: list[str], examples: list[Example]) -> list[float]:
        if self.grader is not None:
            return self.grader.grade(completions, [ex.answer for ex in examples])
        return [self.task.score(c, ex) for c, ex in zip(completions, examples)]

    def failures(self) -> dict:
        if self.grader is None:
            return {}
        return {"grade_timeouts": self.grader.stats.timeouts, "grade_errors": self.grader.stats.errors}

    def close(self):
        if self.grader is not None:
            self.grader.close()


@dataclass
class Run:
    """Everything a step uses, built once by :func:`setup`."""

    cfg: TrainConfig
    model: torch.nn.Module
    tok: object
    adapter: Adapter
    optimizer: torch.optim.Optimizer
    dist: Dist
    gen: torch.Generator  # the sampling generator, on the model's device; ranks sample differently
    examples: list[Example]
    rewarder: Rewarder
    sampling: Sampling
    pad: int

    @property
    def device(self) -> torch.device:
        return self.dist.device


def setup(cfg: TrainConfig) -> Run:
    torch.set_num_threads(cfg.run.threads)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    examples, task = build_examples(cfg)  # data errors surface before the model loads
    dist = Dist(cfg.model.device)
    model, tok = build_model(cfg, str(dist.device))
    adapter = attach(model, cfg.adapter)
    optimizer = torch.optim.Adam(adapter.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    gen = torch.Generator(device=dist.device).manual_seed(cfg.run.seed + 1000 * dist.rank)
    stops = stop_token_ids(model, tok)
    sampling = Sampling(max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
                        top_p=cfg.sampling.top_p, eos_token_ids=stops, stop_strings=tuple(cfg.sampling.stop))
    return Run(cfg, model, tok, adapter, optimizer, dist, gen, examples, Rewarder(cfg, task), sampling,
               pad_token_id(tok, stops))


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of 0-based ``step``: constant, or a cosine from optim.lr down to
    optim.lr * final_lr_fraction at the last step."""
    if cfg.optim.schedule == "constant" or cfg.run.steps == 1:
        return cfg.optim.lr
    progress = step / (cfg.run.steps - 1)
    low = cfg.optim.lr * cfg.optim.final_lr_fraction
    return low + (cfg.optim.lr - low) * 0.5 * (1 + math.cos(math.pi * progress))


# -- one step ---------------------------------------------------------------------------------------------------
class _NoMeter:
    peak = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


@dataclass
class Trajectory:
    """One step's rollouts, scored: what the GRPO update needs. Tensors live on the model's device."""

    rows: list[RolloutRow]  # prompts_per_step * group_size, grouped by prompt
    spec: CacheSpec
    rewards: torch.Tensor  # [rows]
    advantages: torch.Tensor  # [rows, 1]
    batch: TokenBatch  # the replayed rows' per-token quantities; normaliser: every token of every rank's batch
    kept: list[RolloutRow]  # the rows replayed (see collect)
    rollout_tokens_per_s: float
    peak_bytes: dict = field(default_factory=dict)


def collect(run: Run, batch: list[Example], meter=_NoMeter) -> Trajectory:
    """Steps 1-2: sample ``group_size`` completions of each prompt under the cache policy, score them, and fix
    every per-token quantity of the update before any replay."""
    cfg, G = run.cfg, run.cfg.grpo.group_size
    prompt_ids = [render_prompt(run.tok, ex.prompt, cfg.data.template) for ex in batch]
    window = cfg.cache.window if cfg.cache.window != "auto" else max(len(p) for p in prompt_ids)
    spec = CacheSpec(window=window, evict_fraction=cfg.cache.evict_fraction, policy=cfg.cache.policy)
    with meter() as rollout_mem:
        res = rollout(run.model, [p for p in prompt_ids for _ in range(G)], run.sampling, spec, pad_token_id=run.pad,
                      tokenizer=run.tok, generator=run.gen, adapter=run.adapter)
    texts = [run.tok.decode(r.completion_ids, skip_special_tokens=True) for r in res.rows]
    rewards = torch.tensor(run.rewarder(texts, [ex for ex in batch for _ in range(G)]), device=run.device)
    adv = group_advantages(rewards.view(-1, G), cfg.grpo.adv_eps).view(-1, 1)
    old, mask = right_pad([r.logprobs for r in res.rows], 0.0, torch.float32, run.device)
    ref = None
    with meter() as ref_mem:
        if cfg.grpo.beta > 0:
            ref = reference_logprobs(run, res.rows, spec)
    # a row of an all-equal group has advantage 0: without KL its loss and gradient are exactly 0, so the replay
    # skips it (the normaliser still counts every token of the batch, so the loss is unchanged)
    keep = torch.arange(len(res.rows), device=run.device) if cfg.grpo.beta > 0 else adv.view(-1).nonzero().view(-1)
    tb = TokenBatch(advantages=adv[keep], old_logp=old[keep], mask=mask[keep],
                    ref_logp=None if ref is None else ref[keep], normalizer=float(run.dist.sum(mask.sum().double())))
    return Trajectory(res.rows, spec, rewards, adv, tb, [res.rows[i] for i in keep.tolist()], res.tokens_per_s,
                      {"rollout": rollout_mem.peak, "reference": ref_mem.peak})


def reference_logprobs(run: Run, rows: list[RolloutRow], spec: CacheSpec) -> torch.Tensor:
    """The frozen base model's log-probs (adapter disabled, no second copy of the weights), no grad."""
    ref_spec = CacheSpec(window=None) if run.cfg.grpo.kl_reference == "full" else spec
    full_rows = rows if ref_spec.window == spec.window else [
        RolloutRow(r.prompt_ids, r.completion_ids, r.logprobs, None, [], r.finish_reason) for r in rows]
    with torch.no_grad(), run.adapter.disabled():
        return replay(run.model, full_rows, ref_spec, temperature=run.cfg.sampling.temperature,
                      pad_token_id=run.pad).logprobs


def grpo_step(run: Run, traj: Trajectory, meter=_NoMeter) -> dict:
    """Steps 3: ``num_iterations`` clipped passes over the kept rows, each ending in one Adam step."""
    cfg, tb, params = run.cfg, traj.batch, run.adapter.parameters()
    sums = {"clipped_tokens": 0.0, "tokens": 0.0, "kl_sum": 0.0}

    def loss_fn(logp, cols):
        loss, s = clipped_token_loss(logp, tb, cols, clip_low=cfg.grpo.clip_low, clip_high=cfg.grpo.clip_high,
                                     beta=cfg.grpo.beta)
        for k, v in s.items():
            sums[k] += v
        return loss

    out = {"logprob_mismatch": None, "loss": 0.0, "segments": 0}  # stay so when nothing is replayed
    with meter() as replay_mem:
        for it in range(cfg.grpo.num_iterations):
            run.optimizer.zero_grad(set_to_none=True)
            if not traj.kept:  # the optimizer steps on zero gradients, as it would after computing them
                for p in params:
                    p.grad = torch.zeros_like(p)
            else:
                rep = replay(run.model, traj.kept, traj.spec, adapter=run.adapter, temperature=cfg.sampling.temperature,
                             loss_fn=loss_fn, state_grad=cfg.grpo.state_grad, pad_token_id=run.pad)
                if it == 0:
                    width = rep.logprobs.shape[1]
                    gap = (rep.logprobs - tb.old_logp[:, :width]).abs() * tb.mask[:, :width]
                    out.update(logprob_mismatch=float(gap.max()), loss=rep.loss, segments=rep.segments)
            run.dist.sum_grads(params)
            out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm))
            run.optimizer.step()
    out["clip_fraction"] = sums["clipped_tokens"] / max(sums["tokens"], 1.0)
    out["kl"] = sums["kl_sum"] / max(sums["tokens"], 1.0) if cfg.grpo.beta > 0 else 0.0
    out["peak_bytes_replay"] = replay_mem.peak
    return out


def step_metrics(run: Run, traj: Trajectory, stats: dict, lr: float) -> dict:
    """Step 4's record: what was sampled, what the update did, and (on measured steps) the memory of each phase."""
    rewards = traj.rewards
    m = {
        "reward": float(rewards.mean()), "reward_max": float(rewards.max()),
        "accuracy": float((rewards >= 1.0).float().mean()), "loss": stats["loss"], "grad_norm": stats["grad_norm"],
        "clip_fraction": stats["clip_fraction"], "kl": stats["kl"], "logprob_mismatch": stats["logprob_mismatch"],
        "response_length": float(np.mean([len(r.completion_ids) for r in traj.rows])),
        "evictions_per_sample": float(np.mean([len(r.eviction_steps) for r in traj.rows])),
        "replayed_rows": len(traj.kept), "lr": lr, "window": traj.spec.window,
        "rollout_tokens_per_s": traj.rollout_tokens_per_s, "peak_bytes_rollout": traj.peak_bytes["rollout"],
        "peak_bytes_reference": traj.peak_bytes["reference"], "peak_bytes_replay": stats["peak_bytes_replay"],
        **run.rewarder.failures(),
    }
    dist = run.dist
    if dist.world > 1:
        checksums = dist.gather_floats(float(sum(p.double().sum() for p in run.adapter.parameters())))
        m["reward"] = float(dist.sum(rewards.sum().double()) / (len(rewards) * dist.world))
        m["ranks_identical"] = len(set(checksums)) == 1
        m["segments_per_rank"] = dist.gather_floats(float(stats["segments"]))
        m["world_size"] = dist.world
    return m


# -- the loop -------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, resume: str | None = None, progress: bool = True) -> dict:
    cfg.validate()
    run = setup(cfg)
    run_dir, P, dist = Path(cfg.run.out_dir), cfg.grpo.prompts_per_step, run.dist
    start, position = 0, 0
    if resume:
        state = checkpoint.restore(checkpoint.latest(Path(resume)), run.adapter, run.optimizer, run.gen, dist)
        start, position = state["step"], state["data_position"]
    if dist.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg) | {"code_version": checkpoint.code_version(),
                                                                          "world_size": dist.world}, indent=1))
    log, last = RunLog(run_dir, cfg.run.steps, start, enabled=dist.rank == 0, progress=progress), {}
    try:
        for step in range(start, cfg.run.steps):
            t0 = time.perf_counter()
            measured = step == start or (step + 1) % cfg.run.memory_every == 0 or step + 1 == cfg.run.steps
            meter = LiveTensorBytes if measured else _NoMeter
            lr = learning_rate(cfg, step)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            batch = [example_at(run.examples, position + dist.rank * P + i, cfg.run.seed) for i in range(P)]
            position += P * dist.world
            traj = collect(run, batch, meter)
            stats = grpo_step(run, traj, meter)
            last = {"step": step + 1} | step_metrics(run, traj, stats, lr) | {"seconds": time.perf_counter() - t0}
            log.write(last)
            if (step + 1) % cfg.run.save_every == 0 or step + 1 == cfg.run.steps:
                checkpoint.save(run_dir, step + 1, cfg, run.adapter, run.optimizer, run.gen, position, dist)
    finally:
        log.close()
        run.rewarder.close()
    log.plot()
    dist.close()
    return last
