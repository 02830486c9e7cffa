"""The demo's base model: the shipped one does the task with a full cache and fails under the demo's window; the
pre-training recipe saves a loadable model; the mechanism check feeds worked solutions with the rollout's
evictions."""

import json
import random

import pytest
import torch

from pte.cache import BoundedCache, window_visibility
from pte.lab.mechanism import worked_rows
from pte.models import load
from pte.lab.pretrain import SHIPPED_BASE, PretrainConfig, pretrain, recipe_task, task_accuracy
from pte.replay import replay
from pte.rollout import CacheSpec, Decoder, left_pad
from pte.tasks.long_range import LongRange, tokenizer


def test_shipped_base_solves_the_task_with_a_full_cache_and_fails_under_the_window():
    model, tok = load(str(SHIPPED_BASE))
    recipe = json.loads((SHIPPED_BASE / "recipe.json").read_text())
    task = LongRange(hops=recipe["config"]["hops"], filler=recipe["config"]["filler"])
    task.check_difficulty(model.config.num_hidden_layers, 8)
    assert task_accuracy(model, tok, task, 100, seed=123_457, window=None) >= 0.9
    assert task_accuracy(model, tok, task, 100, seed=123_457, window=8) <= 0.5


def test_shipped_countdown_base_solves_the_distance_variant_with_a_full_cache_and_fails_under_the_window():
    base = SHIPPED_BASE.parent / "long_range_countdown_base"
    model, tok = load(str(base))
    assert recipe_task(base).countdown == 1 and "count_draw=uniform" in json.loads((base / "recipe.json").read_text())["command"]
    task = LongRange(hops=6, countdown=9)  # the length scaling's training countdown (docs/ablations.md)
    task.check_difficulty(model.config.num_hidden_layers, 8)
    assert task_accuracy(model, tok, task, 50, seed=123_457, window=None) >= 0.9
    assert task_accuracy(model, tok, task, 50, seed=123_457, window=8) <= 0.5


def test_pretrain_writes_a_model_that_loads_with_equal_logits(tmp_path):
    logs = []
    out = pretrain(PretrainConfig(out=str(tmp_path / "base"), hidden=32, layers=1, heads=2, steps=2, batch=4,
                                  eval_problems=4), log=logs.append)
    assert (out / "recipe.json").exists() and not list(tmp_path.glob("*.tmp-*"))
    assert json.loads((out / "recipe.json").read_text())["config"]["steps"] == 2
    assert any("step 2/2" in m for m in logs)
    model, tok = load(str(out))
    ids = torch.tensor([tok("3>4 start 3 =")["input_ids"]])
    again, _ = load(str(out))
    assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    assert tok.decode(ids[0]) == "3>4 start 3 ="


def test_worked_rows_replay_equals_feeding_the_solution_through_the_bounded_cache():
    model, tok = load(str(SHIPPED_BASE))
    task = LongRange(filler=40)
    spec = CacheSpec(window=8)
    examples = task.examples(3, seed=9)
    rows = worked_rows(tok, task, examples, spec)
    got = replay(model, rows, spec, pad_token_id=tok.pad_token_id).logprobs
    ids, pmask = left_pad([r.prompt_ids for r in rows], tok.pad_token_id)
    comp = torch.tensor([r.completion_ids for r in rows])
    with torch.no_grad():
        dec = Decoder(model, BoundedCache.for_model(model, window=8))
        logits = torch.cat([dec.prefill(ids, pmask)[:, -1:]] + [dec.step(comp[:, c:c + 1]) for c in range(comp.shape[1] - 1)], 1)
    want = logits.log_softmax(-1).gather(-1, comp[..., None])[..., 0]
    assert torch.allclose(got, want, atol=1e-4)
    assert rows[0].eviction_steps[0] == 8 and len(rows[0].eviction_steps) == len(range(8, comp.shape[1] - 1, 2))


