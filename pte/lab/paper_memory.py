"""pte's training step on fake tensors: a device check without a GPU, and paper-scale memory without the memory.

``FakeTensorMode`` runs every op on shapes, dtypes and devices alone: nothing is allocated, and an op that mixes a
CPU tensor with an accelerator tensor raises ``FakeTensorDeviceMismatchError`` exactly where CUDA would (0-dim CPU
tensors may mix, as on CUDA). Two uses of one harness:

- :func:`device_check`: run a step (replay -> loss -> backward -> Adam) of a tiny model whose every parameter and
  buffer sits on the fake accelerator; a tensor the step creates on the CPU by mistake fails the check.
- :func:`paper_step_memory`: pte's real training step of the paper's 3B/7B/8B models (architectures from
  ``pte/assets/paper_models``), its live tensor bytes counted as :class:`pte.memory.LiveTensorBytes` does.

The fake accelerator is ``meta``, not ``cuda``: on a CPU-only build, autograd asks the CUDA runtime for a stream or
the accelerator for every node on a ``cuda`` tensor (``.to("cuda")`` of a leaf aborts the process, backward raises
"Cannot access accelerator device"), while ``meta`` has a device guard and is just as distinct from ``cpu``.

Data-dependent scalars (``.item()``, ``float(t)``, ``bool(t)``) have no value on fake tensors. :class:`Scalars`
answers them from a recording of the same step run for real (tiny models: the fake run then takes the real run's
branches) or with a default (``True``, ``1``: unpadded prompts, a positive count).

Attention at paper scale: the fake kernels of ``scaled_dot_product_attention`` take the math path (a ``[b, h, q, k]``
score matrix), which no GPU run of these models uses. :func:`flash_attention_memory` replaces it by the memory of
the CUDA flash / memory-efficient kernels: saved q, k, v, output and an fp32 log-sum-exp ``[b, h, q]``, a bool mask
turned into a bias of the query dtype; backward allocates dq, dk, dv. transformers' own GQA choice (``repeat_kv``
when a mask is given, as on CUDA) is kept.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

FAKE_DEVICE = torch.device("meta")
MODELS_DIR = Path(__file__).resolve().parents[1] / "assets" / "paper_models"
PAPER_MODELS = ("Qwen2.5-3B-Instruct", "Qwen2.5-7B-Instruct", "DeepSeek-R1-Distill-Llama-8B")
METHODS = ("lora", "lora_c", "pte")
GIB = 2**30


class DeviceMismatch(RuntimeError):
    """A tensor the step created on the CPU met a tensor on the model's device."""


def _call_site() -> tuple[str, int]:
    """The innermost Python line outside torch's dispatch machinery: where a scalar was asked for."""
    import sys

    frame = sys._getframe(2)
    while frame is not None and ("/torch/_" in frame.f_code.co_filename or "/torch/utils/_" in frame.f_code.co_filename):
        frame = frame.f_back
    return ("", 0) if frame is None else (frame.f_code.co_filename, frame.f_lineno)


class Scalars(TorchDispatchMode):
    """Answers ``aten._local_scalar_dense`` (every ``.item()``, ``float(t)``, ``bool(t)``). ``record=True``: compute
    it and keep the answer per call site; else give a recording's answers per call site, in order, then defaults
    (``True`` for bools, ``1`` for numbers). Per call site, because CPU kernels ask for scalars of their own
    (e.g. inside ``arange``) that fake kernels do not."""

    def __init__(self, answers: dict | None = None, record: bool = False):
        super().__init__()
        self.answers = {k: list(v) for k, v in (answers or {}).items()}
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is not torch.ops.aten._local_scalar_dense.default:
            return func(*args, **(kwargs or {}))
        site = _call_site()
        if self.record:
            value = func(*args, **(kwargs or {}))
            self.answers.setdefault(site, []).append(value)
            return value
        queue = self.answers.get(site)
        if queue:
            return queue.pop(0)
        return True if args[0].dtype == torch.bool else 1


