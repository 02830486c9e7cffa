"""The device check (pte.lab.paper_memory.device_check): replay -> clipped loss -> backward -> Adam on a fake accelerator."""

import pytest
import torch

import pte.grpo as grpo
from pte.adapter import AdapterConfig, attach
from pte.cache import sliding_eviction_steps
from pte.models import tiny_model
from pte.lab.paper_memory import FAKE_DEVICE, DeviceMismatch, device_check
from pte.replay import replay
from pte.rollout import CacheSpec, Sampling, rollout

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16]]  # unequal: the padded path runs too


def _build(method: str, window):
    def build():
        model = tiny_model("qwen2", init_std=0.2, seed=1)
        adapter = attach(model, AdapterConfig(method=method, rank=4, n_global=4))
        with torch.no_grad():
            for lin in adapter.linears.values():
                lin.A.normal_(0, 0.1)
        res = rollout(model, PROMPTS * 2, Sampling(max_new_tokens=20), CacheSpec(window=window),
                      generator=torch.Generator().manual_seed(0), adapter=adapter)
        return [model, adapter.encoders], dict(model=model, adapter=adapter, rows=res.rows, window=window)
    return build


def _step(ctx, device):
    """One GRPO step as pte.train runs it, every tensor made on ``device``."""
    rows, adapter = ctx["rows"], ctx["adapter"]
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=device)
    T = max(len(r.completion_ids) for r in rows)
    old = torch.zeros(len(rows), T, device=device)
    mask = torch.zeros(len(rows), T, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        old[i, :len(r.logprobs)] = torch.tensor(r.logprobs, device=device)
        mask[i, :len(r.logprobs)] = True
    tb = grpo.TokenBatch(advantages=grpo.group_advantages(rewards).view(-1, 1), old_logp=old, mask=mask,
                         normalizer=float(mask.sum()))
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-3)
    rep = replay(ctx["model"], rows, CacheSpec(window=ctx["window"]), adapter=adapter,
                 loss_fn=lambda logp, rows, cols: grpo.clipped_token_loss(logp, tb, cols, rows=rows)[0])
    torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
    opt.step()
    return rep, adapter


@pytest.mark.parametrize("method,window", [("lora", None), ("lora_c", 8), ("pte", 8)])
def test_step_runs_on_the_fake_device(method, window):
    rep, adapter = device_check(_build(method, window), _step)
    assert rep.logprobs.device == FAKE_DEVICE and rep.segments == 1 + len(sliding_eviction_steps(19, window))
    assert all(p.device == FAKE_DEVICE and p.grad is not None and p.grad.device == FAKE_DEVICE
               for p in adapter.parameters())


def test_a_cpu_tensor_in_the_loss_fails_the_check(monkeypatch):
    real = grpo.clipped_token_loss

    def planted(logp, batch, cols, **kw):
        batch.advantages = batch.advantages.cpu()  # the bug the check exists for: a loop tensor left on the CPU
        return real(logp, batch, cols, **kw)

    monkeypatch.setattr(grpo, "clipped_token_loss", planted)
    with pytest.raises(DeviceMismatch, match="create it with device="):
        device_check(_build("pte", 8), _step)
