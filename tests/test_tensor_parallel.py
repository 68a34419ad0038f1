"""Tensor parallelism on CPU with gloo: the sharding math, TP=2 against TP=1 with mixed adapters,
adapters on every rank, and real `loraplane engine --tensor-parallel-size 2` processes."""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from torch import nn

from loraplane.engine.adapters import LoraWeights, random_lora_weights, write_random_adapter
from loraplane.engine.config import LORA_MODULES, NAMED_SHAPES
from loraplane.engine.distributed.engine import TensorParallelEngine, build_engine
from loraplane.engine.distributed.sharding import (
    ROW_PARALLEL,
    check_shardable,
    padded_rank,
    shard_lora_weights,
    slice_linear,
)
from loraplane.engine.engine import LLMEngine
from loraplane.engine.errors import InvalidAdapterError
from loraplane.engine.sampling_params import SamplingParams
from tests.gateway_procs import Proc, free_port
from tests.tp_support import ADAPTERS, CFG, drive

TINY = NAMED_SHAPES["tiny"]


# ---- the sharding math (no processes) -----------------------------------------------------

def _random_weights(rank: int, modules: tuple[str, ...], seed: int) -> LoraWeights:
    return random_lora_weights(TINY, rank, modules, seed=seed, alpha=2.0 * rank, scale=2.0)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("rank", [1, 2, 5, 8, 16])
def test_strided_split_reassembles(world: int, rank: int) -> None:
    w = _random_weights(rank, LORA_MODULES, seed=rank)
    shards = [shard_lora_weights(w, p, world) for p in range(world)]
    rp = padded_rank(rank, world)
    for m in LORA_MODULES:
        if m in ROW_PARALLEL:
            a = torch.cat([s.a[m] for s in shards], dim=2)  # input columns side by side
        else:
            a = torch.stack([s.a[m] for s in shards], dim=2).reshape(TINY.num_layers, rp, -1)
        bt = torch.cat([s.bt[m] for s in shards], dim=2)
        assert torch.equal(a[:, :rank], w.a[m]) and not a[:, rank:].any()
        assert torch.equal(bt[:, :rank], w.bt[m]) and not bt[:, rank:].any()
        assert all(s.rank == rank for s in shards)


