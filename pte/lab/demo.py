"""``pte demo``: base / LoRA / LoRA_c / PTE on a task that needs what the cache evicts, end to end on 2 CPU cores.

1. Exactness: under evictions, the bounded cache's logits equal one full forward whose mask hides exactly the
   evicted thought tokens, at their original positions (the invariant the public re-implementation breaks).
2. The shipped base model (``pte/assets/long_range_base``, built by ``pte pretrain-task``) on held-out long-range
   problems: full cache versus sliding windows.
3. GRPO with the shipped recipes, ``configs/long_range_{lora,lora_c,pte}.yaml`` (docs/seed_study.md): LoRA with a
   full cache, LoRA_c and PTE under the recipe's window; PTE on several seeds, to show the spread.
4. Every run at every window on the same held-out problems (greedy, 95% Wilson intervals), the mean over PTE's
   seeds, the training and rollout memory of the last step, and tokens/s; a table (``demo.md``), ``demo.json``
   and ``accuracy.png``.

No download: the base model ships with pte and is rebuilt only if missing. Settings and why: docs/design.md, "The
demo"; its numbers: docs/results.md, "The demo".
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pte.cache import BoundedCache, window_visibility
from pte.methods import METHODS
from pte.models import tiny_model
from pte.rollout import CacheSpec, Decoder, Sampling, left_pad

def _exactness(model, window: int, T: int) -> tuple[float, int]:
    """Max |logit difference| between decoding through the bounded cache and one forward masked by
    :func:`pte.cache.window_visibility`, and the evictions made."""
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    comp = torch.randint(3, model.config.vocab_size, (len(prompts), T), generator=torch.Generator().manual_seed(0))
    ids, pmask = left_pad(prompts, 0)
    cache = BoundedCache.for_model(model, window=window)
    dec = Decoder(model, cache)
    got = [dec.prefill(ids, pmask)[:, -1:]]
    for t in comp.T:
        got.append(dec.step(t[:, None]))
    got = torch.cat(got, 1)
    P = ids.shape[1]
    full = torch.cat([ids, comp], 1)
    valid = torch.cat([pmask, torch.ones_like(comp, dtype=torch.bool)], 1)
    visible = window_visibility(P, T, window, cache.evict_fraction, valid)
    ref = model(input_ids=full, attention_mask=visible[:, None], position_ids=(valid.cumsum(-1) - 1).clamp(min=0)).logits
    return float((got - ref[:, P - 1:]).abs().max()), cache.evictions


CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the training recipes (docs/seed_study.md)


@dataclass
class DemoConfig:
    """What the demo runs; the training recipe itself is ``configs/long_range_{method}.yaml``, the one that
    docs/seed_study.md chose, so the demo and the seed study train the same way."""

    eval_windows: tuple[int | None, ...] = (None, 16, 8, 4)  # None: full cache
    pte_seeds: tuple[int, ...] = (0, 1, 2)  # PTE's spread over seeds; LoRA and LoRA_c train on the first
    train: tuple[str, ...] = ()  # `pte train --set` items for every run, over the recipe's
    workers: int = 2  # training processes at once, one thread each (1: one after the other, in this process)
    eval_problems: int = 200

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(eval_windows=(None, 8), pte_seeds=(0, 1), eval_problems=20,
                   train=("run.steps=2", "grpo.prompts_per_step=2", "grpo.group_size=4", "optim.warmup_steps=0",
                          "grpo.max_sampling_rounds=1"))

    def runs(self) -> list[tuple[str, int]]:
        """(method, seed) of every training run, the costliest first: a full-cache step replays almost nothing,
        and the thought state's updates cost more still."""
        order = sorted(METHODS, key=lambda m: (METHODS[m].bounded_cache, METHODS[m].stateful), reverse=True)
        return [(m, s) for m in order for s in (self.pte_seeds if METHODS[m].stateful else self.pte_seeds[:1])]


def run_name(method: str, seed: int) -> str:
    return f"{method}-s{seed}"


def recipe(base: Path, method: str, seed: int, cfg: DemoConfig, out: Path, threads: int):
    """The :class:`pte.config.TrainConfig` of one run: the method's config file, this base model, seed and run
    directory, then ``cfg.train``."""
    from pte.config import TrainConfig, load_dataclass

    path = CONFIGS / f"long_range_{method}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the demo trains from the recipes in configs/ of a pte checkout; run it "
                                "from a clone (pip install -e .)")
    run = {"seed": seed, "out_dir": str(out / f"train-{run_name(method, seed)}"), "threads": threads}
    return load_dataclass(TrainConfig, str(path), list(cfg.train), values={"model": {"name": str(base)}, "run": run})


