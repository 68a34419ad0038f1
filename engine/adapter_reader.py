"""A PEFT safetensors file read straight from its memory map into pool-order page buffers: the
pages' dtype, B transposed with the scale folded in, every offset and value checked.

Why not safetensors' own reader: it copies each tensor out of the file, and the old path then
stacked, converted, transposed and scaled into further full-size tensors before laying them out.
Here the only full pass is the copy from the file's pages into the destination (converting and
scaling on the way), with the finite check on that destination piece while it is in cache.
The copies are few and large: a module's layers whose tensors sit at a constant byte stride in
the file (every writer's layout, in any name order) are one strided view, so a load is a few
dozen torch calls (which run without the GIL), not one per layer and page piece.

The file is mapped private and read-only in practice (nothing writes through the mapping, so no
page is copied). Like any mmap reader (safetensors' included) it assumes the file is not
truncated while read: node agents replace adapter folders by rename, never in place.
"""

from __future__ import annotations

import math
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplane.engine.adapter_format import (
    MODULE_PARENT,
    SAFETENSORS_DTYPES,
    WEIGHTS_FILE,
    check_layout,
    fail,
    header_length,
    index_safetensors_header,
    load_header_json,
    parse_key,
)
from loraplane.engine.config import ModelConfig

SAFETENSORS_TO_TORCH = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
# (module, "a"|"bt", elements per layer) in pool order, as LoraSpec.segments gives them.
Segments = list[tuple[str, str, int]]


def page_pieces(start: int, n: int, page_elems: int) -> list[tuple[int, int, int, int]]:
    """(page, column, lo, hi): elements [lo, hi) of a segment that starts at per-layer column
    `start` and is n long land on page `page` from `column` on."""
    out = []
    lo = 0
    while lo < n:
        k, col = divmod(start + lo, page_elems)
        hi = min(n, lo + page_elems - col)
        out.append((k, col, lo, hi))
        lo = hi
    return out


