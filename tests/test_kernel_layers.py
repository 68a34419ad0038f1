"""The single-launch RMSNorm and rotary kernels against the model's torch functions, and a model
with them swapped in against the same model without (CPU, TRITON_INTERPRET=1)."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

from loraplane.engine.attention import SeqSlice, TorchAttention  # noqa: E402
from loraplane.engine.config import NAMED_SHAPES  # noqa: E402
from loraplane.engine.kernels.rms_norm import rms_norm as rms_norm_kernel  # noqa: E402
from loraplane.engine.kernels.rotary import rotary  # noqa: E402
from loraplane.engine.memory_pool import DevicePool, PoolLayout  # noqa: E402
from loraplane.engine.models.llama import build_model, rms_norm, rope_tables, rotate  # noqa: E402
from loraplane.engine.models.triton_layers import (  # noqa: E402
    TritonRMSNorm,
    TritonRotary,
    use_triton_layers,
)

DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 64), (5, 48), (3, 80)])
def test_rms_norm_matches_the_model(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    w = (1 + torch.randn(shape[1], generator=gen) * 0.1).to(dtype)
    got = rms_norm_kernel(x, w, 1e-5)
    want = rms_norm(x, w, 1e-5)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,head_dim", [(3, 16), (4, 64), (1, 8)])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64], ids=str)
def test_rotary_matches_the_model(dtype: torch.dtype, heads: int, head_dim: int,
                                  pos_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(heads * head_dim)
    cos, sin = rope_tables(head_dim, 10000.0, None, 300)
    x = torch.randn(7, heads, head_dim, generator=gen).to(dtype)
    positions = torch.tensor([0, 1, 5, 299, 42, 42, 100], dtype=pos_dtype)
    got = rotary(x, positions, cos, sin)
    want = rotate(x, positions, cos, sin)
    # Same roundings in the same order: equal up to float32 product rounding.
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_model_with_triton_layers_matches() -> None:
    cfg = NAMED_SHAPES["tiny"]
    model = build_model(cfg, None, 256, torch.float32, torch.device("cpu"), seed=4)
    fused = copy.deepcopy(model)
    use_triton_layers(fused)
    assert isinstance(fused.norm, TritonRMSNorm) and isinstance(fused.rotary, TritonRotary)
    pool = DevicePool(PoolLayout.for_model(cfg, 4), 40, torch.float32, torch.device("cpu"))
    ids = torch.randint(3, cfg.vocab_size, (9,), generator=torch.Generator().manual_seed(0))
    meta = TorchAttention.build([SeqSlice(0, 9, 9, [1, 2, 3])], 4, torch.device("cpu"))
    want = model.logits(model(ids, torch.arange(9), pool, meta))
    got = fused.logits(fused(ids, torch.arange(9), pool, meta))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
