import json

import pytest
import torch

from helpers import cached_teacher_forced, masked_full_forward
from pte.adapter import AdapterConfig, attach, export_peft, load
from pte.cache import BoundedCache, CacheListener
from pte.models import tiny_model
from pte.replay import replay
from pte.rollout import CacheSpec, Sampling, left_pad, rollout

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]
METHOD_CACHE = {"lora": None, "lora_c": 6, "pte": 6}


def make(method="pte", arch="qwen2", dtype=torch.float32, nonzero=True, **cfg):
    model = tiny_model(arch, init_std=0.2, seed=4, dtype=dtype)
    c = dict(method=method, rank=4, n_global=4 if method != "pte" else 3, seed=1) | cfg
    adapter = attach(model, AdapterConfig(**c))
    if nonzero:  # with A = 0 every other gradient is exactly zero: give A weight
        g = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for lin in adapter.linears.values():
                lin.A.copy_(torch.randn(lin.A.shape, generator=g, dtype=lin.A.dtype) * 0.3)
    return model, adapter


def sampled(model, adapter, window, T=26, temperature=0.9, policy="sliding"):
    s = Sampling(max_new_tokens=T, temperature=temperature)
    return rollout(model, PROMPTS, s, CacheSpec(window=window, policy=policy), adapter=adapter,
                   generator=torch.Generator().manual_seed(0))


def weights_loss(w):
    return lambda logp, sl: -(w[:, sl] * logp).sum()


def grads(adapter):
    return {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for k, p in adapter.named_parameters()}


def zero_grads(adapter):
    for p in adapter.parameters():
        p.grad = None


# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("method", ["lora", "lora_c", "pte"])
def test_zero_initialised_adapter_is_the_base_model(method):
    model = tiny_model("llama", init_std=0.2, seed=4).requires_grad_(False)  # as attach leaves it (kernels differ)
    comp = torch.randint(3, 100, (3, 20), generator=torch.Generator().manual_seed(0)).tolist()
    base = cached_teacher_forced(model, BoundedCache.for_model(model, window=5), PROMPTS, comp)
    adapter = attach(model, AdapterConfig(method=method, rank=4, n_global=4))
    state = adapter.new_state(len(PROMPTS))
    cache = BoundedCache.for_model(model, window=5, listeners=[state] if state else [])
    assert torch.equal(cached_teacher_forced(model, cache, PROMPTS, comp), base)
    adapter.detach()
    assert torch.equal(cached_teacher_forced(model, BoundedCache.for_model(model, window=5), PROMPTS, comp), base)


@pytest.mark.parametrize("method,policy", [("lora", "sliding"), ("lora_c", "sliding"), ("pte", "sliding"),
                                           ("pte", "keynorm")])
def test_replay_logprobs_equal_rollout_sampling_logprobs(method, policy):
    model, adapter = make(method, arch="llama")
    window = METHOD_CACHE[method]
    res = sampled(model, adapter, window, policy=policy)
    if window:
        assert all(len(r.eviction_steps) >= 3 for r in res.rows)
    rep = replay(model, res.rows, CacheSpec(window=window, policy=policy), adapter=adapter, temperature=0.9)
    for i, r in enumerate(res.rows):
        assert (rep.logprobs[i, :len(r.logprobs)] - torch.tensor(r.logprobs)).abs().max() <= 1e-4


