"""The synchronous engine core: admits requests, runs steps, hands back output deltas."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplane.engine.adapter_cache import Adapter, AdapterCache
from loraplane.engine.adapter_source import AdapterSource, FolderSource
from loraplane.engine.adapters import LoraWeights, read_header
from loraplane.engine.attention import TritonAttention
from loraplane.engine.config import EngineConfig, ModelConfig
from loraplane.engine.cuda_graphs import DecodeGraphs
from loraplane.engine.detokenizer import append_token, take_output
from loraplane.engine.errors import (
    BadRequestError,
    InvalidAdapterError,
    OverloadedError,
    PromptTooLongError,
)
from loraplane.engine.lora.layers import LoraState, apply_lora
from loraplane.engine.lora.ops import LoraOp, TorchLoraOp
from loraplane.engine.memory_pool import ADAPTER, KV, DevicePool, PoolLayout
from loraplane.engine.model_runner import ModelRunner
from loraplane.engine.models.llama import LlamaModel, build_model
from loraplane.engine.outputs import AdapterInfo, EngineStats, RequestOutput
from loraplane.engine.sampling_params import SamplingParams
from loraplane.engine.scheduler import Scheduler
from loraplane.engine.sequence import Sequence
from loraplane.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_POOL_BYTES = 1 << 30


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present; 'cuda' without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on GPU and float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_lora_op(device: torch.device) -> Callable[[DevicePool], LoraOp]:
    """Triton kernels on CUDA, the plain-torch op elsewhere or where the pool's chunks are too
    narrow for the kernels' matrix products (tiny test shapes)."""
    if device.type != "cuda":
        return TorchLoraOp
    from loraplane.engine.kernels.lora_meta import kernels_fit
    from loraplane.engine.lora.triton_op import TritonLoraOp

    def make(pool: DevicePool) -> LoraOp:
        return TritonLoraOp(pool) if kernels_fit(pool.layout.chunk) else TorchLoraOp(pool)

    return make


@dataclass(frozen=True)
class EngineParts:
    """What an engine is built from (the model already on its device)."""

    model: LlamaModel
    config: ModelConfig
    tokenizer: Tokenizer
    name: str


