"""Real processes for the operator and node-agent tests: S3 (moto server), the Kubernetes
emulator, engines, node agents, the operator, redis-server; plus adapters to put in S3."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import httpx
import yaml

from loraplane.gateway.schemas import Adapter

ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = ROOT / "manifests" / "crd-loraadapter.yaml"
PEERING_FILE = ROOT / "manifests" / "peering.yaml"
API = "/apis/loraplane.io/v1alpha1"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll check() until it returns something truthy; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, OSError, KeyError, ValueError) as e:
            last = e
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


class Proc:
    """A child process with its output in a log file, stopped by pid."""

    started: list[Proc] = []  # every process started, so fixtures stop restarted ones too

    def __init__(self, name: str, argv: list[str], log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log = log_dir / f"{name}.log"
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **S3_KEYS, **(env or {})}
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                          env=self.env, cwd=ROOT, start_new_session=True)
        Proc.started.append(self)
        return self

    @classmethod
    def stop_since(cls, mark: int) -> None:
        """Stop every process started after len(Proc.started) was mark, newest first."""
        for proc in reversed(cls.started[mark:]):
            proc.stop()
        del cls.started[mark:]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(sig)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def wait_http(url: str, proc: Proc, timeout: float = 60) -> None:
    def up() -> bool:
        if proc.popen is not None and proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited:\n{proc.tail()}")
        return httpx.get(url, timeout=2).status_code < 500

    wait_for(up, timeout, f"{proc.name} at {url}", every=0.2)


# ---- the processes ------------------------------------------------------------------------

def start_s3(log_dir: Path, port: int | None = None) -> tuple[Proc, str]:
    port = port or free_port()
    proc = Proc("s3", [sys.executable, "-m", "moto.server", "-p", str(port), "-H", "127.0.0.1"],
                log_dir).start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/moto-api/", proc)
    return proc, url


def start_emulator(log_dir: Path) -> tuple[Proc, str, Path]:
    port_file = log_dir / "emulator.port"
    kubecfg = log_dir / "kubeconfig"
    port_file.unlink(missing_ok=True)
    # By path, not `-m tests.kube_emulator`: under PYTHONSAFEPATH=1 (the Makefile's) the current
    # folder is off sys.path, and the emulator imports nothing from tests/.
    proc = Proc("emulator", [sys.executable, str(ROOT / "tests" / "kube_emulator.py"),
                             "--crd", str(CRD_FILE), "--crd", str(PEERING_FILE),
                             "--port-file", str(port_file), "--kubeconfig", str(kubecfg)],
                log_dir).start()
    port = wait_for(lambda: port_file.exists() and port_file.read_text(), 30, "the emulator")
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/version", proc)
    return proc, url, kubecfg


def start_engine(log_dir: Path, cache_dir: Path, name: str = "engine") -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(name, [sys.executable, "-m", "loraplane.cli", "engine", "--model", "random:tiny",
                       "--device", "cpu", "--port", str(port), "--pool-memory", "0.05",
                       "--allowed-adapter-dir", str(cache_dir), "--log-level", "warning"],
                log_dir).start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc, timeout=90)
    return proc, url


def start_agent(log_dir: Path, cache_dir: Path, engines: list[str], node: str = "node-a",
                port: int | None = None, capacity: str = "64MiB",
                extra: list[str] | None = None) -> tuple[Proc, str]:
    port = port or free_port()
    argv = [sys.executable, "-m", "loraplane.cli", "node-agent", "--cache-dir", str(cache_dir),
            "--port", str(port), "--host", "127.0.0.1", "--node-name", node,
            "--capacity", capacity, "--resync-interval", "1"]
    for e in engines:
        argv += ["--engine", e]
    proc = Proc(f"agent-{node}", argv + (extra or []), log_dir).start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", proc)
    return proc, url


def start_operator(log_dir: Path, kubecfg: Path, agents: list[str], redis_url: str | None = None,
                   name: str = "operator", peering: str | None = None, priority: int = 0,
                   recheck_interval: float = 1.0) -> Proc:
    """Standalone, or a replica in Kopf peering `peering` (keep-alives expire after 3 s).

    Tests re-check Ready adapters every second; the benchmark uses the production default.
    """
    replica = (["--peering", peering, "--priority", str(priority), "--peering-lifetime", "3"]
               if peering else ["--standalone"])
    argv = [sys.executable, "-m", "loraplane.cli", "operator", "--base-model", "tiny",
            *replica, "--liveness", f"http://127.0.0.1:{free_port()}/healthz",
            "--retry-base", "0.5", "--retry-cap", "4",
            "--recheck-interval", str(recheck_interval)]
    for a in agents:
        argv += ["--agent", a]
    if redis_url:
        argv += ["--redis-url", redis_url]
    return Proc(name, argv, log_dir, env={"KUBECONFIG": str(kubecfg)}).start()


def start_redis(log_dir: Path) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no"], log_dir).start()

    def up() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    wait_for(up, 20, "redis-server")
    return proc, f"redis://127.0.0.1:{port}/0"


class TcpGate:
    """A loopback TCP forwarder that can be shut and reopened on the same port: "S3 is down"
    without losing moto's in-memory objects. hold(request bytes) -> seconds delays requests."""

    def __init__(self, target_port: int, hold: Callable[[bytes], float] | None = None) -> None:
        self.target_port = target_port
        self.hold = hold
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()
            self._conns.clear()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b, hold in ((client, upstream, self.hold), (upstream, client, None)):
                threading.Thread(target=self._pump, args=(a, b, hold), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket,
              hold: Callable[[bytes], float] | None) -> None:
        try:
            while data := src.recv(65536):
                if hold is not None:
                    time.sleep(hold(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


# ---- S3 content ---------------------------------------------------------------------------

def s3_client(url: str) -> Any:
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def upload_folder(client: Any, bucket: str, prefix: str, folder: Path) -> str:
    """Put every file of folder under prefix (with S3-stored SHA-256); returns the s3:// URI."""
    for f in sorted(folder.iterdir()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{f.name}", Body=f.read_bytes(),
                          ChecksumAlgorithm="SHA256")
    return f"s3://{bucket}/{prefix}"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the Kubernetes API, as kubectl would use it ------------------------------------------

class Kube:
    """Create, read and delete LoraAdapters over the emulator's HTTP API."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=10)

    def create(self, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        obj = {"apiVersion": "loraplane.io/v1alpha1", "kind": "LoraAdapter",
               "metadata": {"name": name, "namespace": namespace}, "spec": spec}
        r = self.http.post(f"{API}/namespaces/{namespace}/loraadapters", json=obj)
        assert r.status_code == 201, r.text
        return dict(r.json())

    def create_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        obj = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
               "metadata": {"name": name, "namespace": namespace},
               "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
        r = self.http.post(f"/api/v1/namespaces/{namespace}/secrets", json=obj)
        assert r.status_code == 201, r.text

    def create_peering(self, name: str) -> None:
        """The ClusterKopfPeering object of manifests/peering.yaml."""
        obj = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
               "metadata": {"name": name}}
        r = self.http.post("/apis/kopf.dev/v1/clusterkopfpeerings", json=obj)
        assert r.status_code == 201, r.text

    def get_peering(self, name: str) -> dict[str, Any]:
        r = self.http.get(f"/apis/kopf.dev/v1/clusterkopfpeerings/{name}")
        r.raise_for_status()
        return dict(r.json())

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        r = self.http.get(f"{API}/namespaces/{namespace}/loraadapters/{name}")
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return dict(r.json())

    def patch_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        r = self.http.patch(f"{API}/namespaces/{namespace}/loraadapters/{name}",
                            json={"spec": spec},
                            headers={"Content-Type": "application/merge-patch+json"})
        assert r.status_code == 200, r.text

    def delete(self, namespace: str, name: str) -> None:
        r = self.http.delete(f"{API}/namespaces/{namespace}/loraadapters/{name}")
        assert r.status_code == 200, r.text

    def events(self, namespace: str) -> list[dict[str, Any]]:
        return list(self.http.get(f"/api/v1/namespaces/{namespace}/events").json()["items"])

    def wait_phase(self, namespace: str, name: str, phase: str, timeout: float = 60,
                   version: str | None = None) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            obj = self.get(namespace, name)
            st = (obj or {}).get("status", {})
            if st.get("phase") == phase and version in (None, st.get("version")):
                return obj
            return None

        return dict(wait_for(check, timeout, f"{namespace}/{name} phase {phase}", every=0.2))


def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_FILE.read_text())
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def record_of(redis_url: str, namespace: str, name: str) -> Adapter | None:
    """The gateway's registry record of an adapter, read through the gateway's own store."""
    from loraplane.gateway.store.redis import RedisStore

    async def read() -> Adapter | None:
        store = RedisStore(redis_url)
        try:
            return await store.get_adapter(f"{namespace}/{name}")
        finally:
            await store.close()

    return asyncio.run(read())
