"""Control-plane benchmark: N small LoraAdapters applied at once, time until all are Ready.

Real processes on loopback: kmock's Kubernetes emulator (tests/kube_emulator.py), moto's S3
server, one node agent, one CPU engine (random tiny model) and the operator. Every adapter is a
distinct PEFT folder in S3 (rank 1 on q_proj of the tiny model). Prints the time to Ready and the
CPU seconds each process used, the emulator's own request-serving time separately (it is a
stand-in for the Kubernetes API server and not part of loraplane), and writes JSON under
bench/results/.

    python bench/operator_ready.py --adapters 1000
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraplane.engine.config import NAMED_SHAPES  # noqa: E402
from tests.operator_support import (  # noqa: E402
    API,
    Proc,
    s3_client,
    start_agent,
    start_emulator,
    start_engine,
    start_operator,
    start_s3,
    upload_folder,
    wait_for,
)
from tests.reference import write_lora_folder  # noqa: E402

NS = "bench"


def cpu_seconds(proc: Proc) -> float:
    """User + system CPU seconds of a child process so far (Linux /proc)."""
    assert proc.popen is not None
    fields = Path(f"/proc/{proc.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    # A timeout or `kill` sends SIGTERM: turn it into SystemExit so `finally` stops the children
    # (left running, they would skew the next run's numbers).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    n = args.adapters
    tmp = Path(tempfile.mkdtemp(prefix="operator-bench-"))
    logs, cache = tmp / "logs", tmp / "cache"
    logs.mkdir()
    cache.mkdir()
    procs: dict[str, Proc] = {}
    mark = len(Proc.started)
    try:
        procs["s3"], s3_url = start_s3(logs)
        procs["emulator"], kube_url, kubecfg = start_emulator(logs)
        procs["engine"], engine_url = start_engine(logs, cache)
        procs["agent"], agent_url = start_agent(logs, cache, [engine_url], capacity="1GiB")

        t = time.perf_counter()
        client = s3_client(s3_url)
        client.create_bucket(Bucket="adapters")
        folder = tmp / "adapters"

        def upload(i: int) -> None:
            f = write_lora_folder(folder / f"a{i}", NAMED_SHAPES["tiny"], 1, ("q_proj",), seed=i)
            upload_folder(client, "adapters", f"a{i}", f)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(upload, range(n)))
        print(f"uploaded {n} adapters to S3 in {time.perf_counter() - t:.1f} s")

        # Ready adapters are re-checked at the operator's default interval (60 s), as deployed.
        procs["operator"] = start_operator(logs, kubecfg, [agent_url], recheck_interval=60)
        liveness = next(a for a in procs["operator"].argv if a.endswith("/healthz"))
        wait_for(lambda: httpx.get(liveness, timeout=2).status_code == 200, 60, "the operator")
        cpu_before = {name: cpu_seconds(p) for name, p in procs.items()}
        stats_before = httpx.get(f"{kube_url}/emulator/stats").json()

        kube = httpx.Client(base_url=kube_url, timeout=30)
        start = time.perf_counter()

        def create(i: int) -> None:
            obj = {"apiVersion": "loraplane.io/v1alpha1", "kind": "LoraAdapter",
                   "metadata": {"name": f"a{i}", "namespace": NS},
                   "spec": {"baseModel": "tiny",
                            "source": {"s3": {"uri": f"s3://adapters/a{i}",
                                              "endpoint": s3_url}}}}
            r = kube.post(f"{API}/namespaces/{NS}/loraadapters", json=obj)
            assert r.status_code == 201, r.text

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(n)))
        applied = time.perf_counter() - start
        print(f"applied {n} LoraAdapters in {applied:.1f} s")

        ready_at: list[tuple[float, int]] = []

        def all_ready() -> bool:
            items = kube.get(f"{API}/namespaces/{NS}/loraadapters").json()["items"]
            phases = [i.get("status", {}).get("phase") for i in items]
            ready = phases.count("Ready")
            ready_at.append((time.perf_counter() - start, ready))
            failed = phases.count("Failed")
            if failed:
                raise AssertionError(f"{failed} adapters Failed")
            return ready == n

        wait_for(all_ready, args.timeout, f"{n} adapters Ready", every=1.0)
        total = time.perf_counter() - start
        cpu = {name: round(cpu_seconds(p) - cpu_before[name], 1) for name, p in procs.items()}
        stats = httpx.get(f"{kube_url}/emulator/stats").json()
        served = httpx.get(f"{engine_url}/v1/models").json()["data"]
        half = next(t for t, r in ready_at if r >= n // 2)
        result = {
            "benchmark": "operator_ready",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpus": os.cpu_count()},
            "adapters": n,
            "seconds_to_apply": round(applied, 2),
            "seconds_to_all_ready": round(total, 2),
            "seconds_to_half_ready": round(half, 2),
            "adapters_served_by_engine": sum(1 for m in served if m.get("parent")),
            "cpu_seconds_by_process": cpu,
            "emulator_request_seconds": round(stats["k8sSeconds"] - stats_before["k8sSeconds"], 2),
            "emulator_requests": stats["k8sRequests"] - stats_before["k8sRequests"],
        }
        print(f"{n} adapters Ready in {total:.1f} s (half in {half:.1f} s); "
              f"the engine serves {result['adapters_served_by_engine']}")
        print(f"CPU seconds: {cpu}")
        print(f"emulator (Kubernetes stand-in): {result['emulator_requests']} requests, "
              f"{result['emulator_request_seconds']} s serving them")
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"operator_ready-{datetime.date.today().isoformat()}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    finally:
        Proc.stop_since(mark)
        print(f"logs in {logs}")


if __name__ == "__main__":
    main()
