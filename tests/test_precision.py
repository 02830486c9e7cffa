"""bf16/fp16 end to end (pte.adapter, "Precision"): fp32 adapter parameters and thought state on a half-precision
base model, through rollout, replay, one optimizer step and save -> load."""

import pytest
import torch

from helpers import cached_teacher_forced
from pte.adapter import AdapterConfig, attach, load
from pte.cache import BoundedCache, CacheListener
from pte.models import tiny_model
from pte.replay import replay
from pte.rollout import CacheSpec, Sampling, rollout

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]
WINDOW = {"lora": None, "lora_c": 6, "pte": 6}
# The rollout feeds one token per forward, the replay a segment: in half precision they round differently. Measured
# here (max, mean |dlogp|): bf16 0.036, 0.0069 (lora: one 26-token segment), fp16 0.0088, 0.0016.
HALF_TOLERANCE = {torch.bfloat16: (0.1, 0.015), torch.float16: (0.03, 0.005)}


def make(arch, method, dtype):
    model = tiny_model(arch, init_std=0.2, seed=4, dtype=dtype)
    adapter = attach(model, AdapterConfig(method=method, rank=4, n_global=4 if method != "pte" else 3, seed=1))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for lin in adapter.linears.values():
            lin.A.copy_(torch.randn(lin.A.shape, generator=g) * 0.3)
    return model, adapter


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", ["lora", "lora_c", "pte"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_half_precision_rollout_replay_step_save_load(tmp_path, arch, method, dtype):
    model, adapter = make(arch, method, dtype)
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    spec = CacheSpec(window=WINDOW[method])
    res = rollout(model, PROMPTS, Sampling(max_new_tokens=26, temperature=0.9), spec, adapter=adapter,
                  generator=torch.Generator().manual_seed(0))
    assert spec.window is None or all(len(r.eviction_steps) >= 4 for r in res.rows)
    sampled = torch.tensor([r.logprobs for r in res.rows])
    assert sampled.isfinite().all()

    w = torch.randn(3, 26, generator=torch.Generator().manual_seed(2))
    loss_fn = lambda logp, rows, cols: -(w[rows, cols] * logp).sum() / w.numel()  # noqa: E731
    for p in adapter.parameters():
        p.grad = None
    rep = replay(model, res.rows, spec, adapter=adapter, temperature=0.9, loss_fn=loss_fn)
    assert rep.logprobs.dtype == torch.float32
    delta = (rep.logprobs - sampled).abs()
    max_tol, mean_tol = HALF_TOLERANCE[dtype]
    assert delta.max() <= max_tol and delta.mean() <= mean_tol, (float(delta.max()), float(delta.mean()))
    # pi_old is the replay's own first pass: a no-grad replay gives the very same log-probs, so the ratio is 1
    with torch.no_grad():
        assert torch.equal(replay(model, res.rows, spec, adapter=adapter, temperature=0.9).logprobs, rep.logprobs)

    grads = {k: p.grad for k, p in adapter.named_parameters()}
    assert all(g is not None and g.dtype == torch.float32 and g.isfinite().all() for g in grads.values())
    assert all(g.abs().max() > 0 for k, g in grads.items() if k.endswith((".A", ".B")) or method == "pte"), \
        [k for k, g in grads.items() if g.abs().max() == 0]
    before = {k: p.detach().clone() for k, p in adapter.named_parameters()}
    torch.optim.Adam(adapter.parameters(), lr=1e-3).step()
    after = dict(adapter.named_parameters())
    assert all(after[k].dtype == torch.float32 and after[k].isfinite().all() for k in after)
    assert all((after[k] - before[k]).abs().max() > 1e-4 for k in after)  # Adam's first step is ~lr everywhere

    with torch.no_grad():
        trained = replay(model, res.rows, spec, adapter=adapter, temperature=0.9).logprobs
    assert trained.isfinite().all() and (trained - rep.logprobs).abs().max() > 1e-3
    adapter.save(tmp_path / "ad")
    fresh = tiny_model(arch, init_std=0.2, seed=4, dtype=dtype)
    loaded = load(fresh, tmp_path / "ad")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(replay(fresh, res.rows, spec, adapter=loaded, temperature=0.9).logprobs, trained)


class Events(CacheListener):
    def __init__(self):
        self.events = []

    def on_evict(self, event):
        self.events.append(event)


@torch.no_grad()
@pytest.mark.parametrize("attention", ["softmax", "linear"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_rollout_and_replay_states_agree_in_fp32(arch, attention):
    """The rollout's state (online summaries) and the replay's (pte.history statistics) are fp32 on a bf16 model,
    so over many evictions of the same keys/values they agree to fp32 rounding. When the rollout summarised in the
    keys' dtype they drifted apart by ~1% within 10 evictions."""
    model = tiny_model(arch, init_std=0.2, seed=4, dtype=torch.bfloat16)
    rec = Events()
    comp = torch.randint(3, 100, (3, 60), generator=torch.Generator().manual_seed(0)).tolist()
    cached_teacher_forced(model, BoundedCache.for_model(model, window=6, listeners=[rec]), PROMPTS, comp)
    assert len(rec.events) >= 20 and rec.events[0].keys[0].dtype == torch.bfloat16
    adapter = attach(model, AdapterConfig(method="pte", rank=4, n_global=3, seed=1, state_attention=attention))
    rollout_state, replay_state = adapter.new_state(3), adapter.new_state(3, exact_history=True)
    worst = 0.0
    for event in rec.events:
        rollout_state.on_evict(event)
        seen = [slot.state for slot in adapter.slots]
        replay_state.on_evict(event)
        for layer, slot in enumerate(adapter.slots):
            assert seen[layer].dtype == slot.state.dtype == torch.float32
            worst = max(worst, float((seen[layer] - slot.state).abs().max() / slot.state.abs().max()))
    for state in (rollout_state, replay_state):
        for hist in state.history:
            tensors = [hist] if isinstance(hist, torch.Tensor) else list(hist)
            assert all(t.dtype == torch.float32 for t in tensors)
    assert worst <= 1e-5, worst
