"""Replays a trace against an in-process LLMEngine and records each request's timings."""

from __future__ import annotations

import cProfile
import io
import logging
import pstats
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from loraplane.engine.adapter_cache import Adapter
from loraplane.engine.bench.adapters import WeightSets
from loraplane.engine.bench.metrics import RequestRecord, StepRecord, decode_steps
from loraplane.engine.bench.workload import Request, prompt_ids
from loraplane.engine.distributed.engine import TensorParallelEngine
from loraplane.engine.engine import LLMEngine
from loraplane.engine.sampling_params import SamplingParams
from loraplane.engine.sequence import Sequence

WARMUP_INDEX = 1 << 30  # prompt seeds of warm-up requests, apart from the trace's

log = logging.getLogger(__name__)


@dataclass
class Replay:
    """What one replay recorded: per-request timings and a StepRecord per step."""

    records: list[RequestRecord]
    steps: list[StepRecord] = field(default_factory=list)
    preemptions: int = 0
    admission_held_steps: int = 0  # steps that kept waiting requests out of a free slot


def params_for(request: Request) -> SamplingParams:
    """Greedy, with the trace's output length forced (end-of-sequence ignored)."""
    return SamplingParams(max_tokens=request.output_len, temperature=0.0, ignore_eos=True)


def _sync(engine: LLMEngine) -> None:
    if engine.pool.data.device.type == "cuda":
        torch.cuda.synchronize(engine.pool.data.device)


def warm_up(engine: LLMEngine, sets: WeightSets | None, seed: int) -> None:
    """Run a short mixed batch (every rank, prefill and decode), then each rank alone, through
    adapters the trace does not use, then unregister them; and capture the decode graphs of
    every batch bucket and rank class. Kernel compiles and graph captures (an engine's start-up
    cost) are then not timed as serving, nor is the host tier's up-front pinning.

    Triton compiles a kernel per specialization of its integer arguments (a multiple of 16,
    equal to 1, other): the prompts have odd lengths as well as multiples of 16, and requests
    join while others decode, so eager steps that mix prefill and decode rows of any count
    compile here too (the record's `kernel_compiles` counts what was still missed)."""
    names: list[str | None] = [None]
    if sets is not None:
        for rank in sets.ranks:
            weights, label = sets.first(rank)
            engine.add_adapter(f"warmup-r{rank}", label, weights)
            names.append(f"warmup-r{rank}")
    vocab = engine.config.vocab_size

    def prompt(i: int, length: int) -> list[int]:
        return prompt_ids(Request(WARMUP_INDEX + i, 0.0, None, length, 8), vocab, seed)

    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine.generate([prompt(i, 48 + 16 * i) for i in range(len(names))], params, names)
    for i, name in enumerate(names):  # each rank's kernel variants, odd and even lengths
        for length in (48 + 16 * i, 37 + 16 * i):
            engine.generate([prompt(i, length)], params, [name])
        # A prefill step near the token budget: its shrink has enough tiles to run unsplit.
        n = max(1, engine.engine_config.max_num_batched_tokens // 320)
        engine.generate([prompt(i + 100 * j, 300) for j in range(n)], params, [name] * n)
    # Staggered arrivals: each request joins a step where the earlier ones decode.
    for i, name in enumerate(names * 2):
        engine.add_request(f"warmup-mixed-{i}", prompt(i, 21 + 7 * i), params, name)
        engine.step()
    while engine.has_work():
        engine.step()
    graphs = engine.runner.graphs
    if graphs is not None:
        if sets is None:
            graphs.capture_all()
        else:  # the trace's adapters all target the modules of the weight sets
            graphs.capture_all(max(sets.ranks), sets.modules)
    for name in names[1:]:
        assert name is not None
        engine.unload_adapter(name)
    if not engine.adapters.host.wait_allocated(timeout=300):
        log.warning("the host tier is still pinning its memory; the replay starts anyway")
    _sync(engine)


def profile_tables(prof: torch.profiler.profile) -> str:
    """A finished profile as two text tables: kernels by device time, host work by CPU time."""
    avg = prof.key_averages()
    device_key = "device_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return "\n\n".join([avg.table(sort_by=device_key, row_limit=45, max_name_column_width=70),
                        avg.table(sort_by="self_cpu_time_total", row_limit=30,
                                  max_name_column_width=70)])


