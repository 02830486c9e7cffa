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
import signal
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
from pte.grpo import TokenBatch, clipped_token_loss, group_advantages, soft_overlong_penalty, spread
from pte.memory import LiveTensorBytes
from pte.models import check_positions
from pte.replay import replay
from pte.rollout import CacheSpec, RolloutRow, Sampling, right_pad, rollout
from pte.runlog import RunLog
from pte.signals import Preempted, StopSignals
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


def setup(cfg: TrainConfig, dist: Dist | None = None, data: tuple | None = None) -> Run:
    torch.set_num_threads(cfg.run.threads)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    examples, task = data or build_examples(cfg)  # data errors surface before the model loads
    dist = dist or Dist(cfg.model.device)
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
    """The learning rate of 0-based ``step`` (a function of the step alone, so resume continues it): a linear
    warm-up over optim.warmup_steps, then constant, or a cosine from optim.lr down to
    optim.lr * final_lr_fraction at the last step."""
    warm = cfg.optim.warmup_steps
    if step < warm:
        return cfg.optim.lr * (step + 1) / warm
    if cfg.optim.schedule == "constant" or cfg.run.steps - warm <= 1:
        return cfg.optim.lr
    progress = (step - warm) / (cfg.run.steps - warm - 1)
    low = cfg.optim.lr * cfg.optim.final_lr_fraction
    return low + (cfg.optim.lr - low) * 0.5 * (1 + math.cos(math.pi * progress))


# -- one step ---------------------------------------------------------------------------------------------------
class _NoMeter:
    peak = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class PromptStream:
    """The training prompts in order. A draw gives each rank ``n`` prompts: rank r's i-th is the example at global
    position ``position + r * n + i``; every rank draws the same number of times, so one saved position resumes
    them all. ``signal_rate`` (the last step's share of drawn groups that carried a signal, over all ranks) is
    saved with the position: ``grpo.adaptive_draws`` sizes its rollouts by it."""

    def __init__(self, examples: list[Example], n: int, seed: int, dist: Dist, position: int = 0,
                 signal_rate: float | None = None):
        self.examples, self.n, self.seed, self.dist, self.position = examples, n, seed, dist, position
        self.signal_rate = signal_rate

    def draw(self, times: int = 1) -> list[Example]:
        """``times`` consecutive draws, concatenated: the same prompts as ``times`` calls."""
        batch = []
        for _ in range(times):
            batch += [example_at(self.examples, self.position + self.dist.rank * self.n + i, self.seed)
                      for i in range(self.n)]
            self.position += self.n * self.dist.world
        return batch


@dataclass
class Trajectory:
    """One step's rollouts, scored: what the GRPO update needs. Tensors live on the model's device."""

    rows: list[RolloutRow]  # groups of group_size rows, one group per prompt
    spec: CacheSpec
    rewards: torch.Tensor  # [rows]
    advantages: torch.Tensor  # [rows, 1]
    batch: TokenBatch  # the replayed rows' per-token quantities; normaliser: every loss token of every rank
    kept: list[RolloutRow]  # the rows replayed: a nonzero advantage (all rows when beta > 0), not masked out
    rollout_logp: torch.Tensor  # [kept, T] the sampling log-probs of the kept rows
    stats: dict = field(default_factory=dict)


def draws_wanted(run: Run, rate: float | None, need: int, left: int) -> int:
    """How many draws the next rollout samples at once. One, unless ``grpo.adaptive_draws``: then as many as the
    signal ``rate`` (share of drawn groups with a signal) says will yield ``need`` more such groups, within the
    ``left`` draws of the step's budget (all of them at rate 0). Every rank samples as many as the neediest."""
    if not run.cfg.grpo.adaptive_draws or rate is None:
        return 1
    n = left if rate <= 0 else min(left, max(1, math.ceil(need / (rate * run.cfg.grpo.prompts_per_step))))
    return int(max(run.dist.gather_floats(float(n))))


def _signal_rate(run: Run, signal: int, drawn: int) -> float:
    counts = run.dist.sum(torch.tensor([signal, drawn], dtype=torch.float64))
    return float(counts[0] / counts[1])


