"""The state-driven low-rank adapter: attach to any supported causal LM, detach, save, load, export.

Every target linear becomes ``y = W x + (alpha / r) * A (S (B x))`` per sample, with ``B: d_in -> r`` and
``A: n_g -> d_out`` (zero-initialised, so step 0 is the base model), never materialising ``Delta W``
(in PEFT's names our ``A`` is ``lora_B`` and our ``B`` is ``lora_A``). ``S`` is the layer's thought state
``[batch, n_g, r]`` (:mod:`pte.thought`), or the identity for plain LoRA, which therefore needs ``n_g == r``.

Methods are configurations of these parts, not separate code:

| method  | state ``S``                                | cache (set by the caller)            |
|---------|--------------------------------------------|--------------------------------------|
| lora    | identity                                   | full                                 |
| lora_c  | identity                                   | the same sliding window as PTE       |
| pte     | softmax read of global + evicted tokens, normalised, per layer (:mod:`pte.thought`) | sliding window |

Default targets are every linear of attention and MLP (q, k, v, o, gate, up, down): the state should be able to
act everywhere the layer computes, and the paper's LoRA baseline, whose targets it does not state, is most
commonly run that way in RL recipes. Any subset can be chosen.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pte.files import write_atomic
from pte.thought import StateSlot, ThoughtEncoder, ThoughtState

METHODS = ("lora", "lora_c", "pte")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FORMAT_VERSION = 1


@dataclass
class AdapterConfig:
    method: str = "pte"
    rank: int = 32
    n_global: int = 32
    alpha: float | None = None  # None: alpha = rank, so alpha / r = 1
    targets: tuple[str, ...] = DEFAULT_TARGETS
    state_attention: str = "softmax"  # | "linear" (eq. 4 as printed); see pte.thought
    state_update: str = "accumulate"  # | "recursive" (linear only)
    state_scale: str = "fixed"  # | "learnable"
    key_rope: str = "unrotate"  # | "rotated"
    ablation: str = "none"  # | "global_only" | "global0"
    seed: int = 0

    def __post_init__(self):
        self.targets = tuple(self.targets)
        self.validate()

    def validate(self) -> None:
        choices = dict(method=METHODS, state_attention=("softmax", "linear"), state_update=("accumulate", "recursive"), state_scale=("fixed", "learnable"),
                       key_rope=("unrotate", "rotated"), ablation=("none", "global_only", "global0"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"adapter.{name}={getattr(self, name)!r}: choose one of {list(allowed)}")
        if self.rank < 1:
            raise ValueError(f"adapter.rank={self.rank}: must be >= 1")
        if self.n_global < 1:
            raise ValueError(f"adapter.n_global={self.n_global}: must be >= 1 (#Global-0 is ablation='global0')")
        if self.method != "pte" and self.n_global != self.rank:
            raise ValueError(
                f"method={self.method} fixes S to the r x r identity, so n_global must equal rank "
                f"(got n_global={self.n_global}, rank={self.rank}); set n_global={self.rank}"
            )
        if self.state_attention == "softmax" and self.state_update == "recursive":
            raise ValueError("state_update='recursive' renormalises a linear sum; it needs state_attention='linear' "
                             "(the softmax state is one read over every evicted token)")
        if self.method != "pte" and self.ablation != "none":
            raise ValueError(f"ablation={self.ablation!r} applies to method=pte only")
        if not self.targets:
            raise ValueError("adapter.targets is empty: name at least one linear (e.g. q_proj)")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def stateful(self) -> bool:
        return self.method == "pte"


class AdaptedLinear(nn.Module):
    """``W x + scale * A (S (B x))`` with the frozen base ``W``; ``S`` read from the layer's slot per forward."""

    def __init__(self, base: nn.Linear, rank: int, n_global: int, scale: float, slot: StateSlot):
        super().__init__()
        self.base = base
        self.B = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32, device=base.weight.device))
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        self.A = nn.Parameter(torch.zeros(base.out_features, n_global, dtype=torch.float32, device=base.weight.device))
        self.scale = scale
        self.slot = slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        z = F.linear(x, self.B.to(x.dtype))  # [batch, seq, r]
        state = self.slot.state
        if state is not None:  # [batch, n_g, r]: z -> z S^T, [batch, seq, n_g]
            z = torch.matmul(z, state.transpose(-1, -2).to(x.dtype))
        return y + self.scale * F.linear(z, self.A.to(x.dtype))