def start_profiler() -> torch.profiler.profile:
    """A running torch.profiler over the host and, where there is one, the GPU."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=acts)
    prof.__enter__()
    return prof


class StepProfile:
    """torch.profiler over steps [first, first + count) of a replay: where a step's time goes
    (kernels by device time, host work by CPU time), written as text tables to `path`.
    A tensor-parallel engine's workers profile the same steps into `path`'s name with
    `-rankN` added (they run the same kernels, but their host work and waits differ).
    python: cProfile (rank 0's host thread only) instead: the Python functions by cumulative
    and own time."""

    def __init__(self, path: Path, first: int, count: int, engine: LLMEngine | None = None,
                 python: bool = False) -> None:
        self.path, self.first, self.count = path, first, count
        self._prof: torch.profiler.profile | cProfile.Profile | None = None
        self.python = python  # cProfile of the stepping thread's functions instead
        self._steps: list[StepRecord] = []
        self._workers = engine if isinstance(engine, TensorParallelEngine) else None

    def before(self, step: int) -> None:
        if step == self.first:
            if self.python:
                self._prof = cProfile.Profile()
                self._prof.enable()
                return
            if self._workers is not None:
                self._workers.profile_workers(str(self.path))
            self._prof = start_profiler()

    def after(self, step: int, record: StepRecord) -> None:
        if self._prof is None:
            return
        self._steps.append(record)
        if step == self.first + self.count - 1:
            self.finish()

    def finish(self) -> None:
        """Stop and write (also when the replay ends inside the window)."""
        prof, self._prof = self._prof, None
        if prof is None:
            return
        if isinstance(prof, cProfile.Profile):
            prof.disable()
            text = io.StringIO()
            for key in ("cumulative", "tottime"):
                pstats.Stats(prof, stream=text).sort_stats(key).print_stats(45)
            tables = text.getvalue()
        else:
            prof.__exit__(None, None, None)
            if self._workers is not None:
                self._workers.profile_workers(None)
            tables = profile_tables(prof)
        split = decode_steps(self._steps)  # the bench record's own split of step time
        head = (f"{len(self._steps)} steps from step {self.first}: {split.get('decode_steps', 0)} "
                f"pure decode ({split.get('decode_steps_s', 0.0)} s, other steps "
                f"{split.get('other_steps_s', '-')} s); rows {[st.rows for st in self._steps]}\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(head + tables)
        log.warning("profile of %d steps -> %s", len(self._steps), self.path)


def decode_lora_bytes(engine: LLMEngine, adapters: list[Adapter | None]) -> tuple[int, int]:
    """The distinct adapters of a decode step's rows and the bytes of their A and B weights in
    every layer (whole model, all ranks of a tensor-parallel engine together)."""
    config = engine.config
    size = engine.adapters.pool.data.element_size()
    used = {a for a in adapters if a is not None}
    total = sum(a.spec.elems_per_layer(config) for a in used) * config.num_layers * size
    return len(used), total


def replay(engine: LLMEngine, trace: list[Request], names: list[str], *, saturate: bool,
           seed: int, profile: StepProfile | None = None) -> Replay:
    """Add each request when its arrival time passes (all at once when saturate), step the
    engine until every request has finished, and record arrival, first token and finish;
    `profile` runs the profiler over a window of steps (its timings are then not the
    engine's own)."""
    vocab = engine.config.vocab_size
    prompts = [prompt_ids(r, vocab, seed) for r in trace]
    params = [params_for(r) for r in trace]
    seqs: list[Sequence | None] = [None] * len(trace)
    sched = engine.scheduler
    preempted_before, held_before = sched.num_preemptions, sched.num_held_steps
    steps: list[StepRecord] = []
    t0 = time.monotonic()
    records = [RequestRecord(t0 if saturate else t0 + r.arrival, r.input_len, r.output_len)
               for r in trace]
    bar = tqdm(total=len(trace), desc="replaying", unit="req")
    nxt = 0
    while nxt < len(trace) or engine.has_work():
        now = time.monotonic()
        while nxt < len(trace) and records[nxt].arrival <= now:
            r = trace[nxt]
            adapter = names[r.adapter] if r.adapter is not None else None
            seqs[nxt] = engine.add_request(str(r.index), prompts[nxt], params[nxt], adapter)
            nxt += 1
        if not engine.has_work():
            time.sleep(max(0.0, min(records[nxt].arrival - time.monotonic(), 0.05)))
            continue
        running, waiting = len(sched.running), len(sched.waiting)
        adapters = [seq.adapter for seq in sched.running]
        if profile is not None:
            profile.before(len(steps))
        start = time.monotonic()
        outputs = engine.step()
        end = time.monotonic()
        # A pure decode step: every running sequence sampled a token that was not its first,
        # and nothing was admitted or preempted.
        all_decode = (len(outputs) == running > 0 and len(sched.waiting) == waiting
                      and all(o.completion_tokens > 1 for o in outputs))
        used, lora_bytes = decode_lora_bytes(engine, adapters) if all_decode else (0, 0)
        steps.append(StepRecord(end - start, len(outputs), all_decode, used, lora_bytes))
        if profile is not None:
            profile.after(len(steps) - 1, steps[-1])
        for out in outputs:
            if out.finished:
                i = int(out.request_id)
                seq = seqs[i]
                assert seq is not None
                rec = records[i]
                rec.first_token = seq.first_token_time
                rec.finish = end
                rec.tokens = out.completion_tokens
                rec.refused = out.error is not None
                bar.update(1)
    bar.close()
    if profile is not None:
        profile.finish()
    return Replay(records, steps, sched.num_preemptions - preempted_before,
                  sched.num_held_steps - held_before)
