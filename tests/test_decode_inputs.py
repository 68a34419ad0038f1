"""DecodeInputs: staged rows equal what the sequences hold, with incremental block tables."""

from __future__ import annotations

import random

import torch

from loraplane.engine.decode_inputs import DecodeInputs
from loraplane.engine.sampling_params import SamplingParams
from loraplane.engine.sequence import Sequence

BS = 4
SCRATCH = 999


def check(inp: DecodeInputs, seqs: list[Sequence]) -> None:
    b, host = inp.rows, inp.host
    n = len(seqs)
    pos = [s.num_computed for s in seqs]
    assert host[:n].tolist() == [s.all_ids[p] for s, p in zip(seqs, pos, strict=True)]
    assert host[b:b + n].tolist() == pos
    assert host[2 * b:2 * b + n].tolist() == [
        s.block_table[p // BS] * BS + p % BS for s, p in zip(seqs, pos, strict=True)]
    assert host[2 * b + n:3 * b].tolist() == [SCRATCH] * (b - n)
    assert host[3 * b:4 * b].tolist() == [p + 1 for p in pos] + [0] * (b - n)
    tables = inp.host_tables()
    for r, s in enumerate(seqs):
        assert tables[r, :len(s.block_table)].tolist() == s.block_table
    assert torch.equal(inp.device_buffer, host)


def test_rows_follow_growing_finishing_and_preempted_sequences() -> None:
    rng = random.Random(0)
    inp = DecodeInputs(rows=8, max_blocks=16, block_size=BS, scratch_slot=SCRATCH,
                       device=torch.device("cpu"))
    # A tensor-parallel worker's twin: the same rows from (token, position, table) with fresh
    # table lists each step, as they arrive in rank 0's step message.
    twin = DecodeInputs(rows=8, max_blocks=16, block_size=BS, scratch_slot=SCRATCH,
                        device=torch.device("cpu"))
    next_page = iter(range(1, 10_000))
    live: list[Sequence] = []
    for step in range(300):
        if len(live) < 8 and rng.random() < 0.3:
            prompt = [rng.randrange(100) for _ in range(rng.randrange(1, 20))]
            s = Sequence(f"s{step}", prompt, SamplingParams())
            s.num_computed = len(prompt) - 1
            s.block_table = [next(next_page) for _ in range(-(-len(prompt) // BS))]
            live.insert(rng.randrange(len(live) + 1), s)
        for s in live:
            if rng.random() < 0.05:  # preempted and recomputed: a fresh table list
                s.block_table = [next(next_page) for _ in s.block_table]
        if rng.random() < 0.1:
            rng.shuffle(live)
        if live:
            inp.fill(live)
            check(inp, live)
            twin.fill_rows([s.all_ids[s.num_computed] for s in live],
                           [s.num_computed for s in live], [list(s.block_table) for s in live])
            check(twin, live)
        for s in live:  # the step's token is appended and the table grows in place
            s.output_ids.append(rng.randrange(100))
            s.num_computed += 1
            if s.num_computed + 1 > len(s.block_table) * BS:
                s.block_table.append(next(next_page))
        live = [s for s in live if len(s.block_table) < 16 and rng.random() > 0.03]
