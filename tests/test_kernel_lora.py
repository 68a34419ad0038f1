"""The Triton LoRA shrink/expand kernels against their torch twins and the torch LoRA op.

Runs on the CPU under TRITON_INTERPRET=1 in float32 and float16 (the interpreter's bf16 dot is
wrong); the same checks run in bf16 on the GPU from bench/kernels/lora_bench.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

from loraplane.engine.adapter_cache import AdapterCache  # noqa: E402
from loraplane.engine.adapters import LoraWeights, random_lora_weights  # noqa: E402
from loraplane.engine.config import LORA_MODULES, NAMED_SHAPES, ModelConfig  # noqa: E402
from loraplane.engine.kernels.lora_expand import lora_expand, lora_expand_ref  # noqa: E402
from loraplane.engine.kernels.lora_meta import build_meta  # noqa: E402
from loraplane.engine.kernels.lora_shrink import (  # noqa: E402
    lora_shrink,
    lora_shrink_ref,
    shrink_width,
)
from loraplane.engine.lora.ops import LoraSegment, TorchLoraOp  # noqa: E402
from loraplane.engine.lora.triton_op import TritonLoraOp  # noqa: E402
from loraplane.engine.memory_pool import DevicePool, PoolLayout  # noqa: E402

# Odd widths: hidden 48 with chunk 16, GQA (kv width 32), intermediate 80.
ODD = ModelConfig("odd", 300, 48, 80, 2, 3, 2, 16)


def random_weights(cfg: ModelConfig, rank: int, modules: tuple[str, ...],
                   gen: torch.Generator) -> LoraWeights:
    return random_lora_weights(cfg, rank, modules, seed=gen, std=0.3)


def setup(cfg: ModelConfig, dtype: torch.dtype, ranks: list[int], seed: int):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    pool = DevicePool(PoolLayout.for_model(cfg, 4), 400, dtype, torch.device("cpu"))
    cache = AdapterCache(pool, cfg)
    # Occupy and free some pages first so adapters land on scattered, non-consecutive pages.
    hole = pool.pages.allocate(7, "kv")
    adapters = []
    for i, r in enumerate(ranks):
        mods = tuple(m for j, m in enumerate(LORA_MODULES) if (i + j) % 3 != 1) or ("q_proj",)
        a = cache.add(f"a{i}", "", random_weights(cfg, r, mods, gen))
        assert cache.acquire(a)
        if i == 0:
            pool.pages.free(hole[::2])
        adapters.append(a)
    return pool, adapters, gen


def segments_for(adapters, lengths: list[int], skip: set[int]) -> tuple[list[LoraSegment], int]:  # type: ignore[no-untyped-def]
    segs, row = [], 0
    for i, n in enumerate(lengths):
        if i not in skip:
            segs.append(LoraSegment(row, row + n, adapters[i % len(adapters)]))
        row += n
    return segs, row


CASES = [
    # (ranks, segment lengths, segments without adapter)
    ([8], [1], set()),
    ([1, 4, 16, 5], [1, 1, 1, 1, 1, 1, 1, 1], {2}),
    ([3, 33, 8], [17, 1, 40, 2, 1], {0}),
    ([64, 2], [5, 1, 23], set()),
]


@pytest.mark.parametrize("cfg", [NAMED_SHAPES["tiny"], ODD], ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernels_match_reference(cfg: ModelConfig, dtype: torch.dtype, case: int) -> None:
    ranks, lengths, skip = CASES[case]
    pool, adapters, gen = setup(cfg, dtype, ranks, seed=case)
    segs, rows = segments_for(adapters, lengths, skip)
    lay = pool.layout
    meta = build_meta(segs, 16, torch.device("cpu"))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    layer = case % cfg.num_layers  # the interpreter is slow: one layer, three modules per case
    for j, m in enumerate(LORA_MODULES[case % 3::3]):
        fan_in, fan_out = cfg.module_shape(m)
        x = torch.randn(rows, fan_in, generator=gen).to(dtype)
        want = lora_shrink_ref(x, pool.data[layer], meta, m, lay.chunk, lay.chunks_per_page)
        got = lora_shrink(x, pool.data[layer], meta, m, lay.chunk, lay.chunks_per_page, 16,
                          split_k=1 + 2 * (j % 2))
        torch.testing.assert_close(got, want, atol=tol * 10, rtol=tol)
        y0 = torch.randn(rows, fan_out, generator=gen).to(dtype)
        y_ref, y_k = y0.clone(), y0.clone()
        lora_expand_ref(want, y_ref, pool.data[layer], meta, m, lay.chunk, lay.chunks_per_page)
        lora_expand(want, y_k, pool.data[layer], meta, m, lay.chunk, lay.chunks_per_page, 16)
        torch.testing.assert_close(y_k.float(), y_ref.float(), atol=tol * 20, rtol=tol)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_op_matches_torch_op(case: int) -> None:
    cfg = NAMED_SHAPES["tiny"]
    ranks, lengths, skip = CASES[case]
    pool, adapters, gen = setup(cfg, torch.float32, ranks, seed=10 + case)
    segs, rows = segments_for(adapters, lengths, skip)
    torch_op, triton_op = TorchLoraOp(pool), TritonLoraOp(pool)
    b_torch, b_triton = torch_op.prepare(segs), triton_op.prepare(segs)
    for m in LORA_MODULES[case % 2::2]:
        fan_in, fan_out = cfg.module_shape(m)
        x = torch.randn(rows, fan_in, generator=gen)
        y0 = torch.randn(rows, fan_out, generator=gen)
        y1, y2 = y0.clone(), y0.clone()
        torch_op.apply(x, y1, 1, m, b_torch)
        triton_op.apply(x, y2, 1, m, b_triton)
        torch.testing.assert_close(y2, y1, atol=1e-3, rtol=1e-4)
        # Rows outside every segment are untouched.
        covered = torch.zeros(rows, dtype=torch.bool)
        for s in segs:
            covered[s.start:s.end] = True
        assert torch.equal(y2[~covered], y0[~covered])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("group", [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")],
                         ids=lambda g: g[0])
def test_fused_shrink_matches_each_module(dtype: torch.dtype, group: tuple[str, ...]) -> None:
    cfg = ODD
    ranks, lengths, skip = CASES[2]
    pool, adapters, gen = setup(cfg, dtype, ranks, seed=7)
    segs, rows = segments_for(adapters, lengths, skip)
    lay = pool.layout
    meta = build_meta(segs, 16, torch.device("cpu"))
    x = torch.randn(rows, cfg.hidden_size, generator=gen).to(dtype)
    got = lora_shrink(x, pool.data[1], meta, group, lay.chunk, lay.chunks_per_page, 16,
                      split_k=2)
    width = shrink_width(meta.max_rank)
    assert got.shape == (rows, len(group) * width)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for j, m in enumerate(group):
        want = lora_shrink_ref(x, pool.data[1], meta, m, lay.chunk, lay.chunks_per_page)
        torch.testing.assert_close(got[:, j * width:(j + 1) * width], want, atol=tol * 10,
                                   rtol=tol)


def test_triton_op_shares_one_shrink_per_group() -> None:
    cfg = NAMED_SHAPES["tiny"]
    ranks, lengths, skip = CASES[1]
    pool, adapters, gen = setup(cfg, torch.float32, ranks, seed=21)
    segs, rows = segments_for(adapters, lengths, skip)
    torch_op, triton_op = TorchLoraOp(pool), TritonLoraOp(pool)
    b_torch, b_triton = torch_op.prepare(segs), triton_op.prepare(segs)
    for layer in range(cfg.num_layers):
        x = torch.randn(rows, cfg.hidden_size, generator=gen)  # one input, as the model passes
        for m in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            fan_out = cfg.module_shape(m)[1]
            y0 = torch.randn(rows, fan_out, generator=gen)
            y1, y2 = y0.clone(), y0.clone()
            torch_op.apply(x, y1, layer, m, b_torch)
            triton_op.apply(x, y2, layer, m, b_triton)
            torch.testing.assert_close(y2, y1, atol=1e-3, rtol=1e-4)


def test_untargeted_projections_launch_nothing() -> None:
    """Adapters on q and v only: the batch names those two, the wrapped projections of the
    others never call the op, and the shrink of q,k,v covers q and v alone."""
    from loraplane.engine.lora.layers import apply_lora
    from loraplane.engine.models.llama import build_model

    cfg = NAMED_SHAPES["tiny"]
    gen = torch.Generator().manual_seed(3)
    pool = DevicePool(PoolLayout.for_model(cfg, 4), 200, torch.float32, torch.device("cpu"))
    cache = AdapterCache(pool, cfg)
    a = cache.add("qv", "", random_weights(cfg, 8, ("q_proj", "v_proj"), gen))
    assert cache.acquire(a)
    op = TritonLoraOp(pool)
    calls: list[str] = []
    apply = op.apply

    def counting_apply(x, y, layer, module, batch):  # type: ignore[no-untyped-def]
        calls.append(module)
        apply(x, y, layer, module, batch)

    model = build_model(cfg, None, 64, torch.float32, torch.device("cpu"))
    state = apply_lora(model, op)
    op.apply = counting_apply  # type: ignore[method-assign]
    state.batch = op.prepare([LoraSegment(0, 3, a)])
    assert state.batch.modules == {"q_proj", "v_proj"}
    x = torch.randn(3, cfg.hidden_size, generator=gen)
    attn = model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
        proj(x)
    assert calls == ["q_proj", "v_proj"]
    g = op._group_shrink(x, 0, "q_proj", state.batch)
    assert g.group == ("q_proj", "v_proj") and g.s.shape == (3, 2 * shrink_width(8))


@pytest.mark.parametrize("cfg", [NAMED_SHAPES["tiny"], ODD], ids=lambda c: c.name)
def test_group_expand_matches_each_module(cfg: ModelConfig) -> None:
    """q, k, v expanded in one launch into column blocks of one output (GQA widths in ODD)
    add what three launches add; columns outside the blocks are untouched."""
    ranks, lengths, skip = CASES[2]
    pool, adapters, gen = setup(cfg, torch.float32, ranks, seed=5)
    segs, rows = segments_for(adapters, lengths, skip)
    lay = pool.layout
    meta = build_meta(segs, 16, torch.device("cpu"))
    group = ("q_proj", "k_proj", "v_proj")
    x = torch.randn(rows, cfg.hidden_size, generator=gen)
    s = lora_shrink(x, pool.data[1], meta, group, lay.chunk, lay.chunks_per_page, 16)
    widths = [cfg.module_shape(m)[1] for m in group]
    y0 = torch.randn(rows, sum(widths) + 16, generator=gen)  # a spare column block at the end
    bounds = [sum(widths[:j]) for j in range(4)]
    fused, each = y0.clone(), y0.clone()
    lora_expand(s, [fused[:, bounds[j]:bounds[j + 1]] for j in range(3)], pool.data[1], meta,
                group, lay.chunk, lay.chunks_per_page, 16)
    width = shrink_width(meta.max_rank)
    for j, m in enumerate(group):
        lora_expand_ref(s[:, j * width:(j + 1) * width], each[:, bounds[j]:bounds[j + 1]],
                        pool.data[1], meta, m, lay.chunk, lay.chunks_per_page)
    torch.testing.assert_close(fused, each, atol=1e-4, rtol=1e-4)
    assert torch.equal(fused[:, bounds[3]:], y0[:, bounds[3]:])
    assert not torch.equal(fused, y0)
    with pytest.raises(ValueError, match="column blocks"):
        lora_expand(s, [fused[:, :widths[0]], y0[:, :widths[1]], fused[:, :widths[2]]],
                    pool.data[1], meta, group, lay.chunk, lay.chunks_per_page, 16)


def test_a_group_left_unfinished_is_not_dropped_silently(caplog: pytest.LogCaptureFixture) -> None:
    """q's output, a column block of a fused product, waits for v (this adapter leaves k
    alone); a forward that stops before v leaves it held: the next step refuses to start, the
    reset after a failed forward logs it."""
    cfg = NAMED_SHAPES["tiny"]
    pool, adapters, gen = setup(cfg, torch.float32, [4], seed=2)
    segs = [LoraSegment(0, 2, adapters[0])]
    op = TritonLoraOp(pool)
    widths = [cfg.module_shape(m)[1] for m in ("q_proj", "k_proj", "v_proj")]
    for outcome in ("raises", "logs"):
        batch = op.prepare(segs)
        assert {"q_proj", "v_proj"} <= batch.modules
        x = torch.randn(2, cfg.hidden_size, generator=gen)
        fused = torch.zeros(2, sum(widths))
        op.apply(x, fused[:, :widths[0]], 0, "q_proj", batch)
        assert torch.count_nonzero(fused) == 0  # held, not yet added
        if outcome == "raises":
            with pytest.raises(RuntimeError, match="never ran"):
                op.prepare(segs)
        else:
            op.prepare([])
            assert "never ran" in caplog.text


@pytest.mark.parametrize("case", range(len(CASES)))
def test_metadata_sections_start_16_byte_aligned(case: int) -> None:
    """Triton specializes on pointer alignment: every section of the packed metadata starts
    16 bytes aligned whatever the step's counts, so the compiled variant does not change."""
    from loraplane.engine.kernels.lora_meta import StaticMeta, StaticShape

    ranks, lengths, skip = CASES[case]
    pool, adapters, _ = setup(NAMED_SHAPES["tiny"], torch.float32, ranks, seed=case)
    segs, _ = segments_for(adapters, lengths, skip)
    static = StaticMeta(StaticShape(tiles=64, segs=9, pages=200, max_rank=64), 16,
                        torch.device("cpu"))
    for meta in (build_meta(segs, 16, torch.device("cpu")), static.fill(segs)):
        for t in (meta.tiles, meta.segs, meta.offsets, meta.pages):
            assert t.data_ptr() % 16 == 0
    want = build_meta(segs, 16, torch.device("cpu"))
    assert want.segs[:, 2].tolist() == [s.adapter.rank for s in segs]
    assert want.tiles[:, 0].max().item() == len(segs) - 1


