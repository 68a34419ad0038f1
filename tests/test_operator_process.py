"""The real operator process against kmock's Kubernetes emulator, moto's S3 server, a real node
agent, a real CPU engine, a real redis-server and a real gateway, all on loopback: a Ready
LoraAdapter in namespace team-a is served to tenant team-a through the gateway.

One set of processes serves every scenario (they start in about 20 s on 2 cores); scenarios use
different adapters and run in file order. The last one replaces the standalone operator with two
peered replicas.
"""

from __future__ import annotations

import shutil
import signal
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from loraplane.engine.config import NAMED_SHAPES, ModelConfig
from loraplane.gateway.schemas import Adapter
from tests import gateway_procs
from tests.operator_support import (
    Kube,
    Proc,
    TcpGate,
    crd_schema,
    record_of,
    s3_client,
    sha256_of,
    start_agent,
    start_emulator,
    start_engine,
    start_operator,
    start_redis,
    start_s3,
    upload_folder,
    wait_for,
)
from tests.reference import write_lora_folder

TINY = NAMED_SHAPES["tiny"]
NS = "team-a"
BUCKET = "adapters"

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (.ci/run installs it)")


@dataclass
class Cluster:
    tmp: Path
    logs: Path
    cache: Path
    s3_gate: TcpGate
    s3_url: str
    engine_url: str
    agent: Proc
    agent_url: str
    agent_port: int
    redis_url: str
    kube: Kube
    operator: Proc
    liveness: str
    folders: dict[str, Path]
    gateway: str
    slow_s3_url: str  # the same S3, with whole-file downloads of weights held for HOLD_S
    kubecfg: Path
    keys: dict[str, str] = field(default_factory=dict)  # tenant -> gateway API key

    def spec(self, prefix: str, **extra: Any) -> dict[str, Any]:
        spec = {"baseModel": "tiny",
                "source": {"s3": {"uri": f"s3://{BUCKET}/{prefix}", "endpoint": self.s3_url}},
                **extra}
        jsonschema.validate({"apiVersion": "loraplane.io/v1alpha1", "kind": "LoraAdapter",
                             "metadata": {"name": "x"}, "spec": spec}, crd_schema())
        return spec

    def seed_s3(self) -> None:
        """Create the bucket with every adapter folder."""
        client = s3_client(self.s3_url)
        client.create_bucket(Bucket=BUCKET)
        for prefix, folder in self.folders.items():
            upload_folder(client, BUCKET, prefix, folder)
        # A corrupt copy without a stored checksum: only the agent's streaming hash can tell.
        good = self.folders["good"]
        data = bytearray((good / "adapter_model.safetensors").read_bytes())
        data[-1] ^= 0xFF
        client.put_object(Bucket=BUCKET, Key="corrupt/adapter_model.safetensors",
                          Body=bytes(data))
        client.put_object(Bucket=BUCKET, Key="corrupt/adapter_config.json",
                          Body=(good / "adapter_config.json").read_bytes())

    def cached(self) -> dict[str, dict[str, Any]]:
        """What the agent holds, by engine name."""
        items = httpx.get(f"{self.agent_url}/v1/adapters", timeout=5).json()["adapters"]
        return {a["engineName"]: a for a in items}

    def served(self) -> set[str]:
        data = httpx.get(f"{self.engine_url}/v1/models", timeout=5).json()["data"]
        return {m["id"] for m in data}

    def complete(self, model: str) -> dict[str, Any]:
        r = httpx.post(f"{self.engine_url}/v1/completions", timeout=60,
                       json={"model": model, "prompt": "hello", "max_tokens": 4,
                             "temperature": 0})
        assert r.status_code == 200, r.text
        return dict(r.json())

    def client(self, tenant: str) -> openai.OpenAI:
        """An openai client of the gateway with a key of ``tenant`` (created on first use)."""
        if tenant not in self.keys:
            admin = {"Authorization": f"Bearer {gateway_procs.ADMIN_TOKEN}"}
            r = httpx.post(f"{self.gateway}/admin/v1/tenants", json={"name": tenant},
                           headers=admin, timeout=10)
            assert r.status_code == 201, r.text
            r = httpx.post(f"{self.gateway}/admin/v1/tenants/{tenant}/keys", json={},
                           headers=admin, timeout=10)
            assert r.status_code == 201, r.text
            self.keys[tenant] = r.json()["key"]
        return openai.OpenAI(base_url=f"{self.gateway}/v1", api_key=self.keys[tenant],
                             max_retries=0, timeout=60)

    def folders_on_disk(self, name: str) -> list[Path]:
        return [p for p in (self.cache / NS / name).glob("*") if p.is_dir()] \
            if (self.cache / NS / name).exists() else []


