"""The tensor-parallel engine: rank 0 schedules and samples, workers mirror its steps.

Every rank builds the same model, keeps its shard, and holds a pool with the same number of
pages and the same page ids (KV of a page on rank p holds rank p's heads; adapter pages hold
rank p's share of the adapter). Rank 0 runs the ordinary engine; just before each forward it
sends the step's inputs and the adapter pages workers must (re)write, and every rank then runs
the same forward, meeting in the model's collectives. Workers read adapters from the same path
themselves when rank 0 registers them.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import weakref
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from loraplane.engine.adapter_cache import Adapter
from loraplane.engine.adapter_format import WEIGHTS_FILE, fail
from loraplane.engine.adapter_source import AdapterSource
from loraplane.engine.adapters import LoraWeights
from loraplane.engine.attention import SeqSlice
from loraplane.engine.config import EngineConfig, ModelConfig
from loraplane.engine.cuda_graphs import GraphKey
from loraplane.engine.distributed import protocol
from loraplane.engine.distributed.group import (
    TPGroup,
    WorkerMonitor,
    exit_process,
    free_port,
    init_group,
    rank_device,
    spawn_workers,
)
from loraplane.engine.distributed.lora_op import TensorParallelLoraOp
from loraplane.engine.distributed.sharding import (
    check_shardable,
    local_config,
    local_layout,
    lora_inside_reduce,
    reduce_rows,
    shard_lora_weights,
    shard_model,
)
from loraplane.engine.engine import EngineParts, LLMEngine, resolve_device, resolve_dtype
from loraplane.engine.errors import EngineDeadError, EngineError
from loraplane.engine.lora.ops import LoraSegment
from loraplane.engine.memory_pool import PoolLayout
from loraplane.engine.models.llama import LlamaModel, build_model
from loraplane.engine.models.loader import LoadedModel, load_model
from loraplane.engine.outputs import AdapterInfo, RequestOutput

log = logging.getLogger(__name__)
DESTROY_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class TPOptions:
    """What every rank builds its engine from (sent to workers as JSON on their command line)."""

    model: str
    tensor_parallel_size: int
    device: str = "auto"
    dtype: str = "auto"
    name: str | None = None
    engine_config: EngineConfig = field(default_factory=EngineConfig)
    log_level: int = logging.INFO
    # LoRA through the Triton kernels (None: on CUDA only; True on CPU runs them in Triton's
    # interpreter when TRITON_INTERPRET=1, as the tests do to check the GPU path).
    lora_kernels: bool | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TPOptions:
        raw = json.loads(text)
        cfg = raw.pop("engine_config")
        cfg["adapter_roots"] = tuple(cfg["adapter_roots"])
        return cls(**raw, engine_config=EngineConfig(**cfg))


class TensorParallelEngine(LLMEngine):
    """An LLMEngine over this rank's shard; rank 0 serves, the others run `follow_rank0()`."""

    def __init__(self, parts: EngineParts, engine_config: EngineConfig, tp: TPGroup,
                 lora_kernels: bool | None = None) -> None:
        self.tp = tp
        self.monitor: WorkerMonitor | None = None
        # Rank 0: what workers hold. Adapter id -> the pages they last wrote it to.
        self._mirror: dict[int, list[int]] = {}
        self._live: weakref.WeakValueDictionary[int, Adapter] = weakref.WeakValueDictionary()
        self._dropped: deque[int] = deque()  # adapters gone on rank 0, to drop on the workers
        # Workers: rank 0's adapter id -> this rank's adapter; shards read per file version.
        self._by_id: dict[int, Adapter] = {}
        self._shards: weakref.WeakValueDictionary[tuple[str, int, int], LoraWeights] = \
            weakref.WeakValueDictionary()
        # Bytes of those shards in pinned memory, kept within the host cache's size: page-locked
        # memory is taken from the OS, so shards beyond it stay pageable (one blocking copy).
        self._pinned_bytes = 0
        # Workers, in benchmarks: where to write, and the running profiler (profile_workers).
        self._profiler: tuple[Path, torch.profiler.profile] | None = None
        # Decode steps replay CUDA graphs on every rank: rank 0 plans a step's graph and sends
        # its key; each rank captures a graph the first time its key comes up, all ranks at the
        # same step, so their captures meet in the same collectives.
        super().__init__(parts, engine_config,
                         lambda pool: TensorParallelLoraOp(pool, tp.rank, tp.world, tp.compute,
                                                           lora_kernels))
        lora_inside_reduce(self.model)
        graphs = self.runner.graphs
        if graphs is not None:
            # Padding rows of a graph write K/V into a scratch page: it must be the same page
            # on every rank, or a worker's padding would overwrite a page rank 0 gave to KV.
            slot = torch.tensor([graphs.scratch_slot, -graphs.scratch_slot], dtype=torch.int64)
            dist.all_reduce(slot, op=dist.ReduceOp.MAX, group=tp.control)
            if int(slot[0]) != -int(slot[1]):
                raise RuntimeError("tensor-parallel ranks disagree on the decode graphs' "
                                   "scratch page")
        if tp.rank == 0:
            self.runner.before_forward = self._send_step
            if graphs is not None:
                graphs.announce = self._send_capture

    # ---- both ---------------------------------------------------------------------------

    def _pool_layout(self, config: ModelConfig, block_size: int) -> PoolLayout:
        return local_layout(config, block_size, self.tp.world)

    def _pool_pages(self, layout: PoolLayout, dtype: torch.dtype, device: torch.device) -> int:
        # Every rank needs the same page ids: the smallest pool any rank can hold.
        pages = torch.tensor([super()._pool_pages(layout, dtype, device)], dtype=torch.int64)
        dist.all_reduce(pages, op=dist.ReduceOp.MIN, group=self.tp.control)
        return int(pages.item())

    # ---- rank 0 ---------------------------------------------------------------------------

    def add_adapter(self, name: str, path: str,
                    source: AdapterSource | LoraWeights) -> AdapterInfo:
        """Register rank 0's shard, then have every worker read and shard `path` itself.

        Under tensor parallelism rank 0 reads the weights at registration (to shard them) and
        keeps its shard as the adapter's in-memory source; the lazy source tier is TP=1's."""
        weights = source if isinstance(source, LoraWeights) else source.read(self.pool.data.dtype)
        info = super().add_adapter(name, path, shard_lora_weights(weights, 0, self.tp.world))
        adapter = self.adapters.get(name)
        self._live[adapter.id] = adapter
        # Workers drop their copy once rank 0's adapter object is gone (no request holds it).
        weakref.finalize(adapter, self._dropped.append, adapter.id)
        protocol.send(self.tp.control, protocol.REGISTER, [adapter.id],
                      protocol.encode_text(name, path))
        errors = protocol.gather_errors(self.tp.control, self.tp.world, None)
        bad = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
        if bad:
            self.adapters.remove(name)
            raise fail(name, "not loaded on every tensor-parallel rank (" + "; ".join(bad)
                       + "); with tensor parallelism an adapter must be a folder every rank "
                         "can read")
        return info

    def _send_capture(self, key: GraphKey) -> None:
        """Before rank 0 captures a graph ahead of use (warm-up): the workers capture it too."""
        protocol.send(self.tp.control, protocol.CAPTURE, list(key), [])

    def _send_step(self, ids: list[int], slices: list[SeqSlice], segments: list[LoraSegment],
                   graph: GraphKey | None) -> None:
        """Before rank 0's forward: the step's inputs and the adapter pages workers must write."""
        evictions = self._stale()
        loads = []
        for seg in segments:
            a = seg.adapter
            assert a.pages is not None
            if self._mirror.get(a.id) != a.pages:
                self._mirror[a.id] = list(a.pages)
                loads.append((a.id, list(a.pages)))
        msg = protocol.StepMessage(ids, slices, [(s.start, s.end, s.adapter.id) for s in segments],
                                   loads, evictions, self._take_dropped(), graph)
        protocol.send(self.tp.control, protocol.STEP, *protocol.encode_step(msg))

    def _stale(self) -> list[int]:
        """Forget, and return, the adapters evicted or moved since the workers wrote them (their
        pages may since hold KV or another adapter; a later use rewrites them)."""
        stale = []
        for adapter_id, pages in list(self._mirror.items()):
            a = self._live.get(adapter_id)
            if a is None or a.pages != pages:
                del self._mirror[adapter_id]
                if a is not None:  # a gone adapter is dropped instead
                    stale.append(adapter_id)
        return stale

    def _take_dropped(self) -> list[int]:
        out = []
        while self._dropped:
            out.append(self._dropped.popleft())
        return out

    def profile_workers(self, path: str | None) -> None:
        """Benchmarks: start torch.profiler on every worker (path: where rank 0 writes its own;
        worker N writes `path` with `-rankN` before the suffix), or stop and write (None)."""
        protocol.send(self.tp.control, protocol.PROFILE, [],
                      protocol.encode_text(path) if path is not None else [])

    def step(self) -> list[RequestOutput]:
        try:
            return super().step()
        except RuntimeError as e:  # a collective failed: a rank is gone or stuck
            failure = self.monitor.failure if self.monitor is not None else None
            raise EngineDeadError(f"tensor parallelism failed: {failure or e}") from e

    def report(self) -> list[list[list[int]]]:
        """Per rank, [adapter id, first page or -1, pages] of each adapter it holds (tests).

        Rank 0's row shows where workers must have each adapter now: in its pages when it is
        resident and they have written it there, nowhere otherwise."""
        msg = protocol.StepMessage([], [], [], [], self._stale(), self._take_dropped())
        protocol.send(self.tp.control, protocol.STEP, *protocol.encode_step(msg))
        protocol.send(self.tp.control, protocol.REPORT, [], [])
        rows = [[i, *self._row(self._mirror.get(i))] for i in sorted(self._live)]
        return protocol.gather_rows(self.tp.control, self.tp.world, rows, 3)

    @staticmethod
    def _row(pages: list[int] | None) -> list[int]:
        return [pages[0], len(pages)] if pages else [-1, 0]

    @property
    def failure(self) -> str | None:
        """Why the engine stopped (a dead rank), or None."""
        return self.monitor.failure if self.monitor is not None else None

    def close(self) -> None:
        """Tell workers to exit, wait for them, and leave the process group."""
        if self.monitor is not None and self.monitor.failure is not None:
            return  # workers already ended; a broken group may hang when torn down
        if self.monitor is not None:
            try:
                protocol.send(self.tp.control, protocol.SHUTDOWN, [], [])
            except RuntimeError:
                log.warning("could not reach the workers to shut them down; ending them")
                self.monitor.terminate()
            self.monitor.stop()
        self.leave_group()

    def leave_group(self) -> None:
        """Free the decode graphs, then leave the process group (every rank, at the end).

        Captured graphs hold NCCL work of the group's communicator: tearing it down while they
        live hung on the H200s. The teardown gets DESTROY_TIMEOUT_S; past that the process
        exit cleans up instead of the caller waiting forever."""
        if self.runner.graphs is not None:
            self.runner.graphs = None
            gc.collect()
            if self.tp.device.type == "cuda":
                torch.cuda.synchronize(self.tp.device)
        if not dist.is_initialized():
            return
        done = threading.Thread(target=dist.destroy_process_group, name="tp-leave", daemon=True)
        done.start()
        done.join(DESTROY_TIMEOUT_S)
        if done.is_alive():
            log.warning("the tensor-parallel process group did not shut down within %.0f s; "
                        "leaving it to the process exit", DESTROY_TIMEOUT_S)

    # ---- workers ----------------------------------------------------------------------------

    def follow_rank0(self) -> None:
        """A worker's loop: run rank 0's commands until it says shut down."""
        while True:
            kind, fields, payload = protocol.receive(self.tp.control)
            if kind == protocol.STEP:
                self._run_step(protocol.decode_step(fields, payload))
            elif kind == protocol.REGISTER:
                name, path = protocol.decode_text(payload, 2)
                protocol.gather_errors(self.tp.control, self.tp.world,
                                       self._register(fields[0], name, path))
            elif kind == protocol.CAPTURE:
                assert self.runner.graphs is not None, "rank 0 captures graphs this rank lacks"
                with torch.inference_mode():
                    self.runner.graphs.graph((fields[0], fields[1], fields[2]))
            elif kind == protocol.REPORT:
                rows = [[i, *self._row(a.pages)] for i, a in sorted(self._by_id.items())]
                protocol.gather_rows(self.tp.control, self.tp.world, rows, 3)
            elif kind == protocol.PROFILE:
                self._profile(protocol.decode_text(payload, 1)[0] if payload else None)
            elif kind == protocol.SHUTDOWN:
                log.info("rank 0 asked this worker to exit")
                return
            else:
                raise RuntimeError(f"unknown message kind {kind} from rank 0")

    def _profile(self, path: str | None) -> None:
        """Start profiling this worker's steps, or stop and write the tables next to rank 0's."""
        from loraplane.engine.bench.driver import profile_tables, start_profiler  # benchmarks
        if path is not None:
            p = Path(path)
            self._profiler = (p.with_name(f"{p.stem}-rank{self.tp.rank}{p.suffix}"),
                              start_profiler())
            return
        if self._profiler is None:
            return
        out, prof = self._profiler
        self._profiler = None
        if self.tp.device.type == "cuda":
            torch.cuda.synchronize(self.tp.device)
        prof.__exit__(None, None, None)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"tensor-parallel rank {self.tp.rank}, the steps of rank 0's profile\n"
                       + profile_tables(prof))
        log.warning("profile of rank %d -> %s", self.tp.rank, out)

    def _register(self, adapter_id: int, name: str, path: str) -> str | None:
        """Read and shard the adapter; the error text when that fails."""
        try:
            weights = self._read_shard(name, path)
            self._by_id[adapter_id] = self.adapters.add(f"tp-{adapter_id}", path, weights)
        except EngineError as e:
            log.error("%s", e.message)
            return e.message
        except Exception as e:  # noqa: BLE001 - reported to rank 0, which refuses the adapter
            log.exception("adapter %s", name)
            return f"{type(e).__name__}: {e}"
        return None

    def _read_shard(self, name: str, path: str) -> LoraWeights:
        # Many registered adapters may share a folder (benchmarks): read each version once.
        st = (Path(path) / WEIGHTS_FILE).stat() if Path(path).is_dir() else None
        key = (str(Path(path).resolve()), st.st_mtime_ns if st else 0, st.st_size if st else 0)
        shard = self._shards.get(key)
        if shard is None:
            full = self.read_adapter(name, path).read(self.pool.data.dtype)
            shard = shard_lora_weights(full, self.tp.rank, self.tp.world)
            # Packed (pinned on CUDA) once here, so placing it in a step is one asynchronous
            # copy: rank 0 loads on a side stream, and a worker that concatenated and copied
            # synchronously in the step made rank 0 wait for it in the first collective.
            size = shard.num_bytes
            pin = (self.pool.data.device.type == "cuda"
                   and self._pinned_bytes + size <= self.engine_config.host_cache_bytes)
            shard = shard.packed(self.config, pin=pin)
            if pin:
                self._pinned_bytes += size
                weakref.finalize(shard, self._unpinned, size)
            self._shards[key] = shard
        return shard

    def _unpinned(self, size: int) -> None:
        self._pinned_bytes -= size

    def _drop(self, adapter_id: int) -> None:
        adapter = self._by_id.pop(adapter_id, None)
        if adapter is not None:
            adapter.pages = None  # written by _place, not taken from this rank's allocator
            self.adapters.remove(adapter.name)

    def _place(self, adapter_id: int, pages: list[int]) -> None:
        """Write this rank's shard of an adapter into the pages rank 0 gave it."""
        adapter = self._by_id[adapter_id]
        # Workers register packed shards as in-memory sources: reading one is a no-op, and
        # flatten returns the packed (pinned) buffer, copied on the compute stream ahead of
        # the step's kernels without blocking the host.
        weights = adapter.source.read(self.pool.data.dtype)
        self.pool.write_pages(pages, weights.flatten(self.config))
        adapter.pages = pages  # the kernels read page tables only

    @torch.inference_mode()
    def _run_step(self, msg: protocol.StepMessage) -> None:
        for adapter_id in msg.evictions:
            self._by_id[adapter_id].pages = None
        for adapter_id in msg.drops:
            self._drop(adapter_id)
        for adapter_id, pages in msg.loads:
            self._place(adapter_id, pages)
        if not msg.ids:
            return
        runner = self.runner
        segments = [LoraSegment(start, end, self._by_id[i]) for start, end, i in msg.segments]
        if msg.graph is not None:
            assert runner.graphs is not None, "rank 0 replays graphs this rank lacks"
            runner.graphs.run_rows(msg.graph, msg.ids, [s.context_len - 1 for s in msg.slices],
                                   [s.block_table for s in msg.slices], segments)
            return
        runner.forward_rows(msg.ids, msg.slices, segments)