def test_state_timing_rule():
    """The forward that feeds token c uses Normalize(S_g + sum of S' of evictions made before it)."""
    model, adapter = make("pte")
    seen = []
    lin = adapter.linears["layers.1.mlp.up_proj"]
    hook = lin.register_forward_pre_hook(lambda m, a: seen.append(m.slot.state.clone()))

    class Events(CacheListener):
        def __init__(self):
            self.events = []

        def on_evict(self, event):
            self.events.append(event)

    rec = Events()
    comp = torch.randint(3, 100, (3, 20), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        state = adapter.new_state(len(PROMPTS))
        cached_teacher_forced(model, BoundedCache.for_model(model, window=6, listeners=[rec, state]), PROMPTS, comp)
    hook.remove()
    enc = adapter.encoders[1]
    with torch.no_grad():
        s_g = enc.initial_state().expand(3, -1, -1)
        assert torch.allclose(seen[0], enc.normalize(s_g))  # the prompt forward
        for c in range(20):  # forward c + 1 feeds completion token c
            acc = s_g.clone()
            for ev in rec.events:
                if ev.step <= c:
                    acc = acc + enc.evicted_state(ev.keys[1], ev.values[1], ev.positions[1])
            assert torch.allclose(seen[c + 1], enc.normalize(acc), atol=1e-6), c
        assert len(rec.events) >= 4
        assert (seen[-1] - seen[0]).abs().max() > 1e-3  # the state did move


@pytest.mark.parametrize("method", ["lora_c", "pte"])
def test_short_rollout_replay_gradients_equal_one_full_backward(method):
    """(i) T <= window: no eviction, one segment; gradients equal a full forward/backward without a cache."""
    model, adapter = make(method)
    res = sampled(model, adapter, window=40, T=20)
    w = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    zero_grads(adapter)
    rep = replay(model, res.rows, CacheSpec(window=40), adapter=adapter, temperature=0.9, loss_fn=weights_loss(w))
    assert rep.segments == 1
    got = grads(adapter)
    zero_grads(adapter)
    state = adapter.new_state(3)  # S = Normalize(S_g), with its graph
    ids, pmask = left_pad(PROMPTS, 0)
    comp = torch.tensor([r.completion_ids for r in res.rows])
    full = torch.cat([ids, comp], 1)
    valid = torch.cat([pmask, torch.ones_like(comp, dtype=torch.bool)], 1)
    logits = model(input_ids=full, attention_mask=valid.long(), position_ids=(valid.cumsum(-1) - 1).clamp(min=0)).logits
    P = ids.shape[1]
    logp = (logits[:, P - 1:-1].float() / 0.9).log_softmax(-1).gather(-1, comp[..., None])[..., 0]
    (-(w * logp).sum()).backward()
    adapter.clear_state()
    ref = grads(adapter)
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-5, rtol=1e-4), k
    assert any(ref[k].abs().max() > 0 for k in ref if "encoders" in k) or method != "pte"


def test_lora_c_untruncated_replay_equals_masked_full_backward():
    """(ii) LoRA_c is stateless: with truncate=False the replay gradient equals one masked full forward's."""
    model, adapter = make("lora_c")
    window, T = 6, 26
    res = sampled(model, adapter, window, T=T)
    comp = [r.completion_ids for r in res.rows]
    w = torch.randn(3, T, generator=torch.Generator().manual_seed(2))
    zero_grads(adapter)
    replay(model, res.rows, CacheSpec(window=window), adapter=adapter, temperature=0.9, loss_fn=weights_loss(w),
           truncate=False)
    got = grads(adapter)
    zero_grads(adapter)
    logits = masked_full_forward(model, PROMPTS, comp, window, 0.25, "sdpa")[:, :-1]
    logp = (logits.float() / 0.9).log_softmax(-1).gather(-1, torch.tensor(comp)[..., None])[..., 0]
    (-(w * logp).sum()).backward()
    ref = grads(adapter)
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-5, rtol=1e-4), k
    # the truncated default drops cross-segment paths: it is a different (cheaper) gradient
    zero_grads(adapter)
    replay(model, res.rows, CacheSpec(window=window), adapter=adapter, temperature=0.9, loss_fn=weights_loss(w))
    trunc = grads(adapter)
    assert max((trunc[k] - ref[k]).abs().max() for k in ref) > 1e-4


