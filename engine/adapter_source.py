"""Where a registered adapter's weights come from: a PEFT folder on disk, or tensors in memory."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from loraplane.engine.adapters import LoraSpec, LoraWeights, read_weights, write_weights
from loraplane.engine.config import ModelConfig


class AdapterSource(ABC):
    """The source tier of one adapter: its header-checked spec, and how to read its weights."""

    # Reading does I/O: the host tier runs it on a worker thread, never on the engine thread.
    blocking: bool = True

    def __init__(self, spec: LoraSpec) -> None:
        self.spec = spec

    @abstractmethod
    def read(self, dtype: torch.dtype) -> LoraWeights:
        """The weights (validated, finite), preferably in `dtype`; raises InvalidAdapterError."""

    def write_pages(self, config: ModelConfig, pages: list[torch.Tensor]) -> None:
        """The weights laid out over page buffers ([num_layers, page_elems] each, in their
        dtype) as `LoraWeights.write_pages` does; raises InvalidAdapterError."""
        self.read(pages[0].dtype).write_pages(config, pages)


class FolderSource(AdapterSource):
    """A PEFT folder (local, or a node agent's cache path) whose header was checked at
    registration; the tensors are read, checked again and checked for finite values on read."""

    def __init__(self, folder: str | Path, name: str, config: ModelConfig, spec: LoraSpec, *,
                 max_rank: int, max_bytes: int) -> None:
        super().__init__(spec)
        self.folder = Path(folder)
        self.name = name
        self.config = config
        self.max_rank = max_rank
        self.max_bytes = max_bytes

    def read(self, dtype: torch.dtype) -> LoraWeights:
        return read_weights(self.folder, self.name, self.config, self.spec,
                            max_rank=self.max_rank, max_bytes=self.max_bytes, dtype=dtype)

    def write_pages(self, config: ModelConfig, pages: list[torch.Tensor],
                    phases: dict[str, float] | None = None) -> None:
        """Straight from the file's memory map into the pages (no LoraWeights in between)."""
        write_weights(self.folder, self.name, self.config, self.spec, pages,
                      max_rank=self.max_rank, max_bytes=self.max_bytes, phases=phases)


class MemorySource(AdapterSource):
    """Weights a caller already holds (benchmarks, tests): no I/O. Laid out into the host tier
    on the engine thread by default (tests see it loaded at once); `threaded` moves that copy to
    a loader thread, as a real source's read, so that a benchmark's engine thread does not stall
    on hundreds of megabytes of copies between steps."""

    blocking = False

    def __init__(self, weights: LoraWeights, *, threaded: bool = False) -> None:
        super().__init__(weights)
        self.weights = weights
        if threaded:
            self.blocking = True

    def read(self, dtype: torch.dtype) -> LoraWeights:
        return self.weights
