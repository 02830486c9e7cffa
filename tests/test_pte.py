import json

import pytest
import torch

from helpers import PROMPTS, Recorder, assert_grads_match, cached_teacher_forced, masked_full_forward
from pte.adapter import AdapterConfig, attach, export_peft, load
from pte.cache import BoundedCache, sliding_eviction_steps
from pte.models import tiny_model
from pte.replay import replay
from pte.rollout import CacheSpec, RolloutRow, Sampling, left_pad, rollout

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
    return lambda logp, rows, cols: -(w[rows, cols] * logp).sum()


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


@pytest.mark.parametrize("method,policy,cfg", [
    ("lora", "sliding", {}), ("lora_c", "sliding", {}), ("pte", "sliding", {}), ("pte", "keynorm", {}),
    ("pte", "sliding", dict(state_attention="linear")), ("pte", "sliding", dict(ablation="global0")),
])
def test_replay_logprobs_equal_rollout_sampling_logprobs(method, policy, cfg):
    model, adapter = make(method, arch="llama", **cfg)
    window = METHOD_CACHE[method]
    res = sampled(model, adapter, window, policy=policy)
    if window:
        assert all(len(r.eviction_steps) >= 3 for r in res.rows)
    rep = replay(model, res.rows, CacheSpec(window=window, policy=policy), adapter=adapter, temperature=0.9)
    for i, r in enumerate(res.rows):
        assert (rep.logprobs[i, :len(r.logprobs)] - torch.tensor(r.logprobs)).abs().max() <= 1e-4


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_state_timing_rule(attention):
    """The forward that feeds token c uses the state read from the global tokens and every eviction made before
    it; the softmax state, merged online eviction by eviction, equals one softmax over all those tokens."""
    model, adapter = make("pte", state_attention=attention)
    seen = []
    lin = adapter.linears["layers.1.mlp.up_proj"]
    hook = lin.register_forward_pre_hook(lambda m, a: seen.append(m.slot.state.clone()))

    rec = Recorder()
    comp = torch.randint(3, 100, (3, 20), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        state = adapter.new_state(len(PROMPTS))
        cached_teacher_forced(model, BoundedCache.for_model(model, window=6, listeners=[rec, state]), PROMPTS, comp)
    hook.remove()
    enc = adapter.encoders[1]

    def reference(events):  # [batch, n_g, r], computed in one pass
        if attention == "linear":
            acc = enc.initial_state().expand(3, -1, -1)
            for ev in events:
                acc = acc + enc.evicted_state(ev.keys[1], ev.values[1], ev.positions[1])
            return enc.normalize(acc)
        _, k_g, v_g = enc.global_qkv()
        ka = [(k_g @ enc.wa_k.T).expand(3, -1, -1)]
        va = [(v_g @ enc.wa_v.T).expand(3, -1, -1)]
        for ev in events:
            k, v = enc.project(ev.keys[1], ev.values[1], ev.positions[1])
            ka.append(k)
            va.append(v)
        q = enc.queries()
        weights = (q @ torch.cat(ka, 1).transpose(1, 2) / q.shape[-1] ** 0.5).softmax(-1)  # [batch, n_g, tokens]
        return enc.normalize(weights @ torch.cat(va, 1))

    with torch.no_grad():
        assert torch.allclose(seen[0], reference([]), atol=1e-6)  # the prompt forward
        for c in range(20):  # forward c + 1 feeds completion token c
            expected = reference([ev for ev in rec.events if ev.step <= c])
            assert torch.allclose(seen[c + 1], expected, atol=1e-6), c
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
    assert_grads_match(got, ref)
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
    assert_grads_match(got, ref)
    # the truncated default drops cross-segment paths: it is a different (cheaper) gradient
    zero_grads(adapter)
    replay(model, res.rows, CacheSpec(window=window), adapter=adapter, temperature=0.9, loss_fn=weights_loss(w))
    trunc = grads(adapter)
    assert max((trunc[k] - ref[k]).abs().max() for k in ref) > 1e-4


@pytest.mark.parametrize("truncate", [True, False])
def test_replay_trains_adapters_that_leave_keys_and_values_alone(truncate):
    """Without adapters on k/v, layer 0's cached keys need no grad, but the queries' backward reads them: the cache
    must not overwrite them in place (it did, and backward failed)."""
    model, adapter = make("lora_c", arch="llama", targets=("q_proj", "o_proj"))
    comp = list(range(3, 23))
    rows = [RolloutRow(list(range(5, 12)), comp, [], 8, sliding_eviction_steps(len(comp) - 1, 8, 0.25), "eos")] * 2
    spec = CacheSpec(window=8)
    with torch.no_grad():
        ref = replay(model, rows, spec, adapter=adapter)
    zero_grads(adapter)
    got = replay(model, rows, spec, adapter=adapter, loss_fn=lambda lp, rows, cols: -lp.sum(), truncate=truncate)
    assert got.segments > 3
    assert torch.allclose(got.logprobs, ref.logprobs, atol=1e-6)
    assert all(g.abs().max() > 0 and g.isfinite().all() for k, g in grads(adapter).items() if k.endswith("q_proj.B"))


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_pte_untruncated_replay_passes_finite_differences(attention):
    """(iii) PTE, truncate=False, float64: d loss / d (h_g, W^a_Q, W^a_K, W^a_V) against central differences."""
    model, adapter = make("pte", dtype=torch.float64, state_attention=attention)
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
    replay(model, res.rows, spec, adapter=adapter, temperature=0.9, loss_fn=weights_loss(w), truncate=False)
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


@pytest.mark.parametrize("attention,ablation", [("softmax", "none"), ("softmax", "global0"), ("linear", "none")])
def test_history_state_grad_equals_the_untruncated_gradient(attention, ablation):
    """state_grad="history" (pte.history's fixed-size statistics) gives the encoder the exact gradient through every
    past eviction. Reference: the untruncated graph, in a set-up where no cached key/value depends on a parameter
    (only the last layer's post-attention linears have A != 0), so the two must agree; the segment-truncated
    gradient must not."""
    model, adapter = make("pte", arch="llama", state_attention=attention, ablation=ablation)
    last = f"layers.{model.config.num_hidden_layers - 1}."
    post = [k for k in adapter.linears if k.startswith(last) and k.rsplit(".", 1)[-1] in ("o_proj", "gate_proj",
                                                                                          "up_proj", "down_proj")]
    with torch.no_grad():
        for name, lin in adapter.linears.items():
            if name not in post:
                lin.A.zero_()
    window, T = 4, 22
    res = sampled(model, adapter, window, T=T)
    assert len(res.rows[0].eviction_steps) >= 6
    w = torch.randn(3, T, generator=torch.Generator().manual_seed(2))
    spec = CacheSpec(window=window)
    got = {}
    for mode in ("untruncated", "history", "segment"):
        zero_grads(adapter)
        rep = replay(model, res.rows, spec, adapter=adapter, temperature=0.9, loss_fn=weights_loss(w),
                     truncate=mode != "untruncated", state_grad="history" if mode == "history" else "segment")
        for i, r in enumerate(res.rows):  # the statistics do not change the forward
            assert (rep.logprobs[i, :len(r.logprobs)] - torch.tensor(r.logprobs)).abs().max() <= 1e-4
        got[mode] = grads(adapter)
    enc = [k for k in got["untruncated"] if k.startswith(f"encoders.{model.config.num_hidden_layers - 1}.")]
    assert len(enc) == 4 and all(got["untruncated"][k].abs().max() > 1e-4 for k in enc)
    # every encoder (those of layers 0..L-2 feed only A = 0 linears: zero in both) and the last layer's linears;
    # earlier linears' A still get gradient through the keys/values they would change, which truncation cuts
    compared = [k for k in got["untruncated"] if k.startswith(("encoders.", *post))]
    assert_grads_match({k: got["history"][k] for k in compared}, {k: got["untruncated"][k] for k in compared})
    assert max((got["segment"][k] - got["untruncated"][k]).abs().max() for k in enc) > 1e-3


def test_history_state_grad_rejects_the_recursive_update():
    _, adapter = make("pte", state_attention="linear", state_update="recursive")
    with pytest.raises(ValueError, match="needs state_update='accumulate'"):
        adapter.new_state(2, exact_history=True)


@torch.no_grad()
def test_ablations_shape_the_state_as_documented():
    """global_only: the state never moves (a static adapter); global0: zero until the first eviction, then moves."""
    comp = torch.randint(3, 100, (3, 20), generator=torch.Generator().manual_seed(0)).tolist()
    for ablation in ("global_only", "global0"):
        model, adapter = make("pte", ablation=ablation)
        seen = []
        adapter.linears["layers.0.self_attn.q_proj"].register_forward_pre_hook(
            lambda m, a: seen.append(m.slot.state.clone()))
        cached_teacher_forced(model, BoundedCache.for_model(model, window=6, listeners=[adapter.new_state(3)]),
                              PROMPTS, comp)
        first_evicted = 1 + 6  # the prompt forward, then six thought tokens fill the window
        if ablation == "global_only":
            assert all(torch.equal(s, seen[0]) for s in seen)
        else:
            assert all(s.abs().max() == 0 for s in seen[:first_evicted])
            assert seen[first_evicted].abs().max() > 0
            assert not torch.equal(seen[-1], seen[first_evicted])


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
    (dict(method="pte", state_update="recursive"), "needs state_attention='linear'"),
    (dict(method="pte", state_attention="mean"), "state_attention='mean'"),
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
    with pytest.raises(ValueError, match=r"edited after saving: adapter\.rank=8 \(saved as 4\)"):
        load(tiny_model("qwen2", init_std=0.2, seed=4), tmp_path / "ad")
    del meta["checksum"]  # a file from before checksums: the shapes still catch it
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="no checksums"), \
            pytest.raises(ValueError, match=r"shapes .*file \(4, .*vs model \(8, "):
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


def test_rows_with_zero_weight_can_be_left_out_of_the_replay():
    """What GRPO relies on to skip rows of all-equal groups: rows do not interact, so the gradient of a loss that
    gives some rows zero weight equals the gradient of the replay of the other rows alone."""
    model, adapter = make("pte", arch="llama")
    res = sampled(model, adapter, 6)
    w = torch.randn(3, 26, generator=torch.Generator().manual_seed(3))
    w[1] = 0.0
    spec = CacheSpec(window=6)
    zero_grads(adapter)
    replay(model, res.rows, spec, adapter=adapter, temperature=0.9, loss_fn=weights_loss(w))
    everything = grads(adapter)
    zero_grads(adapter)
    kept = w[[0, 2]]
    replay(model, [res.rows[0], res.rows[2]], spec, adapter=adapter, temperature=0.9,
           loss_fn=lambda lp, rows, cols: -(kept[rows, cols] * lp).sum())
    subset = grads(adapter)
    assert max(everything[k].abs().max() for k in everything) > 1e-3
    for k in everything:
        assert torch.allclose(subset[k], everything[k], atol=1e-4, rtol=1e-5), k  # float32 sums of ~10
