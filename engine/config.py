"""Frozen configuration of a base model and of the engine."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

# The seven projections LoRA may target, in the order the pool lays them out.
LORA_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj")
# Projections that read the same input: the base model fuses each group into one GEMM
# (models/fused_layers.py) and the LoRA kernels into one shrink launch (lora/triton_op.py).
FUSED_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"),
                                             ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (``rope_type == "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """Shape and hyper-parameters of a Llama-family decoder (Llama 2/3, Mistral, SmolLM2)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one of the seven projections."""
        h, i = self.hidden_size, self.intermediate_size
        shapes = {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        return shapes[module]

    @property
    def num_parameters(self) -> int:
        per_layer = sum(a * b for a, b in (self.module_shape(m) for m in LORA_MODULES))
        per_layer += 2 * self.hidden_size
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        return self.num_layers * per_layer + emb + head + self.hidden_size

    @property
    def chunk_size(self) -> int:
        """Elements in one pool chunk: divides every projection's in/out size and a KV head."""
        g = self.head_dim
        for m in LORA_MODULES:
            a, b = self.module_shape(m)
            g = math.gcd(g, math.gcd(a, b))
        return g

    def with_updates(self, **kw: object) -> ModelConfig:
        return replace(self, **kw)  # type: ignore[arg-type]


# Shapes for benchmarks with random weights (``--model random:llama-2-7b``).
NAMED_SHAPES: dict[str, ModelConfig] = {
    "llama-2-7b": ModelConfig("llama-2-7b", 32000, 4096, 11008, 32, 32, 32, 128,
                              rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                              bos_token_id=1, eos_token_ids=(2,)),
    "llama-2-13b": ModelConfig("llama-2-13b", 32000, 5120, 13824, 40, 40, 40, 128,
                               rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                               bos_token_id=1, eos_token_ids=(2,)),
    "llama-2-70b": ModelConfig("llama-2-70b", 32000, 8192, 28672, 80, 64, 8, 128,
                               rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                               bos_token_id=1, eos_token_ids=(2,)),
    "llama-3-8b": ModelConfig("llama-3-8b", 128256, 4096, 14336, 32, 32, 8, 128,
                              rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                              bos_token_id=128000, eos_token_ids=(128001, 128009),
                              rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192)),
    "mistral-7b": ModelConfig("mistral-7b", 32000, 4096, 14336, 32, 32, 8, 128,
                              rms_norm_eps=1e-5, rope_theta=1000000.0,
                              max_position_embeddings=32768, bos_token_id=1, eos_token_ids=(2,)),
    "smollm2-135m": ModelConfig("smollm2-135m", 49152, 576, 1536, 30, 9, 3, 64,
                                rms_norm_eps=1e-5, rope_theta=100000.0,
                                max_position_embeddings=8192, tie_word_embeddings=True,
                                bos_token_id=1, eos_token_ids=(2,)),
    # Tiny shapes for fast tests; tiny-kv8 has 8 KV heads, so it shards 2, 4 and 8 ways.
    "tiny": ModelConfig("tiny", 512, 64, 128, 2, 4, 2, 16, max_position_embeddings=1024,
                        bos_token_id=1, eos_token_ids=(2,)),
    "tiny-kv8": ModelConfig("tiny-kv8", 512, 128, 256, 2, 8, 8, 16,
                            max_position_embeddings=1024, bos_token_id=1, eos_token_ids=(2,)),
}

# Admission policies of engine/policies.py.
POLICIES: tuple[str, ...] = ("fcfs", "cluster", "abort", "vtc")


def default_load_workers() -> int:
    """A quarter of the CPUs this process may use, at least 2 and at most 8. A load is a few
    large copies from the page cache that torch runs without the GIL and spreads over its own
    intra-op threads, so threads beyond the cores only contend (on 2 shared cores 1, 2 and 4
    workers load within noise of each other; bench/host_load.py measures it per machine)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(8, max(2, (cpus or 8) // 4))


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of the engine: memory, batching and limits."""

    block_size: int = 16
    # Bytes of the unified pool (KV blocks + adapter pages); None: sized from free memory.
    pool_bytes: int | None = None
    # On CUDA, the share of free device memory the pool may take when pool_bytes is None.
    gpu_memory_fraction: float = 0.85
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_lora_rank: int = 256
    max_adapter_bytes: int = 4 << 30
    max_waiting: int = 4096
    seed: int = 0
    # Replay decode steps from captured CUDA graphs (CUDA only; False: always eager).
    cuda_graphs: bool = True
    # CUDA only: one GEMM per q,k,v and gate,up group, SiLU*up, residual add + RMSNorm and the
    # q,k rotary each in one launch (models/fused_layers.py); False: the unfused layers.
    fused_layers: bool = True
    max_graph_batch: int = 64
    # When set, adapter paths must resolve inside one of these folders.
    adapter_roots: tuple[str, ...] = ()
    # Admission policy (engine/policies.py): fcfs, cluster, abort or vtc. VTC by default: it is
    # FCFS while one tenant (or none) sends requests and fair between tenants when several do.
    scheduling_policy: str = "vtc"
    # Most distinct adapters in a running batch (S-LoRA's clustering); 0: no cap.
    max_adapters_per_batch: int = 0
    # First-token SLO in seconds of the `abort` policy.
    slo_first_token: float = 6.0
    # Waiting requests an admission round may skip (adapter loading or without room, adapter
    # cap) before it stops looking further down the queue.
    admission_lookahead: int = 64
    # Admission rounds a request may be passed over before it goes first and nothing is admitted
    # behind it until it is: the bound that keeps skipping and reordering from starving it.
    max_passed_over: int = 32
    # Only while decode steps replay CUDA graphs: a step that admits a request runs eagerly
    # (tens of ms of host work on the H200 against ~16 ms for a replayed 13B decode step), so
    # while the batch is nearly full new requests wait until `admission_batch` of them can join
    # at once (at most max_num_seqs // 4; fewer when fewer wait), or until they were held
    # `admission_hold_steps` decode steps. 1: admit whenever a slot is free.
    admission_batch: int = 8
    admission_hold_steps: int = 16
    # Bytes of host RAM for adapter weights in pool layout (pinned on CUDA), LRU.
    host_cache_bytes: int = 8 << 30
    # Bring the queue's next adapters and popular ones to host RAM and the GPU ahead of use.
    prefetch: bool = True
    # Threads reading adapters from their source into host RAM (bench/host_load.py).
    adapter_load_workers: int = default_load_workers()
