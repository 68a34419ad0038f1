"""TP=2 with a pool so small that adapters are evicted and reloaded into pages KV used before:
rank 0 must tell the workers to rewrite them, or their tokens would differ from TP=1.

Its own module: one process holds one tensor-parallel engine at a time, and
test_tensor_parallel.py keeps one for all its tests.
"""

from __future__ import annotations

from pathlib import Path

from loraplane.engine.adapters import write_random_adapter
from loraplane.engine.config import LORA_MODULES, NAMED_SHAPES, EngineConfig
from loraplane.engine.distributed.engine import TensorParallelEngine, build_engine
from loraplane.engine.engine import LLMEngine
from loraplane.engine.sampling_params import SamplingParams

TINY = NAMED_SHAPES["tiny"]
ADAPTERS = {"r16": (16, ("q_proj", "k_proj", "up_proj", "down_proj")), "r5": (5, LORA_MODULES),
            "r8": (8, ("o_proj", "gate_proj", "v_proj")), "r2": (2, ("q_proj", "v_proj"))}
PAGES = 16  # the largest adapter takes 10 pages on either engine


def _page_bytes(tp: int) -> int:
    # [layers, block, K and V, KV heads on this rank, head_dim] float32
    return TINY.num_layers * 16 * 2 * (TINY.num_kv_heads // tp) * TINY.head_dim * 4


def _run(engine: LLMEngine, folder: Path) -> list[list[int]]:
    for name in ADAPTERS:
        engine.load_adapter(name, str(folder / name))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    out = []
    for i, name in enumerate(["r16", "r5", "r8", "r2", "r16", "r8", "r5", "r16"]):
        prompt = [(11 * i + j) % 400 + 3 for j in range(12 + i)]
        (seq,) = engine.generate([prompt], params, [name])
        out.append(seq.output_ids)
        assert engine.adapters.num_resident() < len(ADAPTERS)  # the pool cannot hold them all
    return out


def test_evicted_adapters_are_rewritten_on_every_rank(tmp_path: Path) -> None:
    for i, (name, (rank, modules)) in enumerate(ADAPTERS.items()):
        write_random_adapter(tmp_path / name, TINY, rank, modules, seed=30 + i)
    single = LLMEngine.from_spec("random:tiny", device="cpu", dtype="float32",
                                 engine_config=EngineConfig(pool_bytes=PAGES * _page_bytes(1)))
    want = _run(single, tmp_path)
    engine = build_engine("random:tiny", tensor_parallel_size=2, device="cpu", dtype="float32",
                          engine_config=EngineConfig(pool_bytes=PAGES * _page_bytes(2)),
                          exit_on_failure=False)
    assert isinstance(engine, TensorParallelEngine)
    try:
        assert engine.pool.pages.num_pages == PAGES
        assert _run(engine, tmp_path) == want
        ranks = engine.report()
        assert ranks[0] == ranks[1]
    finally:
        engine.close()