EVAL_SEED = 30_000_001  # held-out: training draws its problems with seed run.seed (0), pre-training 1..steps


def base_model_dir(log) -> Path:
    from pte.lab.pretrain import SHIPPED_BASE, PretrainConfig, pretrain

    if (SHIPPED_BASE / "model.safetensors").exists():
        return SHIPPED_BASE
    full, out = Path("outputs/long_range_full"), Path("outputs/long_range_base")
    if not (out / "model.safetensors").exists():
        log(f"the shipped base model is missing; building it as pte does (~11 min): {full}, then its calibration "
            f"{CALIBRATION} into {out} (both commands end up in {out}/recipe.json)")
        if not (full / "model.safetensors").exists():
            pretrain(PretrainConfig(out=str(full)), log=log)
        pretrain(PretrainConfig(out=str(out), init=str(full), **CALIBRATION), log=log)
    return out


# the second stage of the shipped base model (pte/assets/long_range_base/recipe.json records both)
CALIBRATION = dict(steps=60, lr=1e-3, window_fraction=0.5, window=8)


def train_method(base: Path, method: str, seed: int, cfg: DemoConfig, out: Path, threads: int | None = None,
                 progress: bool = True) -> dict:
    from pte.train import train

    tc = recipe(base, method, seed, cfg, out, threads or torch.get_num_threads())
    start = time.perf_counter()
    last = train(tc, progress=progress)
    last["train_seconds"] = time.perf_counter() - start
    return last


class HeldOut:
    """The demo's evaluation: every window of ``cfg.eval_windows`` on the same held-out problems, greedy, at the
    recipe's evict fraction and length. Built where it runs (a training worker evaluates its own run, so the
    evaluations overlap other runs' training)."""

    def __init__(self, base: Path, cfg: DemoConfig, out: Path):
        from pte.lab.pretrain import recipe_task
        from pte.models import load

        self.base, self.cfg, self.out = base, cfg, out
        self.model, self.tok = load(str(base), dtype="float32")
        self.task = recipe_task(base)
        self.recipe = recipe(base, "pte", cfg.pte_seeds[0], cfg, out, 1)
        self.examples = self.task.examples(cfg.eval_problems, seed=EVAL_SEED)
        self.sampling = Sampling(max_new_tokens=self.recipe.sampling.max_new_tokens, temperature=0,
                                 eos_token_ids=(self.tok.eos_token_id,))

    def __call__(self, name: str, adapter_dir: Path | None = None) -> list:
        from pte.adapter import load as load_adapter
        from pte.evaluate import evaluate, write_run

        adapter = None if adapter_dir is None else load_adapter(self.model, adapter_dir)
        try:
            results = [evaluate(self.model, self.tok, self.examples, self.task.score,
                                spec=CacheSpec(window=w, evict_fraction=self.recipe.cache.evict_fraction),
                                sampling=self.sampling, batch_size=100, adapter=adapter, progress=False, seed=0)
                       for w in self.cfg.eval_windows]
        finally:
            if adapter is not None:
                adapter.detach()
        write_run(self.out / f"eval-{name}", results, {"model": str(self.base), "method": name,
                                                        "benchmark": "long_range", "seed": EVAL_SEED})
        return results


def train_and_eval(base: Path, method: str, seed: int, cfg: DemoConfig, out: Path, threads: int | None = None,
                   progress: bool = True) -> tuple[dict, list]:
    """One run: GRPO, then :class:`HeldOut` on its last checkpoint. -> (last step's metrics, eval results)."""
    from pte.checkpoint import latest

    last = train_method(base, method, seed, cfg, out, threads, progress)
    name = run_name(method, seed)
    return last, HeldOut(base, cfg, out)(name, latest(out / f"train-{name}"))


