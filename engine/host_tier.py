"""The host-RAM adapter tier: pool-layout buffers (pinned on CUDA), bounded in bytes, LRU.

Loads from the source tier run on a small thread pool; the engine thread collects finished ones
with `poll()` (a `Future` is the thread-safe handoff: the worker never touches engine state).
Bytes are reserved when a load starts, so loads in flight count against the capacity too.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from loraplane.engine.adapter_source import AdapterSource
from loraplane.engine.adapters import LoraSpec
from loraplane.engine.config import ModelConfig
from loraplane.engine.errors import InvalidAdapterError

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)


@dataclass(eq=False)
class HostEntry:
    """One adapter in host RAM, or on its way there."""

    nbytes: int
    # [num_layers, elems] in the pool's dtype and `flatten` order; None while loading.
    buffer: torch.Tensor | None = None
    future: Future[tuple[torch.Tensor, float]] | None = None
    read_s: float = 0.0  # seconds the load took (reading, checking, laying out, pinning)
    discard: bool = False  # dropped while loading: forget it when the load ends


class HostTier(Generic[K]):
    """Adapter buffers in host RAM keyed by adapter; `capacity` bytes, least recently used out."""

    def __init__(self, capacity: int, config: ModelConfig, dtype: torch.dtype, pin: bool,
                 workers: int) -> None:
        self.capacity = capacity
        self.config = config
        self.dtype = dtype
        self.pin = pin
        self.used = 0  # bytes of loaded entries and of loads in flight
        self._entries: OrderedDict[K, HostEntry] = OrderedDict()  # least recent first
        self._loading: dict[K, None] = {}  # entries whose load is in flight
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-load")
        # Loads in flight at most from prefetching: enough to keep every worker busy.
        self.max_loading = 2 * workers

    def nbytes(self, spec: LoraSpec) -> int:
        """Host bytes an adapter's buffer takes: pinned buffers count whole, as torch's pinned
        allocator rounds each up to a power of two (S-LoRA shapes are powers of two already)."""
        n = self.config.num_layers * spec.elems_per_layer(self.config) * self.dtype.itemsize
        return 1 << (n - 1).bit_length() if self.pin and n > 1 else n

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def buffer(self, key: K) -> torch.Tensor | None:
        """The loaded buffer (and mark it recently used), or None."""
        entry = self._entries.get(key)
        if entry is None or entry.buffer is None:
            return None
        self._entries.move_to_end(key)
        return entry.buffer

    def loaded(self, key: K) -> bool:
        """In host RAM now (does not count as a use)."""
        entry = self._entries.get(key)
        return entry is not None and entry.buffer is not None

    def read_seconds(self, key: K) -> float:
        entry = self._entries.get(key)
        return entry.read_s if entry is not None else 0.0

    def loading(self, key: K) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.future is not None

    @property
    def num_loading(self) -> int:
        return len(self._loading)

    def room_for(self, nbytes: int, can_evict: Callable[[K], bool]) -> bool:
        """Whether `nbytes` fit after evicting only entries `can_evict` allows (evicts nothing)."""
        free = self.capacity - self.used
        for key, entry in self._entries.items():
            if free >= nbytes:
                break
            if entry.buffer is not None and can_evict(key):
                free += entry.nbytes
        return free >= nbytes

    def start(self, key: K, source: AdapterSource, can_evict: Callable[[K], bool]) -> bool:
        """Reserve the bytes (evicting least recently used entries `can_evict` allows) and load
        from the source: on a worker thread when reading blocks, here otherwise. False if no
        room; errors of a non-blocking read raise here."""
        assert key not in self._entries
        nbytes = self.nbytes(source.spec)
        if not self.room_for(nbytes, can_evict):
            return False
        for victim, entry in list(self._entries.items()):
            if self.capacity - self.used >= nbytes:
                break
            if entry.buffer is not None and can_evict(victim):
                self.drop(victim)
        entry = HostEntry(nbytes)
        if source.blocking:
            entry.future = self._pool.submit(self._read, source)
            self._loading[key] = None
        else:
            entry.buffer, entry.read_s = self._read(source)
        self._entries[key] = entry
        self.used += nbytes
        return True

    def _read(self, source: AdapterSource) -> tuple[torch.Tensor, float]:
        """Read, lay out in pool order and dtype, pin (runs on a worker thread when blocking)."""
        t = time.monotonic()
        weights = source.read(self.dtype)
        elems = source.spec.elems_per_layer(self.config)
        buf = torch.empty(self.config.num_layers, elems, dtype=self.dtype, pin_memory=self.pin)
        weights.flatten(self.config, out=buf)  # [L, elems]
        return buf, time.monotonic() - t

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
                entry.buffer, entry.read_s = entry.future.result()
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
        """Forget an entry now; one still loading is forgotten when its load ends."""
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
        entry.buffer = None

    def check_invariants(self) -> None:
        """Bytes in use are the entries' bytes and within the capacity."""
        assert self.used == sum(e.nbytes for e in self._entries.values())
        assert 0 <= self.used <= self.capacity, f"host tier {self.used} > {self.capacity}"
        for k, e in self._entries.items():
            assert (e.buffer is None) != (e.future is None)
            assert (e.future is not None) == (k in self._loading)