def to_fake(modules: list[nn.Module], mode, device: torch.device = FAKE_DEVICE) -> None:
    """Replace every parameter and buffer of ``modules`` by a fake tensor on ``device`` (same shape, dtype and
    ``requires_grad``; shared tensors, e.g. tied embeddings, stay shared). Meta tensors become fake ones as they are."""
    done: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in done:
            with mode:
                if t.is_meta:
                    f = torch.empty(t.shape, dtype=t.dtype, device=device)
                else:
                    f = mode.from_tensor(t.detach()).to(device)
            done[id(t)] = nn.Parameter(f, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else f
        return done[id(t)]

    for root in modules:
        for mod in root.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[name] = fake(p)
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[name] = fake(b)


@contextlib.contextmanager
def fake_device(modules: list[nn.Module], *, answers: dict | None = None, device: torch.device = FAKE_DEVICE):
    """Inside: ``modules`` live on the fake ``device``, every new tensor is fake, and a CPU/device mix raises
    :class:`DeviceMismatch`. The modules keep their fake tensors afterwards (build fresh ones per check)."""
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    to_fake(modules, mode, device)
    try:
        with mode, Scalars(answers):
            yield device
    except FakeTensorDeviceMismatchError as e:
        raise DeviceMismatch(f"{e}\n-> a tensor was created on the CPU while the model is on {device.type}: create it "
                             "with device= the model's device (next(model.parameters()).device)") from e


def device_check(build: Callable[[], tuple[list[nn.Module], object]], step: Callable[[object, torch.device], object],
                 device: torch.device = FAKE_DEVICE):
    """Run ``step(ctx, torch.device("cpu"))`` for real on ``build()``'s objects, recording its data-dependent scalars,
    then ``step(ctx, device)`` on a second ``build()`` whose modules sit on the fake ``device``. Raises
    :class:`DeviceMismatch` where the step mixes devices. ``build`` -> (modules to move, the step's context)."""
    _, ctx = build()
    with Scalars(record=True) as rec:
        step(ctx, torch.device("cpu"))
    modules, ctx = build()
    with fake_device(modules, answers=rec.answers, device=device) as dev:
        return step(ctx, dev)


# -- attention memory at paper scale -----------------------------------------------------------------------------

class _FlashMemory(torch.autograd.Function):
    """The CUDA flash / memory-efficient kernels' memory (fake tensors only: the values are left empty)."""

    @staticmethod
    def forward(ctx, q, k, v, bias):  # q [b, h, n, d], k/v [b, h or h_kv, m, d]; bias [b, 1, n, m] or None
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *(() if bias is None else (bias,)))
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


