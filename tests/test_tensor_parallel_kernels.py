"""TP=2 through the Triton LoRA kernels (the GPU path) under Triton's CPU interpreter.

Its own module: one process holds one tensor-parallel engine at a time, and
test_tensor_parallel.py keeps one for all its tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from loraplane.engine.adapters import write_random_adapter
from loraplane.engine.config import LORA_MODULES, NAMED_SHAPES, EngineConfig
from loraplane.engine.distributed.engine import TPOptions, start_tensor_parallel
from loraplane.engine.engine import LLMEngine
from loraplane.engine.sampling_params import SamplingParams

TINY = NAMED_SHAPES["tiny"]
CFG = EngineConfig(pool_bytes=4 << 20, max_num_batched_tokens=48, max_num_seqs=16)


@pytest.mark.parametrize("overlap", ["0", "1"])
def test_tp2_with_triton_kernels_equals_tp1(tmp_path: Path, overlap: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink with split-K at ranks r_pad/N, expand into a column slice of the partial output:
    the kernels the GPU runs, here in the interpreter, which the workers inherit; with the
    LoRA collectives waited for where they start, and started asynchronously before the base
    GEMM and waited for in `apply` (overlap: the workers inherit the environment)."""
    monkeypatch.setenv("LORAPLANE_TP_LORA_OVERLAP", overlap)
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
    write_random_adapter(tmp_path / "r5", TINY, 5, LORA_MODULES, seed=1)
    write_random_adapter(tmp_path / "r16", TINY, 16, ("q_proj", "v_proj", "down_proj"), seed=2)
    single = LLMEngine.from_spec("random:tiny", device="cpu", dtype="float32", engine_config=CFG)
    opts = TPOptions("random:tiny", 2, "cpu", "float32", engine_config=CFG, lora_kernels=True)
    engine = start_tensor_parallel(opts, exit_on_failure=False)
    try:
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        prompts: list[str | list[int]] = [[5, 9, 13], list(range(3, 30)), [7], [20, 21, 22]]
        names: list[str | None] = ["r5", "r16", None, "r5"]
        outputs = []
        for e in (single, engine):
            for name in ("r5", "r16"):
                e.load_adapter(name, str(tmp_path / name))
            outputs.append([s.output_ids for s in e.generate(prompts, params, names)])
        assert outputs[0] == outputs[1]
    finally:
        engine.close()
