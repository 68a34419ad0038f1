"""Tensor parallelism at 4 and 8 ranks on the CPU (gloo): the partition the 4- and 8-GPU runs of
the 70B shape use (issue #6), against one rank.

A module of its own: one process runs one tensor-parallel engine at a time, and the TP 2
module keeps its engine open for all its tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loraplane.engine.adapters import write_random_adapter
from loraplane.engine.config import NAMED_SHAPES
from loraplane.engine.distributed.engine import build_engine
from loraplane.engine.engine import LLMEngine
from tests.tp_support import ADAPTERS, CFG, drive


@pytest.mark.parametrize("world", [
    4, pytest.param(8, marks=pytest.mark.skipif(
        not os.environ.get("LORAPLANE_SLOW_TESTS"),
        reason="8 worker processes on CI's 2 cores; LORAPLANE_SLOW_TESTS=1 runs it"))])
def test_tp4_and_tp8_greedy_tokens_equal_tp1(world: int, tmp_path: Path) -> None:
    """Four or eight ranks of tiny-kv8 against one, adapter ranks below and above the TP size:
    the partition the 4- and 8-GPU runs of the 70B shape use, here on the CPU (gloo)."""
    shape = NAMED_SHAPES["tiny-kv8"]
    for i, (name, rank, modules) in enumerate(ADAPTERS):
        write_random_adapter(tmp_path / name, shape, rank, modules, seed=20 + i)
    single = LLMEngine.from_spec("random:tiny-kv8", device="cpu", dtype="float32",
                                 engine_config=CFG)
    want = drive(single, tmp_path)
    engine = build_engine("random:tiny-kv8", tensor_parallel_size=world, device="cpu",
                          dtype="float32", engine_config=CFG, exit_on_failure=False)
    try:
        got = drive(engine, tmp_path)
    finally:
        engine.close()
    assert got == want
    assert len({tuple(t) for t in want}) > 3