def _build_shard(loaded: LoadedModel, max_positions: int, dtype: torch.dtype, tp: TPGroup,
                 seed: int) -> LlamaModel:
    """This rank's model: the whole model built, then sharded and the rest freed; random
    weights too big for one device are drawn per rank at shard shapes instead."""
    config, dev = loaded.config, tp.device
    if (loaded.weights is None and dev.type == "cuda"
            and config.num_parameters * dtype.itemsize > 0.5 * torch.cuda.mem_get_info(dev)[0]):
        log.info("random weights: rank %d draws its own shards (a whole copy would not fit)",
                 tp.rank)
        model = build_model(local_config(config, tp.world), None, max_positions, dtype, dev,
                            seed=seed + tp.rank)
        reduce_rows(model, tp.compute)
        return model
    model = build_model(config, loaded.weights, max_positions, dtype, dev, seed=seed)
    shard_model(model, tp.rank, tp.world, tp.compute)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return model


def build_rank(opts: TPOptions, rank: int, port: int,
               loaded: LoadedModel | None = None) -> TensorParallelEngine:
    """Join the group and build this rank's engine (every rank runs this)."""
    cfg = opts.engine_config
    dev = rank_device(resolve_device(opts.device), rank)
    dtype = resolve_dtype(opts.dtype, dev)
    if loaded is None:
        loaded = load_model(opts.model)
    check_shardable(loaded.config, opts.tensor_parallel_size)
    tp = init_group(rank, opts.tensor_parallel_size, port, dev)
    max_pos = min(loaded.config.max_position_embeddings, cfg.max_model_len or 1 << 30)
    model = _build_shard(loaded, max_pos, dtype, tp, cfg.seed)
    loaded.weights = None
    parts = EngineParts(model, loaded.config, loaded.tokenizer, opts.name or loaded.config.name)
    return TensorParallelEngine(parts, cfg, tp, opts.lora_kernels)