def check_pages(pages: list[torch.Tensor], total: int) -> int:
    """The page width, once `pages` ([num_layers, page_elems] each) fit `total` per layer."""
    pe = pages[0].shape[1]
    if len(pages) != -(-total // pe):
        raise ValueError(f"{total} elements per layer need {-(-total // pe)} pages, "
                         f"not {len(pages)}")
    return pe


def zero_tail(pages: list[torch.Tensor], total: int) -> None:
    """Zero the last page past the `total` used columns (it may hold an older adapter)."""
    col = total % pages[0].shape[1]
    if col:
        pages[-1][:, col:].zero_()


@dataclass(frozen=True)
class _Tensor:
    """Where one 2-D tensor's data sits in the file."""

    dtype: torch.dtype
    shape: tuple[int, int]
    start: int  # byte offset in the file

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize


class _Phases:
    """Seconds per phase of a load, when the caller asks for them (benchmarks)."""

    def __init__(self, out: dict[str, float] | None) -> None:
        self.out = out

    def add(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        if self.out is not None:
            self.out[phase] = self.out.get(phase, 0.0) + now - since
        return now


def _locate(entries: dict, data_start: int, size: int, name: str,
            config: ModelConfig) -> dict[tuple[str, str], dict[int, _Tensor]]:
    """(module, "A"|"B") -> layer -> where its data is; refuses offsets outside the file or not
    matching the (already checked) dtype and shape."""
    out: dict[tuple[str, str], dict[int, _Tensor]] = {}
    for key, meta in entries.items():
        if key == "__metadata__":
            continue
        layer, module, ab = parse_key(key, name, config)
        offsets = meta.get("data_offsets")
        shape = tuple(int(d) for d in meta["shape"])
        t = _Tensor(SAFETENSORS_TO_TORCH[meta["dtype"]], (shape[0], shape[1]), 0)
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= size - data_start
                and offsets[1] - offsets[0] == t.nbytes):
            raise fail(name, f"cannot read {WEIGHTS_FILE}: {key} has data_offsets {offsets!r}, "
                             f"not {t.nbytes} bytes inside the file")
        out.setdefault((module, ab), {})[layer] = _Tensor(t.dtype, t.shape,
                                                          data_start + offsets[0])
    return out


def _runs(per_layer: dict[int, _Tensor], num_layers: int) -> list[tuple[int, int, int]]:
    """(first layer, layers, byte stride): consecutive layers whose tensors share a dtype and
    sit at one constant positive stride, aligned to their element size (one strided view)."""
    runs = []
    first = 0
    while first < num_layers:
        t = per_layer[first]
        n, stride = 1, 0
        while t.start % t.dtype.itemsize == 0 and first + n < num_layers:
            u = per_layer[first + n]
            step = u.start - per_layer[first + n - 1].start
            if u.dtype != t.dtype or step <= 0 or step % t.dtype.itemsize \
                    or (n > 1 and step != stride):
                break
            stride = step
            n += 1
        runs.append((first, n, stride))
        first += n
    return runs


class _File:
    """The mapped file as typed tensors (views, no copy), one per dtype used."""

    def __init__(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self._typed: dict[torch.dtype, torch.Tensor] = {}

    def view(self, t: _Tensor, layers: int, stride: int) -> torch.Tensor:
        """[layers, *t.shape]: `layers` tensors like t from t's offset on, `stride` bytes apart."""
        size = t.dtype.itemsize
        if t.start % size:  # no writer puts data there; read it through an aligned copy
            data = bytearray(self.mm[t.start:t.start + t.nbytes])
            return torch.frombuffer(data, dtype=t.dtype).view(1, *t.shape)
        typed = self._typed.get(t.dtype)
        if typed is None:
            typed = self._typed[t.dtype] = torch.frombuffer(self.mm, dtype=t.dtype,
                                                            count=len(self.mm) // size)
        return typed.as_strided((layers, *t.shape), (stride // size, t.shape[1], 1),
                                t.start // size)


def _copy_rect(dst: torch.Tensor, src: torch.Tensor, lo: int, hi: int, scale: float) -> None:
    """dst [layers, hi - lo] = scale * src [layers, rows, width] flattened per layer, elements
    [lo, hi): at most a partial row, whole rows, and a partial row. Rounds as `src.to(dtype) *
    scale` (the plain path): in one pass when no conversion comes first."""
    width = src.shape[2]
    pos = lo
    while pos < hi:
        row, c0 = divmod(pos, width)
        d = pos - lo
        if c0 or hi - pos < width:
            step = min(width, c0 + hi - pos) - c0
            out, part = dst[:, d:d + step], src[:, row, c0:c0 + step]
        else:
            rows = (hi - pos) // width
            step = rows * width
            out = dst[:, d:d + step].unflatten(1, (rows, width))
            part = src[:, row:row + rows]
        if scale == 1.0:
            out.copy_(part)
        elif part.dtype == out.dtype:
            torch.mul(part, scale, out=out)
        else:
            out.copy_(part).mul_(scale)
        pos += step


def _finite(x: torch.Tensor) -> bool:
    """No NaN or infinity in x (min and max propagate NaN; one pass, no boolean tensor)."""
    lo, hi = torch.aminmax(x)
    return bool(math.isfinite(lo.item()) and math.isfinite(hi.item()))


def read_into_pages(path: Path, name: str, config: ModelConfig, rank: int, segments: Segments,
                    scale: float, pages: list[torch.Tensor],
                    phases: dict[str, float] | None = None) -> None:
    """Read the LoRA tensors of the safetensors file at `path` into `pages` ([num_layers,
    page_elems] each, page k holding pool-order columns [k * page_elems, (k+1) * page_elems)):
    A [r, in] as is, B [out, r] as B^T [r, out] times `scale`, in the pages' dtype, the last
    page's tail zeroed. The file must hold exactly `segments`' modules at `rank`; raises
    InvalidAdapterError otherwise, or on bad offsets or non-finite values. `phases`, when given,
    gets seconds per phase added (header; copy: read, convert, scale, lay out; check)."""
    timer = _Phases(phases)
    t = time.perf_counter()
    total = sum(n for _, _, n in segments)
    pe = check_pages(pages, total)
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            data_start = 8 + header_length(f.read(8), size, name)
            entries = load_header_json(f.read(data_start - 8), name)
            # Private: torch wants a writable buffer; nothing writes, so no page is copied.
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    except OSError as e:
        raise fail(name, f"cannot read {WEIGHTS_FILE}: {e}") from None
    index = index_safetensors_header(entries, name, config)
    modules = check_layout(index, rank, config, name, SAFETENSORS_DTYPES)
    if modules != tuple(dict.fromkeys(m for m, _, _ in segments)):
        raise fail(name, f"{path.parent} changed since it was registered (modules)")
    where = _locate(entries, data_start, size, name, config)
    file = _File(mm)
    t = timer.add("header", t)
    start = 0  # the segment's first per-layer column
    for m, kind, n in segments:
        ab = "A" if kind == "a" else "B"
        per_layer = where[(m, ab)]
        views = []
        for first, count, stride in _runs(per_layer, config.num_layers):
            v = file.view(per_layer[first], count, stride)  # [count, r, in] or [count, out, r]
            views.append((first, count, v if ab == "A" else v.transpose(1, 2)))
        for k, col, lo, hi in page_pieces(start, n, pe):
            dst = pages[k][:, col:col + hi - lo]  # [num_layers, hi - lo]
            for first, count, v in views:
                _copy_rect(dst[first:first + count], v, lo, hi, scale if ab == "B" else 1.0)
            t = timer.add("copy", t)
            if not _finite(dst):
                layer = next(i for i in range(config.num_layers) if not _finite(dst[i]))
                raise fail(name, f"layers.{layer}.{MODULE_PARENT[m]}.{m}.lora_{ab} holds NaN "
                                 f"or infinite values")
            t = timer.add("check", t)
        start += n
    zero_tail(pages, total)
