"""What the tensor-parallel tests share: their engine settings, adapters and a fixed schedule."""

from __future__ import annotations

from pathlib import Path

from loraplane.engine.config import LORA_MODULES, EngineConfig
from loraplane.engine.engine import LLMEngine
from loraplane.engine.sampling_params import SamplingParams

CFG = EngineConfig(pool_bytes=4 << 20, max_num_batched_tokens=48, max_num_seqs=16)
# (name, rank, modules): odd ranks, ranks below the TP size, every module, subsets.
ADAPTERS = [("r2", 2, ("q_proj", "v_proj")),
            ("r5", 5, LORA_MODULES),
            ("r8", 8, ("o_proj", "down_proj", "gate_proj")),
            ("r16", 16, ("k_proj", "up_proj", "down_proj", "q_proj"))]


def drive(engine: LLMEngine, adapter_dir: Path) -> list[list[int]]:
    """A fixed schedule: a first wave, then a second one joining while the first decodes,
    with prompts longer than the token budget (chunked prefill beside decode rows)."""
    for name, _, _ in ADAPTERS:
        if name not in engine.adapters:
            engine.load_adapter(name, str(adapter_dir / name))
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    names: list[str | None] = ["r2", None, "r5", "r8", "r16", None, "r5", "r16", "r2"]
    seqs = []
    for i, name in enumerate(names):
        prompt = [(7 * i + 3 * j) % 500 + 3 for j in range(6 + 9 * (i % 4))]
        seqs.append(engine.add_request(f"req-{i}", prompt, params, name))
        if i == 3:
            for _ in range(3):
                engine.step()
    while engine.has_work():
        engine.step()
    return [s.output_ids for s in seqs]