def train_all(base: Path, cfg: DemoConfig, out: Path, log) -> dict:
    """:func:`train_and_eval` for every run of :meth:`DemoConfig.runs`, keyed by :func:`run_name`. A tiny model's step is bound by
    per-op overhead, not arithmetic, so a second thread buys nothing and a second process does: with
    ``cfg.workers > 1`` the runs train in that many processes at once, one thread each, the costliest first. The
    main process shows their progress from their metrics files. Each run is seeded and single-threaded, so its
    result does not depend on how many run at once."""
    runs = cfg.runs()
    for m, s in runs:  # metrics.jsonl appends, and the progress display reads it: a rerun starts clean
        shutil.rmtree(out / f"train-{run_name(m, s)}", ignore_errors=True)
    if cfg.workers <= 1:
        return {run_name(m, s): train_and_eval(base, m, s, cfg, out) for m, s in runs}
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    progress = _Progress({run_name(m, s): recipe(base, m, s, cfg, out, 1).run.steps for m, s in runs}, out, log)
    with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {run_name(m, s): pool.submit(train_and_eval, base, m, s, cfg, out, 1, False) for m, s in runs}
        while not all(f.done() for f in futures.values()):
            time.sleep(2)
            progress.update()
        results = {name: f.result() for name, f in futures.items()}  # a worker's exception is raised here
    progress.close()
    return results


class _Progress:
    """Steps done per run, read from each run's metrics.jsonl: one tqdm bar per run on a terminal, else a line
    every 30 s (logs stay readable). ``steps``: each run's name and its number of steps."""

    def __init__(self, steps: dict[str, int], out: Path, log):
        self.files = {m: out / f"train-{m}" / "metrics.jsonl" for m in steps}
        self.steps, self.log, self.last_line = steps, log, time.perf_counter()
        self.bars = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bars = {m: tqdm(total=n, desc=f"   {m:9s}", unit="step", position=i, file=sys.stderr)
                         for i, (m, n) in enumerate(steps.items())}

    def _done(self, m: str) -> tuple[int, float | None]:
        try:
            lines = [ln for ln in self.files[m].read_text().splitlines() if ln.endswith("}")]
        except FileNotFoundError:
            return 0, None
        return len(lines), (json.loads(lines[-1])["reward"] if lines else None)

    def update(self, final: bool = False) -> None:
        done = {m: self._done(m) for m in self.files}
        if self.bars is not None:
            for m, (n, reward) in done.items():
                if n > self.bars[m].n:
                    if reward is not None:
                        self.bars[m].set_postfix(reward=f"{reward:.2f}")
                    self.bars[m].update(n - self.bars[m].n)
        elif final or time.perf_counter() - self.last_line >= 30:
            self.last_line = time.perf_counter()
            self.log("   " + " | ".join(f"{m} {n}/{self.steps[m]}" + ("" if r is None else f" reward {r:.2f}")
                                     for m, (n, r) in done.items()))

    def close(self) -> None:
        self.update(final=True)
        if self.bars is not None:
            for bar in self.bars.values():
                bar.close()