def sample_groups(run: Run, prompts: PromptStream, meter=_NoMeter) -> tuple[list[RolloutRow], torch.Tensor, CacheSpec, dict]:
    """Step 1's sampling: ``group_size`` completions of each drawn prompt under the cache policy, scored ->
    rows, rewards [groups, G]. With ``grpo.dynamic_sampling`` groups whose rewards do not spread are dropped and
    fresh prompts drawn, at most ``max_sampling_rounds`` draws (every rank draws as often as the neediest); the
    first ``prompts_per_step`` groups with a signal, in draw order, are kept. ``grpo.adaptive_draws`` sizes the
    first rollout by the last step's signal rate and each refill by this step's so far; it changes how many prompts
    are drawn, never which groups are kept."""
    cfg, G, P = run.cfg, run.cfg.grpo.group_size, run.cfg.grpo.prompts_per_step
    rows, rewards, spec, drawn, rounds, seconds, tokens, total = [], [], None, 0, 0, 0.0, 0, 0.0
    rollouts, signal, rate = 0, 0, prompts.signal_rate
    with meter() as mem:
        while True:
            times = draws_wanted(run, rate, P - len(rewards), cfg.grpo.max_sampling_rounds - rounds)
            batch = prompts.draw(times)
            prompt_ids = [render_prompt(run.tok, ex.prompt, cfg.data.template) for ex in batch]
            check_positions(run.model, max(map(len, prompt_ids)), cfg.sampling.max_new_tokens, "sampling.max_new_tokens")
            if spec is None:  # "auto": the longest question of the first draw; later draws keep it (one replay)
                window = cfg.cache.window if cfg.cache.window != "auto" else max(len(p) for p in prompt_ids)
                spec = CacheSpec(window=window, evict_fraction=cfg.cache.evict_fraction, policy=cfg.cache.policy)
            res = rollout(run.model, [p for p in prompt_ids for _ in range(G)], run.sampling, spec,
                          pad_token_id=run.pad, tokenizer=run.tok, generator=run.gen, adapter=run.adapter)
            texts = [run.tok.decode(r.completion_ids, skip_special_tokens=True) for r in res.rows]
            scores = torch.tensor(run.rewarder(texts, [ex for ex in batch for _ in range(G)]), device=run.device)
            if cfg.reward.overlong_buffer > 0:
                lengths = torch.tensor([len(r.completion_ids) for r in res.rows], device=run.device)
                scores = scores + soft_overlong_penalty(lengths, cfg.sampling.max_new_tokens,
                                                        cfg.reward.overlong_buffer, cfg.reward.overlong_penalty)
            scores = scores.view(-1, G)
            total += float(scores.sum())
            keep = spread(scores) if cfg.grpo.dynamic_sampling else torch.ones(len(batch), dtype=torch.bool)
            signal += int(keep.sum())
            for g in keep.nonzero().view(-1).tolist()[: P - len(rewards)]:
                rows += res.rows[g * G:(g + 1) * G]
                rewards.append(scores[g])
            drawn, rounds, rollouts = drawn + len(batch), rounds + times, rollouts + 1
            seconds, tokens = seconds + res.seconds, tokens + res.generated_tokens
            if cfg.grpo.adaptive_draws:  # sizes the next refill, then the next step's first rollout
                rate = _signal_rate(run, signal, drawn)
            more = cfg.grpo.dynamic_sampling and len(rewards) < P and rounds < cfg.grpo.max_sampling_rounds
            if not run.dist.any(more):
                break
    prompts.signal_rate = rate
    stats = {"sampled_groups": drawn, "kept_groups": len(rewards), "sampling_rounds": rounds, "rollouts": rollouts,
             "reward_sampled": total / (drawn * G),  # over every drawn group; "reward" is over the kept ones
             "rollout_tokens_per_s": tokens / max(seconds, 1e-9), "peak_bytes_rollout": mem.peak}
    empty = torch.zeros(0, G, device=run.device)
    return rows, torch.stack(rewards) if rewards else empty, spec, stats


def collect(run: Run, prompts: PromptStream, meter=_NoMeter, kl_metric: bool = False) -> Trajectory:
    """Steps 1-2: sample and score groups, and fix every per-token quantity of the update before any replay."""
    cfg = run.cfg
    rows, rewards, spec, stats = sample_groups(run, prompts, meter)
    adv = group_advantages(rewards, cfg.grpo.adv_eps).view(-1, 1)
    rollout_logp, mask = right_pad([r.logprobs for r in rows], 0.0, torch.float32, run.device)
    if cfg.grpo.mask_truncated:
        cut = torch.tensor([r.finish_reason == "length" for r in rows], dtype=torch.bool, device=run.device)
        mask = mask & ~cut[:, None]
    ref = None
    with meter() as ref_mem:
        if rows and (cfg.grpo.beta > 0 or kl_metric):
            ref = reference_logprobs(run, rows, spec)
    if ref is not None:  # k3 on the sampled tokens: an estimate of KL(policy || base), logged at any beta
        delta = (ref - rollout_logp) * mask
        stats["kl_to_base"] = float(((delta.exp() - delta - 1) * mask).sum() / mask.sum().clamp(min=1))
    # a row whose advantage is 0 (without KL) or whose tokens are all masked has loss and gradient exactly 0, so the
    # replay skips it; the normaliser still counts every loss token of the batch, so the loss is unchanged
    signal = torch.ones_like(mask[:, 0]) if cfg.grpo.beta > 0 else adv.view(-1) != 0
    keep = (signal & mask.any(dim=1)).nonzero().view(-1)
    tb = TokenBatch(advantages=adv[keep], old_logp=rollout_logp[keep] if cfg.grpo.pi_old == "rollout" else None,
                    mask=mask[keep], ref_logp=None if ref is None or cfg.grpo.beta == 0 else ref[keep],
                    normalizer=float(run.dist.sum(mask.sum().double())))
    logp = rollout_logp[mask]
    stats |= {"peak_bytes_reference": ref_mem.peak, "loss_tokens": int(mask.sum()),
              "entropy": float(-logp.mean()) if logp.numel() else None}  # Monte Carlo: E[-log pi] of sampled tokens
    return Trajectory(rows, spec, rewards.view(-1), adv, tb, [rows[i] for i in keep.tolist()], rollout_logp[keep],
                      stats)