@torch.no_grad()
def test_window_visibility_mask_equals_decoding_through_the_bounded_cache():
    """The calibration rows of pre-training see exactly what the bounded cache would keep: one masked forward gives
    the logits of decoding token by token with evictions."""
    model, tok = load(str(SHIPPED_BASE), dtype="float32")
    task = LongRange(filler=40)
    ex = task.examples(3, seed=5)
    prompts = [tok(e.prompt)["input_ids"] for e in ex]
    comps = [tok(task.solution(e))["input_ids"] for e in ex]
    P, T = len(prompts[0]), len(comps[0])
    ids = torch.tensor([p + c for p, c in zip(prompts, comps)])
    mask = window_visibility(P, T, window=8, evict_fraction=0.25)
    parallel = model(input_ids=ids, attention_mask=mask.expand(3, 1, -1, -1)).logits[:, P - 1:]
    cache = BoundedCache.for_model(model, window=8)
    dec = Decoder(model, cache)
    ids_p, pmask = left_pad(prompts, tok.pad_token_id)
    seq = [dec.prefill(ids_p, pmask)[:, -1:]] + [dec.step(ids[:, P + c:P + c + 1]) for c in range(T)]
    assert cache.evictions > 10
    assert (torch.cat(seq, 1) - parallel).abs().max() < 1e-4
    full = model(input_ids=ids).logits[:, P - 1:]
    assert (full - parallel).abs().max() > 1e-2  # the mask did hide something


def test_pretrain_of_the_distance_variant_draws_a_count_per_step_and_records_it(tmp_path):
    logs = []
    out = pretrain(PretrainConfig(out=str(tmp_path / "base"), hidden=32, layers=1, heads=2, steps=10, batch=2,
                                  eval_problems=4, countdown="2-5"), log=logs.append)  # 10: OneCycleLR's edge case
    recipe = json.loads((out / "recipe.json").read_text())
    assert sorted(recipe["full_cache_accuracy"]) == ["2", "3", "5"]  # shortest, middle, longest count
    assert "--set countdown=2-5" in recipe["command"]
    task = recipe_task(out)
    assert (task.countdown, task.block) == (2, 4)
    model, tok = load(str(out))
    assert model.config.vocab_size == len(tok) == len(tokenizer(countdown=True))
    e = task.examples(1, seed=0)[0]
    assert tok.decode(tok(e.prompt)["input_ids"]) == e.prompt and e.prompt.endswith("#02 =")
    with pytest.raises(ValueError, match="countdown='5-2': need 1 <= LO <= HI <= 99"):
        PretrainConfig(countdown="5-2").validate()
    with pytest.raises(ValueError, match="expected LO-HI"):
        PretrainConfig(countdown="ten").validate()


def test_a_plain_base_extended_to_the_distance_variant_keeps_every_old_logit():
    from pte.lab.pretrain import extend_vocabulary

    model, tok = load(str(SHIPPED_BASE), dtype="float32")
    ids = torch.tensor([tok("9>6 4>2 start 4 = 2 0 a0 ....")["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        extend_vocabulary(model, len(tokenizer(countdown=True)))
        after = model(input_ids=ids).logits
    assert after.shape[-1] == before.shape[-1] + 100
    assert torch.equal(after[..., :before.shape[-1]], before)
    with pytest.raises(ValueError, match="fewer than the model's"):
        extend_vocabulary(model, 10)


def test_count_draws_cover_the_span_with_the_chosen_weights():
    rng = random.Random(0)
    uniform = [PretrainConfig(countdown="1-5", count_draw="uniform").draw_count(rng) for _ in range(5000)]
    log_uniform = [PretrainConfig(countdown="1-5").draw_count(rng) for _ in range(5000)]
    assert set(uniform) == set(log_uniform) == {1, 2, 3, 4, 5}
    assert all(abs(uniform.count(c) / 5000 - 0.2) < 0.03 for c in range(1, 6))
    assert log_uniform.count(5) / 5000 < 0.1 < 0.2 < log_uniform.count(1) / 5000  # short counts favoured
    assert PretrainConfig().draw_count(rng) is None
    with pytest.raises(ValueError, match="count_draw='even': choose one of log-uniform, uniform"):
        PretrainConfig(countdown="1-5", count_draw="even").validate()
