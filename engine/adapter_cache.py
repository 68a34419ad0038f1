"""Registered adapters and their three tiers with one accounting: source, host RAM, GPU pool.

- source: the adapter's folder (or tensors in memory); registration reads only its header.
- host: `HostTier`, page-sized blocks of memory it owns (pinned on CUDA), LRU by bytes, loaded
  on worker threads.
- GPU: pages of the unified pool, pinned while requests run, evicted least recently used when
  idle and memory is needed. Host->GPU copies run on a side CUDA stream (after the work already
  queued on the compute stream, whose freed pages they may overwrite) with an event per adapter;
  `acquire` admits an adapter only once its event is done, so the compute stream never waits for
  a copy (the request waits in the queue instead, while the batch runs). At most MAX_COPIES are
  in flight, started in admission order. On CPU copies are synchronous.
`prefetch` (policy in prefetch.py) moves adapters up ahead of admission; `acquire` never blocks
on I/O: a miss starts what is needed and answers False, and the scheduler retries next step.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loraplane.engine.adapter_source import AdapterSource, MemorySource
from loraplane.engine.adapters import LoraSpec, LoraWeights
from loraplane.engine.config import EngineConfig, ModelConfig
from loraplane.engine.errors import AdapterExistsError, InvalidAdapterError, ModelNotFoundError
from loraplane.engine.host_tier import HostTier
from loraplane.engine.memory_pool import ADAPTER, DevicePool
from loraplane.engine.outputs import AdapterInfo
from loraplane.engine.prefetch import DEMAND, PREFETCH, Load, Popularity, Prefetcher, TierStats

log = logging.getLogger(__name__)
_ids = itertools.count(1)
# Host->GPU copies in flight at most. Copies on one stream run one after another, so a copy's
# wait is the sum of those queued before it: with a few in flight the adapter admission needs
# next waits for at most a few others (an r64 llama-2-7b adapter, 128 MiB, takes ~3 ms over
# PCIe 5), yet the copy engine never idles within a decode step (8 copies ~ one 15-25 ms step).
MAX_COPIES = 8


@dataclass(eq=False)
class Adapter:
    """One registered adapter: its source and spec; pool pages while GPU-resident."""

    name: str
    path: str
    source: AdapterSource
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
    copy_event: torch.cuda.Event | None = None  # host->GPU copy not yet seen complete
    load: Load | None = None  # the way to the GPU in progress, until its first admission
    # When the oldest request for it not admitted yet arrived (time.monotonic), for the load
    # accounting's "waited in the queue".
    requested_at: float | None = None
    error: InvalidAdapterError | None = None  # its weights failed to load: requests fail

    @property
    def spec(self) -> LoraSpec:
        return self.source.spec

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def resident(self) -> bool:
        """Holds pool pages (its copy may still be in flight: see `ready`)."""
        return self.pages is not None

    @property
    def ready(self) -> bool:
        """GPU-resident and its copy complete: usable by a batch."""
        return self.pages is not None and self.copy_event is None


class AdapterCache:
    """Name -> Adapter registry over the three tiers; see the module docstring."""

    def __init__(self, pool: DevicePool, config: ModelConfig, *,
                 host_cache_bytes: int = EngineConfig.host_cache_bytes,
                 prefetch: bool = True,
                 load_workers: int = EngineConfig.adapter_load_workers) -> None:
        self.pool = pool
        self.config = config
        cuda = pool.data.device.type == "cuda"
        self.host: HostTier[Adapter] = HostTier(host_cache_bytes, config, pool.layout,
                                                 pool.data.dtype, pin=cuda, workers=load_workers)
        self.copy_stream = torch.cuda.Stream(pool.data.device) if cuda else None
        self.stats = TierStats()
        self.popularity: Popularity[Adapter] = Popularity()
        self._by_name: dict[str, Adapter] = {}
        self._dropping: list[Adapter] = []  # unregistered, waiting for running requests
        # Holding pool pages (registered or not), least recently used first.
        self.resident_adapters: dict[Adapter, None] = {}
        self._copying: list[Adapter] = []
        # Unregistered adapters that acquire() loaded again for requests queued before.
        self._orphans: dict[Adapter, None] = {}
        self.upcoming: dict[Adapter, int] = {}  # the last prefetch list: adapter -> position
        self.newly_failed: list[Adapter] = []  # for the engine to fail their queued requests
        self.prefetcher = Prefetcher(self) if prefetch else None

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

    def add(self, name: str, path: str, source: AdapterSource | LoraWeights) -> Adapter:
        """Register an adapter in the source tier (metadata only: nothing is read yet)."""
        if isinstance(source, LoraWeights):
            source = MemorySource(source)
        if name in self._by_name:
            raise AdapterExistsError(f"adapter {name!r} is already loaded", param="lora_name")
        offsets: dict[tuple[str, str], tuple[int, int]] = {}
        pos = 0
        chunk = self.pool.layout.chunk
        for module, kind, elems in source.spec.segments(self.config):
            offsets[(module, kind)] = (pos, elems // chunk)
            pos += elems // chunk
        adapter = Adapter(name, path, source, offsets, pos)
        nbytes = self.host_bytes(adapter)
        if nbytes > self.host.capacity:
            raise InvalidAdapterError(f"adapter {name!r}: needs {nbytes} bytes of host memory, "
                                      f"more than the host cache holds ({self.host.capacity})")
        self._by_name[name] = adapter
        return adapter

    def remove(self, name: str) -> None:
        """Unregister now; its pages go back once no running request uses it."""
        adapter = self.get(name)
        del self._by_name[name]
        adapter.unloading = True
        self.popularity.forget(adapter)
        if adapter.active == 0:
            self._forget(adapter)
        else:
            self._dropping.append(adapter)
        self._sweep_orphans()

    def info(self, adapter: Adapter) -> AdapterInfo:
        """The adapter as the API sees it, with its tier."""
        s = adapter.spec
        tier = "gpu" if adapter.ready else "host" if self.host.loaded(adapter) else "source"
        return AdapterInfo(adapter.name, adapter.path, s.rank, s.alpha, s.modules,
                           self.host_bytes(adapter), adapter.ready, tier)

    def size_in_pages(self, adapter: Adapter) -> int:
        """Pages the adapter occupies when resident."""
        return self.pool.layout.pages_for_chunks(adapter.num_chunks)

    def host_bytes(self, adapter: Adapter) -> int:
        """Bytes the adapter takes in host RAM (whole pages, as in the pool)."""
        return self.host.nbytes(self.size_in_pages(adapter))

    def can_copy(self) -> bool:
        """Whether another host->GPU copy may start (fewer than MAX_COPIES in flight)."""
        return len(self._copying) < MAX_COPIES

    def pages_needed(self, adapter: Adapter) -> int:
        """Pages loading it would take now (0 when already resident)."""
        return 0 if adapter.resident else self.size_in_pages(adapter)

    # ---- the scheduler's interface --------------------------------------------------------

    def acquire(self, adapter: Adapter) -> bool:
        """Pin the adapter if it is usable on the GPU now; otherwise start what it needs (host
        load, room, copy) without blocking and answer False."""
        self.poll()
        if adapter.error is not None:
            return False
        now = time.monotonic()
        if adapter.load is not None and adapter.load.need is None:
            adapter.load.need = now
        if adapter.unloading:
            self._orphans[adapter] = None  # may take host bytes or pages: swept when unneeded
        if not adapter.resident:
            if adapter.load is None:
                adapter.load = Load(DEMAND, now, need=now)
            if not self._to_gpu(adapter, DEMAND):
                return False
        if not self._copy_done(adapter):
            return False
        if adapter.active == 0 and adapter.unloading:
            # Unregistered while a request that uses it was queued: it serves the requests
            # already accepted and goes with its last user, as in remove().
            self._dropping.append(adapter)
        adapter.active += 1
        self._used(adapter, now)
        return True

    def release(self, adapter: Adapter) -> None:
        """Unpin after a request ends; an unregistered adapter is dropped with its last user."""
        assert adapter.active > 0
        adapter.active -= 1
        self._used(adapter, time.monotonic())
        if adapter.unloading and adapter.active == 0:
            self._dropping.remove(adapter)
            self._forget(adapter)

    def admitted(self, adapter: Adapter) -> None:
        """A request using the adapter was admitted: close its load's accounting."""
        arrival, adapter.requested_at = adapter.requested_at, None
        if adapter.load is not None and adapter.ready:
            self.stats.admitted(adapter.load, arrival)
            adapter.load = None

    def _used(self, adapter: Adapter, now: float) -> None:
        adapter.last_used = now
        if adapter in self.resident_adapters:  # keep the dict least recently used first
            del self.resident_adapters[adapter]
            self.resident_adapters[adapter] = None

    def make_room(self, pages: int) -> bool:
        """Evict idle resident adapters until `pages` are free: unregistered ones, then least
        recently used ones, then the adapters the queue needs, needed last kept longest (each
        pass stops once enough is free: no sort of all resident adapters)."""
        free = self.pool.pages
        if free.num_free >= pages:
            return True
        orphans = [a for a in self._orphans
                   if a.active == 0 and a.resident and a not in self.upcoming]
        lru = (a for a in list(self.resident_adapters)
               if a.active == 0 and a not in self.upcoming)
        for a in itertools.chain(orphans, lru):
            if free.num_free >= pages:
                return True
            if a.resident:
                self.evict(a)
        if free.num_free < pages:
            queued = sorted((a for a in self.upcoming if a.active == 0 and a.resident),
                            key=lambda a: -self.upcoming[a])
            for a in queued:
                if free.num_free >= pages:
                    break
                self.evict(a)
        return free.num_free >= pages

    def prefetch(self, upcoming: list[Adapter]) -> None:
        """Move the queue's next adapters (and popular ones) up the tiers; see prefetch.py."""
        self.poll()
        self.upcoming = {a: i for i, a in enumerate(upcoming)}
        self._sweep_orphans()
        if self.prefetcher is not None:
            self.prefetcher.run(upcoming)

    # ---- tiers ----------------------------------------------------------------------------

    def note_request(self, adapter: Adapter) -> None:
        """A request for the adapter arrived: count it (popularity) and, prefetching, start
        moving the adapter up now rather than when the next step schedules."""
        now = time.monotonic()
        if adapter.requested_at is None:
            adapter.requested_at = now
        self.popularity.add(adapter, now)
        if self.prefetcher is not None:
            self.prefetcher.arrived(adapter, now)

    def poll(self) -> None:
        """Collect finished host loads and host->GPU copies."""
        for adapter, error in self.host.poll():
            if adapter.load is not None:
                adapter.load.read_s = self.host.read_seconds(adapter)
            if error is not None:
                log.warning("adapter %s failed to load: %s", adapter.name, error.message)
                adapter.error = error
                adapter.load = None
                self.stats.load_failures += 1
                self.newly_failed.append(adapter)
        for adapter in list(self._copying):
            self._copy_done(adapter)

    def wait(self, timeout: float = 0.01) -> None:
        """Block until a host load or copy in flight finishes (or timeout): nothing to run."""
        if self._copying:
            ev = self._copying[0].copy_event
            if ev is not None:
                ev.synchronize()
        else:
            self.host.wait(timeout)
        self.poll()

    def pinned(self, adapter: Adapter) -> bool:
        """Must stay in host RAM: in use by running requests or being copied from."""
        return adapter.active > 0 or adapter.copy_event is not None

    def _to_gpu(self, adapter: Adapter, origin: str) -> bool:
        """Demand path: host load or room + copy; True once the copy has started."""
        if not self.host.loaded(adapter) and (
                adapter in self.host
                or not self.start_host_load(adapter, lambda a: not self.pinned(a))
                or not self.host.loaded(adapter)):
            return False  # loading on a worker thread (or no room yet)
        if not self.can_copy() or not self.make_room(self.size_in_pages(adapter)):
            return False
        self.start_copy(adapter, origin)
        return True

    def start_host_load(self, adapter: Adapter, can_evict: Callable[[Adapter], bool]) -> bool:
        """Start a source->host load evicting only what `can_evict` allows; False if no room."""
        try:
            started = self.host.start(adapter, adapter.source, self.size_in_pages(adapter),
                                      can_evict)
        except InvalidAdapterError as e:  # a non-blocking source failed at once
            adapter.error = e
            adapter.load = None
            self.stats.load_failures += 1
            self.newly_failed.append(adapter)
            return False
        self.stats.host_loads += started
        if started and adapter.load is not None and self.host.loaded(adapter):
            adapter.load.read_s = self.host.read_seconds(adapter)
        return started

    def start_copy(self, adapter: Adapter, origin: str) -> None:
        """Allocate pages and copy the host buffer into them (side stream on CUDA)."""
        runs = self.host.blocks(adapter)
        assert runs is not None
        now = time.monotonic()
        if adapter.load is None:
            adapter.load = Load(origin, now)
        adapter.load.origin = origin
        adapter.load.copy_start = now
        pages = self.pool.pages.allocate(self.size_in_pages(adapter), ADAPTER)
        if self.copy_stream is None:
            self.pool.write_blocks(pages, runs)
        else:
            # After everything queued on the compute stream: it may still use these pages.
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.pool.data.device))
            with torch.cuda.stream(self.copy_stream):
                self.pool.write_blocks(pages, runs)
                ev = torch.cuda.Event()
                ev.record(self.copy_stream)
            adapter.copy_event = ev
            self._copying.append(adapter)
        cpp = self.pool.layout.chunks_per_page
        ids = (torch.tensor(pages, dtype=torch.int64)[:, None] * cpp + torch.arange(cpp)).view(-1)
        adapter.pages = pages
        adapter.chunk_table = self.pool.to_device(ids[: adapter.num_chunks])
        consecutive = pages == list(range(pages[0], pages[0] + len(pages)))
        adapter.contiguous_start = pages[0] * cpp if consecutive else None
        adapter.last_used = now
        self.resident_adapters[adapter] = None
        if adapter.copy_event is None:
            adapter.load.ready = now
        log.debug("adapter %s to the pool in %d pages (%s)", adapter.name, len(pages), origin)

    def _copy_done(self, adapter: Adapter) -> bool:
        ev = adapter.copy_event
        if ev is None:
            return True
        if not ev.query():
            return False
        adapter.copy_event = None
        self._copying.remove(adapter)
        if adapter.load is not None:
            adapter.load.ready = time.monotonic()
        return True

    def drop_idle(self) -> None:
        """Take every idle adapter out of the pool and host RAM and forget popularity, so each of
        a benchmark's replays starts cold (the adapters stay registered)."""
        self.poll()
        for a in self.all():
            if a.active == 0:
                self.evict(a)
                self.host.drop(a)
                self.popularity.forget(a)
                a.load = None

    def evict(self, adapter: Adapter) -> None:
        """Give the adapter's pool pages back (it stays in host RAM if it is there)."""
        if adapter.pages is None:
            return
        if adapter.copy_event is not None:  # its pages are being written: let the copy end
            adapter.copy_event.synchronize()
            self._copy_done(adapter)
        if adapter.load is not None and adapter.load.origin == PREFETCH:
            self.stats.prefetch_unused += 1
        adapter.load = None
        self.pool.pages.free(adapter.pages)
        del self.resident_adapters[adapter]
        adapter.pages = None
        adapter.chunk_table = None
        adapter.contiguous_start = None
        log.debug("adapter %s evicted from the pool", adapter.name)

    def _forget(self, adapter: Adapter) -> None:
        """An unregistered adapter's last use ended: out of the pool and of host RAM."""
        self.evict(adapter)
        self.host.drop(adapter)
        self._orphans.pop(adapter, None)

    def _sweep_orphans(self) -> None:
        """Unregistered adapters loaded for queued requests that are gone (aborted) or not
        among the next ones: free what they hold (a queued request loads it again)."""
        for a in list(self._orphans):
            if a.active == 0 and a not in self.upcoming:
                self._forget(a)

    def num_resident(self) -> int:
        return sum(1 for a in self._by_name.values() if a.ready)

    def num_host(self) -> int:
        return sum(1 for a in self._by_name.values() if self.host.loaded(a))

    def check_invariants(self) -> None:
        """Resident adapters hold their pages; host bytes add up."""
        self.host.check_invariants()
        for a in self.resident_adapters:
            assert a.pages is not None and len(a.pages) == self.size_in_pages(a)
        assert all(a in self.resident_adapters for a in self._copying)
