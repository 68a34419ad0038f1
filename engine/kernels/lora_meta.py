"""Per-step metadata the LoRA kernels read: row tiles, segments, module offsets, page tables."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from loraplane.engine.config import LORA_MODULES

if TYPE_CHECKING:
    from loraplane.engine.lora.ops import LoraSegment

log = logging.getLogger(__name__)
MODULE_INDEX = {m: i for i, m in enumerate(LORA_MODULES)}
# The rank tiles the shrink and expand choose from (rank_tile); the engine compiles both.
RANK_TILES = (16, 32)
# tl.dot needs every dimension of at least 16 on the GPU, and the kernels' K (shrink) and N
# (expand) blocks are one pool chunk wide at most.
MIN_KERNEL_CHUNK = 16
SEG_FIELDS = 4  # row_start, row_end, rank, page table offset
TILE_FIELDS = 2  # segment index, first row
# Each section of the packed buffer starts 16 bytes aligned: Triton specializes a kernel on its
# pointer arguments' 16-byte alignment, and sections that start wherever the previous one ends
# made the alignment (so the compiled variant) change from step to step.
ALIGN = 4  # int32 elements


def rank_tile(max_rank: int) -> int:
    """Rank rows per program tile of the shrink and expand for a step's top rank."""
    return RANK_TILES[0] if max_rank <= RANK_TILES[0] else RANK_TILES[1]


def pack_modules(modules: list[str] | tuple[str, ...]) -> int:
    """The module indices of a fused group, 4 bits each (member j at bits 4j..), as the kernels
    unpack them."""
    return sum(MODULE_INDEX[m] << (4 * j) for j, m in enumerate(modules))


def kernels_fit(chunk: int) -> bool:
    """Whether pool chunks of `chunk` elements suit the LoRA kernels on the GPU
    (MIN_KERNEL_CHUNK); logs why the plain-torch op serves instead when not."""
    if chunk >= MIN_KERNEL_CHUNK:
        return True
    log.warning("adapter chunks of %d elements are narrower than the LoRA kernels' %d: the "
                "plain-torch LoRA op serves this model (slower, no decode graphs with "
                "adapters)", chunk, MIN_KERNEL_CHUNK)
    return False


@triton.jit
def tile_segment(tiles_ptr, segs_ptr, offsets_ptr, tile, module, KIND: tl.constexpr):
    """What a program reads of its tile (layouts as LoraKernelMeta's): the tile's first row,
    its segment's end row, rank and page-table offset, and the first chunk of `module`'s A
    (KIND 0) or B^T (KIND 1), -1 when the adapter leaves the module alone."""
    seg = tl.load(tiles_ptr + tile * 2)
    row0 = tl.load(tiles_ptr + tile * 2 + 1)
    row_end = tl.load(segs_ptr + seg * 4 + 1)
    rank = tl.load(segs_ptr + seg * 4 + 2)
    page_off = tl.load(segs_ptr + seg * 4 + 3)
    first = tl.load(offsets_ptr + seg * 14 + module * 2 + KIND)  # [S, 7 modules, 2]
    return row0, row_end, rank, page_off, first


@triton.jit
def tile_rows(row0, row_end, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr,
              ROWS1: tl.constexpr):
    """A tile's rows, their mask and a zero float32 accumulator: ROWS1 (a tile of one row) a
    scalar row and acc [WIDTH]; else rows [BLOCK_M] and acc [BLOCK_M, WIDTH]."""
    if ROWS1:
        rows = row0
        row_mask = row0 < row_end
        acc = tl.zeros((WIDTH,), dtype=tl.float32)
    else:
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        acc = tl.zeros((BLOCK_M, WIDTH), dtype=tl.float32)
    return rows, row_mask, acc


@triton.jit
def tile_out(base, rows, row_mask, stride, cols, col_mask, ROWS1: tl.constexpr):
    """Pointers and mask of a tile's output block: base + row * stride + col, shaped as
    tile_rows' accumulator."""
    if ROWS1:
        ptrs = base + rows * stride + cols
        mask = row_mask & col_mask
    else:
        ptrs = base + rows[:, None] * stride + cols[None, :]
        mask = row_mask[:, None] & col_mask[None, :]
    return ptrs, mask


@dataclass(frozen=True)
class LoraKernelMeta:
    """Device int32 views, filled with one host-to-device copy per step.

    tiles [W, 2]: (segment, first row) of each BLOCK_M-row tile of work;
    segs [S, 4]: (row_start, row_end, rank, offset of the adapter's page table in `pages`);
    offsets [S, 7, 2]: first chunk of A and of B^T of each module in the adapter's layout (-1:
    the adapter leaves that module alone); pages [P]: the page tables of the step's adapters.
    """

    tiles: torch.Tensor
    segs: torch.Tensor
    offsets: torch.Tensor
    pages: torch.Tensor
    num_tiles: int
    max_rank: int


@dataclass(frozen=True)
class StaticShape:
    """Fixed sizes for metadata that a CUDA graph reads: padded tiles, segments, pages."""

    tiles: int
    segs: int  # includes one spare, rank-0 segment that padding tiles point at
    pages: int
    max_rank: int