HOLD_S = 2.0


def _hold_downloads(request: bytes) -> float:
    """Delay an agent's GET of a whole weights file, not the verifier's HEAD or ranged GETs."""
    line = request.split(b"\r\n", 1)[0]
    whole = b"\r\nrange:" not in request.lower()
    return HOLD_S if line.startswith(b"GET ") and b"safetensors" in line and whole else 0.0


def _adapter(tmp: Path, name: str, cfg: ModelConfig = TINY, seed: int = 0, rank: int = 4
             ) -> Path:
    return write_lora_folder(tmp / name, cfg, rank, ("q_proj", "v_proj"), seed=seed)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("operator")
    logs, cache = tmp / "logs", tmp / "cache"
    logs.mkdir()
    cache.mkdir()
    other = ModelConfig("other", 512, 32, 64, 2, 4, 2, 8)  # a different base model's shapes
    pickle_only = tmp / "pickle-only"
    pickle_only.mkdir()
    (pickle_only / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (pickle_only / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    folders = {"good": _adapter(tmp, "good", seed=1), "good-v2": _adapter(tmp, "good-v2", seed=2),
               "other-shapes": _adapter(tmp, "other-shapes", cfg=other),
               "pickle-only": pickle_only, "late": _adapter(tmp, "late", seed=3),
               "gone": _adapter(tmp, "gone", seed=4), "restart": _adapter(tmp, "restart", seed=5),
               "lost": _adapter(tmp, "lost", seed=6), "slow": _adapter(tmp, "slow", seed=7),
               "peer": _adapter(tmp, "peer", seed=8)}
    procs: list[Proc] = []
    mark = len(Proc.started)
    gateway: gateway_procs.Proc | None = None
    try:
        s3, s3_direct = start_s3(logs)
        procs.append(s3)
        gate = TcpGate(int(s3_direct.rsplit(":", 1)[1]))
        gate.open()
        slow_gate = TcpGate(gate.target_port, hold=_hold_downloads)
        slow_gate.open()
        emulator, kube_url, kubecfg = start_emulator(logs)
        procs.append(emulator)
        redis, redis_url = start_redis(logs)
        procs.append(redis)
        engine, engine_url = start_engine(logs, cache)
        procs.append(engine)
        agent, agent_url = start_agent(logs, cache, [engine_url])
        procs.append(agent)
        operator = start_operator(logs, kubecfg, [agent_url], redis_url=redis_url)
        procs.append(operator)
        liveness = next(a for a in operator.argv if a.startswith("http://") and "healthz" in a)
        gateway, gateway_url = gateway_procs.start_gateway(logs, "gateway", redis_url,
                                                           [engine_url])
        c = Cluster(tmp, logs, cache, gate, gate.url, engine_url,
                    agent, agent_url, int(agent_url.rsplit(":", 1)[1]), redis_url,
                    Kube(kube_url), operator, liveness, folders, gateway_url, slow_gate.url,
                    kubecfg)
        c.seed_s3()
        # Kopf lists, then watches; objects created before its watch would be replayed anyway,
        # but waiting for the liveness probe makes "the operator is up" explicit.
        wait_for(lambda: httpx.get(liveness, timeout=2).status_code == 200, 60,
                 "the operator's liveness probe")
        yield c
    finally:
        if gateway is not None:
            gateway.stop()
        Proc.stop_since(mark)
        if any(p.name == "operator" for p in procs):
            print(procs[-1].tail(80))


def test_apply_ready_and_completion(cluster: Cluster) -> None:
    folder = cluster.folders["good"]
    spec = cluster.spec("good", sha256=sha256_of(folder / "adapter_model.safetensors"),
                        sharing={"sharedWith": ["team-b"]})
    cluster.kube.create(NS, "good", spec)
    obj = cluster.kube.wait_phase(NS, "good", "Ready")
    st = obj["status"]
    assert st["rank"] == 4 and st["modules"] == ["q_proj", "v_proj"]
    assert st["readyNodes"] == 1 and st["observedGeneration"] == 1
    assert {c["type"]: c["status"] for c in st["conditions"]} == {
        "Verified": "True", "Cached": "True", "Loaded": "True", "Ready": "True"}
    assert st["nodes"] == [{"name": "node-a", "version": st["version"], "state": "Loaded",
                            "engines": [cluster.engine_url]}]
    assert "loraplane.io/finalizer" in obj["metadata"]["finalizers"]
    jsonschema.validate(obj, crd_schema())  # the status the operator writes fits the schema
    engine_name = f"{NS}/good@{st['version']}"
    assert st["engineName"] == engine_name
    assert engine_name in cluster.served() and engine_name in cluster.cached()
    out = cluster.complete(engine_name)
    assert out["model"] == engine_name and out["choices"][0]["text"] is not None
    assert record_of(cluster.redis_url, NS, "good") == Adapter(
        id=f"{NS}/good", public=False, shared_with=["team-b"], engine_name=engine_name)
    assert any(e.get("reason") == "Ready" for e in cluster.kube.events(NS))
    probe = httpx.get(cluster.liveness, timeout=5).json()
    assert probe["agents"] == 1


def test_gateway_serves_the_ready_adapter_to_its_tenants(cluster: Cluster) -> None:
    owner = cluster.client(NS)
    out = owner.completions.create(model=f"{NS}/good", prompt="hello", max_tokens=4)
    assert out.model == f"{NS}/good" and out.choices[0].text is not None
    chunks = list(owner.chat.completions.create(
        model=f"{NS}/good", max_tokens=4, stream=True,
        messages=[{"role": "user", "content": "hello"}]))
    assert chunks and {ch.model for ch in chunks} == {f"{NS}/good"}
    assert f"{NS}/good" in {m.id for m in owner.models.list()}
    shared = cluster.client("team-b")  # spec.sharing.sharedWith
    assert shared.completions.create(model=f"{NS}/good", prompt="hi", max_tokens=2).choices
    with pytest.raises(openai.NotFoundError) as e:
        cluster.client("team-c").completions.create(model=f"{NS}/good", prompt="hi",
                                                    max_tokens=2)
    assert e.value.code == "model_not_found"
    assert f"{NS}/good" not in {m.id for m in cluster.client("team-c").models.list()}


@pytest.mark.parametrize("name, prefix, extra, reason, stage", [
    ("bad-sum", "good", {"sha256": "0" * 64}, "ChecksumMismatch", "Verified"),
    ("corrupt", "corrupt", "sha-of-good", "ChecksumMismatch", "Cached"),
    ("pickled", "pickle-only", {}, "PickleRefused", "Verified"),
    ("wrong-base", "good", {"baseModel": "llama-3-8b"}, "BaseModelMismatch", "Verified"),
    ("wrong-shapes", "other-shapes", {}, "ShapeMismatch", "Verified"),
    ("missing", "no/such/folder", {}, "ObjectNotFound", "Verified"),
])
def test_bad_adapter_fails_with_reason_and_nothing_cached(
        cluster: Cluster, name: str, prefix: str, extra: Any, reason: str, stage: str) -> None:
    if extra == "sha-of-good":  # the spec's checksum is right; the object in S3 is not
        extra = {"sha256": sha256_of(cluster.folders["good"] / "adapter_model.safetensors")}
    cluster.kube.create(NS, name, cluster.spec(prefix, **extra))
    st = cluster.kube.wait_phase(NS, name, "Failed")["status"]
    assert st["reason"] == reason, st
    cond = {c["type"]: c for c in st["conditions"]}
    assert cond[stage]["status"] == "False" and cond[stage]["reason"] == reason
    assert cond["Ready"]["status"] == "False" and st["readyNodes"] == 0
    assert not any(k.startswith(f"{NS}/{name}@") for k in cluster.cached())
    assert not any(m.startswith(f"{NS}/{name}@") for m in cluster.served())
    assert cluster.folders_on_disk(name) == []
    assert not list((cluster.cache / ".partial").glob("*"))
    assert record_of(cluster.redis_url, NS, name) is None
    assert any(e.get("reason") == reason for e in cluster.kube.events(NS))


def test_credentials_from_a_secret(cluster: Cluster) -> None:
    cluster.kube.create_secret(NS, "s3-creds", {"accessKeyId": "from-secret",
                                                "secretAccessKey": "also-from-secret"})
    s3 = {"uri": f"s3://{BUCKET}/gone", "endpoint": cluster.s3_url,
          "credentialsSecretRef": {"name": "s3-creds"}}
    cluster.kube.create(NS, "with-secret", cluster.spec("gone") | {"source": {"s3": s3}})
    assert cluster.kube.wait_phase(NS, "with-secret", "Ready")["status"]["readyNodes"] == 1
    s3 |= {"credentialsSecretRef": {"name": "no-such-secret"}}
    cluster.kube.create(NS, "secretless", cluster.spec("gone") | {"source": {"s3": s3}})
    st = cluster.kube.wait_phase(NS, "secretless", "Pending")["status"]
    assert st["reason"] == "CredentialsUnavailable" and "not found" in st["message"]


def test_s3_down_then_back_retries_then_ready(cluster: Cluster) -> None:
    cluster.s3_gate.close()
    cluster.kube.create(NS, "late", cluster.spec("late"))
    st = cluster.kube.wait_phase(NS, "late", "Pending", timeout=30)["status"]
    assert st["reason"] == "SourceUnavailable"
    assert {c["type"]: c["status"] for c in st["conditions"]}["Verified"] == "Unknown"
    cluster.s3_gate.open()
    st = cluster.kube.wait_phase(NS, "late", "Ready", timeout=30)["status"]
    assert f"{NS}/late@{st['version']}" in cluster.served()


def test_fetching_phase_visible_during_first_placement(cluster: Cluster) -> None:
    spec = cluster.spec("slow")
    spec["source"]["s3"]["endpoint"] = cluster.slow_s3_url  # the agent's download waits HOLD_S
    cluster.kube.create(NS, "slow", spec)
    seen: list[dict[str, Any]] = []

    def fetching() -> dict[str, Any] | None:
        st = ((cluster.kube.get(NS, "slow") or {}).get("status") or {})
        seen.append(st)
        return st if st.get("phase") == "Fetching" else None

    st = wait_for(fetching, 10, "phase Fetching", every=0.05)
    cond = {c["type"]: c for c in st["conditions"]}
    assert cond["Verified"]["status"] == "True" and cond["Ready"]["status"] == "Unknown"
    assert st["reason"] == "Fetching" and st["rank"] == 4 and st["version"]
    assert not any(s.get("phase") == "Ready" for s in seen)
    jsonschema.validate(cluster.kube.get(NS, "slow"), crd_schema())
    st = cluster.kube.wait_phase(NS, "slow", "Ready", timeout=30)["status"]
    assert st["readyNodes"] == 1 and st["reason"] == "Loaded"


def test_recheck_puts_back_an_adapter_a_node_lost(cluster: Cluster) -> None:
    cluster.kube.create(NS, "lost", cluster.spec("lost"))
    st = cluster.kube.wait_phase(NS, "lost", "Ready")["status"]
    engine_name = st["engineName"]
    # The node loses it behind the operator's back (as an LRU eviction would), while S3 is
    # down so that putting it back has to wait.
    cluster.s3_gate.close()
    r = httpx.delete(f"{cluster.agent_url}/v1/adapters/{NS}/lost", timeout=10)
    assert r.status_code == 200 and r.json()["evicted"] == [st["version"]]
    assert engine_name not in cluster.served()

    def degraded() -> dict[str, Any] | None:
        s = ((cluster.kube.get(NS, "lost") or {}).get("status") or {})
        ready = {c["type"]: c for c in s.get("conditions", [])}.get("Ready", {})
        return s if ready.get("status") == "False" and ready.get("reason") == "NodeLost" \
            else None

    try:
        st = wait_for(degraded, 15, "Ready False with reason NodeLost")
        assert st["readyNodes"] == 0 and st["nodes"][0]["state"] == "Lost", st
        assert st["phase"] == "Fetching"
        jsonschema.validate(cluster.kube.get(NS, "lost"), crd_schema())
    finally:
        cluster.s3_gate.open()
    st = cluster.kube.wait_phase(NS, "lost", "Ready", timeout=30)["status"]
    assert st["readyNodes"] == 1 and st["nodes"][0]["state"] == "Loaded"
    assert {c["type"]: c["status"] for c in st["conditions"]}["Ready"] == "True"
    assert engine_name in cluster.served() and engine_name in cluster.cached()
    assert cluster.complete(engine_name)["model"] == engine_name
    assert any(e.get("reason") == "NodeLost" for e in cluster.kube.events(NS))


def _write_partial(cache: Path) -> Path:
    debris = cache / ".partial" / "deadbeef"
    debris.mkdir(parents=True, exist_ok=True)
    (debris / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 99) + b"{")
    return debris


def test_agent_restart_recovers(cluster: Cluster) -> None:
    before = cluster.cached()
    assert before
    cluster.agent.stop()
    debris = _write_partial(cluster.cache)
    # While the agent is down, a new adapter waits (no node can take it) instead of failing.
    cluster.kube.create(NS, "restart", cluster.spec("restart"))
    st = cluster.kube.wait_phase(NS, "restart", "Fetching", timeout=30)["status"]
    assert st["reason"] in ("NotEnoughNodes", "AgentUnavailable")
    agent, _ = start_agent(cluster.logs, cluster.cache, [cluster.engine_url],
                           port=cluster.agent_port)
    cluster.agent = agent
    assert not debris.exists()
    after = cluster.cached()
    assert set(before) <= set(after)  # the index was rebuilt from the folder
    st = cluster.kube.wait_phase(NS, "restart", "Ready", timeout=30)["status"]
    assert f"{NS}/restart@{st['version']}" in cluster.served()


def test_update_rolls_out_new_version(cluster: Cluster) -> None:
    old = cluster.kube.get(NS, "good")
    assert old is not None
    old_version = old["status"]["version"]
    cluster.kube.patch_spec(NS, "good", {
        "source": {"s3": {"uri": f"s3://{BUCKET}/good-v2"}},
        "sha256": sha256_of(cluster.folders["good-v2"] / "adapter_model.safetensors")})

    def rolled() -> dict[str, Any] | None:
        obj = cluster.kube.get(NS, "good")
        st = (obj or {}).get("status", {})
        ok = st.get("phase") == "Ready" and st.get("version") != old_version
        return obj if ok else None

    obj = wait_for(rolled, 30, "the new version")
    st = obj["status"]
    assert st["observedGeneration"] == obj["metadata"]["generation"] == 2
    new_name, old_name = f"{NS}/good@{st['version']}", f"{NS}/good@{old_version}"
    wait_for(lambda: old_name not in cluster.served(), 10, "the old version unloaded")
    assert new_name in cluster.served() and old_name not in cluster.cached()
    assert cluster.complete(new_name)["model"] == new_name
    record = record_of(cluster.redis_url, NS, "good")
    assert record is not None and record.engine_name == new_name
    # The gateway forwards the same tenant-facing id under the new name at once (the old one
    # is gone from the engine, so an answer proves it).
    out = cluster.client(NS).completions.create(model=f"{NS}/good", prompt="hi", max_tokens=2)
    assert out.model == f"{NS}/good"


def test_delete_evicts_unloads_and_releases_finalizer(cluster: Cluster) -> None:
    obj = cluster.kube.get(NS, "good")
    assert obj is not None
    engine_name = obj["status"]["engineName"]
    cluster.kube.delete(NS, "good")
    wait_for(lambda: cluster.kube.get(NS, "good") is None, 30, "the finalizer to go")
    assert not any(m.startswith(f"{NS}/good@") for m in cluster.served())
    assert engine_name not in cluster.served()
    assert not any(k.startswith(f"{NS}/good@") for k in cluster.cached())
    assert cluster.folders_on_disk("good") == []
    assert record_of(cluster.redis_url, NS, "good") is None
    with pytest.raises(openai.NotFoundError):
        cluster.client(NS).completions.create(model=f"{NS}/good", prompt="hi", max_tokens=2)


def _handled(proc: Proc, name: str) -> int:
    """How many times this operator process ran the reconcile handler for team-a/<name>."""
    return sum(1 for line in proc.log.read_text(errors="replace").splitlines()
               if f"[{NS}/{name}]" in line and "Handler 'reconcile' succeeded" in line)


def test_two_peered_replicas_one_works_the_other_takes_over(cluster: Cluster) -> None:
    cluster.operator.stop()
    cluster.kube.create_peering("loraplane")
    replicas = {}
    for name, priority in (("replica-a", 20), ("replica-b", 10)):
        proc = start_operator(cluster.logs, cluster.kubecfg, [cluster.agent_url],
                              redis_url=cluster.redis_url, name=name, peering="loraplane",
                              priority=priority)
        probe = next(a for a in proc.argv if a.startswith("http://") and "healthz" in a)
        wait_for(lambda probe=probe: httpx.get(probe, timeout=2).status_code == 200, 60,
                 f"{name}'s liveness probe")
        replicas[name] = proc
    a, b = replicas["replica-a"], replicas["replica-b"]
    # Kopf starts every replica paused; only the highest priority resumes.
    wait_for(lambda: sorted(p["priority"] for p in
                            cluster.kube.get_peering("loraplane").get("status", {}).values())
             == [10, 20], 20, "both replicas' keep-alives in the peering object")
    assert "Resuming operations after the pause" in a.log.read_text()
    assert "Resuming operations" not in b.log.read_text()

    cluster.kube.create(NS, "peer-1", cluster.spec("peer"))
    cluster.kube.wait_phase(NS, "peer-1", "Ready")
    time.sleep(1)  # room for a second handler run, were replica-b handling too
    assert (_handled(a, "peer-1"), _handled(b, "peer-1")) == (1, 0)

    a.stop(signal.SIGKILL)  # no goodbye: replica-b waits for a's keep-alive to expire (3 s)
    cluster.kube.create(NS, "peer-2", cluster.spec("peer"))
    st = cluster.kube.wait_phase(NS, "peer-2", "Ready", timeout=30)["status"]
    assert "Resuming operations after the pause" in b.log.read_text()
    assert (_handled(a, "peer-2"), _handled(b, "peer-2")) == (0, 1)
    assert f"{NS}/peer-2@{st['version']}" in cluster.served()
