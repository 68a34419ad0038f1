"""Registered adapters and their residency in the device pool (LRU among idle adapters)."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from loraplane.engine.adapters import LoraWeights
from loraplane.engine.config import ModelConfig
from loraplane.engine.errors import AdapterExistsError, ModelNotFoundError
from loraplane.engine.memory_pool import ADAPTER, DevicePool
from loraplane.engine.outputs import AdapterInfo

log = logging.getLogger(__name__)
_ids = itertools.count(1)


@dataclass(eq=False)
class Adapter:
    """One registered adapter: host weights, and pool pages while resident."""

    name: str
    path: str
    weights: LoraWeights
    # (module, "a"|"bt") -> (first chunk, number of chunks) within the adapter's per-layer layout.
    offsets: dict[tuple[str, str], tuple[int, int]]
    num_chunks: int
    id: int = field(default_factory=lambda: next(_ids))
    pages: list[int] | None = None
    # Global chunk ids of the adapter's chunks, the same in every layer: [num_chunks], int64.
    chunk_table: torch.Tensor | None = None
    # First global chunk id when the pages are consecutive (then weights are plain slices).
    contiguous_start: int | None = None
    active: int = 0  # running sequences using it
    last_used: float = 0.0
    unloading: bool = False

    @property
    def rank(self) -> int:
        return self.weights.rank

    @property
    def resident(self) -> bool:
        return self.pages is not None

    def info(self) -> AdapterInfo:
        w = self.weights
        return AdapterInfo(self.name, self.path, w.rank, w.alpha, w.modules, w.num_bytes,
                           self.resident)


class AdapterCache:
    """Name → Adapter registry; pages come from the unified pool on demand, LRU when idle."""

    def __init__(self, pool: DevicePool, config: ModelConfig) -> None:
        self.pool = pool
        self.config = config
        self._by_name: dict[str, Adapter] = {}
        self._dropping: list[Adapter] = []  # unregistered, waiting for running requests

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)

    def all(self) -> list[Adapter]:
        return list(self._by_name.values())

    def get(self, name: str) -> Adapter:
        try:
            return self._by_name[name]
        except KeyError:
            raise ModelNotFoundError(f"The model `{name}` does not exist.", param="model") from None

    def add(self, name: str, path: str, weights: LoraWeights) -> Adapter:
        """Register validated weights under a name (host tier only until first use)."""
        if name in self._by_name:
            raise AdapterExistsError(f"adapter {name!r} is already loaded", param="lora_name")
        offsets: dict[tuple[str, str], tuple[int, int]] = {}
        pos = 0
        chunk = self.pool.layout.chunk
        for module, kind, elems in weights.segments(self.config):
            offsets[(module, kind)] = (pos, elems // chunk)
            pos += elems // chunk
        adapter = Adapter(name, path, weights, offsets, pos)
        self._by_name[name] = adapter
        return adapter

    def remove(self, name: str) -> None:
        """Unregister now; its pages go back once no running request uses it."""
        adapter = self.get(name)
        del self._by_name[name]
        adapter.unloading = True
        if adapter.active == 0:
            self._evict(adapter)
        else:
            self._dropping.append(adapter)

    def size_in_pages(self, adapter: Adapter) -> int:
        """Pages the adapter occupies when resident."""
        return self.pool.layout.pages_for_chunks(adapter.num_chunks)

    def pages_needed(self, adapter: Adapter) -> int:
        """Pages loading it would take now (0 when already resident)."""
        return 0 if adapter.resident else self.size_in_pages(adapter)

    def acquire(self, adapter: Adapter) -> bool:
        """Make the adapter resident (evicting idle ones if needed) and pin it; False if no room."""
        if not adapter.resident:
            need = self.pages_needed(adapter)
            if not self.make_room(need):
                return False
            self._load(adapter, self.pool.pages.allocate(need, ADAPTER))
            if adapter.unloading:
                # Unregistered while a request that uses it was queued: it serves the requests
                # already accepted and goes again with its last user, as in remove().
                self._dropping.append(adapter)
        adapter.active += 1
        adapter.last_used = time.monotonic()
        return True

    def release(self, adapter: Adapter) -> None:
        """Unpin after a request ends; an unregistered adapter is dropped with its last user."""
        assert adapter.active > 0
        adapter.active -= 1
        adapter.last_used = time.monotonic()
        if adapter.unloading and adapter.active == 0:
            self._dropping.remove(adapter)
            self._evict(adapter)

    def prefetch(self, upcoming: list[Adapter]) -> None:
        """Hint: the adapters the scheduler will admit next, in order (the tiers work loads them
        ahead; adapters here are loaded on first use, so there is nothing to do yet)."""

    def make_room(self, pages: int) -> bool:
        """Evict idle resident adapters, least recently used first, until `pages` are free."""
        if self.pool.pages.num_free >= pages:
            return True
        idle = sorted((a for a in self._by_name.values() if a.resident and a.active == 0),
                      key=lambda a: a.last_used)
        for a in idle:
            if self.pool.pages.num_free >= pages:
                break
            self._evict(a)
        return self.pool.pages.num_free >= pages

    def _load(self, adapter: Adapter, pages: list[int]) -> None:
        self.pool.write_pages(pages, adapter.weights.flatten(self.config))
        cpp = self.pool.layout.chunks_per_page
        ids = (torch.tensor(pages, dtype=torch.int64)[:, None] * cpp + torch.arange(cpp)).view(-1)
        adapter.pages = pages
        adapter.chunk_table = ids[: adapter.num_chunks].to(self.pool.data.device)
        consecutive = pages == list(range(pages[0], pages[0] + len(pages)))
        adapter.contiguous_start = pages[0] * cpp if consecutive else None
        log.debug("adapter %s resident in %d pages", adapter.name, len(pages))

    def _evict(self, adapter: Adapter) -> None:
        if adapter.pages is not None:
            self.pool.pages.free(adapter.pages)
            adapter.pages = None
            adapter.chunk_table = None
            adapter.contiguous_start = None
            log.debug("adapter %s evicted from the pool", adapter.name)

    def num_resident(self) -> int:
        return sum(1 for a in self._by_name.values() if a.resident)
