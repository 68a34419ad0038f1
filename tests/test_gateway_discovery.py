"""The gateway's Kubernetes discovery as real processes: the kube emulator holds the engine's Pod,
the gateway (``--k8s-selector``, ``--k8s-api`` at the emulator) routes to it, and drops it from
rotation once the Pod is no longer Ready or is deleted."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.gateway_procs import ADMIN_TOKEN, start_engine, start_gateway, start_redis, wait_engine
from tests.operator_support import free_port, start_emulator

NAMESPACE = "engines"
SELECTOR = "app.kubernetes.io/name=loraplane-engine"
PODS = f"/api/v1/namespaces/{NAMESPACE}/pods"


def pod(name: str, labels: dict[str, str], port: int | None = None) -> dict[str, Any]:
    """A Running, Ready Pod on 127.0.0.1 (with a container port 'http' when ``port`` is set)."""
    container: dict[str, Any] = {"name": "engine", "image": "loraplane"}
    if port is not None:
        container["ports"] = [{"name": "http", "containerPort": port}]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
            "spec": {"containers": [container]},
            "status": {"phase": "Running", "podIP": "127.0.0.1",
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def test_discovered_engine_serves_then_leaves_rotation(tmp_path: Path) -> None:
    procs: list[Any] = []
    try:
        redis, redis_url = start_redis(tmp_path)
        procs.append(redis)
        engine, engine_url = start_engine(tmp_path, "engine")  # loads while the emulator starts
        procs.append(engine)
        emulator, kube_url, _ = start_emulator(tmp_path)
        procs.append(emulator)
        wait_engine(engine, engine_url)
        engine_port = int(engine_url.rsplit(":", 1)[1])

        kube = httpx.Client(base_url=kube_url, timeout=10)
        r = kube.post(PODS, json=pod("engine-0", {"app.kubernetes.io/name": "loraplane-engine"}))
        assert r.status_code == 201, r.text
        # Same namespace, other labels: the selector must keep it out.
        r = kube.post(PODS, json=pod("other-0", {"app.kubernetes.io/name": "other"},
                                     port=free_port()))
        assert r.status_code == 201, r.text
        listed = kube.get(PODS, params={"labelSelector": SELECTOR}).json()["items"]
        assert [p["metadata"]["name"] for p in listed] == ["engine-0"]

        token = tmp_path / "k8s-token"
        token.write_text("emulator-token\n")
        gateway_proc, gateway = start_gateway(
            tmp_path, "gateway", redis_url, [], poll_interval_s=0.25,
            extra=["--k8s-selector", SELECTOR, "--k8s-namespace", NAMESPACE,
                   "--k8s-port", str(engine_port), "--k8s-api", kube_url,
                   "--k8s-token-file", str(token)],
            env={"LORAPLANE_GATEWAY_DISCOVERY_INTERVAL_S": "0.5"})
        procs.append(gateway_proc)
        admin = httpx.Client(base_url=gateway + "/admin/v1", timeout=30,
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

        def replicas() -> list[dict[str, Any]]:
            r = admin.get("/replicas")
            assert r.status_code == 200, r.text
            return list(r.json())

        def wait_replicas(want: list[str], what: str, timeout: float = 5) -> float:
            started = time.monotonic()
            while (urls := [x["url"] for x in replicas() if x["healthy"]]) != want:
                assert time.monotonic() - started < timeout, f"{what}: replicas {urls}"
                time.sleep(0.1)
            return time.monotonic() - started

        # (a) The discovered engine, and only it, is in rotation and serves a tenant.
        assert [(x["url"], x["healthy"], x["model"]) for x in replicas()] == [
            (engine_url, True, "tiny")]
        assert admin.post("/tenants", json={"name": "acme", "limits": {}}).status_code == 201
        r = admin.post("/tenants/acme/keys", json={"name": "test"})
        assert r.status_code == 201, r.text
        client = openai.OpenAI(base_url=gateway + "/v1", api_key=r.json()["key"],
                               max_retries=0, timeout=60)
        out = client.completions.create(model="tiny", prompt="hello", max_tokens=4,
                                        temperature=0)
        assert out.model == "tiny" and out.choices[0].finish_reason in ("length", "stop")
        assert out.usage is not None and out.usage.completion_tokens == 4

        # (b) Not Ready: out within a few seconds; Ready again: back.
        not_ready = {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}
        r = kube.patch(f"{PODS}/engine-0", json=not_ready,
                       headers={"Content-Type": "application/merge-patch+json"})
        assert r.status_code == 200, r.text
        assert wait_replicas([], "pod not Ready") < 5
        assert replicas() == []  # removed from the fleet, not merely unhealthy
        ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
        r = kube.patch(f"{PODS}/engine-0", json=ready,
                       headers={"Content-Type": "application/merge-patch+json"})
        assert r.status_code == 200, r.text
        wait_replicas([engine_url], "pod Ready again")

        # Deleted: out within a few seconds, and completions have nowhere to go.
        assert kube.delete(f"{PODS}/engine-0").status_code == 200
        assert wait_replicas([], "pod deleted") < 5
        assert replicas() == []
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="tiny", prompt="hello", max_tokens=4)
        # With no replica the base model is unknown: 404 model_not_found today (503 would do).
        assert err.value.status_code in (404, 503), err.value
        assert gateway_proc.popen.poll() is None
    finally:
        for proc in reversed(procs):
            proc.stop()
