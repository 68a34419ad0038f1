"""Rank 0's messages to the workers as int64 tensors over the gloo control group (no pickles).

Each message is a fixed-size header [kind, payload length, fields...] broadcast from rank 0,
then, when the length is not zero, one int64 payload tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from loraplane.engine.attention import SeqSlice

STEP, REGISTER, REPORT, SHUTDOWN, CAPTURE, PROFILE = 1, 2, 3, 4, 5, 6
HEADER = 11
ERROR_BYTES = 512  # one rank's error text in replies gathered after a command


@dataclass
class StepMessage:
    """One forward step as the workers need it; adapters are rank 0's adapter ids."""

    ids: list[int]
    slices: list[SeqSlice]
    segments: list[tuple[int, int, int]]  # (row start, row end, adapter id)
    loads: list[tuple[int, list[int]]] = field(default_factory=list)  # (adapter id, pages)
    evictions: list[int] = field(default_factory=list)  # adapters no longer in their pages
    drops: list[int] = field(default_factory=list)  # adapter ids gone on rank 0
    # The decode graph (bucket rows, LoRA rank cap, LoRA module mask) that runs the step; None:
    # an eager forward.
    graph: tuple[int, int, int] | None = None


def send(group: dist.ProcessGroup, kind: int, fields: list[int], payload: list[int]) -> None:
    """Rank 0: broadcast one message."""
    header = torch.zeros(HEADER, dtype=torch.int64)
    header[0], header[1] = kind, len(payload)
    header[2:2 + len(fields)] = torch.tensor(fields, dtype=torch.int64)
    dist.broadcast(header, 0, group=group)
    if payload:
        dist.broadcast(torch.tensor(payload, dtype=torch.int64), 0, group=group)


def receive(group: dist.ProcessGroup) -> tuple[int, list[int], list[int]]:
    """Workers: wait for the next message; (kind, fields, payload)."""
    header = torch.zeros(HEADER, dtype=torch.int64)
    dist.broadcast(header, 0, group=group)
    kind, n, *fields = header.tolist()
    payload = torch.zeros(n, dtype=torch.int64)
    if n:
        dist.broadcast(payload, 0, group=group)
    return kind, fields, payload.tolist()


def encode_step(m: StepMessage) -> tuple[list[int], list[int]]:
    """(fields, payload): ids | slices (row, n, context, table length) | tables | segments |
    loads (id, page count, pages) | evictions | drops."""
    payload = list(m.ids)
    for s in m.slices:
        payload += [s.row, s.num_new, s.context_len, len(s.block_table)]
    for s in m.slices:
        payload += s.block_table
    for seg in m.segments:
        payload += list(seg)
    for adapter_id, pages in m.loads:
        payload += [adapter_id, len(pages), *pages]
    payload += m.evictions + m.drops
    fields = [len(m.ids), len(m.slices), len(m.segments), len(m.loads), len(m.evictions),
              len(m.drops), *(m.graph or (0, 0, 0))]
    return fields, payload


def decode_step(fields: list[int], payload: list[int]) -> StepMessage:
    n_ids, n_slices, n_segs, n_loads, n_evictions, n_drops, rows, cap, mask = fields[:9]
    pos = n_ids
    heads = [payload[pos + 4 * i:pos + 4 * i + 4] for i in range(n_slices)]
    pos += 4 * n_slices
    slices = []
    for row, n, ctx, width in heads:
        slices.append(SeqSlice(row, n, ctx, payload[pos:pos + width]))
        pos += width
    segments = [(payload[pos + 3 * i], payload[pos + 3 * i + 1], payload[pos + 3 * i + 2])
                for i in range(n_segs)]
    pos += 3 * n_segs
    loads = []
    for _ in range(n_loads):
        adapter_id, count = payload[pos], payload[pos + 1]
        loads.append((adapter_id, payload[pos + 2:pos + 2 + count]))
        pos += 2 + count
    evictions = payload[pos:pos + n_evictions]
    drops = payload[pos + n_evictions:pos + n_evictions + n_drops]
    return StepMessage(payload[:n_ids], slices, segments, loads, evictions, drops,
                       (rows, cap, mask) if rows else None)


def encode_text(*parts: str) -> list[int]:
    """Strings as byte values, each preceded by its length."""
    out: list[int] = []
    for p in parts:
        b = p.encode()
        out += [len(b), *b]
    return out


def decode_text(payload: list[int], count: int) -> list[str]:
    out, pos = [], 0
    for _ in range(count):
        n = payload[pos]
        out.append(bytes(payload[pos + 1:pos + 1 + n]).decode())
        pos += 1 + n
    return out


def gather_errors(group: dist.ProcessGroup, world: int, error: str | None) -> list[str | None]:
    """Every rank: all-gather each rank's error text (None: it succeeded)."""
    mine = torch.zeros(ERROR_BYTES + 1, dtype=torch.uint8)
    if error is not None:
        raw = error.encode()[:ERROR_BYTES]
        mine[0] = 1
        mine[1:1 + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    parts = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    return [bytes(p[1:].tolist()).rstrip(b"\0").decode(errors="replace") if p[0] else None
            for p in parts]


def gather_rows(group: dist.ProcessGroup, world: int, rows: list[list[int]],
                width: int) -> list[list[list[int]]]:
    """Every rank: all-gather a variable number of int rows of `width` ints each."""
    count = torch.tensor([len(rows)], dtype=torch.int64)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    most = max(int(c) for c in counts)
    mine = torch.full((most, width), -1, dtype=torch.int64)
    if rows:
        mine[:len(rows)] = torch.tensor(rows, dtype=torch.int64)
    parts = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    return [p[:int(c)].tolist() for p, c in zip(parts, counts, strict=True)]
