"""The GRPO step's stabilisers (dynamic sampling, truncation masking, skipped steps, exact zero advantages,
warm-up, pi_old), each checked against a reference computation."""

import copy

import pytest
import torch

from pte.config import load_config
from pte.grpo import TokenBatch, clipped_token_loss, group_advantages, soft_overlong_penalty
from pte.replay import replay
from pte.train import PromptStream, collect, grpo_step, learning_rate, setup

BASE = ["grpo.group_size=4", "grpo.prompts_per_step=2", "sampling.max_new_tokens=10", "adapter.rank=4",
        "adapter.n_global=4", "cache.window=4", "run.threads=1", "grpo.kl_metric_every=0"]


class Scripted:
    """A rewarder that returns scripted reward groups, one list of groups per call."""

    def __init__(self, calls):
        self.calls = list(calls)

    def __call__(self, texts, examples):
        groups = self.calls.pop(0)
        return [r for g in groups for r in g]

    def failures(self):
        return {}

    def close(self):
        pass


def _run(extra=(), calls=None):
    run = setup(load_config(None, BASE + list(extra)))
    if calls is not None:
        run.rewarder = Scripted(calls)
    return run, PromptStream(run.examples, run.cfg.grpo.prompts_per_step, 0, run.dist)


@pytest.mark.parametrize("values", [[0.1] * 8, [0.7] * 8, [1 / 3] * 8, [-2.5] * 8, [0.3, 0.3, 0.3]])
def test_all_equal_groups_get_exactly_zero_advantage(values):
    adv = group_advantages(torch.tensor([values, [0.0] + [1.0] * (len(values) - 1)]))
    assert torch.equal(adv[0], torch.zeros(len(values)))
    assert (adv[1] != 0).all()


def test_dynamic_sampling_refills_only_zero_spread_groups_and_normalises_by_the_kept_batch():
    flat, spread_a, spread_b = [0.5] * 4, [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]
    run, prompts = _run(["grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=3"],
                        calls=[[flat, spread_a], [spread_b, flat]])
    first, second = prompts.draw(), prompts.draw()  # what the two draws will see
    prompts.position = 0
    traj = collect(run, prompts)
    assert traj.stats["sampled_groups"] == 4 and traj.stats["sampling_rounds"] == 2
    assert traj.stats["reward_sampled"] == pytest.approx((2 + 1 + 3 + 2) / 16)  # every drawn group counts
    assert traj.rewards.tolist() == spread_a + spread_b
    prompts_of_rows = {tuple(r.prompt_ids) for r in traj.rows}
    tok = run.tok
    expected = {tuple(tok(first[1].prompt)["input_ids"]), tuple(tok(second[0].prompt)["input_ids"])}
    assert prompts_of_rows == expected and prompts.position == 4
    assert traj.batch.normalizer == sum(len(r.completion_ids) for r in traj.rows)


def test_dynamic_sampling_stops_after_its_rounds():
    flat = [0.0] * 4
    run, prompts = _run(["grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=2"], calls=[[flat, flat]] * 2)
    traj = collect(run, prompts)
    assert traj.stats["sampling_rounds"] == 2 and traj.rows == [] and traj.kept == []
    stats = grpo_step(run, traj)
    assert stats["skipped_step"]


