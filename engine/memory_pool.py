"""The unified paged memory pool: one set of fixed-size pages holds KV blocks and adapter weights.

A page is one KV block in every layer: ``[num_layers, block_size, 2, num_kv_heads, head_dim]``
elements. Adapter weights use the same pages, cut into *chunks* of ``chunk`` elements (a size that
divides every projection's input and output width, so a weight row never straddles a chunk). An
adapter of rank r lays out, per layer, the rows of A ``[r, in]`` and of B^T ``[r, out]`` of each
module it targets one after the other, chunk by chunk; only its last page is partly empty, whatever
the rank, and the same page ids serve every layer (one page table per adapter, as per sequence).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from loraplane.engine.config import ModelConfig

KV = "kv"
ADAPTER = "adapter"


class PoolExhaustedError(RuntimeError):
    """Raised when more pages are asked for than are free."""


class PagePool:
    """Allocator of page ids with reference counts; knows which kind of owner holds each page."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError("the pool needs at least one page")
        self.num_pages = num_pages
        # Pop from the end: low page ids are handed out first, which keeps adapters contiguous.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._refcount = [0] * num_pages
        self._kind: list[str | None] = [None] * num_pages
        self._used = Counter[str]()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def num_used(self, kind: str) -> int:
        return self._used[kind]

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int, kind: str) -> list[int]:
        """Take n free pages for an owner of the given kind (KV or ADAPTER)."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if not self.can_allocate(n):
            raise PoolExhaustedError(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refcount[p] = 1
            self._kind[p] = kind
        self._used[kind] += n
        return pages

    def incref(self, pages: list[int]) -> None:
        """Share pages with another owner (prefix sharing)."""
        for p in pages:
            if self._refcount[p] <= 0:
                raise RuntimeError(f"incref of free page {p}")
            self._refcount[p] += 1

    def free(self, pages: list[int]) -> None:
        """Drop one reference to each page; a page with none left returns to the free list."""
        # Check everything first so a bad call changes nothing.
        drops = Counter(pages)
        for p, n in drops.items():
            if not 0 <= p < self.num_pages or self._refcount[p] < n:
                raise RuntimeError(f"double free of page {p}")
        for p in pages:
            self._refcount[p] -= 1
            if self._refcount[p] == 0:
                kind = self._kind[p]
                assert kind is not None
                self._used[kind] -= 1
                self._kind[p] = None
                self._free.append(p)

    def check_invariants(self) -> None:
        """Every page is either free with no owner or used with a positive count, never both."""
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        used = Counter[str]()
        for p in range(self.num_pages):
            if p in free:
                assert self._refcount[p] == 0 and self._kind[p] is None, f"free page {p} owned"
            else:
                assert self._refcount[p] > 0, f"page {p} leaked (not free, no owner)"
                kind = self._kind[p]
                assert kind is not None
                used[kind] += 1
        assert +used == +self._used, f"usage counters {self._used} != pages {used}"


@dataclass(frozen=True)
class PoolLayout:
    """Sizes of a page and of a chunk for one model, in elements."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    chunk: int

    @classmethod
    def for_model(cls, config: ModelConfig, block_size: int) -> PoolLayout:
        return cls(config.num_layers, block_size, config.num_kv_heads, config.head_dim,
                   config.chunk_size)

    @property
    def page_elems_per_layer(self) -> int:
        return self.block_size * 2 * self.num_kv_heads * self.head_dim

    @property
    def chunks_per_page(self) -> int:
        return self.page_elems_per_layer // self.chunk

    def page_bytes(self, dtype: torch.dtype) -> int:
        return self.num_layers * self.page_elems_per_layer * dtype.itemsize

    def pages_for_chunks(self, num_chunks: int) -> int:
        return -(-num_chunks // self.chunks_per_page)


class DevicePool:
    """The pool's storage on one device and its two views (KV blocks, adapter chunks)."""

    def __init__(self, layout: PoolLayout, num_pages: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.layout = layout
        self.pages = PagePool(num_pages)
        # [num_layers, num_pages, page_elems]
        self.data = torch.zeros(layout.num_layers, num_pages, layout.page_elems_per_layer,
                                dtype=dtype, device=device)

    def kv_layer(self, layer: int) -> torch.Tensor:
        """[num_pages * block_size, 2, num_kv_heads, head_dim]: K and V of each token slot."""
        lay = self.layout
        return self.data[layer].view(-1, 2, lay.num_kv_heads, lay.head_dim)

    def chunks_layer(self, layer: int) -> torch.Tensor:
        """[num_pages * chunks_per_page, chunk]: adapter weight chunks."""
        return self.data[layer].view(-1, self.layout.chunk)

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A small host tensor on the pool's device; on CUDA staged through pinned memory so
        the copy is queued on the current stream without waiting for the work before it."""
        if self.data.device.type != "cuda":
            return host.to(self.data.device)
        return host.pin_memory().to(self.data.device, non_blocking=True)

    def write_pages(self, pages: list[int], flat: torch.Tensor) -> None:
        """Copy [num_layers, n_elems] of adapter weights into the given pages (last one partly);
        on the current stream, asynchronously when `flat` is in pinned memory."""
        pe = self.layout.page_elems_per_layer
        n = flat.shape[1]
        padded = torch.zeros(flat.shape[0], len(pages) * pe, dtype=self.data.dtype,
                             device=self.data.device)
        padded[:, :n] = flat.to(device=self.data.device, dtype=self.data.dtype,
                                non_blocking=True)
        self._scatter(pages, padded.view(flat.shape[0], len(pages), pe))

    def write_blocks(self, pages: list[int], runs: list[torch.Tensor]) -> None:
        """Copy host page buffers into the given pages: `runs` in page order, each [n,
        num_layers, page_elems] (the host tier's consecutive blocks), n summing to len(pages);
        on the current stream, asynchronously from pinned memory. On CUDA each run is one
        contiguous transfer into a staging buffer on the device (a pool page is strided across
        layers, so it cannot be a transfer's destination), then one scatter into the pages."""
        if self.data.device.type != "cuda":
            k = 0
            for run in runs:
                self._scatter(pages[k:k + len(run)], run.transpose(0, 1))
                k += len(run)
            return
        lay = self.layout
        # [pages, num_layers, page_elems]
        staging = torch.empty(len(pages), lay.num_layers, lay.page_elems_per_layer,
                              dtype=self.data.dtype, device=self.data.device)
        k = 0
        for run in runs:
            staging[k:k + len(run)].copy_(run, non_blocking=True)
            k += len(run)
        assert k == len(pages), f"{k} blocks for {len(pages)} pages"
        self._scatter(pages, staging.transpose(0, 1))

    def _scatter(self, pages: list[int], src: torch.Tensor) -> None:
        """data[:, pages] = src, src [num_layers, len(pages), page_elems] on this device or
        (CPU) on the host."""
        self.data.index_copy_(1, self.to_device(torch.tensor(pages)), src)
