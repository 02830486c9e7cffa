"""Configuration: dataclasses loaded from YAML, overridden by ``--set key=value``, validated before any model is
loaded (:func:`load_dataclass`, for every command's config); :class:`TrainConfig` is ``pte train``'s. An unknown key
or an impossible value is an error naming the key."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pte.adapter import AdapterConfig
from pte.data import check_limit, check_template
from pte.methods import METHODS
from pte.replay import STATE_GRADS


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; YAML 1.2 and every user read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, where: str):
    """YAML with the float fix; a syntax error names ``where`` and its line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{where}{at}: YAML syntax error: {exc.problem or exc.context}; fix the YAML there") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: not valid YAML ({exc})") from None


@dataclass
class ModelConfig:
    name: str = "tiny-char"  # a save_pretrained directory, a hub name, or "tiny-char" (a tiny Llama built in code)
    dtype: str = "float32"
    attn: str = "sdpa"
    device: str = "cpu"
    tiny_seed: int = 0  # for "tiny-char"


@dataclass
class DataConfig:
    path: str | None = None  # JSONL / Parquet / HF save_to_disk directory
    task: str | None = "copy_digit"  # a generator in pte.tasks, used when path is None
    task_options: dict = field(default_factory=dict)  # keyword arguments of the task's class
    prompt_field: str = "question"
    answer_field: str = "answer"
    answer_format: str = "auto"  # auto | gsm8k | boxed | plain
    template: str = "{prompt}"  # "chat" or a format string with {prompt}
    limit: int | None = None


@dataclass
class CacheConfig:
    window: int | str | None = "auto"  # thought tokens; "auto": the longest question in the micro-batch (paper)
    evict_fraction: float = 0.25
    policy: str = "sliding"


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)


@dataclass
class GRPOConfig:
    group_size: int = 8
    prompts_per_step: int = 4
    num_iterations: int = 1  # optimisation passes per batch (PPO epochs)
    clip_low: float = 0.2
    clip_high: float = 0.2
    beta: float = 0.0  # the paper gives no value; TRL's default is 0
    kl_reference: str = "full"  # full: the base model over the full context (eq. 3); bounded: under the same cache
    adv_eps: float = 1e-6
    # pi_old of the clipped ratio. "replay": the first pass's own log-probs, detached, so that pass's ratio is exactly 1
    # in any precision (bf16 rollout and replay forwards differ); "rollout": the sampling log-probs (the rollout/
    # replay gap is logged as logprob_mismatch either way)
    pi_old: str = "replay"
    # DAPO's dynamic sampling: drop groups whose rewards do not spread and draw fresh prompts, at most
    # max_sampling_rounds draws a step; a step then trains on at most prompts_per_step groups
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    # sample several draws in one rollout, as many as the last step's signal rate says are needed (within
    # max_sampling_rounds): fewer, larger rollouts, the same kept prompts; rollout memory grows with the draws
    adaptive_draws: bool = False
    mask_truncated: bool = False  # completions cut by sampling.max_new_tokens are left out of the loss (TRL's option)
    skip_empty_steps: bool = True  # no optimizer step when no row of any rank has a signal (Adam moves on zeros)
    # replay (and the KL reference) this many rows at a time, gradients accumulated: exactly one batch's update, with
    # memory bounded by micro_batch_rows x (prompt + window); null: every kept row at once
    micro_batch_rows: int | None = None
    kl_metric_every: int = 10  # log kl_to_base (k3, sampled tokens) every N steps even at beta 0; 0: never
    # PTE's replay: "history" gives the thought encoder the exact gradient through every past eviction from fixed-size
    # statistics (pte.history; constant memory); "segment" stops it at the segment, so the encoder learns only from
    # the newest eviction (why the default: docs/log.md, "The cause: the truncation, not the state")
    state_grad: str = "history"


@dataclass
class OptimConfig:
    lr: float = 1e-2  # ours, for tiny models; the paper's 1e-5 is for 3-8B models
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    # "cosine": lr decays from optim.lr to optim.lr * final_lr_fraction over run.steps (a function of the step, so
    # a resumed run continues the same schedule); "constant": optim.lr throughout
    schedule: str = "constant"
    final_lr_fraction: float = 0.1
    warmup_steps: int = 0  # linear warm-up from optim.lr / warmup_steps, then the schedule over the remaining steps


@dataclass
class RewardConfig:
    kind: str = "task"  # "task": the synthetic task's own scorer; "math": math-verify against the gold answer
    workers: int = 2
    timeout: float = 10.0
    # DAPO's soft overlong penalty: a completion within overlong_buffer tokens of sampling.max_new_tokens loses up to
    # overlong_penalty, linearly in how far into the buffer it runs; 0: off
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0


