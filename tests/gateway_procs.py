"""Real processes for the gateway's tests: redis-server, tiny engines, gateways, on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from loraplane.engine.config import NAMED_SHAPES
from tests.reference import write_lora_folder

TINY = NAMED_SHAPES["tiny"]
ADMIN_TOKEN = "test-admin-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process with a log file; ``stop`` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None):
        self.name, self.log = name, log
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        with log.open("w") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                          env=self.env)

    def wait_until(self, ready: Callable[[], bool], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.popen.poll() is None, f"{self.name} exited:\n{self.log.read_text()}"
            try:
                if ready():
                    return
            except (httpx.HTTPError, OSError):
                pass
            assert time.monotonic() < deadline, f"{self.name} not ready:\n{self.log.read_text()}"
            time.sleep(0.2)

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def _http_ok(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=2).status_code == 200


def start_redis(folder: Path) -> tuple[Proc, str]:
    """A throwaway redis-server (no persistence) and its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    port = free_port()
    proc = Proc("redis-server", [binary, "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no", "--dir", str(folder)],
                folder / "redis.log")

    def pong() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    proc.wait_until(pong, 30)
    return proc, f"redis://127.0.0.1:{port}/0"


def start_engine(folder: Path, name: str, extra: list[str] | None = None) -> tuple[Proc, str]:
    """A `loraplane engine` with the tiny random model on CPU, with ``extra`` flags (call
    ``wait_engine`` after)."""
    port = free_port()
    proc = Proc(name, [sys.executable, "-m", "loraplane.cli", "engine", "--model", "random:tiny",
                       "--port", str(port), "--device", "cpu", "--pool-memory", "0.05",
                       "--served-model-name", "tiny", "--log-level", "warning", *(extra or [])],
                folder / f"{name}.log")
    return proc, f"http://127.0.0.1:{port}"


def wait_engine(proc: Proc, url: str) -> None:
    proc.wait_until(_http_ok(url + "/health"), 180)


def start_gateway(folder: Path, name: str, redis_url: str, engines: list[str],
                  poll_interval_s: float = 0.5, extra: list[str] | None = None,
                  env: dict[str, str] | None = None) -> tuple[Proc, str]:
    """A `loraplane gateway` over ``engines`` (polling them twice a second by default), with
    ``extra`` flags and ``env`` (e.g. Kubernetes discovery)."""
    port = free_port()
    token_file = folder / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    argv = [sys.executable, "-m", "loraplane.cli", "gateway", "--redis-url", redis_url,
            "--port", str(port), "--admin-token-file", str(token_file), "--log-level", "info"]
    for e in engines:
        argv += ["--engine", e]
    proc = Proc(name, argv + (extra or []), folder / f"{name}.log",
                env={"LORAPLANE_GATEWAY_POLL_INTERVAL_S": str(poll_interval_s), **(env or {})})
    url = f"http://127.0.0.1:{port}"
    proc.wait_until(_http_ok(url + "/health"), 60)
    return proc, url


def load_adapter(engine_url: str, name: str, folder: Path, seed: int) -> None:
    """Write a tiny PEFT adapter and load it into an engine under ``name``."""
    path = write_lora_folder(folder / name.replace("/", "__"), TINY, 4, ("q_proj", "v_proj"),
                             seed=seed)
    r = httpx.post(engine_url + "/v1/load_lora_adapter",
                   json={"lora_name": name, "lora_path": str(path)}, timeout=60)
    assert r.status_code == 200, r.text


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus sample over series whose labels include ``labels``."""
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        if series.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total