class PositionSignal:
    """A rewarder whose groups (of 4) spread exactly at the chosen stream positions, whatever was sampled."""

    def __init__(self, positions):
        self.positions, self.seen = set(positions), 0

    def __call__(self, texts, examples):
        first = self.seen
        self.seen += len(examples) // 4
        return [float(first + i // 4 in self.positions and i % 4 == 0) for i in range(len(examples))]

    def failures(self):
        return {}

    def close(self):
        pass


@pytest.mark.parametrize("rate, rollouts", [(None, 3), (0.0, 1), (0.25, 1), (0.5, 2), (1.0, 3)])
def test_adaptive_draws_keep_the_groups_one_draw_per_rollout_keeps(rate, rollouts):
    """Of 8 drawn prompts (4 draws of 2) those at stream positions 1 and 6 carry a signal. One draw per rollout
    needs 4 rollouts to find both; adaptive draws size each rollout by the signal rate (the last step's, then this
    step's) and keep the same two groups in the same order."""
    for adaptive in (False, True):
        run, prompts = _run(["grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=4",
                             f"grpo.adaptive_draws={str(adaptive).lower()}"])
        order = [tuple(run.tok(ex.prompt)["input_ids"]) for ex in prompts.draw(4)]
        prompts.position, prompts.signal_rate = 0, rate
        run.rewarder = PositionSignal([1, 6])
        traj = collect(run, prompts)
        assert [tuple(r.prompt_ids) for r in traj.rows[::4]] == [order[1], order[6]]
        assert traj.stats["sampling_rounds"] == 4 and traj.stats["sampled_groups"] == 8
        assert traj.stats["rollouts"] == (rollouts if adaptive else 4)
        assert prompts.signal_rate == (0.25 if adaptive else rate)


def test_truncated_rows_contribute_no_gradient():
    """mask_truncated: the gradient equals a replay of the rows that stopped on their own, normalised by their
    tokens only."""
    extra = ["grpo.mask_truncated=true", "sampling.stop=['7', 'a', 'e', '3', 'x']", "sampling.max_new_tokens=8",
             "grpo.prompts_per_step=3"]
    run, prompts = _run(extra, calls=[[[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]])
    traj = collect(run, prompts)
    reasons = [r.finish_reason for r in traj.rows]
    assert "length" in reasons and any(x != "length" for x in reasons), reasons
    stopped = [i for i, r in enumerate(traj.rows) if r.finish_reason != "length"]
    assert traj.batch.normalizer == sum(len(traj.rows[i].completion_ids) for i in stopped)
    assert all(r.finish_reason != "length" for r in traj.kept)
    grpo_step(run, traj)  # one pass; its gradient stays in .grad after the optimizer step
    # the reference: replay the stopped rows with their advantages, one fresh adapter state
    ref_run, _ = _run(extra)
    adv = traj.advantages.view(-1)[stopped].view(-1, 1)
    rows = [traj.rows[i] for i in stopped]
    mask = torch.zeros(len(rows), max(len(r.completion_ids) for r in rows), dtype=torch.bool)
    for i, r in enumerate(rows):
        mask[i, :len(r.completion_ids)] = True
    keep = [i for i in range(len(rows)) if adv[i, 0] != 0]
    tb = TokenBatch(advantages=adv[keep], old_logp=None, mask=mask[keep], normalizer=float(mask.sum()))
    replay(ref_run.model, [rows[i] for i in keep], traj.spec, adapter=ref_run.adapter,
           loss_fn=lambda lp, rows, cols: clipped_token_loss(lp, tb, cols, rows=rows)[0], pad_token_id=ref_run.pad)
    torch.nn.utils.clip_grad_norm_(ref_run.adapter.parameters(), ref_run.cfg.optim.max_grad_norm)
    for (name, p), (_, q) in zip(run.adapter.named_parameters(), ref_run.adapter.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-7, rtol=1e-5), name


def test_a_skipped_step_leaves_parameters_and_adam_state_unchanged():
    signal, none = [[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]], [[1.0] * 4, [0.0] * 4]
    run, prompts = _run(calls=[signal, none])
    assert not grpo_step(run, collect(run, prompts))["skipped_step"]
    params = [p.detach().clone() for p in run.adapter.parameters()]
    state = copy.deepcopy(run.optimizer.state_dict()["state"])
    assert state and all(s["step"] == 1 for s in state.values())
    stats = grpo_step(run, collect(run, prompts))
    assert stats["skipped_step"] and stats["grad_norm"] == 0.0
    assert all(torch.equal(a, p) for a, p in zip(params, run.adapter.parameters()))
    after = run.optimizer.state_dict()["state"]
    assert after.keys() == state.keys()
    assert all(torch.equal(after[i][k], state[i][k]) for i in state for k in state[i])


def test_first_pass_ratio_is_exactly_one_with_replay_pi_old():
    """pi_old=replay: no token is clipped on the first pass whatever the clip range, since ratio == 1."""
    run, prompts = _run(["grpo.clip_low=0.0", "grpo.clip_high=0.0"], calls=[[[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]])
    traj = collect(run, prompts)
    assert traj.batch.old_logp is None
    seen = []

    def spy(logp, rows, cols):
        old = logp.detach() if traj.batch.old_logp is None else traj.batch.old_logp[rows, cols]
        seen.append(float((logp.detach() - old).abs().max()))
        return clipped_token_loss(logp, traj.batch, cols, rows=rows, clip_low=0.0, clip_high=0.0)[0]

    replay(run.model, traj.kept, traj.spec, adapter=run.adapter, loss_fn=spy, pad_token_id=run.pad)
    assert seen and max(seen) == 0.0
    stats = grpo_step(run, traj)
    assert stats["clip_fraction"] == 0.0 and stats["grad_norm"] > 0
    assert traj.batch.old_logp is not None  # the second pass would compare against the first pass's log-probs


def test_warmup_then_schedule():
    cfg = load_config(None, ["optim.lr=0.01", "optim.warmup_steps=4", "run.steps=10"])
    assert [learning_rate(cfg, s) for s in range(5)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01])
    cos = load_config(None, ["optim.lr=0.01", "optim.warmup_steps=2", "run.steps=5", "optim.schedule=cosine",
                             "optim.final_lr_fraction=0.0"])
    assert [learning_rate(cos, s) for s in range(5)] == pytest.approx([0.005, 0.01, 0.01, 0.005, 0.0])


def test_soft_overlong_penalty_matches_dapo():
    got = soft_overlong_penalty(torch.tensor([5, 12, 16, 18, 20]), max_len=20, buffer=8, penalty=1.0)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.5, -0.75, -1.0])
    assert torch.equal(soft_overlong_penalty(torch.tensor([20]), 20, 0), torch.zeros(1))


def test_micro_batched_step_equals_one_batch():
    """grpo.micro_batch_rows: the same gradient as replaying every kept row at once (fp32, relative 1e-6)."""
    calls = [[[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.5]]]
    grads = {}
    for size in (None, 3):
        run, prompts = _run([f"grpo.micro_batch_rows={'null' if size is None else size}"], calls=calls)
        grpo_step(run, collect(run, prompts))
        grads[size] = torch.cat([p.grad.reshape(-1) for p in run.adapter.parameters()])
    assert grads[None].norm() > 0
    assert float((grads[3] - grads[None]).norm() / grads[None].norm()) <= 1e-6


@pytest.mark.parametrize("method", ["lora", "lora_c", "pte"])
def test_a_bf16_training_step_has_first_pass_ratio_one(method, tmp_path):
    """A bf16 base model: one GRPO step per method trains fp32 adapter parameters, and with pi_old=replay no
    token is clipped on the first pass even with a zero clip range (rollout and replay differ in bf16)."""
    from pte.train import train

    window = "null" if method == "lora" else "4"
    last = train(load_config(None, BASE + [f"adapter.method={method}", f"cache.window={window}", "run.steps=1",
                                           "model.dtype=bfloat16", "grpo.clip_low=0.0", "grpo.clip_high=0.0",
                                           "sampling.max_new_tokens=12", f"run.out_dir={tmp_path}"]), progress=False)
    assert last["replayed_rows"] > 0 and last["clip_fraction"] == 0.0 and last["grad_norm"] > 0
    assert last["logprob_mismatch"] is not None and torch.isfinite(torch.tensor(last["loss"]))