def _shrink(x: torch.Tensor, a: torch.Tensor, width: int) -> torch.Tensor:
    """What the shrink kernel writes: x · A^T in the first columns, zeros up to `width`."""
    out = torch.zeros(x.shape[0], width, dtype=torch.float64)
    out[:, :a.shape[0]] = x @ a.t()
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_partition_with_mixed_ranks_equals_unsharded(world: int) -> None:
    """Rows of adapters of ranks 2, 5 and 16 in one batch: the sharded shrink, gather / reduce
    and expand give each row exactly its own adapter's x·A^T·B^T."""
    weights = {r: _random_weights(r, LORA_MODULES, seed=100 + r) for r in (2, 5, 16)}
    rows = [2, 2, 5, 16, 16, 16]  # the adapter rank of each batch row
    gen = torch.Generator().manual_seed(0)
    for m in LORA_MODULES:
        fan_in, fan_out = TINY.module_shape(m)
        x = torch.randn(len(rows), fan_in, generator=gen, dtype=torch.float64)
        want = torch.stack([x[i] @ weights[r].a[m][0].double().t() @ weights[r].bt[m][0].double()
                            for i, r in enumerate(rows)])
        shards = {r: [shard_lora_weights(w, p, world) for p in range(world)]
                  for r, w in weights.items()}
        widest = max(padded_rank(r, world) for r in rows)
        outs = []
        if m in ROW_PARALLEL:
            n_in = fan_in // world
            partial = [torch.stack([_shrink(x[i:i + 1, p * n_in:(p + 1) * n_in],
                                            shards[r][p].a[m][0].double(), widest)[0]
                                    for i, r in enumerate(rows)]) for p in range(world)]
            s = sum(partial)  # the all-reduce, [T, R]
            assert isinstance(s, torch.Tensor)
            for p in range(world):  # rank p's output columns
                outs.append(torch.stack([s[i, :padded_rank(r, world)]
                                         @ shards[r][p].bt[m][0].double()
                                         for i, r in enumerate(rows)]))
        else:
            local = [torch.stack([_shrink(x[i:i + 1], shards[r][p].a[m][0].double(),
                                          widest // world)[0] for i, r in enumerate(rows)])
                     for p in range(world)]  # [T, R'] per rank
            s_full = torch.stack(local, dim=-1).reshape(len(rows), -1)  # the all-gather
            for p in range(world):
                outs.append(torch.stack([s_full[i, :padded_rank(r, world)]
                                         @ shards[r][p].bt[m][0].double()
                                         for i, r in enumerate(rows)]))
        torch.testing.assert_close(torch.cat(outs, dim=1), want)


def test_sharded_projections_equal_the_whole() -> None:
    full = nn.Linear(64, 96, bias=False)
    x = torch.randn(5, 64)
    cols = [slice_linear(full, 0, p, 4) for p in range(4)]
    torch.testing.assert_close(torch.cat([c(x) for c in cols], dim=1), full(x))
    rows = [slice_linear(full, 1, p, 4) for p in range(4)]
    partial = sum(r(x[:, p * 16:(p + 1) * 16]) for p, r in enumerate(rows))
    torch.testing.assert_close(partial, full(x))


def test_unshardable_sizes_are_clear_errors() -> None:
    check_shardable(TINY, 2)
    with pytest.raises(ValueError, match="KV heads"):
        check_shardable(TINY, 4)  # tiny has 2 KV heads
    with pytest.raises(ValueError, match="KV heads"):  # refused before any worker starts
        build_engine("random:tiny", tensor_parallel_size=4, device="cpu")


# ---- TP=2 in this process against TP=1 -----------------------------------------------------

@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tp-adapters")
    for i, (name, rank, modules) in enumerate(ADAPTERS):
        write_random_adapter(root / name, TINY, rank, modules, seed=10 + i)
    return root


@pytest.fixture(scope="module")
def tp_engine(adapter_dir: Path) -> Iterator[TensorParallelEngine]:
    engine = build_engine("random:tiny", tensor_parallel_size=2, device="cpu", dtype="float32",
                          engine_config=CFG, exit_on_failure=False)
    assert isinstance(engine, TensorParallelEngine)
    try:
        yield engine
    finally:
        engine.close()


def test_tp2_greedy_tokens_equal_tp1(tp_engine: TensorParallelEngine, adapter_dir: Path) -> None:
    single = LLMEngine.from_spec("random:tiny", device="cpu", dtype="float32", engine_config=CFG)
    want = drive(single, adapter_dir)
    got = drive(tp_engine, adapter_dir)
    assert got == want
    assert len({tuple(t) for t in want}) > 3  # the adapters make a difference


def test_workers_profile_the_steps_rank0_asks_for(tp_engine: TensorParallelEngine,
                                                   tmp_path: Path) -> None:
    """A PROFILE command starts torch.profiler on every worker; the next one writes its tables
    next to rank 0's path, named -rank1 (benchmarks' --profile-steps)."""
    path = tmp_path / "profile-x.txt"
    tp_engine.profile_workers(str(path))
    tp_engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0.0,
                                                   ignore_eos=True))
    tp_engine.profile_workers(None)
    tp_engine.report()  # a round trip: the worker has handled the command before it answers
    text = (tmp_path / "profile-x-rank1.txt").read_text()
    assert text.startswith("tensor-parallel rank 1") and "Self CPU" in text


def test_adapters_load_and_unload_on_every_rank(tp_engine: TensorParallelEngine,
                                                adapter_dir: Path, tmp_path: Path) -> None:
    path = write_random_adapter(tmp_path / "late", TINY, 3, ("v_proj", "o_proj"), seed=5)
    tp_engine.load_adapter("late", str(path))
    late = tp_engine.adapters.get("late").id
    ranks = tp_engine.report()
    assert ranks[0] == ranks[1] and late in [row[0] for row in ranks[1]]
    tp_engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=3, temperature=0.0), ["late"])
    ranks = tp_engine.report()
    assert ranks[0] == ranks[1]  # the same pages on both ranks
    assert [row for row in ranks[1] if row[0] == late][0][1] >= 0  # resident
    tp_engine.unload_adapter("late")
    gc.collect()
    ranks = tp_engine.report()
    assert ranks[0] == ranks[1] and late not in [row[0] for row in ranks[1]]
    # A folder the workers cannot read: refused everywhere, registered nowhere.
    weights = tp_engine.read_adapter("bad", str(path))
    with pytest.raises(InvalidAdapterError, match="rank 1"):
        tp_engine.add_adapter("bad", str(tmp_path / "missing"), weights)
    assert "bad" not in tp_engine.adapters
    gc.collect()
    assert tp_engine.report()[0] == tp_engine.report()[1]


