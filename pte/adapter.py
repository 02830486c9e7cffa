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

Precision. The adapter's parameters (``A``, ``B``, ``h_g``, ``W^a_*``) are fp32 whatever the base model's dtype,
as PEFT's ``autocast_adapter_dtype`` keeps them, so the optimizer's small updates are not rounded away in bf16.
The adapted linear computes in the activations' dtype: ``B``, ``S`` and ``A`` are cast to it in each forward, so a
bf16 model runs bf16 matmuls only. The thought encoder computes in fp32 (:mod:`pte.thought`): the global tokens
pass the frozen projections in the base dtype, as any token does, and leave them in fp32; evicted keys/values are
cast to fp32 before they are un-rotated; the ``W^a`` projections, the softmax summaries, the history statistics
(:mod:`pte.history`) and the normalisation are fp32, in the rollout and the replay alike, so both carry the same
state up to fp32 rounding. The state is cast to the activation dtype only where an adapted linear applies it.
Log-probs are fp32 (:func:`pte.rollout.sample`, :func:`pte.replay.token_logprobs`). The rollout (one token per
forward) and the replay (one segment per forward) still round differently in bf16, so their log-probs differ by
bf16 noise: the GRPO loss takes the replay's own log-probs as ``pi_old`` (:mod:`pte.grpo`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pte.files import write_atomic
from pte.methods import METHODS
from pte.thought import StateSlot, ThoughtEncoder, ThoughtState

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
        choices = dict(method=tuple(METHODS), state_attention=("softmax", "linear"), state_update=("accumulate", "recursive"), state_scale=("fixed", "learnable"),
                       key_rope=("unrotate", "rotated"), ablation=("none", "global_only", "global0"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"adapter.{name}={getattr(self, name)!r}: choose one of {list(allowed)}")
        if self.rank < 1:
            raise ValueError(f"adapter.rank={self.rank}: must be >= 1")
        if self.n_global < 1:
            raise ValueError(f"adapter.n_global={self.n_global}: must be >= 1 (#Global-0 is ablation='global0')")
        if not self.stateful and self.n_global != self.rank:
            raise ValueError(
                f"method={self.method} fixes S to the r x r identity, so n_global must equal rank "
                f"(got n_global={self.n_global}, rank={self.rank}); set n_global={self.rank}"
            )
        if self.state_attention == "softmax" and self.state_update == "recursive":
            raise ValueError("state_update='recursive' renormalises a linear sum; it needs state_attention='linear' "
                             "(the softmax state is one read over every evicted token)")
        if not self.stateful and self.ablation != "none":
            raise ValueError(f"ablation={self.ablation!r} applies to method=pte only")
        if not self.targets:
            raise ValueError("adapter.targets is empty: name at least one linear (e.g. q_proj)")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def stateful(self) -> bool:
        return METHODS[self.method].stateful


class AdaptedLinear(nn.Module):
    """``W x + scale * A (S (B x))`` with the frozen base ``W``; ``S`` read from the layer's slot per forward.
    ``A``/``B`` are fp32 parameters; the forward runs in ``x``'s dtype (module docstring, "Precision")."""

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
            s_t = state.transpose(-1, -2).to(x.dtype)
            z = torch.bmm(z, s_t) if z.dim() == 3 else torch.matmul(z, s_t)  # bmm: fewer dispatches than matmul
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
    def new_state(self, batch: int, exact_history: bool = False, share_globals: bool | None = None) -> ThoughtState | None:
        """A fresh per-sequence state for ``batch`` rows (``None`` for the stateless methods); subscribe it to the
        cache so evictions update it. ``exact_history``: see :mod:`pte.history` (replay only); ``share_globals``:
        see :class:`pte.thought.SharedGlobals` (with grad, the caller then calls ``backward_globals()``)."""
        if not self.config.stateful:
            return None
        c = self.config
        return ThoughtState(self.encoders, self.slots, batch, attention=c.state_attention, update=c.state_update,
                            ablation=c.ablation, key_rope=c.key_rope, exact_history=exact_history,
                            share_globals=share_globals)

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
            "base_model": base_model_name(self.model),
            "base_config_hash": config_hash(self.model), "model_type": self.model.config.model_type,
            "num_layers": self.model.config.num_hidden_layers,
        }

    def save(self, directory: str | os.PathLike, cache: dict | None = None, extra: dict | None = None) -> Path:
        """Adapter-only safetensors + JSON config (method, rank, n_g, targets, the cache policy it was trained
        under, base model id and config hash), each written atomically (temp file, then rename). The config also
        goes into the safetensors header and both carry checksums, so a damaged file or a hand-edited value is
        caught at load. Non-finite tensors are refused: they would load as a broken policy."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        bad = _non_finite(tensors)
        if bad:
            raise ValueError(f"refusing to save adapter {out}: {bad}; the training diverged (lower optim.lr, keep "
                             "optim.max_grad_norm) or resume from an earlier checkpoint")
        meta = json.loads(json.dumps(self.metadata() | {"cache": cache} | ({"extra": extra} if extra else {})))
        meta["checksum"] = {"tensors_sha256": tensors_sha256(tensors), "config_sha256": _config_sha256(meta)}
        header = {"format": "pt", "pte_config": json.dumps(meta, sort_keys=True)}
        write_atomic(out / "adapter.safetensors", lambda p: save_file(tensors, str(p), metadata=header))
        write_atomic(out / "adapter_config.json", lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
        return out


class AdapterWarning(UserWarning):
    """A mismatch that may be intended (another base model name, an old file without checksums)."""


def base_model_name(model) -> str:
    """The base model's name as recorded in an adapter: a hub id, or a local directory's resolved path."""
    name = getattr(model.config, "_name_or_path", "") or ""
    return str(Path(name).resolve()) if name and Path(name).is_dir() else name


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A checksum of names, dtypes, shapes and bytes, independent of the file layout."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _config_sha256(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _non_finite(tensors: dict[str, torch.Tensor]) -> str:
    bad = {k: int((~torch.isfinite(t)).sum()) for k, t in tensors.items() if t.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if not bad:
        return ""
    first = sorted(bad)[0]
    return f"{len(bad)} tensor(s) hold NaN/inf values ({first}: {bad[first]} of {tensors[first].numel()})"


def _changed_keys(saved: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now), key=str):
        a, b = saved.get(key, "<absent>"), now.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}={b!r} (saved as {a!r})")
    return out


def attach(model, config: AdapterConfig) -> Adapter:
    return Adapter(model, config)


def _linear_names(layer) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def read_config(directory: str | os.PathLike) -> dict:
    d = Path(directory)
    if d.is_file():
        raise ValueError(f"adapter {directory} is a file; pass the directory holding adapter_config.json and "
                         "adapter.safetensors")
    if not d.exists():
        raise FileNotFoundError(f"adapter {directory}: no such directory")
    path = d / "adapter_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no adapter_config.json; expected a directory written by Adapter.save")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f":{exc.lineno}:{exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ValueError(f"{path}{where}: not valid JSON ({getattr(exc, 'msg', exc)}); restore the file or save the "
                         "adapter again") from None
    if not isinstance(meta, dict) or meta.get("format") != "pte-adapter":
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        hint = " (a PEFT adapter: pte loads its own format only)" if isinstance(meta, dict) and "peft_type" in meta else ""
        raise ValueError(f"{path}: not a pte adapter config (format={found!r}){hint}")
    missing = [k for k in ("version", "adapter", "model_type", "num_layers", "base_config_hash") if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing {missing}; the file is damaged: restore it or save the adapter again")
    if not isinstance(meta["adapter"], dict):
        raise ValueError(f"{path}: 'adapter' must be a JSON object of adapter settings")
    return meta


def read_tensors(directory: str | os.PathLike, meta: dict | None = None) -> dict[str, torch.Tensor]:
    """``adapter.safetensors``, verified: readable, matching the checksum and the config saved with it, finite.
    Files from before checksums load with a warning."""
    from safetensors import SafetensorError, safe_open

    meta = read_config(directory) if meta is None else meta
    path = Path(directory) / "adapter.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; the adapter directory is incomplete")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc}); it is truncated or damaged: restore it or "
                         "use another checkpoint") from None
    checksum = meta.get("checksum")
    if not checksum:
        warnings.warn(f"{directory}: no checksums (saved by an older pte); loading it unverified (save it again to "
                      "add them)", AdapterWarning, stacklevel=3)
    else:
        if checksum.get("tensors_sha256") != tensors_sha256(tensors):
            raise ValueError(f"{path}: the tensors do not match the checksum in adapter_config.json; the file was "
                             "damaged or replaced: restore it or use another checkpoint")
        if checksum.get("config_sha256") != _config_sha256(meta):
            saved = json.loads(header["pte_config"]) if "pte_config" in header else {}
            changed = _changed_keys({k: v for k, v in saved.items() if k != "checksum"},
                                    {k: v for k, v in meta.items() if k != "checksum"})
            what = "; ".join(changed[:5]) if changed else "its contents changed"
            raise ValueError(f"{Path(directory) / 'adapter_config.json'} was edited after saving: {what}; the tensors "
                             "were trained with the saved values: restore them (or save the adapter again)")
    bad = _non_finite(tensors)
    if bad:
        raise ValueError(f"{path}: {bad}; the training diverged: use an earlier checkpoint")
    return tensors


def load(model, directory: str | os.PathLike, strict: bool = False) -> Adapter:
    """Attach the saved adapter to ``model``; the config is checked against the model before any weight loads.
    Another base model name is a warning (``strict=True``: an error); another architecture is an error."""
    meta = read_config(directory)
    if not isinstance(meta["version"], int) or meta["version"] > FORMAT_VERSION:
        raise ValueError(f"{directory}: adapter format version {meta['version']!r} is newer than this pte "
                         f"({FORMAT_VERSION}); upgrade pte")
    problems = []
    if meta["model_type"] != model.config.model_type:
        problems.append(f"model type {meta['model_type']!r} != {model.config.model_type!r}")
    if meta["num_layers"] != model.config.num_hidden_layers:
        problems.append(f"{meta['num_layers']} layers != {model.config.num_hidden_layers}")
    if meta["base_config_hash"] != config_hash(model):
        problems.append(f"base config hash {meta['base_config_hash']} != {config_hash(model)} (a different architecture)")
    if problems:
        raise ValueError(f"adapter {directory} was trained for another model ({meta.get('base_model') or 'unnamed'}): "
                         + "; ".join(problems))
    trained_on, here = meta.get("base_model") or "", base_model_name(model)
    if trained_on and here and trained_on != here:
        msg = (f"adapter {directory} was trained on {trained_on}, not {here} (same architecture, different model?)")
        if strict:
            raise ValueError(f"{msg}; load it with the model it was trained on, or drop --strict")
        warnings.warn(f"{msg}; pass --strict (strict=True) to refuse", AdapterWarning, stacklevel=2)
    tensors = read_tensors(directory, meta)
    meta["adapter"].setdefault("state_attention", "linear")  # files from before the switch used eq. 4's linear state
    known = {f.name for f in fields(AdapterConfig)}
    unknown = set(meta["adapter"]) - known
    if unknown:
        raise ValueError(f"{directory}: unknown adapter config keys {sorted(unknown)}; written by a newer pte?")
    try:
        config = AdapterConfig(**meta["adapter"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{Path(directory) / 'adapter_config.json'}: {exc}") from None
    adapter = Adapter(model, config)
    try:
        adapter.load_state_dict(tensors)
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
