"""pte.lab.paper_memory: the fake-mode measurement equals the real one, its extrapolations are exact, the FLOPs formula."""

import pytest
import torch

from helpers import thought_starts
from pte.adapter import AdapterConfig, attach
from pte.memory import LiveTensorBytes
from pte.models import tiny_config, tiny_model
from pte.lab.paper_memory import (PAPER_MODELS, Scalars, attention_tflops, extrapolate, fake_device, paper_config,
                              step_memory, training_step)
from pte.rollout import CacheSpec, Sampling, rollout


@pytest.mark.parametrize("method,window,dtype", [("pte", 8, torch.float32), ("lora_c", 8, torch.bfloat16),
                                                 ("lora", None, torch.float32)])
def test_fake_peak_equals_the_real_peak(method, window, dtype):
    """One training step of a tiny model: live tensor bytes counted on fake tensors = counted on real ones."""
    def build():
        model = tiny_model("llama", attn="eager", init_std=0.2, seed=1, dtype=dtype)
        adapter = attach(model, AdapterConfig(method=method, rank=4, n_global=4))
        rows = rollout(model, [[5, 6, 7, 8]] * 3, Sampling(max_new_tokens=30), CacheSpec(window=window),
                       generator=torch.Generator().manual_seed(0), adapter=adapter).rows
        return model, adapter, rows

    def step(model, adapter, rows, device):
        opt = torch.optim.Adam(adapter.parameters(), lr=1e-3)
        with LiveTensorBytes() as live:
            training_step(model, adapter, opt, method, rows, window, device)
        return live.peak

    model, adapter, rows = build()
    with Scalars(record=True) as rec:
        real = step(model, adapter, rows, torch.device("cpu"))
    model, adapter, rows = build()
    with fake_device([model, adapter.encoders], answers=rec.answers) as dev:
        fake = step(model, adapter, rows, dev)
    assert real > 100_000 and abs(fake - real) <= 0.01 * real


def test_extrapolation_over_layers_rows_and_length_is_exact():
    """Bytes are multilinear in layers, rows and (bounded cache, past the first segments) length: 8 probes
    predict a far point. A phase's peak is a max over its ops, so this is exact only while one op sets the peak in
    every probe: on a model this small the prompt forward's and the decode step's transient peaks move between ops
    (the last layer, the head, the fp32 state update), and the chunked log-prob's transient is capped at one chunk;
    the cached and saved bytes (static, K/V, state) stay exact."""
    def measure(layers, rows, length):
        cfg = tiny_config("qwen2", vocab_size=96, hidden=32, layers=layers, heads=4, kv_heads=2)
        return step_memory(cfg, "pte", length, 8, rows, 6, rank=4)

    predicted = extrapolate(measure, dict(layers=3, rows=3, length=20), {"layers": (1, 2), "rows": (1, 2),
                                                                         "length": (12, 14)})
    measured = measure(3, 3, 20)
    transient = {"prefill": 0.1, "decode": 0.1, "train": 1e-3}
    assert {k: v for k, v in predicted.items() if k not in transient} == \
        {k: v for k, v in measured.items() if k not in transient}
    assert predicted["train"] > 0 and predicted["state"] > 0
    for k, rel in transient.items():
        assert predicted[k] == pytest.approx(measured[k], rel=rel), k


def test_attention_flops():
    """Table 1's LoRA column is the formula at prompt 0 (7.4 / 5.7 / 4.2 TFLOPs); the bounded count equals the
    sliding window's visibility, simulated token by token."""
    paper = {"DeepSeek-R1-Distill-Llama-8B": 7.4, "Qwen2.5-7B-Instruct": 5.7, "Qwen2.5-3B-Instruct": 4.2}
    for name in PAPER_MODELS:
        assert round(attention_tflops(paper_config(name), "lora", 0, 3072, 1024), 1) == paper[name]
    cfg = tiny_config("llama", hidden=64, layers=2, heads=4)
    P, T, W = 5, 40, 8
    pairs = P * (P + 1) // 2 + sum(P + c + 1 - start for c, start in enumerate(thought_starts(T - 1, W, 0.25)))
    assert attention_tflops(cfg, "lora_c", P, T, W) == pytest.approx(3 * 4 * 4 * 16 * 2 * pairs / 1e12, rel=1e-12)