def test_kernel_variants_compile_up_front() -> None:
    """The engine's start-up launch of every shrink/expand variant runs (programs return at
    once on the rank-0 metadata) and leaves the pool untouched."""
    from loraplane.engine.lora.triton_op import compile_lora_kernels

    cfg = NAMED_SHAPES["tiny"]
    pool, _, _ = setup(cfg, torch.float32, [4], seed=0)
    before = pool.data.clone()
    launches = compile_lora_kernels(pool, cfg, 16)
    ins = {cfg.module_shape(m)[0] for m in LORA_MODULES}
    outs = {cfg.module_shape(m)[1] for m in LORA_MODULES}
    assert launches == 2 * (4 * len(ins) + 2 * len(outs))
    assert torch.equal(pool.data, before)


def test_split_k_rule() -> None:
    """Split-K fills TARGET_PROGRAMS programs, never past MAX_SPLIT nor the K blocks."""
    from loraplane.engine.kernels.lora_shrink import MAX_SPLIT, TARGET_PROGRAMS, shrink_split

    assert shrink_split(128, 32) == TARGET_PROGRAMS // 128  # 64 rows x 2 rank blocks: 4
    assert shrink_split(5, 32) == MAX_SPLIT  # few tiles: capped, not 64
    assert shrink_split(5, 4) == 4  # no more splits than K blocks
    assert shrink_split(TARGET_PROGRAMS, 32) == 1