def start_tensor_parallel(opts: TPOptions, *, exit_on_failure: bool) -> TensorParallelEngine:
    """Rank 0: start the workers and build the engine.

    exit_on_failure: a worker's death ends this process (servers, benchmarks); otherwise the
    engine's next step raises EngineDeadError (in-process use, tests).
    """
    world = opts.tensor_parallel_size
    if world < 2:
        raise ValueError("tensor parallelism needs a size of at least 2")
    if dist.is_initialized():
        raise RuntimeError("this process already runs a tensor-parallel engine; close it first")
    rank_device(resolve_device(opts.device), world - 1)  # enough GPUs?
    # A bad spec or a size that does not divide the model fails here, before any worker runs.
    loaded = load_model(opts.model)
    check_shardable(loaded.config, world)
    port = free_port()
    procs = spawn_workers(world, port, opts.to_json())
    monitor = WorkerMonitor(procs, exit_process if exit_on_failure else lambda reason: None)
    try:
        engine = build_rank(opts, 0, port, loaded)
    except BaseException:
        monitor.terminate()
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    engine.monitor = monitor
    log.info("tensor parallel over %d ranks (workers: pids %s)", world,
             ", ".join(str(p.pid) for p in procs))
    return engine


def build_engine(model: str, *, tensor_parallel_size: int = 1, device: str = "auto",
                 dtype: str = "auto", engine_config: EngineConfig | None = None,
                 name: str | None = None, exit_on_failure: bool = True) -> LLMEngine:
    """An engine on one device (size 1: LLMEngine.from_spec) or over N tensor-parallel ranks."""
    cfg = engine_config or EngineConfig()
    if tensor_parallel_size == 1:
        return LLMEngine.from_spec(model, device=device, dtype=dtype, engine_config=cfg,
                                   name=name)
    opts = TPOptions(model, tensor_parallel_size, device, dtype, name, cfg,
                     logging.getLogger().getEffectiveLevel())
    return start_tensor_parallel(opts, exit_on_failure=exit_on_failure)


def close_engine(engine: LLMEngine) -> None:
    """Stop a tensor-parallel engine's workers (nothing to do for a single-device engine)."""
    if isinstance(engine, TensorParallelEngine):
        engine.close()