def _pack(segments: list[LoraSegment], block_m: int, static: StaticShape | None,
          ranks: list[int] | None = None) -> tuple[list[int], tuple[int, int, int], int, int]:
    """Host int32 values [tiles | segs | offsets | pages], each section but the last padded to
    ALIGN, and the unpadded sizes of the first three.

    ranks: the rank each segment's kernels use instead of its adapter's (tensor parallelism
    reads a shard's rows of A with a rank of r_pad / N, see distributed/lora_op.py).
    """
    tiles: list[int] = []
    segs: list[int] = []
    offsets: list[int] = []
    pages: list[int] = []
    page_off: dict[int, int] = {}  # adapter id -> offset of its page table in `pages`
    max_rank = 0
    for s, seg in enumerate(segments):
        a = seg.adapter
        assert a.pages is not None, f"adapter {a.name} is not resident"
        if a.id not in page_off:
            page_off[a.id] = len(pages)
            pages.extend(a.pages)
        rank = a.rank if ranks is None else ranks[s]
        segs += [seg.start, seg.end, rank, page_off[a.id]]
        for m in LORA_MODULES:
            offsets += [a.offsets[(m, "a")][0], a.offsets[(m, "bt")][0]] \
                if (m, "a") in a.offsets else [-1, -1]
        for row in range(seg.start, seg.end, block_m):
            tiles += [s, row]
        max_rank = max(max_rank, rank)
    num_tiles = len(tiles) // TILE_FIELDS
    if static is not None:
        spare = static.segs - 1
        if (num_tiles > static.tiles or len(segments) > spare or len(pages) > static.pages
                or max_rank > static.max_rank):
            raise ValueError("the step's LoRA metadata exceeds the captured graph's sizes")
        tiles += [spare, 0] * (static.tiles - num_tiles)
        segs += [0, 0, 0, 0] * (static.segs - len(segments))
        offsets += [-1] * (2 * len(LORA_MODULES) * (static.segs - len(segments)))
        pages += [0] * (static.pages - len(pages))
        num_tiles, max_rank = static.tiles, static.max_rank
    sizes = (len(tiles), len(segs), len(offsets))
    values: list[int] = []
    for section in (tiles, segs, offsets):
        values += section + [0] * (-len(section) % ALIGN)
    return values + pages, sizes, num_tiles, max_rank


def _views(flat: torch.Tensor, sizes: tuple[int, int, int], num_tiles: int,
           max_rank: int) -> LoraKernelMeta:
    n_t, n_s, n_o = sizes
    s0 = n_t + -n_t % ALIGN  # where each section starts (see ALIGN)
    o0 = s0 + n_s + -n_s % ALIGN
    p0 = o0 + n_o + -n_o % ALIGN
    return LoraKernelMeta(
        tiles=flat[:n_t].view(-1, TILE_FIELDS),
        segs=flat[s0:s0 + n_s].view(-1, SEG_FIELDS),
        offsets=flat[o0:o0 + n_o].view(-1, len(LORA_MODULES), 2),
        pages=flat[p0:],
        num_tiles=num_tiles,
        max_rank=max_rank,
    )


def build_meta(segments: list[LoraSegment], block_m: int, device: torch.device,
               ranks: list[int] | None = None) -> LoraKernelMeta:
    """Pack the step's segments into one int32 buffer and copy it to the device once."""
    values, sizes, num_tiles, max_rank = _pack(segments, block_m, None, ranks)
    flat = torch.tensor(values, dtype=torch.int32)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    return _views(flat, sizes, num_tiles, max_rank)


class StaticMeta:
    """Device buffers of fixed size that a captured graph reads; refilled before each replay.

    The host side is one persistent (pinned on CUDA) buffer written through numpy, so a fill
    allocates no tensor; the step's sync on its sampled tokens orders the reuse.
    """

    def __init__(self, shape: StaticShape, block_m: int, device: torch.device) -> None:
        self.shape = shape
        self.block_m = block_m
        values, sizes, num_tiles, max_rank = _pack([], block_m, shape)
        self.host = torch.tensor(values, dtype=torch.int32)
        if device.type == "cuda":
            self.host = self.host.pin_memory()
        self._np = self.host.numpy()
        self.flat = self.host.to(device)
        self.meta = _views(self.flat, sizes, num_tiles, max_rank)

    def fill(self, segments: list[LoraSegment], ranks: list[int] | None = None) -> LoraKernelMeta:
        """Copy this step's segments into the buffers (asynchronously) and return their views.

        ranks: as in build_meta (the ranks the kernels use instead of the adapters' own)."""
        self._np[:] = _pack(segments, self.block_m, self.shape, ranks)[0]
        self.flat.copy_(self.host, non_blocking=True)
        return self.meta


def segment_weights(pool_layer: torch.Tensor, meta: LoraKernelMeta, module: str, kind: int,
                    chunk: int, chunks_per_page: int,
                    width: int) -> list[tuple[int, int, torch.Tensor]]:
    """(row_start, row_end, W) per segment whose adapter targets `module`, read from the pool.

    kind 0: A [rank, width]; kind 1: B^T [rank, width]. The torch twins of the kernels use it.
    """
    chunks = pool_layer.reshape(-1, chunk)
    out = []
    for i, (start, end, rank, poff) in enumerate(meta.segs.tolist()):
        first = int(meta.offsets[i, MODULE_INDEX[module], kind])
        if first < 0:
            continue
        c = first + torch.arange(rank * width // chunk, device=pool_layer.device)
        pages = meta.pages[poff + c // chunks_per_page].long()
        out.append((start, end, chunks[pages * chunks_per_page + c % chunks_per_page]
                    .reshape(rank, width)))
    return out