def test_pte_untruncated_replay_passes_finite_differences():
    """(iii) PTE, truncate=False, float64: d loss / d (h_g, W^a_Q, W^a_K, W^a_V) against central differences."""
    model, adapter = make("pte", dtype=torch.float64)
    for p in adapter.parameters():
        p.data = p.data.double()
    for m in model.modules():  # transformers' RMSNorm computes in float32: keep float64 so differences are clean
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = lambda x, m=m: m.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)
    window, T = 4, 14
    res = sampled(model, adapter, window, T=T)
    assert len(res.rows[0].eviction_steps) >= 3
    w = torch.randn(3, T, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    spec = CacheSpec(window=window)

    def loss_value():
        with torch.no_grad():
            rep = replay(model, res.rows, spec, adapter=adapter, temperature=0.9)
        return float(-(w * rep.logprobs.double()).sum())

    zero_grads(adapter)
    replay(model, res.rows, spec, adapter=adapter, temperature=0.9, loss_fn=lambda lp, sl: -(w[:, sl] * lp).sum(),
           truncate=False)
    g = torch.Generator().manual_seed(5)
    checked = 0
    for name, p in adapter.named_parameters():
        if not name.startswith("encoders."):
            continue
        for _ in range(2):
            idx = tuple(int(torch.randint(s, (1,), generator=g)) for s in p.shape)
            eps = 1e-6
            with torch.no_grad():
                p[idx] += eps
                up = loss_value()
                p[idx] -= 2 * eps
                down = loss_value()
                p[idx] += eps
            fd = (up - down) / (2 * eps)
            assert abs(float(p.grad[idx]) - fd) <= 1e-5 * max(1.0, abs(fd)), (name, idx, float(p.grad[idx]), fd)
            checked += 1
    assert checked >= 16


def test_rows_never_share_state():
    model, adapter = make("pte")
    res = sampled(model, adapter, 6)
    batch = replay(model, res.rows, CacheSpec(window=6), adapter=adapter, temperature=0.9)
    for i, row in enumerate(res.rows):
        alone = replay(model, [row], CacheSpec(window=6), adapter=adapter, temperature=0.9)
        n = len(row.completion_ids)
        assert (alone.logprobs[0, :n] - batch.logprobs[i, :n]).abs().max() <= 1e-4


def test_truncated_replay_trains_the_encoder_in_every_segment():
    model, adapter = make("pte")
    res = sampled(model, adapter, 6)
    w = torch.zeros(3, 26)
    w[:, 20:] = 1.0  # only tokens long after the first evictions carry weight
    zero_grads(adapter)
    rep = replay(model, res.rows, CacheSpec(window=6), adapter=adapter, temperature=0.9, loss_fn=weights_loss(w))
    assert rep.segments > 4
    for name, grad in grads(adapter).items():
        if name.startswith("encoders."):
            assert grad.abs().max() > 0, name


@pytest.mark.parametrize("cfg,message", [
    (dict(method="lora", rank=8, n_global=4), "n_global must equal rank"),
    (dict(method="pte", state_update="sum"), "state_update='sum'"),
    (dict(method="lora", ablation="global0"), "applies to method=pte only"),
    (dict(method="pte", targets=("qkv",)), r"target modules \['qkv'\] not found"),
])
def test_bad_adapter_config_is_a_clear_error(cfg, message):
    with pytest.raises(ValueError, match=message):
        attach(tiny_model("llama"), AdapterConfig(**cfg))


# -- files --------------------------------------------------------------------------------------------------------
def test_save_load_gives_identical_logprobs(tmp_path):
    model, adapter = make("pte", state_scale="learnable")
    res = sampled(model, adapter, 6)
    before = replay(model, res.rows, CacheSpec(window=6), adapter=adapter, temperature=0.9).logprobs
    adapter.save(tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    fresh = tiny_model("qwen2", init_std=0.2, seed=4)
    loaded = load(fresh, tmp_path / "ad")
    after = replay(fresh, res.rows, CacheSpec(window=6), adapter=loaded, temperature=0.9).logprobs
    assert torch.equal(before, after)


def test_loading_for_another_model_or_rank_fails_clearly(tmp_path):
    _, adapter = make("pte")
    adapter.save(tmp_path / "ad")
    with pytest.raises(ValueError, match="trained for another model.*hidden|trained for another model"):
        load(tiny_model("qwen2", hidden=32), tmp_path / "ad")
    with pytest.raises(ValueError, match="model type 'qwen2' != 'llama'"):
        load(tiny_model("llama"), tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    meta["adapter"]["rank"] = 8
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"shapes .*file \(4, .*vs model \(8, "):
        load(tiny_model("qwen2", init_std=0.2, seed=4), tmp_path / "ad")


@pytest.mark.parametrize("method", ["lora", "lora_c"])
def test_exported_static_adapter_loads_in_peft_with_same_logits(tmp_path, method):
    import peft
    model, adapter = make(method, arch="llama")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    export_peft(adapter, tmp_path / "peft")
    base = tiny_model("llama", init_std=0.2, seed=4)
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="input-dependent state"):
        export_peft(make("pte")[1], tmp_path / "x")
