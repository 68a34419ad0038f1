"""A decode graph's inputs staged on the host: one pinned buffer, refilled in place, one copy.

Per step the host writes token ids, positions, KV slots, context lengths and block tables of the
batch's rows into a persistent int32 buffer (pinned on CUDA) and issues one asynchronous copy into
its device twin, which the captured graph reads. Block-table rows are written incrementally: a row
that still holds the same sequence gets only the pages added since the last step.
"""

from __future__ import annotations

import torch

from loraplane.engine.sequence import Sequence

_FIELDS = 4  # ids, positions, slots, lens; the tables follow


class DecodeInputs:
    """Static int32 inputs of a decode graph of `rows` rows (padding rows attend to nothing).

    One buffer, host and device alike: ids [B] | positions [B] | slots [B] | lens [B] |
    tables [B, max_blocks]. Padding rows have length 0 and write their K/V to `scratch_slot`.
    """

    def __init__(self, rows: int, max_blocks: int, block_size: int, scratch_slot: int,
                 device: torch.device) -> None:
        self.rows = rows
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.scratch_slot = scratch_slot
        size = rows * (_FIELDS + max_blocks)
        self.host = torch.zeros(size, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.device_buffer = torch.zeros(size, dtype=torch.int32, device=device)
        self._np = self.host.numpy()  # writes through numpy: no tensor per step
        self._np[2 * rows:3 * rows] = scratch_slot
        self.device_buffer.copy_(self.host)
        # What each table row holds: the block-table list it was copied from and how much of it.
        # Freeing a sequence's KV replaces its list (scheduler._free_kv), so identity tells a
        # re-used row from a grown one.
        self._row_table: list[list[int] | None] = [None] * rows
        self._row_len = [0] * rows

    def _view(self, buf: torch.Tensor, field: int) -> torch.Tensor:
        return buf[field * self.rows:(field + 1) * self.rows]

    @property
    def ids(self) -> torch.Tensor:
        return self._view(self.device_buffer, 0)

    @property
    def positions(self) -> torch.Tensor:
        return self._view(self.device_buffer, 1)

    @property
    def slots(self) -> torch.Tensor:
        return self._view(self.device_buffer, 2)

    @property
    def lens(self) -> torch.Tensor:
        return self._view(self.device_buffer, 3)

    @property
    def tables(self) -> torch.Tensor:
        """[rows, max_blocks] int32 block tables (stale past each row's length: never read)."""
        return self.device_buffer[_FIELDS * self.rows:].view(self.rows, self.max_blocks)

    def host_tables(self) -> torch.Tensor:
        """The host copy of `tables` (tests compare it with the sequences' block tables)."""
        return self.host[_FIELDS * self.rows:].view(self.rows, self.max_blocks)

    def fill(self, seqs: list[Sequence]) -> None:
        """Stage the rows of `seqs` (each decoding its next token) and copy them to the device."""
        pos = [s.num_computed for s in seqs]
        self.fill_rows([s.token_at(p) for s, p in zip(seqs, pos, strict=True)], pos,
                       [s.block_table for s in seqs])

    def fill_rows(self, tokens: list[int], pos: list[int], tables: list[list[int]]) -> None:
        """Stage rows given as their token, its position and the block table (a tensor-parallel
        worker has these from rank 0's step message, not Sequences), and copy them to the device.

        The caller syncs on the step's sampled tokens before the next fill, so the previous copy
        out of the pinned buffer has finished when it is overwritten.
        """
        n, bs, b = len(tokens), self.block_size, self.rows
        if n > b:
            raise ValueError(f"{n} rows do not fit a decode graph of {b} rows")
        pad = [0] * (b - n)
        h = self._np
        h[:b] = tokens + pad
        h[b:2 * b] = pos + pad
        h[2 * b:3 * b] = [t[p // bs] * bs + p % bs for t, p in zip(tables, pos, strict=True)] \
            + [self.scratch_slot] * (b - n)
        h[3 * b:4 * b] = [p + 1 for p in pos] + pad
        width = self.max_blocks
        for r, t in enumerate(tables):
            old, done, now = self._row_table[r], self._row_len[r], len(t)
            if now > width:
                raise ValueError(f"a block table of {now} pages exceeds the graph's {width}")
            if old is not t or now < done:  # another sequence, or a table cut in place
                done = 0
                self._row_table[r] = t
            if now > done:
                start = _FIELDS * b + r * width
                h[start + done:start + now] = t[done:now]
            self._row_len[r] = now
        for r in range(n, b):  # padding rows: forget their last occupant
            self._row_table[r] = None
        self.device_buffer.copy_(self.host, non_blocking=True)
