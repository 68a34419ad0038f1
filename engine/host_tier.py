"""The host-RAM adapter tier: adapters in pool-page-sized blocks of memory the tier owns, bounded
in bytes, least recently used out.

Memory: the tier sub-allocates fixed-size blocks, one pool page each (`[num_layers,
page_elems]`), from large chunks (about CHUNK_BYTES, pinned on CUDA) that it allocates the first
time a block in them is written and keeps for its lifetime; an adapter is a list of blocks, its
k-th block holding what its k-th pool page will hold. So a load never allocates host memory (no
per-load cudaHostAlloc, which is slow and takes a driver lock), an adapter of n pages takes
exactly n blocks (bytes are counted in whole blocks, as the pool counts pages) and freeing is
returning block ids. Free blocks are handed out lowest id first: an adapter's blocks are mostly
consecutive, so its copy to the GPU takes few transfers, and chunks fill in order.

Loads from the source tier run on a small thread pool; the engine thread collects finished ones
with `poll()` (a `Future` is the thread-safe handoff: the worker writes only the blocks reserved
for it and never touches engine state). Blocks are reserved when a load starts, so loads in
flight count against the capacity too. Only the engine thread reserves and frees blocks.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from loraplane.engine.adapter_source import AdapterSource
from loraplane.engine.config import ModelConfig
from loraplane.engine.errors import InvalidAdapterError
from loraplane.engine.memory_pool import PoolLayout

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)
# Bytes of one chunk of host memory: large enough that chunks are allocated a few times in a
# process's life, small enough that the tier pins little more than it uses. A power of two, as
# torch's pinned allocator rounds each allocation up to one.
CHUNK_BYTES = 1 << 30


@dataclass(eq=False)
class HostEntry:
    """One adapter in host RAM, or on its way there."""

    blocks: list[int]  # block ids in the adapter's page order
    nbytes: int
    ready: bool = False  # loaded: the blocks hold its weights
    future: Future[float] | None = None  # the load in flight (its result: seconds it took)
    read_s: float = 0.0  # seconds the load took (reading, checking, laying out)
    discard: bool = False  # dropped while loading: forget it when the load ends


class HostTier(Generic[K]):
    """Adapters in host RAM keyed by adapter; `capacity` bytes, least recently used out."""

    def __init__(self, capacity: int, config: ModelConfig, layout: PoolLayout,
                 dtype: torch.dtype, pin: bool, workers: int) -> None:
        self.capacity = capacity
        self.config = config
        self.layout = layout
        self.dtype = dtype
        self.pin = pin
        self.block_bytes = layout.page_bytes(dtype)
        self.num_blocks = capacity // self.block_bytes
        self.chunk_blocks = max(1, CHUNK_BYTES // self.block_bytes)
        # [blocks, num_layers, page_elems] each; None until a block in it is first written.
        self._chunks: list[torch.Tensor | None] = \
            [None] * -(-self.num_blocks // self.chunk_blocks)
        self._chunk_lock = threading.Lock()  # loader threads allocate chunks
        # Free block ids: those freed (a heap) and every id from `_next` on.
        self._freed: list[int] = []
        self._next = 0
        self.used = 0  # bytes of loaded entries and of loads in flight
        self._entries: OrderedDict[K, HostEntry] = OrderedDict()  # least recent first
        self._loading: dict[K, None] = {}  # entries whose load is in flight
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-load")
        # Loads in flight at most from prefetching: enough to keep every worker busy.
        self.max_loading = 2 * workers
        # Pinning is slow (about 0.3 s a GiB, one chunk at a time under the lock): on CUDA a
        # thread pins every chunk from the start, so loads seldom wait for a chunk; on the CPU
        # chunks stay lazy (tests and laptops keep their RAM).
        self._allocated = threading.Event()
        if pin and self._chunks:
            threading.Thread(target=self._allocate_all, name="host-tier-pin", daemon=True).start()
        else:
            self._allocated.set()

    def _allocate_all(self) -> None:
        t = time.monotonic()
        try:
            for c in range(len(self._chunks)):
                self._chunk(c)
        except RuntimeError as e:  # out of pinnable memory: loads allocate (and fail) lazily
            log.warning("could not pin the host tier's %.1f GiB up front: %s",
                        self.capacity / 2**30, e)
        else:
            log.info("pinned the host tier's %.1f GiB in %.1f s", self.capacity / 2**30,
                     time.monotonic() - t)
        finally:
            self._allocated.set()

    def wait_allocated(self, timeout: float | None = None) -> bool:
        """Wait until the up-front pinning has ended (benchmarks: not timed as serving)."""
        return self._allocated.wait(timeout)

    def nbytes(self, pages: int) -> int:
        """Host bytes of an adapter of `pages` pool pages."""
        return pages * self.block_bytes

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def blocks(self, key: K) -> list[torch.Tensor] | None:
        """The loaded adapter's blocks as runs of consecutive ones, each [n, num_layers,
        page_elems], in page order (and mark it recently used); None if not loaded."""
        entry = self._entries.get(key)
        if entry is None or not entry.ready:
            return None
        self._entries.move_to_end(key)
        return self._runs(entry.blocks)

    def touch(self, key: K) -> None:
        """Mark an entry recently used."""
        if key in self._entries:
            self._entries.move_to_end(key)

    def loaded(self, key: K) -> bool:
        """In host RAM now (does not count as a use)."""
        entry = self._entries.get(key)
        return entry is not None and entry.ready

    def read_seconds(self, key: K) -> float:
        entry = self._entries.get(key)
        return entry.read_s if entry is not None else 0.0

    def loading(self, key: K) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.future is not None

    @property
    def num_loading(self) -> int:
        return len(self._loading)

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def room_for(self, nbytes: int, can_evict: Callable[[K], bool]) -> bool:
        """Whether `nbytes` fit after evicting only entries `can_evict` allows (evicts nothing)."""
        free = self.free
        for key, entry in self._entries.items():
            if free >= nbytes:
                break
            if entry.ready and can_evict(key):
                free += entry.nbytes
        return free >= nbytes

    def start(self, key: K, source: AdapterSource, pages: int,
              can_evict: Callable[[K], bool]) -> bool:
        """Reserve `pages` blocks (evicting least recently used entries `can_evict` allows) and
        load from the source: on a worker thread when reading blocks, here otherwise. False if
        no room; errors of a non-blocking read raise here (the blocks are given back)."""
        assert key not in self._entries
        nbytes = self.nbytes(pages)
        if not self.room_for(nbytes, can_evict):
            return False
        for victim, entry in list(self._entries.items()):
            if self.free >= nbytes:
                break
            if entry.ready and can_evict(victim):
                self.drop(victim)
        if self.free < nbytes:  # `can_evict` changed its mind between the two passes
            return False
        entry = HostEntry(self._take(pages), nbytes)
        self._entries[key] = entry
        self.used += nbytes
        if source.blocking:
            entry.future = self._pool.submit(self._read, source, entry.blocks)
            self._loading[key] = None
            return True
        try:
            entry.read_s = self._read(source, entry.blocks)
        except Exception:
            self._forget(key)
            raise
        entry.ready = True
        return True

    def _take(self, n: int) -> list[int]:
        """n free block ids, lowest first (the capacity check was done in bytes)."""
        out = []
        for _ in range(n):
            if self._freed:
                out.append(heapq.heappop(self._freed))
            else:
                out.append(self._next)
                self._next += 1
        assert self._next <= self.num_blocks
        return out

    def _chunk(self, c: int) -> torch.Tensor:
        """Chunk c's memory, allocated on first use (on a loader thread, under a lock)."""
        chunk = self._chunks[c]
        if chunk is None:
            with self._chunk_lock:
                chunk = self._chunks[c]
                if chunk is None:
                    n = min(self.chunk_blocks, self.num_blocks - c * self.chunk_blocks)
                    lay = self.layout
                    chunk = torch.empty(n, lay.num_layers, lay.page_elems_per_layer,
                                        dtype=self.dtype, pin_memory=self.pin)
                    self._chunks[c] = chunk
        return chunk

    def _runs(self, blocks: list[int]) -> list[torch.Tensor]:
        """Blocks as views of their chunks, consecutive ids of one chunk in one view."""
        cb = self.chunk_blocks
        runs = []
        first = 0
        for i in range(1, len(blocks) + 1):
            if i < len(blocks) and blocks[i] == blocks[i - 1] + 1 and blocks[i] % cb:
                continue
            start = blocks[first]
            runs.append(self._chunk(start // cb)[start % cb:start % cb + i - first])
            first = i
        return runs

    def _read(self, source: AdapterSource, blocks: list[int]) -> float:
        """Read and lay out into the blocks in pool order and dtype (runs on a worker thread
        when blocking); returns the seconds it took."""
        t = time.monotonic()
        source.write_pages(self.config, [page for run in self._runs(blocks) for page in run])
        return time.monotonic() - t

    def poll(self) -> list[tuple[K, InvalidAdapterError | None]]:
        """Collect finished loads: (key, None) when loaded, (key, error) when the read failed
        (its entry is gone); discarded entries are forgotten silently."""
        done: list[tuple[K, InvalidAdapterError | None]] = []
        for key in list(self._loading):
            entry = self._entries[key]
            assert entry.future is not None
            if not entry.future.done():
                continue
            del self._loading[key]
            try:
                entry.read_s = entry.future.result()
                entry.ready = True
                error = None
            except InvalidAdapterError as e:
                error = e
            except Exception as e:  # noqa: BLE001 - an I/O error of the source: the adapter fails
                error = InvalidAdapterError(f"adapter weights could not be read: {e}")
            entry.future = None
            if error is not None or entry.discard:
                self._forget(key)
            if not entry.discard:
                done.append((key, error))
        return done

    def wait(self, timeout: float) -> None:
        """Block until a load finishes or `timeout` seconds pass."""
        futures = [f for k in self._loading if (f := self._entries[k].future) is not None]
        if futures:
            wait_futures(futures, timeout=timeout, return_when=FIRST_COMPLETED)

    def drop(self, key: K) -> None:
        """Forget an entry now (its blocks are reused: the caller makes sure no copy in flight
        reads them); one still loading is forgotten when its load ends."""
        entry = self._entries.get(key)
        if entry is None:
            return
        if entry.future is not None:
            entry.discard = True
        else:
            self._forget(key)

    def _forget(self, key: K) -> None:
        entry = self._entries.pop(key)
        self.used -= entry.nbytes
        entry.ready = False
        for b in entry.blocks:
            heapq.heappush(self._freed, b)

    def check_invariants(self) -> None:
        """Bytes in use are the entries' blocks, within the capacity; every block id below the
        high-water mark is held by exactly one entry or free."""
        held = [b for e in self._entries.values() for b in e.blocks]
        assert self.used == sum(e.nbytes for e in self._entries.values()) \
            == len(held) * self.block_bytes
        assert 0 <= self.used <= self.capacity, f"host tier {self.used} > {self.capacity}"
        ids = held + self._freed
        assert len(ids) == len(set(ids)) == self._next <= self.num_blocks, "a block leaked"
        assert all(0 <= b < self._next for b in ids)
        for k, e in self._entries.items():
            assert e.ready != (e.future is not None)
            assert (e.future is not None) == (k in self._loading)