# ---- real processes ----------------------------------------------------------------------

def _workers_of(pid: int) -> list[int]:
    """Pids of the tensor-parallel workers whose parent is `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"distributed.worker" in cmd:
            out.append(int(entry.name))
    return out


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _start_engine(adapter_dir: Path, log: Path) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc("tp-engine", [sys.executable, "-m", "loraplane.cli", "engine",
                              "--tensor-parallel-size", "2", "--model", "random:tiny",
                              "--device", "cpu", "--dtype", "float32", "--pool-memory", "0.01",
                              "--adapters", str(adapter_dir), "--port", str(port)],
                log, env={"PYTHONSAFEPATH": "1"})
    url = f"http://127.0.0.1:{port}"
    proc.wait_until(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, 180)
    return proc, url


def test_engine_process_serves_adapters_and_exits_when_a_worker_dies(
        adapter_dir: Path, tmp_path: Path) -> None:
    proc, url = _start_engine(adapter_dir, tmp_path / "engine.log")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                               timeout=120)
        assert {"r2", "r5", "r8", "r16"} <= {m.id for m in client.models.list().data}
        with_adapter = client.completions.create(model="r5", prompt="Hello there", max_tokens=8,
                                                 temperature=0)
        base = client.completions.create(model="tiny", prompt="Hello there", max_tokens=8,
                                         temperature=0)
        assert with_adapter.choices[0].finish_reason == "length"
        assert with_adapter.choices[0].text != base.choices[0].text
        # Loaded and unloaded over HTTP while serving: every rank reads the folder.
        late = write_random_adapter(tmp_path / "late", TINY, 3, ("q_proj", "down_proj"), seed=9)
        r = httpx.post(url + "/v1/load_lora_adapter",
                       json={"lora_name": "late", "lora_path": str(late)}, timeout=60)
        assert r.status_code == 200, r.text
        out = client.completions.create(model="late", prompt="Hello there", max_tokens=8,
                                        temperature=0)
        assert out.choices[0].finish_reason == "length"
        assert out.usage is not None and out.usage.completion_tokens == 8
        r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "late"}, timeout=60)
        assert r.status_code == 200, r.text

        # A long request in flight when rank 1 dies must end (error or cut short), not hang.
        ended = threading.Event()
        outcome: list[str] = []

        def long_request() -> None:
            try:
                r = client.completions.create(model="r16", prompt="Count", max_tokens=900,
                                              temperature=0, extra_body={"ignore_eos": True})
                outcome.append(f"finish_reason {r.choices[0].finish_reason}")
            except openai.OpenAIError as e:
                outcome.append(f"{type(e).__name__}: {e}")
            ended.set()
        threading.Thread(target=long_request, daemon=True).start()
        time.sleep(1.0)
        (worker,) = _workers_of(proc.popen.pid)
        os.kill(worker, signal.SIGKILL)
        code = proc.popen.wait(120)
        assert code == 1
        assert ended.wait(60)
        assert outcome and outcome[0] != "finish_reason length", outcome
        assert "tensor-parallel rank 1" in proc.log.read_text()
    finally:
        proc.stop()


def test_workers_exit_when_rank0_dies(adapter_dir: Path, tmp_path: Path) -> None:
    proc, _ = _start_engine(adapter_dir, tmp_path / "engine.log")
    try:
        (worker,) = _workers_of(proc.popen.pid)
        proc.kill()
        deadline = time.monotonic() + 60
        while not _gone(worker):
            assert time.monotonic() < deadline, "the worker outlived rank 0"
            time.sleep(0.2)
    finally:
        proc.stop()


@pytest.mark.parametrize("graph", [None, (16, 32, 0b1001)])
def test_step_message_round_trip(graph: tuple[int, int, int] | None) -> None:
    """Rank 0's step message, graph key included, decodes to what was sent."""
    from loraplane.engine.attention import SeqSlice
    from loraplane.engine.distributed import protocol

    msg = protocol.StepMessage([5, 6, 7], [SeqSlice(0, 2, 9, [3, 4, 8]), SeqSlice(2, 1, 4, [1])],
                               [(0, 2, 11), (2, 3, 12)], [(11, [20, 21])], [13], [14, 15], graph)
    fields, payload = protocol.encode_step(msg)
    assert len(fields) + 2 <= protocol.HEADER
    assert protocol.decode_step(fields, payload) == msg
