"""The fused decode-layer kernels (residual add + RMSNorm, SiLU*up, q,k rotary) against their
torch twins, and a model with `use_fused_layers` against the same model without: plain, with
LoRA adapters of mixed ranks, and on a tensor-parallel rank's shard (CPU, TRITON_INTERPRET=1)."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

import loraplane.engine.distributed.lora_op as lora_op_module  # noqa: E402
import loraplane.engine.lora.triton_op as triton_op_module  # noqa: E402
from loraplane.engine.adapters import LoraWeights, random_lora_weights  # noqa: E402
from loraplane.engine.attention import SeqSlice, TorchAttention, store_kv  # noqa: E402
from loraplane.engine.config import LORA_MODULES, NAMED_SHAPES, EngineConfig  # noqa: E402
from loraplane.engine.distributed.lora_op import (  # noqa: E402
    SKIP_COLLECTIVES_ENV,
    TensorParallelLoraOp,
)
from loraplane.engine.distributed.sharding import slice_linear  # noqa: E402
from loraplane.engine.engine import EngineParts, LLMEngine  # noqa: E402
from loraplane.engine.kernels.rms_norm import add_rms_norm  # noqa: E402
from loraplane.engine.kernels.rotary import rotary_qk, rotary_qk_store  # noqa: E402
from loraplane.engine.kernels.silu_mul import silu_mul, silu_mul_ref  # noqa: E402
from loraplane.engine.lora.layers import LoraLinear, apply_lora  # noqa: E402
from loraplane.engine.lora.ops import TorchLoraOp  # noqa: E402
from loraplane.engine.lora.triton_op import TritonLoraOp  # noqa: E402
from loraplane.engine.memory_pool import DevicePool, PoolLayout  # noqa: E402
from loraplane.engine.models.fused_layers import (  # noqa: E402
    FusedLlamaModel,
    FusedMember,
    FusedRotary,
    use_fused_layers,
)
from loraplane.engine.models.llama import (  # noqa: E402
    LlamaModel,
    build_model,
    rms_norm,
    rope_tables,
    rotate,
)
from loraplane.engine.models.triton_layers import use_triton_layers  # noqa: E402
from loraplane.engine.sampling_params import SamplingParams  # noqa: E402
from loraplane.engine.tokenizer import Tokenizer  # noqa: E402

DTYPES = [torch.float32, torch.float16]
TINY = NAMED_SHAPES["tiny"]


def _tol(dtype: torch.dtype) -> float:
    return 1e-6 if dtype == torch.float32 else 1e-3


# ---- kernels against their twins ----------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 64), (5, 48), (3, 80), (2, 1000)])
def test_add_rms_norm_matches_add_then_norm(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(shape[1])
    h = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    d = torch.randn(*shape, generator=gen).to(dtype)
    w = (1 + torch.randn(shape[1], generator=gen) * 0.1).to(dtype)
    total, normed = add_rms_norm(h, d, w, 1e-5)
    want = h + d
    assert torch.equal(total, want)  # the residual is rounded exactly as torch's add
    torch.testing.assert_close(normed, rms_norm(want, w, 1e-5), atol=_tol(dtype),
                               rtol=_tol(dtype))


def test_add_rms_norm_refuses_mismatched_inputs() -> None:
    h = torch.randn(3, 16)
    with pytest.raises(ValueError, match="does not match"):
        add_rms_norm(h, torch.randn(3, 8), torch.ones(16), 1e-5)
    with pytest.raises(ValueError, match="dtype"):
        add_rms_norm(h, h, torch.ones(16, dtype=torch.float16), 1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,width", [(1, 1), (3, 37), (4, 1500), (2, 2048)])
def test_silu_mul_matches_torch(dtype: torch.dtype, rows: int, width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    # gate and up as the column blocks of one fused [T, 2I] product (row stride 2I).
    fused = (torch.randn(rows, 2 * width, generator=gen) * 4).to(dtype)
    gate, up = fused[:, :width], fused[:, width:]
    got = silu_mul(gate, up, block=512)
    assert got.is_contiguous()
    torch.testing.assert_close(got, silu_mul_ref(gate, up), atol=_tol(dtype), rtol=_tol(dtype))


def test_silu_mul_refuses_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="one dtype"):
        silu_mul(torch.randn(2, 8), torch.randn(2, 9))
    with pytest.raises(ValueError, match="contiguous"):
        silu_mul(torch.randn(8, 2).t(), torch.randn(2, 8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(4, 2, 16), (3, 1, 8), (20, 4, 64),
                                                       (2, 2, 32)])
def test_rotary_qk_matches_two_rotations(dtype: torch.dtype, q_heads: int, kv_heads: int,
                                         head_dim: int) -> None:
    gen = torch.Generator().manual_seed(q_heads * head_dim)
    cos, sin = rope_tables(head_dim, 10000.0, None, 300)
    # q, k as head views of one fused q,k,v product: row stride (nh + 2 kvh) * hd.
    t = 5
    qkv = torch.randn(t, (q_heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q = qkv[:, :q_heads * head_dim].view(t, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim:(q_heads + kv_heads) * head_dim].view(t, kv_heads, head_dim)
    positions = torch.tensor([0, 1, 299, 42, 42], dtype=torch.int32)
    got_q, got_k = rotary_qk(q, k, positions, cos, sin)
    torch.testing.assert_close(got_q, rotate(q, positions, cos, sin), atol=_tol(dtype),
                               rtol=_tol(dtype))
    torch.testing.assert_close(got_k, rotate(k, positions, cos, sin), atol=_tol(dtype),
                               rtol=_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(4, 2, 16), (3, 1, 8), (20, 4, 64)])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32], ids=str)
def test_rotary_qk_store_matches_rotation_then_store(dtype: torch.dtype, q_heads: int,
                                                     kv_heads: int, head_dim: int,
                                                     slot_dtype: torch.dtype) -> None:
    """One launch rotates q, k and writes the rotated k and v into their cache slots; the
    same as two rotations and store_kv, and no other slot changes."""
    gen = torch.Generator().manual_seed(q_heads + head_dim)
    cos, sin = rope_tables(head_dim, 10000.0, None, 300)
    t = 6
    qkv = torch.randn(t, (q_heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q = qkv[:, :q_heads * head_dim].view(t, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim:(q_heads + kv_heads) * head_dim].view(t, kv_heads, head_dim)
    v = qkv[:, (q_heads + kv_heads) * head_dim:].view(t, kv_heads, head_dim)
    positions = torch.tensor([0, 1, 299, 42, 42, 7], dtype=torch.int32)
    slots = torch.tensor([9, 0, 31, 4, 5, 17], dtype=slot_dtype)
    cache = torch.randn(32, 2, kv_heads, head_dim, generator=gen).to(dtype)
    want_cache = cache.clone()
    store_kv(rotate(k, positions, cos, sin), v, want_cache, slots.long())
    got_q = rotary_qk_store(q, k, v, positions, cos, sin, cache, slots)
    tol = _tol(dtype)
    torch.testing.assert_close(got_q, rotate(q, positions, cos, sin), atol=tol, rtol=tol)
    torch.testing.assert_close(cache, want_cache, atol=tol, rtol=tol)
    with pytest.raises(ValueError):
        rotary_qk_store(q, k, v, positions, cos, sin, cache[:, :1], slots)


# ---- the model --------------------------------------------------------------------------

def _fuse(model: LlamaModel) -> None:
    use_triton_layers(model)
    use_fused_layers(model)


def _fused_copy(model: LlamaModel) -> LlamaModel:
    fused = copy.deepcopy(model)
    _fuse(fused)
    return fused


def _logits(model: LlamaModel, dtype: torch.dtype) -> torch.Tensor:
    """Logits of a prefill of 9 tokens, then one decode row beside a 4-token prefill."""
    cfg = model.config
    pool = DevicePool(PoolLayout.for_model(cfg, 4), 40, dtype, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (9,), generator=gen)
    meta = TorchAttention.build([SeqSlice(0, 9, 9, [1, 2, 3])], 4, torch.device("cpu"))
    first = model.logits(model(ids, torch.arange(9), pool, meta))
    ids2 = torch.randint(3, cfg.vocab_size, (5,), generator=gen)
    meta2 = TorchAttention.build([SeqSlice(0, 1, 10, [1, 2, 3]), SeqSlice(1, 4, 4, [5])], 4,
                                 torch.device("cpu"))
    pos = torch.tensor([9, 0, 1, 2, 3])
    return torch.cat([first, model.logits(model(ids2, pos, pool, meta2))])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_model_matches_unfused(dtype: torch.dtype) -> None:
    model = build_model(TINY, None, 256, dtype, torch.device("cpu"), seed=4)
    fused = _fused_copy(model)
    assert type(fused) is FusedLlamaModel and type(fused.rotary) is FusedRotary
    attn = fused.layers[0].self_attn
    # The members' weights are views into one [q + 2 kv, H] tensor: no extra memory.
    q, v = attn.q_proj, attn.v_proj
    assert isinstance(q, FusedMember) and isinstance(v, FusedMember)
    assert q.fused is v.fused and q.weight.untyped_storage().data_ptr() == \
        q.fused.weight.untyped_storage().data_ptr()
    assert q.fused.weight.shape == (TINY.q_size + 2 * TINY.kv_size, TINY.hidden_size)
    assert sum(p.numel() for p in fused.parameters()) == \
        sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(_logits(fused, dtype), _logits(model, dtype),
                               atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=1e-3)


def test_fusing_after_lora_is_refused() -> None:
    model = build_model(TINY, None, 64, torch.float32, torch.device("cpu"))
    pool = DevicePool(PoolLayout.for_model(TINY, 4), 8, torch.float32, torch.device("cpu"))
    apply_lora(model, TorchLoraOp(pool))
    assert isinstance(model.layers[0].self_attn.q_proj, LoraLinear)
    with pytest.raises(ValueError, match="before LoRA"):
        use_fused_layers(model)


def _adapter(rank: int, modules: tuple[str, ...], seed: int) -> LoraWeights:
    return random_lora_weights(TINY, rank, modules, seed=seed, std=0.3, alpha=2.0 * rank,
                               scale=2.0)


# Mixed ranks; adapters on part of a fused group (q, v without k; up without gate) and on all.
ADAPTERS = [("r2", 2, ("q_proj", "v_proj")), ("r5", 5, LORA_MODULES),
            ("r16", 16, ("k_proj", "up_proj", "down_proj"))]


def _generate(model: LlamaModel, op: type, names: list[str | None]
              ) -> tuple[list[list[int]], list[torch.Tensor]]:
    engine = LLMEngine(EngineParts(model, TINY, Tokenizer.byte_level(TINY.vocab_size), "base"),
                       EngineConfig(pool_bytes=16 << 20, max_num_batched_tokens=24,
                                    max_num_seqs=8), lora_op=op)
    for name, rank, mods in ADAPTERS:
        engine.add_adapter(name, "", _adapter(rank, mods, rank))
    logits: list[torch.Tensor] = []
    run = engine.runner.run

    def capture(batch):  # type: ignore[no-untyped-def]
        out = run(batch)
        logits.append(out[2].clone())
        return out
    engine.runner.run = capture  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, TINY.vocab_size, (n,), generator=gen).tolist()
               for n in (3, 17, 1, 9)]
    seqs = engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0,
                                                   ignore_eos=True), names)
    return [s.output_ids for s in seqs], logits


@pytest.mark.parametrize("op", [TorchLoraOp, TritonLoraOp], ids=lambda o: o.__name__)
def test_fused_model_with_adapters_matches_unfused(op: type) -> None:
    """Each projection's LoRA term lands in its own column block of the fused product."""
    model = build_model(TINY, None, 256, torch.float32, torch.device("cpu"), seed=6)
    fused = _fused_copy(model)
    names: list[str | None] = [None, "r2", "r5", "r16"]
    want_ids, want = _generate(model, op, names)
    got_ids, got = _generate(fused, op, names)
    assert got_ids == want_ids
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    # Adapters must matter far beyond the tolerance, or the comparison proves nothing.
    _, base = _generate(copy.deepcopy(model), op, [None] * 4)
    assert (base[0][1:] - want[0][1:]).abs().max() > 0.1