@dataclass
class RunConfig:
    steps: int = 30
    out_dir: str = "runs/train"
    seed: int = 0
    save_every: int = 10
    keep_last: int = 2
    threads: int = 2
    # live-tensor memory is counted by a dispatch mode that sees every op, which slows a step (docs/design.md, "Memory
    # measurement"), so only on the first step, every memory_every steps and the last step; other steps log null
    memory_every: int = 10
    overwrite: bool = False  # replace a finished or abandoned run in out_dir (otherwise: refuse, or --resume it)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=lambda: AdapterConfig(method="pte", rank=8, n_global=8))
    cache: CacheConfig = field(default_factory=CacheConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        check_types(self)
        checks = [
            (self.run.steps >= 1, "run.steps", "must be >= 1"),
            (self.run.save_every >= 1, "run.save_every", "must be >= 1"),
            (self.run.keep_last >= 1, "run.keep_last", "must be >= 1"),
            (self.run.threads >= 1, "run.threads", "must be >= 1"),
            (self.run.memory_every >= 1, "run.memory_every", "must be >= 1"),
            (self.grpo.group_size >= 2, "grpo.group_size", "must be >= 2: advantages compare completions of one prompt"),
            (self.grpo.prompts_per_step >= 1, "grpo.prompts_per_step", "must be >= 1"),
            (self.grpo.num_iterations >= 1, "grpo.num_iterations", "must be >= 1"),
            (0 <= self.grpo.clip_low < 1, "grpo.clip_low", "must lie in [0, 1)"),
            (self.grpo.clip_high >= 0, "grpo.clip_high", "must be >= 0"),
            (self.grpo.beta >= 0, "grpo.beta", "must be >= 0"),
            (self.grpo.kl_reference in ("full", "bounded"), "grpo.kl_reference", "choose full or bounded"),
            (self.grpo.state_grad in STATE_GRADS, "grpo.state_grad", f"choose one of {list(STATE_GRADS)}"),
            (not (self.grpo.state_grad == "history" and self.adapter.state_attention == "linear"
                  and self.adapter.state_update == "recursive"), "grpo.state_grad",
             "history needs adapter.state_update: accumulate (the recursive update has no fixed-size gradient "
             "statistics); set grpo.state_grad: segment"),
            (self.grpo.pi_old in ("replay", "rollout"), "grpo.pi_old", "choose replay or rollout"),
            (self.grpo.max_sampling_rounds >= 1, "grpo.max_sampling_rounds", "must be >= 1"),
            (self.grpo.dynamic_sampling or not self.grpo.adaptive_draws, "grpo.adaptive_draws",
             "sizes dynamic sampling's refills; set grpo.dynamic_sampling: true, or drop adaptive_draws"),
            (self.grpo.micro_batch_rows is None or self.grpo.micro_batch_rows >= 1, "grpo.micro_batch_rows",
             "must be >= 1, or null for every row at once"),
            (self.grpo.kl_metric_every >= 0, "grpo.kl_metric_every", "must be >= 0 (0: never)"),
            (math.isfinite(self.optim.lr) and self.optim.lr > 0, "optim.lr", "must be a finite number > 0"),
            (all(0 <= b < 1 for b in self.optim.betas), "optim.betas", "each must lie in [0, 1), e.g. [0.9, 0.999]"),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0"),
            (0 <= self.reward.overlong_buffer < self.sampling.max_new_tokens, "reward.overlong_buffer",
             "must lie in [0, sampling.max_new_tokens)"),
            (self.reward.overlong_penalty >= 0, "reward.overlong_penalty", "must be >= 0"),
            (self.optim.max_grad_norm > 0, "optim.max_grad_norm", "must be > 0"),
            (self.optim.schedule in ("constant", "cosine"), "optim.schedule", "choose constant or cosine"),
            (0 <= self.optim.final_lr_fraction <= 1, "optim.final_lr_fraction", "must lie in [0, 1]"),
            (self.sampling.max_new_tokens >= 1, "sampling.max_new_tokens", "must be >= 1"),
            (self.sampling.temperature > 0, "sampling.temperature", "must be > 0 for RL (greedy rollouts give no spread)"),
            (0 < self.sampling.top_p <= 1, "sampling.top_p", "must lie in (0, 1]"),
            (0 < self.cache.evict_fraction <= 1, "cache.evict_fraction", "must lie in (0, 1]"),
            (self.reward.kind in ("task", "math"), "reward.kind", "choose task or math"),
            (self.reward.timeout > 0, "reward.timeout", "must be > 0 seconds"),
            (self.data.path is not None or self.data.task is not None, "data.path", "set data.path or data.task"),
            (self.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype", "choose float32, bfloat16 or float16"),
            (self.reward.workers >= 1, "reward.workers", "must be >= 1"),
        ]
        for ok, key, why in checks:
            if not ok:
                raise ValueError(f"{key}={_lookup(self, key)!r}: {why}")
        check_limit(self.data.limit, "data.limit")
        check_template(self.data.template, "data.template")
        w = self.cache.window
        if not (w is None or w == "auto" or (isinstance(w, int) and not isinstance(w, bool) and w >= 1)):
            raise ValueError(f"cache.window={w!r}: an int >= 1, 'auto' (the longest question in the micro-batch) "
                             "or null (full cache)")
        method = METHODS.get(self.adapter.method)  # an unknown one: adapter.validate() names it
        if method and not method.bounded_cache and w is not None:
            raise ValueError(f"adapter.method={self.adapter.method} trains with a full cache: set cache.window=null "
                             f"(got {w!r}), or use lora_c for the sliding window")
        if method and method.bounded_cache and w is None:
            raise ValueError(f"adapter.method={self.adapter.method} needs a bounded cache: set cache.window")
        self.adapter.validate()


def _lookup(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


_NAMES = {int: "an integer", float: "a float", str: "a string", bool: "true or false", dict: "a mapping",
          type(None): "null"}


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_describe(args[0]).split(' ', 1)[-1]}s"
    if origin is tuple:
        return f"a list of {len(args)} {_describe(args[0]).split(' ', 1)[-1]}s"
    if origin is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[-1]}s"
    return _NAMES.get(origin or tp, getattr(tp, "__name__", str(tp)))


def _coerce(value, tp):
    """``value`` as type ``tp`` (ints widen to floats, lists become tuples), or raise TypeError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg)
            except TypeError:
                pass
        raise TypeError
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if (origin or tp) is dict:
        if isinstance(value, dict):
            return value
        raise TypeError
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise TypeError
            return tuple(_coerce(v, a) for v, a in zip(value, args))
        items = [_coerce(v, args[0]) for v in value]
        return tuple(items) if origin is tuple else items
    return value


def _checked(value, tp, key: str):
    try:
        return _coerce(value, tp)
    except TypeError:
        hint = " (finite)" if isinstance(value, float) and not math.isfinite(value) else ""
        if "string" in _describe(tp) and isinstance(value, (int, float, bool)):
            hint = f" (quote it: '{value}')"
        elif "string" in _describe(tp) and isinstance(value, (dict, list)):
            hint = " (YAML reads {...} as a mapping and [...] as a list: quote the text)"
        raise ValueError(f"{key}={value!r}: expected {_describe(tp)}{hint}") from None


def check_types(cfg, prefix: str = "") -> None:
    """Every field of a (nested) config dataclass against its declared type, naming the key."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_types(value, f"{prefix}{f.name}.")
        else:
            setattr(cfg, f.name, _checked(value, hints[f.name], f"{prefix}{f.name}"))


def _build(cls, data, prefix: str):
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "config"
        raise ValueError(f"{where}: expected a section (a mapping of keys), got {data!r}; write it as "
                         f"{prefix.rstrip('.').rsplit('.', 1)[-1] or 'key'}: {{key: value, ...}}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        name = sorted(unknown, key=str)[0]
        section = prefix.rstrip(".") or "the top level"
        raise ValueError(f"unknown config key '{prefix}{name}'; known keys under {section}: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        f = known[name]
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            if value is not None and not isinstance(value, dict):
                _build(type(sub), value, f"{prefix}{name}.")
            merged = {k.name: getattr(sub, k.name) for k in dataclasses.fields(sub)} | (value or {})
            kwargs[name] = _build(type(sub), merged, f"{prefix}{name}.")
        else:
            kwargs[name] = _checked(value, hints[name], f"{prefix}{name}")
    return cls(**kwargs)


def _read_yaml(path: str, top_level: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config {path}: no such file")
    if p.is_dir():
        raise ValueError(f"config {path} is a directory; pass a YAML file (see configs/)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"config {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    raw = parse_yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config {path}: the top level must be a mapping of {top_level}")
    return raw


def _merge(raw: dict, values: dict) -> None:
    """``values`` into ``raw``, section by section."""
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            _merge(raw[key], value)
        else:
            raw[key] = value


def _example(cls, prefix: str = "") -> str | None:
    """A ``--set`` example for ``cls``: its learning rate, wherever it lives."""
    for f in dataclasses.fields(cls):
        if f.name == "lr":
            return f"{prefix}lr=0.01"
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub) and (found := _example(type(sub), f"{prefix}{f.name}.")):
            return found
    return None


def load_dataclass(cls, path: str | None = None, overrides: list[str] = (), values: dict | None = None):
    """A config dataclass ``cls`` from, in rising precedence: its defaults, the YAML file ``path``, ``values``
    (already-typed keys: a command's own flags, a preset) and ``--set key=value`` items (dotted keys for
    sections, values read as YAML). Every key is checked against the declared types, naming the key, and
    ``cls.validate()`` runs when the class has one. The one loader of every command's config."""
    names = [f.name for f in dataclasses.fields(cls)]
    nested = any(f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory())
                 for f in dataclasses.fields(cls))
    top_level = f"{'sections' if nested else 'keys'} ({''.join(n + ':, ' for n in names[:2])}...)"
    raw = _read_yaml(path, top_level) if path else {}
    _merge(raw, dict(values or {}))
    example = _example(cls) or f"{names[0]}=..."
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set {example}")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {part} is not a section")
        node[parts[-1]] = parse_yaml(value, f"--set {item}")
    try:
        cfg = _build(cls, raw, "")
    except TypeError as exc:
        raise ValueError(f"config: {exc}") from None
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def load_config(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """``pte train``'s config: :func:`load_dataclass` of :class:`TrainConfig`."""
    return load_dataclass(TrainConfig, path, overrides)


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
