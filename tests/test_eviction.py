"""Every registered eviction policy against independent references: what the cache keeps, the logits of cached
decoding, and the replay of recorded choices; then each score against its definition."""

import pytest
import torch
import torch.nn.functional as F

from conftest import reference_mask
from helpers import PROMPTS, Recorder, completions
from pte.adapter import AdapterConfig, attach
from pte.cache import BoundedCache
from pte.eviction import POLICIES, H2O, PyramidKV, Recorded, SnapKV, make_policy, pyramid_budgets
from pte.models import tiny_model
from pte.replay import replay
from pte.rollout import CacheSpec, Decoder, Sampling, left_pad, rollout

WINDOW, T = 8, 26


def decode(model, policy, comp, window=WINDOW, listeners=()):
    """Teacher-force ``comp`` one token at a time; -> logits [batch, 1 + T, vocab], events, per-step snapshots of
    each layer's thought window (keys, values, positions) taken before the step."""
    rec = Recorder()
    cache = BoundedCache.for_model(model, window=window, policy=policy, listeners=[rec, *listeners])
    ids, pmask = left_pad(PROMPTS, 0)
    P = ids.shape[1]
    dec = Decoder(model, cache)
    logits, snapshots = [dec.prefill(ids, pmask)[:, -1:]], []
    for t in torch.tensor(comp).T:
        snapshots.append([(l.keys[:, :, P:].clone(), l.values[:, :, P:].clone(), l.positions[:, P:].clone())
                          for l in cache.layers])
        logits.append(dec.step(t[:, None]))
    return torch.cat(logits, dim=1), rec.events, snapshots, cache


def evicted_indices(event, layer):
    """The event's window indices for ``layer``; the sliding window reports none: the oldest."""
    if event.indices is not None:
        return event.indices[layer]
    n = event.positions[layer].shape[1]
    return torch.arange(n).expand(event.positions[layer].shape[0], n)


def keep(x, kept):
    """x [batch, heads, window, dim] at the columns kept [batch, window] (bool), in order."""
    b, h, _, d = x.shape
    return x.transpose(1, 2)[kept].view(b, -1, h, d).transpose(1, 2)


def layer_visibility(prompts, T, events, num_layers):
    """Per layer ``[batch, P + T, P + T]`` bool: causal, pads hidden, and each completion query blind to every token
    its layer evicted before that query was fed. -> (valid [batch, P + T], visible per layer)."""
    ids, pmask = left_pad(prompts, 0)
    batch, P = ids.shape
    lengths = pmask.sum(-1)
    valid = torch.cat([pmask, torch.ones(batch, T, dtype=torch.bool)], dim=1)
    base = torch.tril(torch.ones(P + T, P + T, dtype=torch.bool))[None] & valid[:, None, :]
    visible = [base.clone() for _ in range(num_layers)]
    for ev in events:
        for layer in range(num_layers):
            for b in range(batch):
                cols = P + ev.positions[layer][b] - lengths[b]  # completion index = position - prompt length
                visible[layer][b, P + ev.step:, cols] = False
    return valid, visible


def masked_forward(model, comp, visible, valid, output_attentions=False):
    """One forward over prompt + completion where layer l's attention gets its own mask ``visible[l]``."""
    attn_impl = model.config._attn_implementation
    ids, _ = left_pad(PROMPTS, 0)
    P = ids.shape[1]
    full = torch.cat([ids, torch.tensor(comp)], dim=1)
    position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
    masks = [reference_mask(valid, v, attn_impl) for v in visible]

    def own_mask(module, args, kwargs):
        kwargs["attention_mask"] = masks[module.layer_idx]
        return args, kwargs

    handles = [layer.self_attn.register_forward_pre_hook(own_mask, with_kwargs=True) for layer in model.model.layers]
    try:
        out = model(input_ids=full, attention_mask=torch.ones_like(full), position_ids=position_ids,
                    output_attentions=output_attentions)
    finally:
        for h in handles:
            h.remove()
    return out.logits[:, P - 1:], out.attentions


