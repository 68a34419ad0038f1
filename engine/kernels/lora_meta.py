"""Per-step metadata the LoRA kernels read: row tiles, segments, module offsets, page tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from loraplane.engine.config import LORA_MODULES

if TYPE_CHECKING:
    from loraplane.engine.lora.ops import LoraSegment

MODULE_INDEX = {m: i for i, m in enumerate(LORA_MODULES)}
SEG_FIELDS = 4  # row_start, row_end, rank, page table offset
TILE_FIELDS = 2  # segment index, first row


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


def build_meta(segments: list[LoraSegment], block_m: int, device: torch.device) -> LoraKernelMeta:
    """Pack the step's segments into one int32 buffer and copy it to the device once."""
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
        segs += [seg.start, seg.end, a.rank, page_off[a.id]]
        for m in LORA_MODULES:
            offsets += [a.offsets[(m, "a")][0], a.offsets[(m, "bt")][0]] \
                if (m, "a") in a.offsets else [-1, -1]
        for row in range(seg.start, seg.end, block_m):
            tiles += [s, row]
        max_rank = max(max_rank, a.rank)
    flat = torch.tensor(tiles + segs + offsets + pages, dtype=torch.int32)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    n_t, n_s, n_o = len(tiles), len(segs), len(offsets)
    return LoraKernelMeta(
        tiles=flat[:n_t].view(-1, TILE_FIELDS),
        segs=flat[n_t:n_t + n_s].view(-1, SEG_FIELDS),
        offsets=flat[n_t + n_s:n_t + n_s + n_o].view(-1, len(LORA_MODULES), 2),
        pages=flat[n_t + n_s + n_o:],
        num_tiles=n_t // TILE_FIELDS,
        max_rank=max_rank,
    )