def reference_logprobs(run: Run, rows: list[RolloutRow], spec: CacheSpec) -> torch.Tensor:
    """The frozen base model's log-probs (adapter disabled, no second copy of the weights), no grad."""
    ref_spec = CacheSpec(window=None) if run.cfg.grpo.kl_reference == "full" else spec
    full_rows = rows if ref_spec.window == spec.window else [
        RolloutRow(r.prompt_ids, r.completion_ids, r.logprobs, None, [], r.finish_reason) for r in rows]
    with torch.no_grad(), run.adapter.disabled():
        return replay(run.model, full_rows, ref_spec, temperature=run.cfg.sampling.temperature,
                      pad_token_id=run.pad, micro_batch_rows=run.cfg.grpo.micro_batch_rows).logprobs


def grpo_step(run: Run, traj: Trajectory, meter=_NoMeter) -> dict:
    """Step 3: ``num_iterations`` clipped passes over the kept rows, each ending in one Adam step. pi_old is fixed
    by the first pass (``grpo.pi_old``). No step is taken when no row of any rank has a signal
    (``grpo.skip_empty_steps``): Adam's moments would otherwise keep moving the adapter on zero gradients."""
    cfg, tb, params = run.cfg, traj.batch, run.adapter.parameters()
    sums = {"clipped_tokens": 0.0, "tokens": 0.0, "kl_sum": 0.0}

    def loss_fn(logp, rows, cols):
        loss, s = clipped_token_loss(logp, tb, cols, rows=rows, clip_low=cfg.grpo.clip_low,
                                     clip_high=cfg.grpo.clip_high, beta=cfg.grpo.beta)
        for k, v in s.items():
            sums[k] += v
        return loss

    out = {"logprob_mismatch": None, "loss": 0.0, "segments": 0, "grad_norm": 0.0, "skipped_step": False}
    if cfg.grpo.skip_empty_steps and not run.dist.any(bool(traj.kept)):
        run.optimizer.zero_grad(set_to_none=True)
        return out | {"skipped_step": True, "clip_fraction": 0.0, "kl": 0.0, "peak_bytes_replay": None}
    with meter() as replay_mem:
        for it in range(cfg.grpo.num_iterations):
            run.optimizer.zero_grad(set_to_none=True)
            if not traj.kept:  # another rank has a signal: this one adds zero gradients to the sum
                for p in params:
                    p.grad = torch.zeros_like(p)
            else:
                rep = replay(run.model, traj.kept, traj.spec, adapter=run.adapter, temperature=cfg.sampling.temperature,
                             loss_fn=loss_fn, state_grad=cfg.grpo.state_grad, pad_token_id=run.pad,
                             micro_batch_rows=cfg.grpo.micro_batch_rows)
                if it == 0:
                    width = rep.logprobs.shape[1]
                    gap = (rep.logprobs - traj.rollout_logp[:, :width]).abs() * tb.mask[:, :width]
                    out.update(logprob_mismatch=float(gap.max()), loss=rep.loss, segments=rep.segments)
                    if tb.old_logp is None:
                        tb.old_logp = rep.logprobs
            run.dist.sum_grads(params)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            if not torch.isfinite(norm):
                raise FloatingPointError(
                    f"non-finite gradient norm ({float(norm)}, loss {out['loss']}): the adapter was not updated; lower "
                    "optim.lr or check the rewards, then resume from the last checkpoint with --resume")
            out["grad_norm"] = float(norm)
            run.optimizer.step()
    out["clip_fraction"] = sums["clipped_tokens"] / max(sums["tokens"], 1.0)
    out["kl"] = sums["kl_sum"] / max(sums["tokens"], 1.0) if cfg.grpo.beta > 0 else 0.0
    out["peak_bytes_replay"] = replay_mem.peak
    return out


