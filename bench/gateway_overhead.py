"""Gateway overhead: added latency (p50/p99) and the most requests/s one gateway process serves.

Starts a redis-server, a canned upstream (answers /residency and a fixed completion, so the
engine costs nothing), and `loraplane gateway` in front of it with one tenant whose limits are
set (so every request runs the full admission script), then loads both with wrk:
- 1 connection: latency direct vs through the gateway (added = gateway - direct, per percentile);
- 32 connections: requests/s direct and through the gateway.
Everything runs on this machine, so the load generator competes with the gateway for cores, as
in PERFORMANCE.md's reference table. Needs `wrk` and `redis-server` (apt-get install -y wrk
redis-server). Other work on the machine takes cores from all of them: the record keeps the load
average before and after the runs. Writes bench/results/gateway-overhead-<date>T<HHMM>.json.

    python bench/gateway_overhead.py [--duration 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.gateway_procs import ADMIN_TOKEN, Proc, free_port, start_gateway, start_redis  # noqa: E402

MODEL = "bench/a"
COMPLETION = json.dumps({
    "id": "cmpl-bench", "object": "text_completion", "created": 0, "model": MODEL,
    "choices": [{"index": 0, "text": " world", "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 16, "total_tokens": 18}}).encode()
RESIDENCY = json.dumps({
    "model": "canned", "max_model_len": 2048, "adapters": [{"name": MODEL, "tier": "gpu"}],
    "load": {"running": 0, "waiting": 0, "pool_pages_free": 1, "pool_pages_total": 1}}).encode()


async def canned_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A plain ASGI upstream: /residency and a fixed completion for any other path."""
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    body = RESIDENCY if scope["path"] == "/residency" else COMPLETION
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def run_upstream(port: int) -> None:
    import uvicorn

    uvicorn.run(canned_app, host="127.0.0.1", port=port, log_level="warning",
                access_log=False, lifespan="off")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, key: str | None, connections: int, seconds: int,
        folder: Path, pid: int | None = None) -> dict[str, float]:
    """Run wrk POSTing a completion; its requests/s and latency percentiles (ms)."""
    script = folder / "post.lua"
    headers = 'wrk.headers["Content-Type"] = "application/json"\n'
    if key:
        headers += f'wrk.headers["Authorization"] = "Bearer {key}"\n'
    body = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 16})
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n{headers}')
    cpu_before = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                          "-s", str(script), url + "/v1/completions"],
                         capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk saw errors:\n{out}")
    result = {"requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])}
    if pid:  # the gateway's own CPU per request: what it would sustain per core, load aside
        requests = int(re.search(r"(\d+) requests in", out)[1])
        result["server_cpu_ms_per_request"] = (cpu_seconds(pid) - cpu_before) * 1000 / requests
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    for pct, value, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        result[f"p{pct}_ms"] = float(value) * unit[u]
    return result


def machine() -> dict[str, Any]:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(),
            "load_average_1_5_15": _load(),
            "python": platform.python_version(),
            "versions": {p: version(p) for p in ("fastapi", "uvicorn", "aiohttp", "redis",
                                                 "uvloop", "httptools")}}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32, help="for the throughput run")
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        run_upstream(args.upstream)
        return
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk: apt-get install -y wrk")
    started = dt.datetime.now()
    load_before = _load()  # before this benchmark's own processes add to it
    folder = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    procs: list[Proc] = []
    try:
        redis_proc, redis_url = start_redis(folder)
        procs.append(redis_proc)
        port = free_port()
        upstream = f"http://127.0.0.1:{port}"
        procs.append(Proc("upstream", [sys.executable, __file__, "--upstream", str(port)],
                          folder / "upstream.log"))
        procs[-1].wait_until(lambda: httpx.get(upstream + "/residency").status_code == 200)
        gw_proc, gateway = start_gateway(folder, "gateway", redis_url, [upstream])
        procs.append(gw_proc)
        gw_pid = gw_proc.popen.pid
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        limits = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12,
                  "max_concurrent_requests": 10**6}
        httpx.post(gateway + "/admin/v1/tenants", json={"name": "bench", "limits": limits},
                   headers=admin).raise_for_status()
        httpx.put(gateway + f"/admin/v1/adapters/{MODEL}", json={}, headers=admin)
        key = httpx.post(gateway + "/admin/v1/tenants/bench/keys", json={},
                         headers=admin).json()["key"]
        wrk(gateway, key, 4, 2, folder)  # warm up connections and caches
        wrk(upstream, None, 4, 2, folder)
        results = {
            "latency_1_connection": {
                "direct": wrk(upstream, None, 1, args.duration, folder),
                "gateway": wrk(gateway, key, 1, args.duration, folder, gw_pid)},
            f"throughput_{args.connections}_connections": {
                "direct": wrk(upstream, None, args.connections, args.duration, folder),
                "gateway": wrk(gateway, key, args.connections, args.duration, folder,
                               gw_pid)},
        }
        served = httpx.get(gateway + "/admin/v1/tenants/bench/usage", headers=admin).json()
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(folder, ignore_errors=True)
    lat = results["latency_1_connection"]
    added = {p: round(lat["gateway"][p] - lat["direct"][p], 3)
             for p in ("p50_ms", "p99_ms") if p in lat["gateway"] and p in lat["direct"]}
    thr = results[f"throughput_{args.connections}_connections"]
    record = {"benchmark": "gateway_overhead", "date": started.date().isoformat(),
              "time": started.strftime("%H:%M"), "machine": machine(),
              "load_average_1_5_15_before": load_before,
              "config": {"duration_s": args.duration, "connections": args.connections,
                         "load_generator": "wrk -t1 on the same machine",
                         "request": "POST /v1/completions, adapter model, limits set",
                         "upstream": "canned ASGI app under uvicorn (httptools, uvloop)"},
              "results": results, "added_latency_ms": added,
              "gateway_requests_per_s": thr["gateway"]["requests_per_s"],
              "gateway_cpu_ms_per_request": round(thr["gateway"]["server_cpu_ms_per_request"], 3),
              "gateway_requests_per_s_per_full_core": round(
                  1000 / thr["gateway"]["server_cpu_ms_per_request"]),
              "metered_requests": served["total"]["requests"],
              "targets": {"added_p50_ms": 2.0, "requests_per_s": 1000}}
    print(f"machine: {record['machine']['cpu']} x{record['machine']['cores']}, "
          f"{record['machine']['os']}")
    print(f"{'path':<10}{'p50 ms (1 conn)':>17}{'p99 ms (1 conn)':>17}"
          f"{f'req/s ({args.connections} conn)':>20}")
    for path in ("direct", "gateway"):
        print(f"{path:<10}{lat[path].get('p50_ms', 0):>17.3f}{lat[path].get('p99_ms', 0):>17.3f}"
              f"{thr[path]['requests_per_s']:>20.0f}")
    print(f"added by the gateway: p50 {added.get('p50_ms')} ms, p99 {added.get('p99_ms')} ms; "
          f"gateway throughput {thr['gateway']['requests_per_s']:.0f} req/s "
          f"(targets: <= 2 ms, >= 1000 req/s)")
    print(f"gateway CPU: {record['gateway_cpu_ms_per_request']} ms per request = "
          f"{record['gateway_requests_per_s_per_full_core']} req/s per full core "
          f"(load average {record['load_average_1_5_15_before']} before, "
          f"{record['machine']['load_average_1_5_15']} after)")
    out = ROOT / "bench" / "results" / f"gateway-overhead-{started:%Y-%m-%dT%H%M}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
