import os

import pytest
import torch

from pte.models import tiny_model

torch.set_num_threads(int(os.environ.get("PTE_TEST_THREADS", "2")))  # 1 on a machine shared with other jobs
if os.environ.get("PTE_TEST_DEVICE"):  # e.g. cuda (scripts/gpu_check.sh): models and new tensors default to it
    torch.set_default_device(os.environ["PTE_TEST_DEVICE"])

ARCHS = ["llama", "qwen2"]
ATTNS = ["sdpa", "eager"]


@pytest.fixture(params=[(a, i) for a in ARCHS for i in ATTNS], ids=lambda p: f"{p[0]}-{p[1]}")
def model(request):
    """A tiny random model with sharp weights (std 0.2): small-init models hide position bugs."""
    arch, attn = request.param
    return tiny_model(arch, attn=attn, init_std=0.2, seed=1)


def reference_mask(valid: torch.Tensor, visible: torch.Tensor, attn: str, dtype=torch.float32) -> torch.Tensor:
    """[batch, q, k] bool visibility -> the 4D mask transformers expects for ``attn``.

    Pad queries see themselves so no row is fully masked; their outputs are never compared.
    """
    eye = torch.eye(visible.shape[-1], dtype=torch.bool)[None] & ~valid[:, :, None]
    vis = (visible | eye)[:, None]
    if attn == "eager":  # eager *adds* the mask: a boolean mask there would be silently wrong
        return torch.zeros(vis.shape, dtype=dtype).masked_fill(~vis, torch.finfo(dtype).min)
    return vis