def _sdpa_memory(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    bias = None
    if attn_mask is not None:  # CUDA's sdpa turns a bool mask into an additive bias of the query dtype
        bias = attn_mask if attn_mask.dtype != torch.bool else torch.empty(attn_mask.shape, dtype=query.dtype,
                                                                           device=query.device)
    return _FlashMemory.apply(query, key, value, bias)


@contextlib.contextmanager
def flash_attention_memory():
    """Within: ``F.scaled_dot_product_attention`` has the CUDA kernels' memory (see the module docstring)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _sdpa_memory
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# -- the paper's models -------------------------------------------------------------------------------------------

def paper_config(name: str, layers: int | None = None):
    """A transformers config of one of :data:`PAPER_MODELS` (``layers``: override the layer count)."""
    from transformers import AutoConfig

    path = MODELS_DIR / f"{name}.json"
    if not path.exists():
        raise ValueError(f"unknown paper model {name!r}; choose one of {list(PAPER_MODELS)}")
    values = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    values.pop("architectures", None)
    values.pop("torch_dtype", None)
    if layers is not None:
        values["num_hidden_layers"] = layers
    return AutoConfig.for_model(values.pop("model_type"), **values)


def meta_model(config, dtype=torch.bfloat16):
    """The model on the meta device (no memory, no init); :func:`to_fake` turns it into fake tensors."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()


def attention_tflops(config, method: str, prompt_len: int, length: int, window: int, n_global: int = 32,
                     rank: int = 32) -> float:
    """Attention TFLOPs of one sequence's training pass (forward + backward = 3 x forward).

    forward = 4 * heads * head_dim * layers * (query, key) pairs: QK^T and PV, 2 FLOPs a multiply-add. LoRA: causal
    over prompt + completion, pairs = N (N + 1) / 2. LoRA_c / PTE: the prompt causal, then each fed completion token
    sees the prompt and the window's thought tokens held (its own included), as the bounded cache evicts; PTE adds
    the state's read of each evicted block, 4 * n_g * r * n_evict per layer."""
    from pte.cache import n_evict_for

    cfg = config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_pair = 4 * cfg.num_attention_heads * head_dim * cfg.num_hidden_layers
    if method == "lora":
        n = prompt_len + length
        return 3 * per_pair * n * (n + 1) / 2 / 1e12
    m = n_evict_for(window, 0.25)
    pairs, held, evictions = prompt_len * (prompt_len + 1) // 2, 0, 0
    for _ in range(length - 1):  # the last completion token is never fed
        if held >= window:
            held -= m
            evictions += 1
        held += 1
        pairs += prompt_len + held
    state = 4 * n_global * rank * m * evictions * cfg.num_hidden_layers if method == "pte" else 0
    return 3 * (per_pair * pairs + state) / 1e12


def _bytes(obj, seen: set) -> int:
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage()._cdata
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(_bytes(o, seen) for o in obj)
    return 0


def _state_bytes(state) -> int:
    if state is None:
        return 0
    seen: set = set()
    return _bytes(state.history, seen) + _bytes([s.state for s in state.slots if s.state is not None], seen)


def teacher_forced(model, rows, loss_fn, temperature: float = 1.0) -> None:
    """The full-cache baseline's training pass as TRL runs it: one forward over prompt + completion (no cache, no
    mask: causal), the completion's log-probs as the replay computes them, one backward."""
    device = next(model.parameters()).device
    if len({len(r.prompt_ids) for r in rows}) != 1 or len({len(r.completion_ids) for r in rows}) != 1:
        raise ValueError("teacher_forced takes rows of one prompt length and one completion length")
    T = len(rows[0].completion_ids)
    ids = torch.tensor([r.prompt_ids + r.completion_ids[:-1] for r in rows], device=device)  # [rows, P + T - 1]
    targets = torch.tensor([r.completion_ids for r in rows], device=device)  # [rows, T]
    position_ids = torch.arange(ids.shape[1], device=device).expand_as(ids)
    logits = model(input_ids=ids, position_ids=position_ids, use_cache=False, logits_to_keep=T).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logp = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    loss_fn(logp, slice(None), slice(0, T)).backward()


def training_step(model, adapter, optimizer, method: str, rows, window: int | None, device) -> None:
    """One micro-batch of pte's GRPO step: the replay under the method's cache (LoRA: :func:`teacher_forced`) with
    the clipped token loss, then the Adam step. Every tensor is made on ``device``."""
    from pte.grpo import TokenBatch, clipped_token_loss
    from pte.replay import replay
    from pte.rollout import CacheSpec

    n, T = len(rows), max(len(r.completion_ids) for r in rows)
    tb = TokenBatch(advantages=torch.ones(n, 1, device=device), old_logp=torch.zeros(n, T, device=device),
                    mask=torch.ones(n, T, dtype=torch.bool, device=device), normalizer=float(n * T))
    loss_fn = lambda logp, rows, cols: clipped_token_loss(logp, tb, cols, rows=rows)[0]
    if method == "lora":
        teacher_forced(model, rows, loss_fn)
    else:
        replay(model, rows, CacheSpec(window=window), adapter=adapter, loss_fn=loss_fn)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _rows(n: int, prompt_len: int, length: int, window: int | None):
    from pte.cache import sliding_eviction_steps
    from pte.rollout import RolloutRow

    prompt, completion = list(range(3, 3 + prompt_len)), [3] * length
    return [RolloutRow(prompt, completion, [0.0] * length, window, sliding_eviction_steps(length - 1, window), "length")
            for _ in range(n)]


def _rollout_live(model, adapter, window: int | None, rows: int, prompt_len: int, length: int, device):
    """-> (peak live bytes of the prompt forward, of the last decode step with the cache and state it holds, K/V
    bytes then, thought-state bytes then). Kept apart, as each is multilinear (:func:`extrapolate`) and their max
    is not.

    The prompt forward is measured, then the cache is filled to its longest in one forward (not measured: decoding
    feeds one token a time), then one decode step (an eviction and the state update first, under the window) and
    its sampling are measured on top of the cache and state."""
    from pte.memory import LiveTensorBytes
    from pte.rollout import CacheSpec, Decoder, Sampling, sample

    s = Sampling(max_new_tokens=length)
    with torch.no_grad():
        state = adapter.new_state(rows) if adapter is not None else None
        cache = CacheSpec(window=window).build(model, (state,) if state is not None else ())
        dec = Decoder(model, cache)
        with LiveTensorBytes() as prefill:
            sample(dec.prefill(torch.full((rows, prompt_len), 3, device=device),
                               torch.ones(rows, prompt_len, dtype=torch.bool, device=device))[:, -1], s, None)
        held = window if window is not None else length - 1
        dec.step(torch.full((rows, held), 3, device=device), logits_to_keep=1)
        kv, before = cache.cache_bytes(), _state_bytes(state)
        with LiveTensorBytes() as decode:
            sample(dec.step(torch.full((rows, 1), 3, device=device), logits_to_keep=1)[:, -1], s, None)
        after = _state_bytes(state)  # with the first eviction's history
        if adapter is not None:
            adapter.clear_state()
    return prefill.peak, kv + before + decode.peak, kv, after


def step_memory(config, method: str, length: int, window: int, rows: int, prompt_len: int, rank: int = 32) -> dict:
    """Bytes of one training step of ``config``'s model, all fake (bf16 weights, fp32 adapter and Adam state):
    ``static`` (weights + adapter + Adam); peak live bytes above static of the rollout's ``prefill`` and of its
    ``decode`` step at its longest, and of the ``train`` pass; ``kv`` and ``state``, the rollout's cache and thought
    state at its longest."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pte.adapter import AdapterConfig, attach
    from pte.memory import LiveTensorBytes

    win = None if method == "lora" else window
    model = meta_model(config)
    adapter = attach(model, AdapterConfig(method=method, rank=rank, n_global=rank))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    to_fake([model, adapter.encoders], mode)
    with mode, Scalars(), flash_attention_memory():
        device = FAKE_DEVICE
        params = adapter.parameters()
        optimizer = torch.optim.Adam(params, lr=1e-6)
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()  # Adam's state exists from the first step on
        optimizer.zero_grad(set_to_none=True)
        seen: set = set()
        adapter_bytes = _bytes(params, seen)
        weights = _bytes(list(model.parameters()), seen)
        adam = _bytes([t for st in optimizer.state.values() for t in st.values()], seen)
        prefill, decode, kv, st = _rollout_live(model, adapter if method == "pte" else None, win, rows, prompt_len, length,
                                        device)
        batch = _rows(rows, prompt_len, length, win)
        with LiveTensorBytes() as train:
            training_step(model, adapter, optimizer, method, batch, win, device)
    return {"static": weights + adapter_bytes + adam, "weights": weights, "adapter": adapter_bytes, "adam": adam,
            "prefill": prefill, "decode": decode, "train": train.peak, "kv": kv, "state": st}


def extrapolate(fn: Callable[..., dict], at: dict, probes: dict) -> dict:
    """``fn(**at)`` from ``fn`` at two probe values of each axis in ``probes`` (``{axis: (a, b)}``), extrapolating
    one axis after the other. Exact where every count is multilinear in the probed axes, as bytes are in the
    number of identical decoder layers, in the rows of a batch and, past the first segments of a bounded-cache
    replay, in the length (``tests/test_paper_memory.py`` checks each on a small case)."""
    if not probes:
        return fn(**at)
    (axis, (a, b)), rest = next(iter(probes.items())), dict(list(probes.items())[1:])
    lo, hi = extrapolate(fn, at | {axis: a}, rest), extrapolate(fn, at | {axis: b}, rest)
    return {k: lo[k] + round((at[axis] - a) * (hi[k] - lo[k]) / (b - a)) for k in lo}


def paper_records(models=PAPER_MODELS, methods=METHODS, lengths=(3072, 6144, 16384, 65536), window: int = 1024,
                  micro_batches=(1, 2, 4, 8, 16, 32, 64), prompt_len: int = 256, rows_per_gpu: int = 64,
                  length_probes: tuple[int, int] | None = (3072, 4096), log=print) -> list[dict]:
    """The ``pte bench paper-memory`` records: per model, method, length and micro-batch, the rollout's and the
    train pass's peaks and the step's (their max), weights, adapter and Adam state included.

    Measured at 1 and 2 decoder layers and 1 and 2 rows and, for the bounded cache (whose fake run costs one
    replay segment per eviction), at the ``length_probes``; extrapolated from there (:func:`extrapolate`).
    ``length_probes=None`` measures every length."""
    import functools

    records = []
    for name in models:
        full = paper_config(name)
        for method in methods:
            @functools.cache
            def measure(layers, rows, length):
                t0 = time.perf_counter()
                out = step_memory(paper_config(name, layers), method, length, window, rows, prompt_len)
                log(f"  measured {name} {method} layers={layers} rows={rows} length={length} "
                    f"({time.perf_counter() - t0:.1f}s)")
                return out

            probes = {"layers": (1, 2), "rows": (1, 2)}
            if method != "lora" and length_probes is not None:
                probes["length"] = length_probes
            for length in lengths:
                flops = attention_tflops(full, method, prompt_len, length, window)
                for m in micro_batches:
                    mem = extrapolate(measure, dict(layers=full.num_hidden_layers, rows=m, length=length), probes)
                    mem["rollout"] = max(mem["prefill"], mem["decode"])
                    base = dict(model=name, method=method, length=length, window=None if method == "lora" else window,
                                rows=m, prompt_len=prompt_len, kv_cache_bytes=mem["kv"], state_bytes=mem["state"],
                                attention_tflops=flops, static_bytes=mem["static"])
                    for phase in ("rollout", "train"):
                        records.append(base | {"phase": phase, "peak_bytes": mem["static"] + mem[phase]})
                    records.append(base | {"phase": "step", "micro_batches": math.ceil(rows_per_gpu / m),
                                           "peak_bytes": mem["static"] + max(mem["rollout"], mem["train"])})
                log(f"{name} {method} {length}: step at 1 row {records[-3 * len(micro_batches) + 2]['peak_bytes'] / GIB:.1f} GiB")
    return records