def step_metrics(run: Run, traj: Trajectory, stats: dict, lr: float) -> dict:
    """Step 4's record: what was sampled, what the update did, and (on measured steps) the memory of each phase."""
    rewards = traj.rewards
    m = {
        "reward": float(rewards.mean()) if rewards.numel() else None,
        "reward_max": float(rewards.max()) if rewards.numel() else None,
        "accuracy": float((rewards >= 1.0).float().mean()) if rewards.numel() else None,
        "loss": stats["loss"], "grad_norm": stats["grad_norm"], "skipped_step": stats["skipped_step"],
        "clip_fraction": stats["clip_fraction"], "kl": stats["kl"], "logprob_mismatch": stats["logprob_mismatch"],
        "response_length": float(np.mean([len(r.completion_ids) for r in traj.rows])) if traj.rows else None,
        "evictions_per_sample": float(np.mean([len(r.eviction_steps) for r in traj.rows])) if traj.rows else None,
        "replayed_rows": len(traj.kept), "lr": lr, "window": traj.spec.window, **traj.stats,
        "peak_bytes_replay": stats["peak_bytes_replay"], **run.rewarder.failures(),
    }
    dist = run.dist
    if dist.world > 1:
        checksums = dist.gather_floats(float(sum(p.double().sum() for p in run.adapter.parameters())))
        total = dist.sum(torch.tensor([float(rewards.sum()), float(rewards.numel())], dtype=torch.float64))
        m["reward"] = float(total[0] / total[1].clamp(min=1))
        m["ranks_identical"] = len(set(checksums)) == 1
        m["segments_per_rank"] = dist.gather_floats(float(stats["segments"]))
        m["world_size"] = dist.world
    return m


# -- the loop -------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, resume: str | None = None, progress: bool = True) -> dict:
    cfg.validate()
    ckpt = checkpoint.latest(Path(resume)) if resume else None
    if ckpt is not None:
        checkpoint.check_resumable(ckpt, cfg)
        if (done := checkpoint.finished(ckpt, cfg)) is not None:
            return done
    data = build_examples(cfg)  # data errors surface before anything is written
    dist = Dist(cfg.model.device)
    run_dir = checkpoint.RunDir.claim(Path(cfg.run.out_dir), resume=ckpt, overwrite=cfg.run.overwrite, rank=dist.rank)
    try:
        return _train(cfg, setup(cfg, dist, data), run_dir, ckpt, progress)
    finally:
        run_dir.release()
        dist.close()


def _train(cfg: TrainConfig, run: Run, run_dir: checkpoint.RunDir, ckpt: Path | None, progress: bool) -> dict:
    dist, out = run.dist, run_dir.path
    start, position, rate = 0, 0, None
    if ckpt is not None:
        state = checkpoint.restore(ckpt, run.adapter, run.optimizer, run.gen, dist)
        start, position, rate = state["step"], state["data_position"], state.get("signal_rate")
    if dist.rank == 0:
        run_dir.truncate_metrics(start)
        (out / "config.json").write_text(json.dumps(to_dict(cfg) | {"code_version": checkpoint.code_version(),
                                                                     "world_size": dist.world}, indent=1))
    prompts = PromptStream(run.examples, cfg.grpo.prompts_per_step, cfg.run.seed, dist, position, rate)
    log, last = RunLog(out, cfg.run.steps, start, enabled=dist.rank == 0, progress=progress), {}
    try:
        with StopSignals() as stop:
            for step in range(start, cfg.run.steps):
                t0 = time.perf_counter()
                measured = step == start or (step + 1) % cfg.run.memory_every == 0 or step + 1 == cfg.run.steps
                meter = LiveTensorBytes if measured else _NoMeter
                lr = learning_rate(cfg, step)
                for group in run.optimizer.param_groups:
                    group["lr"] = lr
                kl_metric = cfg.grpo.kl_metric_every > 0 and (step + 1) % cfg.grpo.kl_metric_every == 0
                traj = collect(run, prompts, meter, kl_metric)
                stats = grpo_step(run, traj, meter)
                last = {"step": step + 1} | step_metrics(run, traj, stats, lr) | {"seconds": time.perf_counter() - t0}
                log.write(last)
                stopping = dist.any(stop.signum is not None)
                if (step + 1) % cfg.run.save_every == 0 or step + 1 == cfg.run.steps or stopping:
                    saved = checkpoint.save(out, step + 1, cfg, run.adapter, run.optimizer, run.gen, prompts.position,
                                            dist, run_dir.run_id, signal_rate=prompts.signal_rate)
                if stopping and step + 1 < cfg.run.steps:
                    raise Preempted(stop.signum or signal.SIGTERM, saved)
    finally:
        log.close()
        run.rewarder.close()
    log.plot()
    return last