# -- the conformance matrix -------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_cache_keeps_exactly_the_unselected_tokens(model, name):
    """(a) after each event every layer holds its window minus the event's choice, in original order and positions;
    the choice is the lowest scores outside the protected newest tokens, as many as the policy cuts."""
    policy = make_policy(name)
    scored = []
    score = policy.score
    policy.score = lambda *a: scored.append(score(*a)) or scored[-1]
    comp = completions(T)
    _, events, snapshots, cache = decode(model, policy, comp)
    assert len(events) >= 5
    P = left_pad(PROMPTS, 0)[0].shape[1]
    for ev in events:
        before, after = snapshots[ev.step], snapshots[ev.step + 1] if ev.step + 1 < T else None
        for layer, (k, v, pos) in enumerate(before):
            idx = evicted_indices(ev, layer)
            n = idx.shape[1]
            assert n == policy.n_evict(layer, k.shape[2])
            gather = idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            assert torch.equal(ev.keys[layer], k.gather(2, gather)) and torch.equal(ev.values[layer], v.gather(2, gather))
            assert torch.equal(ev.positions[layer], pos.gather(1, idx))
            kept = torch.ones_like(pos, dtype=torch.bool).scatter(1, idx, False)
            if after is not None:  # the next snapshot: the kept tokens, then the token fed at the event
                k2, v2, pos2 = after[layer]
                assert torch.equal(pos2[:, :-1], pos[kept].view(pos.shape[0], -1))
                assert torch.equal(k2[:, :, :-1], keep(k, kept)) and torch.equal(v2[:, :, :-1], keep(v, kept))
    if name != "sliding":  # sliding slices without scoring; its score (the position) is checked below
        assert len(scored) == len(events) * len(cache.layers)
        for i, s in enumerate(scored):
            ev, layer = events[i // len(cache.layers)], i % len(cache.layers)
            idx = evicted_indices(ev, layer)
            window, n = s.shape[1], idx.shape[1]
            protect = min(policy.keep_newest(layer), window - n)
            out = torch.zeros_like(s, dtype=torch.bool).scatter(1, idx, True)
            assert not out[:, window - protect:].any()
            candidates = ~out
            candidates[:, window - protect:] = False
            if n and candidates.any():
                lowest_kept = s.masked_fill(~candidates, float("inf")).min(1).values
                highest_out = s.masked_fill(~out, -float("inf")).max(1).values
                assert (highest_out <= lowest_kept).all()
    assert P + max(l.physical_length() - P for l in cache.layers) == cache.layers[0].physical_length()


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_cached_decoding_equals_masked_full_forward(model, name):
    """(b) every step's logits equal one forward in which each layer hides exactly what it evicted."""
    comp = completions(T)
    got, events, _, cache = decode(model, make_policy(name), comp)
    valid, visible = layer_visibility(PROMPTS, T, events, len(cache.layers))
    ref, _ = masked_forward(model, comp, visible, valid)
    assert len(events) >= 5
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("method", [None, "pte"])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_recorded_replay_reproduces_rollout_logprobs(name, method):
    """(c) the replay re-applies the recorded choices: its log-probs equal the rollout's sampling log-probs, fp32."""
    model = tiny_model("llama", init_std=0.2, seed=4, layers=3)
    adapter = None
    if method:
        adapter = attach(model, AdapterConfig(method=method, rank=4, n_global=3, seed=1))
        g = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for lin in adapter.linears.values():
                lin.A.copy_(torch.randn(lin.A.shape, generator=g) * 0.3)
    spec = CacheSpec(window=6, policy=name)
    res = rollout(model, PROMPTS, Sampling(max_new_tokens=T, temperature=0.9), spec, adapter=adapter,
                  generator=torch.Generator().manual_seed(0))
    assert all(len(r.eviction_steps) >= 4 for r in res.rows)
    rep = replay(model, res.rows, spec, adapter=adapter, temperature=0.9)
    for i, r in enumerate(res.rows):
        assert (rep.logprobs[i, :len(r.logprobs)] - torch.tensor(r.logprobs)).abs().max() <= 1e-4


# -- each score against its definition --------------------------------------------------------------------------
@torch.no_grad()
def test_h2o_score_is_the_attention_received_since_cached():
    """H2O's incremental score equals the eager attention each window token received, summed over heads and
    every query fed while it was cached, read off one masked full forward."""
    model = tiny_model("qwen2", attn="eager", init_std=0.2, seed=1, layers=2)
    policy = H2O(recent=2)
    scored = []
    score = policy.score
    policy.score = lambda *a: scored.append(score(*a).clone()) or scored[-1]
    comp = completions(T)
    _, events, snapshots, cache = decode(model, policy, comp)
    valid, visible = layer_visibility(PROMPTS, T, events, len(cache.layers))
    _, attentions = masked_forward(model, comp, visible, valid, output_attentions=True)
    ids, pmask = left_pad(PROMPTS, 0)
    P, lengths = ids.shape[1], pmask.sum(-1)
    for i, s in enumerate(scored):
        ev, layer = events[i // 2], i % 2
        pos = snapshots[ev.step][layer][2]  # [batch, window]
        cols = P + pos - lengths[:, None]
        attn = attentions[layer].sum(1)  # [batch, P + T, P + T]
        expect = torch.stack([attn[b, P:P + ev.step][:, cols[b]].sum(0) for b in range(len(PROMPTS))])
        assert torch.allclose(s, expect, atol=1e-5)
    assert len(scored) >= 10


@torch.no_grad()
def test_snapkv_score_is_pooled_attention_of_the_last_queries():
    """With an observation window no longer than the evicted block, the observed queries were all fed since the
    previous event, so their attention over the current cache is the eager attention at their own steps."""
    model = tiny_model("llama", attn="eager", init_std=0.2, seed=2, layers=2)
    policy = SnapKV(observation=2, kernel=3)
    scored = []
    score = policy.score
    policy.score = lambda *a: scored.append(score(*a).clone()) or scored[-1]
    comp = completions(T)
    _, events, snapshots, cache = decode(model, policy, comp)  # window 8: 2 evicted per event
    valid, visible = layer_visibility(PROMPTS, T, events, len(cache.layers))
    _, attentions = masked_forward(model, comp, visible, valid, output_attentions=True)
    ids, pmask = left_pad(PROMPTS, 0)
    P, lengths = ids.shape[1], pmask.sum(-1)
    for i, s in enumerate(scored):
        ev, layer = events[i // 2], i % 2
        cols = P + snapshots[ev.step][layer][2] - lengths[:, None]
        attn = attentions[layer].mean(1)  # [batch, P + T, P + T]
        rows = [P + ev.step - 2, P + ev.step - 1]  # the queries of the last two fed tokens
        raw = torch.stack([attn[b, rows][:, cols[b]].mean(0) for b in range(len(PROMPTS))])  # [batch, window]
        padded = F.pad(raw, (1, 1))
        counts = F.pad(torch.ones_like(raw), (1, 1))
        pooled = sum(padded[:, j:j + raw.shape[1]] for j in range(3)) / sum(counts[:, j:j + raw.shape[1]] for j in range(3))
        assert torch.allclose(s, pooled, atol=1e-6)
    assert len(scored) >= 10


@pytest.mark.parametrize("layers,window,n,spread", [(4, 8, 2, 0.5), (3, 4, 1, 0.5), (28, 16, 4, 0.9), (1, 5, 2, 0.5)])
def test_pyramid_budgets_decrease_at_the_sliding_total(layers, window, n, spread):
    budgets = pyramid_budgets(layers, window, n, spread)
    assert sum(budgets) == layers * window
    assert budgets == sorted(budgets, reverse=True) and min(budgets) >= n
    if layers > 1:
        assert budgets[0] > window > budgets[-1]


@torch.no_grad()
def test_pyramid_layers_hold_their_budgets_with_events_on_the_sliding_schedule():
    model = tiny_model("llama", init_std=0.2, seed=1, layers=4)
    policy = PyramidKV()
    _, events, _, cache = decode(model, policy, completions(40))
    assert [ev.step for ev in events] == list(range(WINDOW, 40, 2))
    assert [l.physical_length() - cache.prompt_len for l in cache.layers] == policy.budgets  # each layer full
    assert sum(policy.budgets) == 4 * WINDOW and policy.budgets[0] > WINDOW > policy.budgets[-1]
    per_event = [[ev.positions[l].shape[1] for l in range(4)] for ev in events]
    assert per_event[-1] == [2, 2, 2, 2]  # steady state: every layer cuts the sliding window's block
    assert per_event[0][0] == 0 and per_event[0][-1] > 2  # layer 0 grows first, the last layer cuts down at once


@torch.no_grad()
def test_recorded_does_not_depend_on_the_order_layers_call_it():
    idx = [[torch.tensor([[0, 1]]), torch.tensor([[2, 3]])], [torch.tensor([[1, 4]]), torch.tensor([[0, 5]])]]
    policy = Recorded(idx)
    policy.bind(2, 8, 2)
    k = torch.zeros(1, 1, 8, 2)
    pos = torch.arange(8)[None]
    assert torch.equal(policy.select(1, k, k, pos, 2), idx[0][1])
    assert torch.equal(policy.select(1, k, k, pos, 2), idx[1][1])
    assert torch.equal(policy.select(0, k, k, pos, 2), idx[0][0])
    assert torch.equal(policy.select(0, k, k, pos, 2), idx[1][0])
    with pytest.raises(RuntimeError, match="eviction #3 of layer 0 was not recorded"):
        policy.select(0, k, k, pos, 2)


def test_sliding_window_score_selects_the_oldest():
    policy = make_policy("sliding")
    policy.bind(1, 6, 2)
    pos = torch.tensor([[3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5]])
    k = torch.randn(2, 1, 6, 4)
    scored = type(policy).__mro__[1].select(policy, 0, k, k, pos, 2)  # the base class's selection on its score
    assert torch.equal(scored, torch.tensor([[0, 1], [0, 1]])) and policy.select(0, k, k, pos, 2) is None


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown eviction policy 'lru'; choose one of \['h2o', 'keynorm', "
                                         r"'pyramidkv', 'sliding', 'snapkv'\]"):
        make_policy("lru")


def test_score_policies_need_the_models_queries():
    cache = BoundedCache(2, window=4, policy="h2o")  # not built for a model: no hooks record the queries
    model = tiny_model("llama")
    dec = Decoder(model, cache)
    ids, pmask = left_pad(PROMPTS, 0)
    for m in model.modules():  # a model never hooked
        assert not getattr(m, "_pte_hooked", False)
    dec.prefill(ids, pmask)
    with pytest.raises(RuntimeError, match="build the cache with BoundedCache.for_model"):
        dec.step(torch.tensor(completions(1)))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from pte.models import char_tokenizer

    path = tmp_path_factory.mktemp("tiny")
    tok = char_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), init_std=0.2, seed=2, max_positions=256, layers=3)
    with torch.no_grad():  # <pad>/<eos>/<bos> never win: every completion runs to the limit
        model.lm_head.weight[:3] = 0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_cli_generate_and_eval_run_each_policy(saved_model, capsys, tmp_path, name):
    """``pte generate --policy`` gives the engine's tokens under that policy; ``pte eval --policy`` records it."""
    import json

    from pte.cli import main

    path, model, tok = saved_model
    assert main(["generate", "--model", str(path), "--prompt", "Q: 12+7=?", "--cache-window", "6",
                 "--max-new-tokens", "30", "--temperature", "0", "--policy", name, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = tok("Q: 12+7=?")["input_ids"]
    ref = rollout(model, [ids], Sampling(max_new_tokens=30, temperature=0, eos_token_ids=(tok.eos_token_id,)),
                  CacheSpec(window=6, policy=name)).rows[0]
    assert out["completion_ids"] == ref.completion_ids and out["evictions"] == len(ref.eviction_steps) > 0
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"problem": "Q: 1+1=?", "answer": "2"}) + "\n")
    assert main(["eval", "--model", str(path), "--benchmark", str(data), "--cache-window", "6", "--max-new-tokens",
                 "20", "--temperature", "0", "--policy", name, "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["config"]["policy"] == name


def test_cli_unknown_policy_names_the_choices(saved_model, capsys, tmp_path):
    from pte.cli import main

    path = saved_model[0]
    for cmd in (["generate", "--prompt", "hi"], ["eval", "--benchmark", "long_range", "--out", str(tmp_path)]):
        assert main([cmd[0], "--model", str(path), *cmd[1:], "--max-new-tokens", "4", "--policy", "lru"]) == 2
        assert "unknown eviction policy 'lru'; choose one of ['h2o', 'keynorm'" in capsys.readouterr().err
