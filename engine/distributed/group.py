"""Process group of a tensor-parallel engine: start workers, connect ranks, watch for deaths.

Rank 0 is the engine process (HTTP server, scheduler, sampler); ranks 1..N-1 are worker
processes it starts on loopback. Model collectives use NCCL on CUDA (gloo on CPU); the per-step
control messages always travel over a separate gloo group of CPU tensors, whose long timeout lets
workers wait for an idle rank 0. Deaths are found by watching processes, not by timeouts: rank 0
polls its workers, and each worker polls its parent.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# A worker blocks on the control group while rank 0 has nothing to run: no timeout there.
CONTROL_TIMEOUT = timedelta(days=30)
# Model collectives: a rank stuck this long means the engine is broken.
COMPUTE_TIMEOUT = timedelta(seconds=float(os.environ.get("LORAPLANE_TP_TIMEOUT_S", "600")))
POLL_S = 0.2
EXIT_GRACE_S = 2.0


@dataclass(frozen=True)
class TPGroup:
    """This process's place in the tensor-parallel group."""

    rank: int
    world: int
    device: torch.device
    compute: dist.ProcessGroup  # NCCL on CUDA, gloo on CPU: the model's collectives
    control: dist.ProcessGroup  # gloo over CPU tensors: step inputs, adapter commands


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank p uses GPU base+p (base: the index asked for, 0 by default); CPU ranks share it."""
    if device.type != "cuda":
        return device
    index = (device.index or 0) + rank
    if index >= torch.cuda.device_count():
        raise ValueError(f"tensor-parallel rank {rank} needs cuda:{index}, but this machine "
                         f"has {torch.cuda.device_count()} GPUs")
    return torch.device("cuda", index)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_group(rank: int, world: int, port: int, device: torch.device) -> TPGroup:
    """Join the group on 127.0.0.1:port (every rank calls this)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=COMPUTE_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    compute = dist.group.WORLD
    assert control is not None and compute is not None
    return TPGroup(rank, world, device, compute, control)


def spawn_workers(world: int, port: int, options_json: str) -> list[subprocess.Popen[bytes]]:
    """Start ranks 1..world-1 as `python -m loraplane.engine.distributed.worker`."""
    procs = []
    for rank in range(1, world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "LORAPLANE_TP_PARENT": str(os.getpid()),
               # The repository's operator/ folder must not shadow the stdlib module.
               "PYTHONSAFEPATH": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "loraplane.engine.distributed.worker", options_json],
            env=env))
    return procs


def exit_process(reason: str) -> None:
    """Take the whole engine process down with exit code 1, after a short grace period in
    which requests in flight get their error (the engine thread's next collective fails).
    A hard exit: the process group is broken, and tearing it down may hang."""
    time.sleep(EXIT_GRACE_S)
    log.error("exiting: %s", reason)
    logging.shutdown()
    os._exit(1)


class WorkerMonitor:
    """Rank 0's watch over its workers: a thread that notices one exiting."""

    def __init__(self, procs: list[subprocess.Popen[bytes]],
                 on_death: Callable[[str], None]) -> None:
        self.procs = procs
        self.on_death = on_death
        self.failure: str | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tp-monitor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.wait(POLL_S):
            for rank, proc in enumerate(self.procs, start=1):
                code = proc.poll()
                if code is not None and not self._stopping.is_set():
                    self.failure = (f"tensor-parallel rank {rank} (pid {proc.pid}) exited with "
                                    f"code {code}")
                    log.error("%s: the engine cannot run without it", self.failure)
                    self.terminate()
                    self.on_death(self.failure)
                    return

    def terminate(self, timeout: float = 10.0) -> None:
        """Stop watching and end every worker still running (SIGTERM, then SIGKILL)."""
        self._stopping.set()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        self.stop(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Wait for workers that were told to exit; kill any that do not."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def watch_parent(parent: int) -> None:
    """In a worker: exit as soon as rank 0 (our parent) is gone, so no worker is orphaned."""
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                log.error("rank 0 (pid %d) is gone; this worker exits", parent)
                os._exit(1)
            time.sleep(POLL_S)
    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()
