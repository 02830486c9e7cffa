"""Data parallelism over processes started by ``torchrun`` or ``accelerate launch`` (env ``WORLD_SIZE``).

Ranks sample different prompts and replay different numbers of segments, so nothing inside the replay
communicates (no DDP wrapper, no per-segment all-reduce): each rank accumulates its own gradient, then one
all-reduce per step sums the adapter gradients. With the token count summed over ranks as the normaliser, that
sum is the gradient of the global token-level loss, and every rank takes the same Adam step.

On CUDA each process drives the GPU named by ``LOCAL_RANK`` and every buffer it hands to NCCL lives there.
"""

from __future__ import annotations

import os

import torch


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment {name}={text!r}: expected an integer (set by torchrun)") from None


class Dist:
    def __init__(self, device: str = "cpu"):
        import torch.distributed as dist

        self.dist = dist
        self.world = _env_int("WORLD_SIZE", 1)
        self.rank = _env_int("RANK", 0)
        self.local_rank = _env_int("LOCAL_RANK", self.rank)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {device!r}: this torch build sees no CUDA GPU; use --device cpu")
            if self.world > 1:  # one GPU per process, chosen by the launcher
                self.device = torch.device("cuda", self.local_rank)
            elif self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over ranks, on this rank's device."""
        x = x.to(self.device)
        if self.world > 1:
            self.dist.all_reduce(x, op=self.dist.ReduceOp.SUM)
        return x

    def sum_grads(self, params: list[torch.Tensor]) -> None:
        """One all-reduce per step: every gradient flattened into one buffer, summed over ranks, written back."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = self.sum(torch.cat([p.grad.reshape(-1) for p in params]))
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank."""
        return bool(self.sum(torch.tensor([float(flag)], dtype=torch.float64)).item() > 0)

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier()

    def gather_floats(self, value: float) -> list[float]:
        if self.world == 1:
            return [value]
        out = [torch.zeros(1, dtype=torch.float64, device=self.device) for _ in range(self.world)]
        self.dist.all_gather(out, torch.tensor([value], dtype=torch.float64, device=self.device))
        return [float(t) for t in out]

    def close(self) -> None:
        if self.world > 1 and self.dist.is_initialized():
            self.dist.destroy_process_group()