def test_tensor_parallel_op_expands_a_fused_group_in_one_launch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The TP LoRA op on fused layers holds q, k (gate) until v (up) arrives, then expands the
    group into the fused product in one launch. At world size 1 with its collectives skipped
    (the gather of one rank is the identity) it must equal the one-GPU op."""
    monkeypatch.setenv(SKIP_COLLECTIVES_ENV, "1")
    launches: list[int] = []
    real = lora_op_module.lora_expand

    def counting(s, y, *args, **kwargs):  # type: ignore[no-untyped-def]
        launches.append(1 if isinstance(y, torch.Tensor) else len(y))
        return real(s, y, *args, **kwargs)
    # Both modules that launch the expand for the TP op (its own, and the group expand it
    # shares with the one-GPU op).
    monkeypatch.setattr(lora_op_module, "lora_expand", counting)
    monkeypatch.setattr(triton_op_module, "lora_expand", counting)

    def tp_op(pool: DevicePool) -> TensorParallelLoraOp:
        return TensorParallelLoraOp(pool, 0, 1, None, kernels=True)
    model = build_model(TINY, None, 256, torch.float32, torch.device("cpu"), seed=6)
    names: list[str | None] = [None, "r2", "r5", "r16"]
    want_ids, want = _generate(_fused_copy(model), TritonLoraOp, names)
    got_ids, got = _generate(_fused_copy(model), tp_op, names)  # type: ignore[arg-type]
    assert got_ids == want_ids
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert 3 in launches and 2 in launches  # q,k,v and gate,up groups in one launch each


def test_fusion_works_on_a_tensor_parallel_shard() -> None:
    """Rank 1 of 2's column-parallel shards (narrower q, k, v, gate, up) fuse like the whole;
    the row-parallel o/down local products are kept without their all-reduce here (no group),
    the same partial model on both sides."""
    world, rank = 2, 1
    model = build_model(TINY, None, 256, torch.float32, torch.device("cpu"), seed=8)
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            assert isinstance(parent, nn.Module)
            for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                if hasattr(parent, name):
                    setattr(parent, name, slice_linear(getattr(parent, name), 0, rank, world))
            for name in ("o_proj", "down_proj"):
                if hasattr(parent, name):
                    setattr(parent, name, slice_linear(getattr(parent, name), 1, rank, world))
    shard_cfg = TINY.with_updates(num_heads=TINY.num_heads // world,
                                  num_kv_heads=TINY.num_kv_heads // world,
                                  intermediate_size=TINY.intermediate_size // world)
    model.config = shard_cfg
    fused = _fused_copy(model)
    assert fused.layers[0].mlp.up_proj.weight.shape == (shard_cfg.intermediate_size,
                                                        TINY.hidden_size)
    torch.testing.assert_close(_logits(fused, torch.float32), _logits(model, torch.float32),
                               atol=1e-4, rtol=1e-3)
