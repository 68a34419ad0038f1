"""The engine matches Hugging Face transformers + PEFT: greedy tokens exactly, logits closely.

Several adapters of different ranks and target modules share batches with base-model rows; the
requests arrive at different steps and long prompts are prefilled in chunks beside decode rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loraplane.engine.attention import TritonAttention
from loraplane.engine.config import NAMED_SHAPES, EngineConfig, ModelConfig, RopeScaling
from loraplane.engine.engine import EngineParts, LLMEngine
from loraplane.engine.models.llama import LlamaModel, build_model
from loraplane.engine.sampling_params import SamplingParams
from loraplane.engine.tokenizer import Tokenizer
from tests.reference import AdapterSpec, Reference, make_peft_adapter, random_hf_model

# Logits of the engine (paged KV, chunked prefill, batched LoRA) vs a full HF forward, float32.
LOGIT_ATOL = 2e-4

ADAPTERS = (
    AdapterSpec("qv-r2", 2, 4.0, ("q_proj", "v_proj")),
    AdapterSpec("all-r8", 8, 16.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj")),
    AdapterSpec("mlp-r16-rslora", 16, 8.0, ("gate_proj", "up_proj", "down_proj"), rslora=True),
    AdapterSpec("ko-r5", 5, 10.0, ("k_proj", "o_proj")),
)

TINY_GQA_LLAMA3 = NAMED_SHAPES["tiny"].with_updates(
    name="tiny-llama3", rope_theta=500000.0, max_position_embeddings=2048,
    rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64))


def run_parity(base_cfg: ModelConfig, weights: dict[str, torch.Tensor], hf_base: object,
               tokenizer: Tokenizer, tmp: Path, prompts: list[list[int]], max_new: int,
               max_batched: int, lora_op: type | None = None,
               attention: type | None = None,
               prepare: Callable[[LlamaModel], None] | None = None) -> None:
    """prepare: applied to the built model before the engine wraps it (layer swaps)."""
    paths = {s.name: make_peft_adapter(hf_base, s, tmp, seed=i)  # type: ignore[arg-type]
             for i, s in enumerate(ADAPTERS)}
    ref = Reference(hf_base, paths)  # type: ignore[arg-type]
    model = build_model(base_cfg, weights, base_cfg.max_position_embeddings, torch.float32,
                        torch.device("cpu"))
    if prepare is not None:
        prepare(model)
    engine = LLMEngine(EngineParts(model, base_cfg, tokenizer, "base"),
                       EngineConfig(pool_bytes=64 << 20, max_num_batched_tokens=max_batched,
                                    max_num_seqs=16),
                       lora_op=lora_op)
    if attention is not None:
        engine.runner.attention = attention
    for name, path in paths.items():
        engine.load_adapter(name, str(path))

    captured: dict[str, list[torch.Tensor]] = {}
    run = engine.runner.run

    def capture(batch):  # type: ignore[no-untyped-def]
        seqs, tokens, logits = run(batch)
        for s, row in zip(seqs, logits, strict=True):
            captured.setdefault(s.request_id, []).append(row.clone())
        return seqs, tokens, logits
    engine.runner.run = capture  # type: ignore[method-assign]

    names: list[str | None] = [None, *paths]
    jobs = [(f"r{i}", p, names[i % len(names)]) for i, p in enumerate(prompts)]
    params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
    seqs = {}
    # Requests arrive two per step, so prefills of late arrivals mix with earlier decodes.
    pending = list(jobs)
    while pending or engine.has_work():
        for rid, p, a in pending[:2]:
            seqs[rid] = engine.add_request(rid, p, params, a)
        pending = pending[2:]
        engine.step()
        engine.pool.pages.check_invariants()

    for rid, p, a in jobs:
        want = ref.generate(p, a, max_new)
        got = seqs[rid].output_ids
        assert got == want, f"{rid} (adapter {a}): engine {got} != reference {want}"
        full = p + want[:-1]
        ref_logits = ref.logits(full, a)[len(p) - 1:]
        eng_logits = torch.stack(captured[rid])
        err = (ref_logits - eng_logits).abs().max().item()
        assert err < LOGIT_ATOL, f"{rid} (adapter {a}): max logit error {err}"
        if a is not None:
            # The adapter must matter far beyond the tolerance, or the check proves nothing.
            effect = (ref.logits(full, None)[len(p) - 1:] - ref_logits).abs().max().item()
            assert effect > 100 * LOGIT_ATOL, f"adapter {a} barely changes the logits ({effect})"
    assert engine.pool.pages.num_used("kv") == 0


@pytest.mark.parametrize("cfg", [NAMED_SHAPES["tiny"], TINY_GQA_LLAMA3], ids=lambda c: c.name)
def test_parity_tiny_random(cfg: ModelConfig, tmp_path: Path) -> None:
    hf = random_hf_model(cfg, seed=1)
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 17, 40, 1, 9, 33, 12, 25, 6, 50]
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    run_parity(cfg, hf.state_dict(), hf, Tokenizer.byte_level(cfg.vocab_size), tmp_path,
               prompts, max_new=12, max_batched=24)


def test_parity_smollm2(tmp_path: Path) -> None:
    """The real default model (SmolLM2-135M-Instruct from its GGUF) against HF + PEFT."""
    from transformers import AutoModelForCausalLM

    from loraplane.engine.models.loader import export_hf_checkpoint, load_model

    loaded = load_model("smollm2")
    export_hf_checkpoint(loaded, tmp_path / "base")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    tok = loaded.tokenizer
    texts = ["The capital of France is", "def fibonacci(n):",
             "Once upon a time, in a small village by the sea, there lived an old fisherman "
             "who every morning",
             tok.apply_chat_template([{"role": "user", "content": "Name three colors."}]),
             "1, 2, 3, 4,"]
    prompts = [tok.encode(t) for t in texts]
    assert loaded.weights is not None
    run_parity(loaded.config, loaded.weights, hf, tok, tmp_path, prompts, max_new=8,
               max_batched=32)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_parity_tiny_triton_kernels(tmp_path: Path, fused: bool) -> None:
    """The same check with the Triton LoRA and attention kernels (CPU interpreter, float32); and
    with the whole GPU path: fused layers too (their Triton kernels; mixed-rank adapters,
    chunked prefills beside decodes)."""
    pytest.importorskip("triton")
    from loraplane.engine.lora.triton_op import TritonLoraOp
    from loraplane.engine.models.fused_layers import use_fused_layers
    from loraplane.engine.models.triton_layers import use_triton_layers

    def fuse(model: LlamaModel) -> None:
        use_triton_layers(model)
        use_fused_layers(model)

    cfg = NAMED_SHAPES["tiny"]
    hf = random_hf_model(cfg, seed=2)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist()
               for n in (3, 20, 1, 9, 14)]
    run_parity(cfg, hf.state_dict(), hf, Tokenizer.byte_level(cfg.vocab_size), tmp_path,
               prompts, max_new=5, max_batched=16, lora_op=TritonLoraOp,
               attention=TritonAttention, prepare=fuse if fused else None)