class LLMEngine:
    """Owns the model, the unified pool, the adapters and the scheduler; single-threaded."""

    def __init__(self, parts: EngineParts, engine_config: EngineConfig,
                 lora_op: Callable[[DevicePool], LoraOp] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model = parts.model
        self.config = parts.config
        self.tokenizer = parts.tokenizer
        self.model_name = parts.name
        self.engine_config = engine_config
        device = parts.model.embed_tokens.weight.device
        dtype = parts.model.embed_tokens.weight.dtype
        if device.type == "cuda":
            from loraplane.engine.models.fused_layers import use_fused_layers
            from loraplane.engine.models.triton_layers import use_triton_layers

            use_triton_layers(parts.model)  # single-launch RMSNorm and rotary
            if engine_config.fused_layers:
                use_fused_layers(parts.model)  # fused q,k,v and gate,up GEMMs, add+norm, ...
                # Before the pool takes its share of free memory: the unfused weights' blocks
                # go back to the device instead of staying in torch's cache.
                torch.cuda.empty_cache()
        layout = self._pool_layout(parts.config, engine_config.block_size)
        num_pages = self._pool_pages(layout, dtype, device)
        self.pool = DevicePool(layout, num_pages, dtype, device)
        self.adapters = AdapterCache(
            self.pool, parts.config, host_cache_bytes=engine_config.host_cache_bytes,
            prefetch=engine_config.prefetch, load_workers=engine_config.adapter_load_workers)
        make_op = lora_op or default_lora_op(device)
        self.lora: LoraState = apply_lora(parts.model, make_op(self.pool))
        if device.type == "cuda":
            start = time.perf_counter()
            if launches := self.lora.op.compile_kernels(parts.config):
                log.info("LoRA kernels: %d variants ready in %.1f s (compiled now, not while "
                         "requests wait; Triton's disk cache keeps them for the next start)",
                         launches, time.perf_counter() - start)
        self.runner = ModelRunner(parts.model, self.pool, self.lora)
        # The clock of arrivals, first tokens and the policy (tests inject a fake one).
        self.clock = clock
        self.scheduler = Scheduler(engine_config, self.pool, self.adapters, clock=clock)
        pool_tokens = num_pages * layout.block_size
        limit = engine_config.max_model_len or parts.config.max_position_embeddings
        self.max_model_len = min(limit, parts.config.max_position_embeddings, pool_tokens)
        if (engine_config.cuda_graphs and device.type == "cuda"
                and self.runner.attention is TritonAttention
                and self.lora.op.graph_safe):
            self.runner.graphs = DecodeGraphs(
                parts.model, parts.config, self.pool, self.lora, self.max_model_len,
                min(engine_config.max_graph_batch, engine_config.max_num_seqs),
                engine_config.max_lora_rank)
            self.scheduler.batch_admissions = engine_config.admission_batch > 1
        self.eos_ids = tuple(parts.tokenizer.eos_token_ids) or parts.config.eos_token_ids
        self._stats = EngineStats()
        self._finished = Counter[str]()
        log.info("engine ready: %s on %s/%s, pool %d pages x %.2f MiB, max_model_len %d, "
                 "scheduling policy %s", self.model_name, device, dtype, num_pages,
                 layout.page_bytes(dtype) / 2**20, self.max_model_len, self.scheduler.policy.name)

    @classmethod
    def from_spec(cls, model: str = "smollm2", *, device: str = "auto", dtype: str = "auto",
                  engine_config: EngineConfig | None = None, name: str | None = None,
                  clock: Callable[[], float] = time.monotonic) -> LLMEngine:
        """Load a model spec (see loader.load_model) onto a device and build the engine."""
        from loraplane.engine.models.loader import load_model  # gguf/safetensors only here

        cfg = engine_config or EngineConfig()
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        loaded = load_model(model)
        max_pos = min(loaded.config.max_position_embeddings, cfg.max_model_len or 1 << 30)
        built = build_model(loaded.config, loaded.weights, max_pos, dt, dev, seed=cfg.seed)
        del loaded.weights
        parts = EngineParts(built, loaded.config, loaded.tokenizer, name or loaded.config.name)
        return cls(parts, cfg, clock=clock)

    def _pool_layout(self, config: ModelConfig, block_size: int) -> PoolLayout:
        """The pool's page and chunk sizes (a tensor-parallel engine holds its shard's heads)."""
        return PoolLayout.for_model(config, block_size)

    def _pool_pages(self, layout: PoolLayout, dtype: torch.dtype, device: torch.device) -> int:
        page = layout.page_bytes(dtype)
        budget = self.engine_config.pool_bytes
        if budget is None:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                budget = int(free * self.engine_config.gpu_memory_fraction)
            else:
                budget = CPU_POOL_BYTES
        pages = budget // page
        if pages < 2:
            raise ValueError(f"the pool budget of {budget} bytes holds fewer than 2 pages of "
                             f"{page} bytes")
        return int(pages)

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    adapter: str | None = None,
                    on_output: Callable[[RequestOutput], None] | None = None,
                    tenant: str | None = None) -> Sequence:
        """Validate and queue a request; errors are EngineError subclasses. ``tenant`` names
        who asks, for the fair scheduling policy (the gateway authenticates it)."""
        params.validate()
        ad: Adapter | None = None
        if adapter is not None and adapter != self.model_name:
            ad = self.adapters.get(adapter)
            if ad.error is not None:
                raise InvalidAdapterError(ad.error.message, param="model")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise BadRequestError("the prompt is empty", param="prompt")
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise BadRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {len(ids) + params.max_tokens} tokens ({len(ids)} in the prompt, "
                f"{params.max_tokens} for the completion).", param="max_tokens")
        kv_pages = -(-(len(ids) + params.max_tokens) // self.pool.layout.block_size)
        adapter_pages = self.adapters.size_in_pages(ad) if ad else 0
        if kv_pages + adapter_pages > self.pool.pages.num_pages:
            raise PromptTooLongError(
                f"{len(ids)} prompt + {params.max_tokens} completion tokens with this adapter "
                f"need {kv_pages + adapter_pages} pages; the pool holds "
                f"{self.pool.pages.num_pages}", param="max_tokens")
        if len(self.scheduler.waiting) >= self.engine_config.max_waiting:
            raise OverloadedError("the engine's queue is full; retry later")
        seq = Sequence(request_id, ids, params, ad, tenant=tenant, arrival=self.clock(),
                       on_output=on_output)
        self.scheduler.add(seq)
        if ad is not None:
            self.adapters.note_request(ad)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a request now and free its pages (a no-op once it has finished)."""
        if seq.finished:
            return
        seq.finish_reason = "abort"
        self._finish(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """Run one batch; returns the output deltas produced (also sent to on_output)."""
        self._fail_adapter_requests()
        batch = self.scheduler.schedule()
        outputs = []
        for seq in batch.refused:  # early abort: the error reaches the caller in the output
            seq.finish_reason = "abort"
            outputs.append(self._finish(seq))
        if not len(batch):
            if not outputs:
                self.adapters.wait()  # nothing runnable: the queue waits on adapter loads
            return outputs
        for seq in batch.seqs:
            if seq.adapter is not None and seq.num_computed == 0:
                self.adapters.admitted(seq.adapter)
        sampled, tokens, _ = self.runner.run(batch)
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            seq.num_computed += n
        self._stats.last_batch_size = len(batch)
        self._stats.steps_total += 1
        now = self.clock()
        for seq, tok in zip(sampled, tokens, strict=True):
            if seq.finished:
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
            append_token(self.tokenizer, seq, tok, self.eos_ids, self.max_model_len)
            self._stats.generation_tokens_total += 1
            if seq.finish_reason is not None:
                outputs.append(self._finish(seq))
            else:
                out = take_output(seq, finished=False)
                if out.text_delta or out.token_ids_delta:
                    outputs.append(out)
                    if seq.on_output is not None:
                        seq.on_output(out)
        return outputs

    def _fail_adapter_requests(self) -> None:
        """Requests queued for adapters whose weights failed to load end with that error."""
        failed, self.adapters.newly_failed = self.adapters.newly_failed, []
        for adapter in failed:
            assert adapter.error is not None
            for seq in [s for s in self.scheduler.waiting if s.adapter is adapter]:
                seq.finish_reason = "error"
                seq.error = InvalidAdapterError(adapter.error.message, param="model")
                self._finish(seq)

    def _finish(self, seq: Sequence) -> RequestOutput:
        """End a request now; its last output carries `seq.error` when it ended on one."""
        self.scheduler.finish(seq)
        assert seq.finish_reason is not None
        self._finished[seq.finish_reason] += 1
        self._stats.prompt_tokens_total += len(seq.prompt_ids)
        out = take_output(seq, finished=True)
        if seq.on_output is not None:
            seq.on_output(out)
        return out

    # ---- adapters ---------------------------------------------------------------------------

    def read_adapter(self, name: str, path: str) -> FolderSource:
        """Validate an adapter folder from its config and header (thread-safe; touches no engine
        state); its weights are read when it is first brought to host RAM."""
        cfg = self.engine_config
        if cfg.adapter_roots:
            real = Path(path).resolve()
            if not any(real.is_relative_to(Path(r).resolve()) for r in cfg.adapter_roots):
                raise InvalidAdapterError(f"adapter {name!r}: {path} is outside the allowed "
                                          f"adapter folders ({', '.join(cfg.adapter_roots)})")
        limits = {"max_rank": cfg.max_lora_rank, "max_bytes": cfg.max_adapter_bytes}
        spec = read_header(path, name, self.config, **limits)
        return FolderSource(path, name, self.config, spec, **limits)

    def add_adapter(self, name: str, path: str,
                    source: AdapterSource | LoraWeights) -> AdapterInfo:
        """Register a checked folder (or weights in memory) under a name (engine thread)."""
        if name == self.model_name:
            raise BadRequestError(f"{name!r} is the base model's name", param="lora_name")
        return self.adapters.info(self.adapters.add(name, path, source))

    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """read_adapter then add_adapter, for synchronous callers."""
        return self.add_adapter(name, path, self.read_adapter(name, path))

    def unload_adapter(self, name: str) -> None:
        """New requests cannot use it; running ones finish, then its pages are freed."""
        self.adapters.remove(name)

    def list_adapters(self) -> list[AdapterInfo]:
        return [self.adapters.info(a) for a in self.adapters.all()]

    def stats(self) -> EngineStats:
        s = self._stats
        pages = self.pool.pages
        s.running = len(self.scheduler.running)
        s.waiting = len(self.scheduler.waiting)
        s.pool_pages_total = pages.num_pages
        s.pool_pages_kv = pages.num_used(KV)
        s.pool_pages_adapter = pages.num_used(ADAPTER)
        s.page_bytes = self.pool.layout.page_bytes(self.pool.data.dtype)
        s.adapters_registered = len(self.adapters)
        s.adapters_resident = self.adapters.num_resident()
        s.adapters_host = self.adapters.num_host()
        s.host_cache_bytes_used = self.adapters.host.used
        s.host_cache_bytes_total = self.adapters.host.capacity
        s.tiers = dataclasses.replace(self.adapters.stats)
        s.requests_finished = dict(self._finished)
        return s

    def generate(self, prompts: list[str | list[int]], params: SamplingParams,
                 adapters: list[str | None] | None = None) -> list[Sequence]:
        """Run prompts to completion synchronously (tests, benchmarks)."""
        names = adapters or [None] * len(prompts)
        seqs = [self.add_request(f"gen-{i}", p, params, a)
                for i, (p, a) in enumerate(zip(prompts, names, strict=True))]
        while self.has_work():
            self.step()
        return seqs
