"""``pte train``: cache-aware GRPO (paper eq. 3) for LoRA, LoRA_c and PTE — one loop, the method is a config field.

Each step, read as the algorithm:
  1. take ``prompts_per_step`` prompts; sample ``group_size`` completions of each under the method's cache policy
     (the rollout engine, no grad, PTE's state updated on every eviction);
  2. score them; group-normalised advantages;
  3. optionally, reference log-probs of the frozen base model (adapter disabled): over the full context, or under the
     same cache policy (``grpo.kl_reference``), computed before the replay in a no-grad pass;
  4. for ``num_iterations`` passes: replay the completions under the same cache policy with the clipped token-level
     loss (rollout log-probs as pi_old), backward once per segment; clip the gradient norm; Adam step;
  5. log; every ``save_every`` steps write an atomic checkpoint (adapter, optimizer, every RNG, data position).
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pte.adapter import Adapter, attach
from pte.config import TrainConfig, to_dict
from pte.data import Example, load_examples, render_prompt
from pte.grpo import TokenBatch, clipped_token_loss, group_advantages
from pte.memory import LiveTensorBytes
from pte.replay import replay
from pte.rollout import CacheSpec, Sampling, rollout

CHECKPOINT_PREFIX = "checkpoint-"


# -- set-up -----------------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig):
    from pte.models import char_tokenizer, load, tiny_model

    if cfg.model.name == "tiny-char":
        tok = char_tokenizer()
        # init std 0.2: with transformers' default 0.02 the final RMSNorm caps how far any hidden state can move
        # a logit (|h| * |w_token| ~ 8 * 0.16), so no adapter could make a token likely
        model = tiny_model("llama", vocab_size=len(tok), hidden=64, layers=2, heads=4, kv_heads=2,
                           seed=cfg.model.tiny_seed, max_positions=4096, init_std=0.2)
        return model, tok
    return load(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device, attn=cfg.model.attn)


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


# -- checkpoints --------------------------------------------------------------------------------------------------
def _code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Dist:
    """Data parallelism over processes started by ``accelerate launch`` or ``torchrun`` (env ``WORLD_SIZE``).

    Ranks sample different prompts and replay different numbers of segments, so nothing inside the replay
    communicates (no DDP wrapper, no per-segment all-reduce): each rank accumulates its own gradient, then one
    all-reduce per step sums the adapter gradients. With the token count summed over ranks as the normaliser,
    that sum is the gradient of the global token-level loss, and every rank takes the same Adam step.
    """

    def __init__(self, device: str = "cpu"):
        import torch.distributed as dist

        self.dist = dist
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            self.dist.all_reduce(x, op=self.dist.ReduceOp.SUM)
        return x

    def sum_grads(self, params: list[torch.Tensor]) -> None:
        """One all-reduce per step: every gradient flattened into one buffer, summed over ranks, written back."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        self.sum(flat)
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier()

    def gather_floats(self, value: float) -> list[float]:
        if self.world == 1:
            return [value]
        out = [torch.zeros(1, dtype=torch.float64) for _ in range(self.world)]
        self.dist.all_gather(out, torch.tensor([value], dtype=torch.float64))
        return [float(t) for t in out]

    def close(self) -> None:
        if self.world > 1 and self.dist.is_initialized():
            self.dist.destroy_process_group()