@pytest.mark.parametrize("case", range(len(CASES)))
def test_expand_blocks_wider_than_a_chunk(case: int) -> None:
    """An expand block of two chunks (a page lookup per chunk; the chunks may lie on two pages)
    gives the torch twin's result, alone and for a fused group."""
    cfg = NAMED_SHAPES["tiny"]
    ranks, lengths, skip = CASES[case]
    pool, adapters, gen = setup(cfg, torch.float16, ranks, seed=30 + case)
    segs, rows = segments_for(adapters, lengths, skip)
    lay = pool.layout
    meta = build_meta(segs, 16, torch.device("cpu"))
    layer = case % cfg.num_layers
    group = ("q_proj", "k_proj", "v_proj")
    widths = [cfg.module_shape(m)[1] for m in group]
    x = torch.randn(rows, cfg.hidden_size, generator=gen).to(torch.float16)
    s = lora_shrink_ref(x, pool.data[layer], meta, group, lay.chunk, lay.chunks_per_page)
    w = s.shape[1] // len(group)
    y0 = torch.randn(rows, sum(widths), generator=gen).to(torch.float16)
    want = y0.clone()
    for j, (m, yj) in enumerate(zip(group, torch.split(want, widths, dim=1), strict=True)):
        lora_expand_ref(s[:, j * w:(j + 1) * w], yj, pool.data[layer], meta, m, lay.chunk,
                        lay.chunks_per_page)
    got = y0.clone()
    lora_expand(s, list(torch.split(got, widths, dim=1)), pool.data[layer], meta, list(group),
                lay.chunk, lay.chunks_per_page, 16, block_n=2 * lay.chunk)
    torch.testing.assert_close(got.float(), want.float(), atol=0.4, rtol=2e-2)
    one = y0[:, :widths[0]].clone()
    ref = one.clone()
    lora_expand_ref(s[:, :w], ref, pool.data[layer], meta, "q_proj", lay.chunk,
                    lay.chunks_per_page)
    lora_expand(s[:, :w], one, pool.data[layer], meta, "q_proj", lay.chunk,
                lay.chunks_per_page, 16, block_n=4 * lay.chunk)
    torch.testing.assert_close(one.float(), ref.float(), atol=0.4, rtol=2e-2)


def test_cuda_op_falls_back_to_torch_for_chunks_too_narrow_for_the_kernels() -> None:
    """tl.dot needs 16 on every side on the GPU: a pool of 8-element chunks (a tiny test shape)
    gets the plain-torch op on CUDA instead of a kernel that fails to compile."""
    from loraplane.engine.engine import default_lora_op

    make = default_lora_op(torch.device("cuda"))
    narrow = DevicePool(PoolLayout(1, 16, 1, 8, 8), 4, torch.float32, torch.device("cpu"))
    wide = DevicePool(PoolLayout(1, 16, 1, 16, 16), 4, torch.float32, torch.device("cpu"))
    assert type(make(narrow)) is TorchLoraOp
    assert type(make(wide)) is TritonLoraOp