def _decoder_layers(model) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: expected model.model.layers (a Llama/Qwen2/Qwen3/Mistral causal LM)")
    return layers


def config_hash(model) -> str:
    """A short hash of the base model's architecture config (what an adapter's shapes depend on)."""
    cfg = model.config.to_dict()
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "rope_parameters")
    blob = json.dumps({k: cfg.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Adapter:
    """The trainable parts attached to one model: each target's ``A``/``B`` and, for PTE, one
    :class:`ThoughtEncoder` per layer. Only these are saved or trained; the base model is frozen."""

    def __init__(self, model, config: AdapterConfig):
        self.config = config
        self.model = model
        layers = _decoder_layers(model)
        device = next(model.parameters()).device
        self.slots = [StateSlot() for _ in layers]
        self.linears: dict[str, AdaptedLinear] = {}
        self.encoders = nn.ModuleList()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            for i, layer in enumerate(layers):
                for name, module in list(layer.named_modules()):
                    leaf = name.rsplit(".", 1)[-1]
                    if leaf in config.targets and isinstance(module, nn.Linear):
                        parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                        adapted = AdaptedLinear(module, config.rank, config.n_global, config.scale, self.slots[i])
                        setattr(parent, leaf, adapted)
                        self.linears[f"layers.{i}.{name}"] = adapted
            missing = set(config.targets) - {k.rsplit(".", 1)[-1] for k in self.linears}
            if missing:
                self.detach()
                raise ValueError(f"target modules {sorted(missing)} not found in {type(model).__name__}; "
                                 f"its linears are named like {sorted(_linear_names(layers[0]))}")
            if config.stateful:
                rotary = model.model.rotary_emb
                cfg = model.config
                head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
                for layer in layers:
                    enc = ThoughtEncoder(layer.self_attn, rotary, cfg.hidden_size, config.n_global, config.rank,
                                         head_dim, config.state_scale == "learnable")
                    self.encoders.append(enc.to(device))
        for p in model.parameters():
            p.requires_grad_(False)
        for _, p in self.named_parameters():
            p.requires_grad_(True)

    def named_parameters(self):
        for key, lin in self.linears.items():
            yield f"{key}.A", lin.A
            yield f"{key}.B", lin.B
        for name, p in self.encoders.named_parameters():
            yield f"encoders.{name}", p

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.named_parameters()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        missing, unexpected = set(own) - set(tensors), set(tensors) - set(own)
        bad = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
               for k in set(own) & set(tensors) if tensors[k].shape != own[k].shape]
        if missing or unexpected or bad:
            raise ValueError(f"adapter tensors do not fit: missing {sorted(missing)[:5]}, unexpected "
                             f"{sorted(unexpected)[:5]}, shapes {bad[:5]}")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(tensors[k])

    # -- the state --------------------------------------------------------------------------------------------
    def new_state(self, batch: int, exact_history: bool = False) -> ThoughtState | None:
        """A fresh per-sequence state for ``batch`` rows (``None`` for the stateless methods); subscribe it to the
        cache so evictions update it. ``exact_history``: see :mod:`pte.history` (replay only)."""
        if not self.config.stateful:
            return None
        c = self.config
        return ThoughtState(self.encoders, self.slots, batch, attention=c.state_attention, update=c.state_update,
                            ablation=c.ablation, key_rope=c.key_rope, exact_history=exact_history)

    @contextlib.contextmanager
    def disabled(self):
        """The base model, exactly (every adapted linear adds 0): the KL reference, with no second copy of the
        weights."""
        scales = {k: lin.scale for k, lin in self.linears.items()}
        for lin in self.linears.values():
            lin.scale = 0.0
        try:
            yield
        finally:
            for k, lin in self.linears.items():
                lin.scale = scales[k]

    def clear_state(self) -> None:
        for slot in self.slots:
            slot.state = None

    def detach(self) -> None:
        """Put the base linears back; the model is as it was before :meth:`attach`."""
        for key, adapted in self.linears.items():
            idx, name = key.split(".", 2)[1:]
            layer = _decoder_layers(self.model)[int(idx)]
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            setattr(parent, name.rsplit(".", 1)[-1], adapted.base)
        self.clear_state()

    # -- files ------------------------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {
            "format": "pte-adapter", "version": FORMAT_VERSION, "adapter": asdict(self.config),
            "base_model": getattr(self.model.config, "_name_or_path", "") or "",
            "base_config_hash": config_hash(self.model), "model_type": self.model.config.model_type,
            "num_layers": self.model.config.num_hidden_layers,
        }

    def save(self, directory: str | os.PathLike, cache: dict | None = None, extra: dict | None = None) -> Path:
        """Adapter-only safetensors + JSON config (method, rank, n_g, targets, the cache policy it was trained
        under, base model id and config hash), each written atomically (temp file, then rename)."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = self.metadata() | {"cache": cache} | ({"extra": extra} if extra else {})
        write_atomic(out / "adapter.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        write_atomic(out / "adapter_config.json", lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
        return out


def attach(model, config: AdapterConfig) -> Adapter:
    return Adapter(model, config)


def _linear_names(layer) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "adapter_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no adapter_config.json; expected a directory written by Adapter.save")
    meta = json.loads(path.read_text())
    if meta.get("format") != "pte-adapter":
        raise ValueError(f"{path}: not a pte adapter config (format={meta.get('format')!r})")
    return meta


def load(model, directory: str | os.PathLike) -> Adapter:
    """Attach the saved adapter to ``model``; the config is checked against the model before any weight loads."""
    from safetensors.torch import load_file

    meta = read_config(directory)
    if meta["version"] > FORMAT_VERSION:
        raise ValueError(f"{directory}: adapter format version {meta['version']} is newer than this pte ({FORMAT_VERSION}); upgrade pte")
    problems = []
    if meta["model_type"] != model.config.model_type:
        problems.append(f"model type {meta['model_type']!r} != {model.config.model_type!r}")
    if meta["num_layers"] != model.config.num_hidden_layers:
        problems.append(f"{meta['num_layers']} layers != {model.config.num_hidden_layers}")
    if meta["base_config_hash"] != config_hash(model):
        problems.append(f"base config hash {meta['base_config_hash']} != {config_hash(model)} (a different architecture)")
    if problems:
        raise ValueError(f"adapter {directory} was trained for another model ({meta['base_model'] or 'unnamed'}): "
                         + "; ".join(problems))
    meta["adapter"].setdefault("state_attention", "linear")  # files from before the switch used eq. 4's linear state
    known = {f.name for f in fields(AdapterConfig)}
    unknown = set(meta["adapter"]) - known
    if unknown:
        raise ValueError(f"{directory}: unknown adapter config keys {sorted(unknown)}; written by a newer pte?")
    adapter = Adapter(model, AdapterConfig(**meta["adapter"]))
    try:
        adapter.load_state_dict(load_file(str(Path(directory) / "adapter.safetensors")))
    except ValueError as exc:
        adapter.detach()
        raise ValueError(f"adapter {directory}: {exc}") from None
    return adapter


def export_peft(adapter: Adapter, directory: str | os.PathLike) -> Path:
    """Write a static adapter (LoRA / LoRA_c) in PEFT's LoRA format (``adapter_model.safetensors`` +
    ``adapter_config.json``) so PEFT and vLLM can load it. PTE's state depends on the input: it cannot be
    expressed as a static LoRA, so exporting it is an error."""
    from safetensors.torch import save_file

    c = adapter.config
    if c.stateful:
        raise ValueError("method=pte has an input-dependent state; only lora / lora_c adapters export to PEFT")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, lin in adapter.linears.items():
        name = "base_model.model.model." + key
        tensors[f"{name}.lora_A.weight"] = lin.B.detach().cpu().contiguous()  # our B: d_in -> r
        tensors[f"{name}.lora_B.weight"] = lin.A.detach().cpu().contiguous()  # our A: r -> d_out
    peft_cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": c.rank, "lora_alpha": c.alpha if c.alpha is not None else c.rank,
        "lora_dropout": 0.0, "target_modules": list(c.targets), "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": getattr(adapter.model.config, "_name_or_path", "") or None,
        "inference_mode": True, "use_rslora": False, "use_dora": False,
    }
    write_atomic(out / "adapter_model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write_atomic(out / "adapter_config.json", lambda p: Path(p).write_text(json.dumps(peft_cfg, indent=1)))
    return out