def save_checkpoint(run_dir: Path, step: int, cfg: TrainConfig, adapter: Adapter, optimizer, gen: torch.Generator,
                    data_position: int, dist: Dist) -> Path:
    """Write ``checkpoint-{step}`` atomically: every rank writes its RNG states into a temporary directory,
    rank 0 adds the adapter, optimizer and state, and renames it at the end."""
    from safetensors.torch import save_file

    final = run_dir / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = run_dir / f".tmp-{final.name}"
    if dist.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    np_state = np.random.get_state()
    py_state = random.getstate()
    save_file({"torch": torch.get_rng_state(), "sampling": gen.get_state(),
               "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}, str(tmp / f"rng-rank{dist.rank}.safetensors"))
    (tmp / f"rng-rank{dist.rank}.json").write_text(json.dumps({
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}))
    dist.barrier()
    if dist.rank == 0:
        adapter.save(tmp, cache=asdict(cfg.cache))
        opt = optimizer.state_dict()
        tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous() for i, st in opt["state"].items() for k, v in st.items()}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {
            "step": step, "data_position": data_position, "threads": torch.get_num_threads(), "world_size": dist.world,
            "param_groups": opt["param_groups"], "param_names": [n for n, _ in adapter.named_parameters()],
            "config": to_dict(cfg), "code_version": _code_version(),
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(run_dir.glob(f"{CHECKPOINT_PREFIX}*"))[: -cfg.run.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def latest_checkpoint(path: Path) -> Path:
    if path.name.startswith(CHECKPOINT_PREFIX) and (path / "trainer_state.json").exists():
        return path
    found = sorted(path.glob(f"{CHECKPOINT_PREFIX}*"))
    if not found:
        raise FileNotFoundError(f"--resume {path}: no {CHECKPOINT_PREFIX}* directory there")
    return found[-1]


def restore_checkpoint(ckpt: Path, adapter: Adapter, optimizer, gen: torch.Generator, dist: Dist) -> dict:
    from safetensors.torch import load_file

    from pte.adapter import read_config

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


# -- the loop -------------------------------------------------------------------------------------------------------
def reference_logprobs(model, adapter: Adapter, rows, cfg: TrainConfig, spec: CacheSpec) -> torch.Tensor:
    """The frozen base model's log-probs (adapter disabled, no second copy of the weights), no grad."""
    ref_spec = CacheSpec(window=None) if cfg.grpo.kl_reference == "full" else spec
    full_rows = rows if ref_spec.window == spec.window else [
        type(r)(r.prompt_ids, r.completion_ids, r.logprobs, None, [], r.finish_reason) for r in rows]
    with torch.no_grad(), adapter.disabled():
        return replay(model, full_rows, ref_spec, temperature=cfg.sampling.temperature).logprobs


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of 0-based ``step``: constant, or a cosine from optim.lr down to
    optim.lr * final_lr_fraction at the last step."""
    if cfg.optim.schedule == "constant" or cfg.run.steps == 1:
        return cfg.optim.lr
    progress = step / (cfg.run.steps - 1)
    low = cfg.optim.lr * cfg.optim.final_lr_fraction
    return low + (cfg.optim.lr - low) * 0.5 * (1 + math.cos(math.pi * progress))


def train(cfg: TrainConfig, resume: str | None = None, progress: bool = True) -> dict:
    cfg.validate()
    torch.set_num_threads(cfg.run.threads)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    examples, task = build_examples(cfg)  # data errors surface before the model loads
    model, tok = build_model(cfg)
    adapter = attach(model, cfg.adapter)
    optimizer = torch.optim.Adam(adapter.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    dist = Dist(cfg.model.device)
    gen = torch.Generator().manual_seed(cfg.run.seed + 1000 * dist.rank)  # ranks sample differently
    run_dir = Path(cfg.run.out_dir)
    start_step, position = 0, 0
    if resume:
        state = restore_checkpoint(latest_checkpoint(Path(resume)), adapter, optimizer, gen, dist)
        start_step, position = state["step"], state["data_position"]
    if dist.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg) | {"code_version": _code_version(),
                                                                          "world_size": dist.world}, indent=1))
    rewarder = Rewarder(cfg, task)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = tuple(x for x in [tok.eos_token_id] if x is not None)
    sampling = Sampling(max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
                        top_p=cfg.sampling.top_p, eos_token_ids=eos, stop_strings=tuple(cfg.sampling.stop))
    G, P = cfg.grpo.group_size, cfg.grpo.prompts_per_step
    bar = _progress(cfg.run.steps, start_step, progress and dist.rank == 0)
    log_path = run_dir / "metrics.jsonl"
    writer = None
    if dist.rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    last = {}
    try:
        for step in range(start_step, cfg.run.steps):
            t0 = time.perf_counter()
            measured = step == start_step or (step + 1) % cfg.run.memory_every == 0 or step + 1 == cfg.run.steps
            meter = LiveTensorBytes if measured else _NoMeter
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = [example_at(examples, position + dist.rank * P + i, cfg.run.seed) for i in range(P)]
            position += P * dist.world
            prompt_ids = [render_prompt(tok, ex.prompt, cfg.data.template) for ex in batch]
            window = cfg.cache.window if cfg.cache.window != "auto" else max(len(p) for p in prompt_ids)
            spec = CacheSpec(window=window, evict_fraction=cfg.cache.evict_fraction, policy=cfg.cache.policy)
            rows_prompts = [p for p in prompt_ids for _ in range(G)]
            with meter() as rollout_mem:
                res = rollout(model, rows_prompts, sampling, spec, pad_token_id=pad, tokenizer=tok, generator=gen,
                              adapter=adapter)
            texts = [tok.decode(r.completion_ids, skip_special_tokens=True) for r in res.rows]
            rewards = torch.tensor(rewarder(texts, [ex for ex in batch for _ in range(G)]))
            adv = group_advantages(rewards.view(P, G), cfg.grpo.adv_eps).view(-1, 1)
            T = max(len(r.completion_ids) for r in res.rows)
            old = torch.zeros(len(res.rows), T)
            mask = torch.zeros(len(res.rows), T, dtype=torch.bool)
            for i, r in enumerate(res.rows):
                old[i, :len(r.logprobs)] = torch.tensor(r.logprobs)
                mask[i, :len(r.logprobs)] = True
            ref = None
            with meter() as ref_mem:
                if cfg.grpo.beta > 0:
                    ref = reference_logprobs(model, adapter, res.rows, cfg, spec)
            # a row of an all-equal group has advantage 0: without KL its loss and gradient are exactly 0, so the
            # replay skips it (the normaliser still counts every token of the batch, so the loss is unchanged)
            keep = torch.arange(len(res.rows)) if cfg.grpo.beta > 0 else adv.view(-1).nonzero().view(-1)
            tb = TokenBatch(advantages=adv[keep], old_logp=old[keep], mask=mask[keep],
                            ref_logp=None if ref is None else ref[keep], normalizer=float(dist.sum(mask.sum().double())))
            kept_rows = [res.rows[i] for i in keep.tolist()]
            stats = {"clipped_tokens": 0.0, "tokens": 0.0, "kl_sum": 0.0}

            def loss_fn(logp, cols):
                loss, s = clipped_token_loss(logp, tb, cols, clip_low=cfg.grpo.clip_low, clip_high=cfg.grpo.clip_high,
                                             beta=cfg.grpo.beta)
                for k, v in s.items():
                    stats[k] += v
                return loss

            mismatch, loss_value, segments = None, 0.0, 0  # stay so when nothing is replayed
            with meter() as replay_mem:
                for it in range(cfg.grpo.num_iterations):
                    optimizer.zero_grad(set_to_none=True)
                    if not kept_rows:  # the optimizer steps on zero gradients, as it would after computing them
                        for p_ in adapter.parameters():
                            p_.grad = torch.zeros_like(p_)
                    else:
                        rep = replay(model, kept_rows, spec, adapter=adapter, temperature=cfg.sampling.temperature,
                                     loss_fn=loss_fn, state_grad=cfg.grpo.state_grad, pad_token_id=pad)
                        if it == 0:
                            width = rep.logprobs.shape[1]
                            mismatch = float(((rep.logprobs - tb.old_logp[:, :width]).abs() * tb.mask[:, :width]).max())
                            loss_value, segments = rep.loss, rep.segments
                    dist.sum_grads(adapter.parameters())
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(adapter.parameters(), cfg.optim.max_grad_norm))
                    optimizer.step()
            seconds = time.perf_counter() - t0
            last = {
                "step": step + 1, "reward": float(rewards.mean()), "reward_max": float(rewards.max()),
                "accuracy": float((rewards >= 1.0).float().mean()), "loss": loss_value, "grad_norm": grad_norm,
                "clip_fraction": stats["clipped_tokens"] / max(stats["tokens"], 1.0),
                "kl": stats["kl_sum"] / max(stats["tokens"], 1.0) if cfg.grpo.beta > 0 else 0.0,
                "logprob_mismatch": mismatch, "response_length": float(mask.sum(1).float().mean()),
                "evictions_per_sample": float(np.mean([len(r.eviction_steps) for r in res.rows])),
                "replayed_rows": len(kept_rows), "lr": lr,
                "window": window, "rollout_tokens_per_s": res.tokens_per_s, "seconds": seconds,
                "peak_bytes_rollout": rollout_mem.peak, "peak_bytes_reference": ref_mem.peak,
                "peak_bytes_replay": replay_mem.peak, **rewarder.failures(),
            }
            if dist.world > 1:
                checksums = dist.gather_floats(float(sum(p_.double().sum() for p_ in adapter.parameters())))
                last["reward"] = float(dist.sum(rewards.sum().double()) / (len(rewards) * dist.world))
                last["ranks_identical"] = len(set(checksums)) == 1
                last["segments_per_rank"] = dist.gather_floats(float(segments))
                last["world_size"] = dist.world
            if dist.rank == 0:
                with log_path.open("a") as f:
                    f.write(json.dumps(last) + "\n")
                for key, value in last.items():
                    if isinstance(value, (int, float)) and key != "step":
                        writer.add_scalar(key, value, step + 1)
                writer.flush()
            if (step + 1) % cfg.run.save_every == 0 or step + 1 == cfg.run.steps:
                save_checkpoint(run_dir, step + 1, cfg, adapter, optimizer, gen, position, dist)
            bar.update(last)
    finally:
        bar.close()
        rewarder.close()
        if writer is not None:
            writer.close()
    if dist.rank == 0:
        plot_metrics(run_dir)
    dist.close()
    return last


class _NoMeter:
    peak = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class _progress:
    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="pte train", unit="step", file=sys.stderr)

    def update(self, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(reward=f"{metrics['reward']:.3f}", tok_s=f"{metrics['rollout_tokens_per_s']:.0f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Reward (and accuracy) per step from ``metrics.jsonl`` -> a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], marker=".", label="mean reward")
    ax.plot([r["step"] for r in rows], [r["accuracy"] for r in rows], marker=".", label="reward = 1 (fraction)")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(out) if out else run_dir / "reward.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