def demo(quick: bool = False, out: str | None = None, cfg: DemoConfig | None = None) -> int:
    """``cfg`` (default: :meth:`DemoConfig.quick` with ``quick``, else :class:`DemoConfig`); ``quick`` also shortens
    the exactness check."""
    from pte.evaluate import compare

    def log(msg: str) -> None:
        print(msg, flush=True)

    cfg = cfg or (DemoConfig.quick() if quick else DemoConfig())
    out_dir = Path(out or "outputs/demo")
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    log("pte demo: Progressive Thought Encoding on 2 CPU cores, no download\n")

    torch.manual_seed(0)
    probe = tiny_model("qwen2", vocab_size=512, hidden=128, layers=4, heads=4, kv_heads=2, init_std=0.2)
    with torch.no_grad():
        err, n_ev = _exactness(probe, window=16, T=64 if quick else 200)
    log(f"1. exactness: {n_ev} evictions, max |logit - masked full forward| = {err:.2e} "
        f"({'ok' if err < 1e-3 else 'FAILED'})")

    base = base_model_dir(log)
    held_out = HeldOut(base, cfg, out_dir)
    model, task, pte_recipe = held_out.model, held_out.task, held_out.recipe
    window = pte_recipe.cache.window
    if pte_recipe.data.task_options != {"hops": task.hops, "filler": task.filler}:
        raise ValueError(f"configs/long_range_pte.yaml trains on {pte_recipe.data.task_options}, but the base model "
                         f"{base} was trained on hops {task.hops}, filler {task.filler}; make them agree")
    task.check_difficulty(model.config.num_hidden_layers, window)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"2. base model {base} ({n_params / 1e6:.2f}M parameters; task: {task.hops} hops, filler {task.filler}, "
        f"answer {task.thought_tokens_before_answer()} tokens after it is written)")

    def show(name: str, results: list) -> None:
        log(f"   {name:9s} " + "  ".join(f"{r.summary.label}: {100 * r.summary.pass1:5.1f}%" for r in results))

    evals = {"base": held_out("base")}
    show("base", evals["base"])
    g, o = pte_recipe.grpo, pte_recipe.optim
    log(f"3. GRPO from configs/long_range_{{lora,lora_c,pte}}.yaml: {pte_recipe.run.steps} steps x {g.prompts_per_step} "
        f"prompts x {g.group_size} samples, {g.num_iterations} passes per batch, lr {o.lr} ({o.schedule}), window "
        f"{window} for LoRA_c and PTE, full cache for LoRA; PTE on seeds {list(cfg.pte_seeds)}, LoRA and LoRA_c "
        f"on seed {cfg.pte_seeds[0]}" + (f"; {cfg.workers} training processes at once, one thread each"
                                         if cfg.workers > 1 else "") + f"; each run then evaluated on "
        f"{cfg.eval_problems} held-out problems (greedy)")
    done = train_all(base, cfg, out_dir, log)
    trained = {name: m for name, (m, _) in done.items()}
    for name, (m, results) in done.items():
        reward = "none (no group drawn had a signal)" if m["reward"] is None else f"{m['reward']:.2f}"
        log(f"   {name}: last-step reward {reward}, {m['train_seconds']:.0f}s")
        show(name, results)
        evals[name] = results
    compare([str(out_dir / f"eval-{m}") for m in evals], out_dir / "compare")
    table = results_table(evals, trained, window)
    (out_dir / "demo.md").write_text(table)
    (out_dir / "demo.json").write_text(json.dumps({
        "config": asdict(cfg), "base": str(base), "recipe": {m: str(CONFIGS / f"long_range_{m}.yaml") for m in METHODS},
        "eval": {m: [asdict(r.summary) for r in rs] for m, rs in evals.items()},
        "train_last_step": trained, "seconds": time.perf_counter() - t_start}, indent=1, default=str))
    log("\n" + table)
    log(f"written: {out_dir}/demo.md, demo.json, compare/accuracy.png; {time.perf_counter() - t_start:.0f}s in all")
    return 0 if err < 1e-3 else 1


def _mib(n: int | None) -> str:
    """A peak in MiB; "—" where the last step measured none (no run, or a step skipped for want of a signal)."""
    return "—" if n is None else f"{n / 2**20:.1f}"


def results_table(evals: dict, trained: dict, window: int) -> str:
    """One row per run (accuracy with its 95% interval at each window, tokens/s, memory), then per method with
    more than one seed the mean over its seeds."""
    labels = [r.summary.label for r in next(iter(evals.values()))]
    head = ["run", "trained with"] + [f"acc. {lb} % (95% CI)" for lb in labels] + \
        ["rollout tok/s (w%d)" % window, "train peak MiB (replay)", "rollout peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, results in evals.items():
        t = trained.get(name)
        how = "—" if t is None else ("full cache" if t["window"] is None else f"window {t['window']}")
        accs = [f"{100 * r.summary.pass1:.1f} ({100 * r.summary.ci_low:.0f}–{100 * r.summary.ci_high:.0f})"
                for r in results]
        at_window = next((r.summary.tokens_per_s for r in results if r.summary.window == window), float("nan"))
        mem = [_mib(None if t is None else t.get(k)) for k in ("peak_bytes_replay", "peak_bytes_rollout")]
        lines.append("| " + " | ".join([name, how] + accs + [f"{at_window:.0f}"] + mem) + " |")
    for method in METHODS:
        seeds = [rs for name, rs in evals.items() if name.rsplit("-s", 1)[0] == method]
        if len(seeds) > 1:
            means = [sum(rs[i].summary.pass1 for rs in seeds) / len(seeds) for i in range(len(labels))]
            lines.append("| " + " | ".join([f"**{method}: mean of {len(seeds)} seeds**", ""] +
                                           [f"**{100 * m:.1f}**" for m in means] + ["", "", ""]) + " |")
    return "\n".join(lines) + "\n"
