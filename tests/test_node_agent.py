"""The real node-agent process with moto's S3 server and a real CPU engine: put, list, evict,
LRU eviction that also unregisters (and shows in the per-version GET), refusals that leave
nothing cached, restart recovery."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from loraplane.engine.config import NAMED_SHAPES
from tests.operator_support import (
    Proc,
    s3_client,
    sha256_of,
    start_agent,
    start_engine,
    start_s3,
    upload_folder,
    wait_for,
)
from tests.reference import write_lora_folder

TINY = NAMED_SHAPES["tiny"]
V1, V2 = "aaaaaa000001", "bbbbbb000002"


@dataclass
class Node:
    logs: Path
    cache: Path
    s3_url: str
    engine: Proc
    engine_url: str
    agent: Proc
    agent_url: str
    agent_port: int
    sizes: dict[str, int]
    shas: dict[str, str]

    def put(self, name: str, prefix: str, version: str = V1, **extra: Any) -> httpx.Response:
        body = {"source": {"uri": f"s3://adapters/{prefix}", "endpoint": self.s3_url}, **extra}
        return httpx.put(f"{self.agent_url}/v1/adapters/ns/{name}/{version}", json=body,
                         timeout=60)

    def cached(self) -> list[str]:
        items = httpx.get(f"{self.agent_url}/v1/adapters", timeout=5).json()["adapters"]
        return [a["engineName"] for a in items]

    def served(self) -> set[str]:
        return {m["id"] for m in httpx.get(f"{self.engine_url}/v1/models").json()["data"]}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("agent")
    logs, cache = tmp / "logs", tmp / "cache"
    logs.mkdir()
    mark = len(Proc.started)
    try:
        _, s3_url = start_s3(logs)
        client = s3_client(s3_url)
        client.create_bucket(Bucket="adapters")
        sizes, shas = {}, {}
        for i, name in enumerate(("a", "b", "c", "d")):
            folder = write_lora_folder(tmp / name, TINY, 4, ("q_proj", "v_proj"), seed=i)
            upload_folder(client, "adapters", name, folder)
            sizes[name] = (folder / "adapter_model.safetensors").stat().st_size
            shas[name] = sha256_of(folder / "adapter_model.safetensors")
        client.put_object(Bucket="adapters", Key="pickled/adapter_model.bin", Body=b"\x80\x04")
        client.put_object(Bucket="adapters", Key="pickled/adapter_config.json", Body=b"{}")
        engine, engine_url = start_engine(logs, cache)
        # Room for two adapters: the third evicts the least recently used.
        capacity = str(int(2.5 * sizes["a"]))
        agent, agent_url = start_agent(logs, cache, [engine_url], capacity=capacity)
        yield Node(logs, cache, s3_url, engine, engine_url, agent, agent_url,
                   int(agent_url.rsplit(":", 1)[1]), sizes, shas)
    finally:
        Proc.stop_since(mark)


def test_put_caches_verifies_and_registers(node: Node) -> None:
    r = node.put("a", "a", sha256=node.shas["a"])
    assert r.status_code == 200, r.text
    entry = r.json()
    assert entry["engineName"] == f"ns/a@{V1}" and entry["sha256"] == node.shas["a"]
    assert entry["bytes"] == node.sizes["a"] and entry["engines"] == [node.engine_url]
    assert Path(entry["path"]) == node.cache / "ns" / "a" / V1
    assert f"ns/a@{V1}" in node.served()
    out = httpx.post(f"{node.engine_url}/v1/completions", timeout=60,
                     json={"model": f"ns/a@{V1}", "prompt": "hi", "max_tokens": 2})
    assert out.status_code == 200, out.text
    info = httpx.get(f"{node.agent_url}/v1/info").json()
    assert info["node"] == "node-a" and info["baseModels"] == ["tiny"]
    assert info["usedBytes"] == node.sizes["a"]


def test_concurrent_puts_of_one_version_download_once(node: Node) -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: node.put("b", "b"), range(4)))
    assert {r.status_code for r in results} == {200}
    assert node.cached().count(f"ns/b@{V1}") == 1


@pytest.mark.parametrize("name, prefix, extra, status, reason", [
    ("bad-sum", "c", {"sha256": "f" * 64}, 422, "ChecksumMismatch"),
    ("pickled", "pickled", {}, 422, "PickleRefused"),
    ("missing", "nothing/here", {}, 422, "ObjectNotFound"),
])
def test_refusals_leave_nothing_cached(node: Node, name: str, prefix: str, extra: dict,
                                       status: int, reason: str) -> None:
    r = node.put(name, prefix, **extra)
    assert r.status_code == status and r.json()["reason"] == reason, r.text
    assert not any(n.startswith(f"ns/{name}@") for n in node.cached())
    assert not (node.cache / "ns" / name).exists()
    assert not list((node.cache / ".partial").glob("*"))


def test_unsafe_names_are_refused(node: Node) -> None:
    for path in ("ns/..%2F..%2Fetc/aaaaaa", "ns/a/not-hex", "NS/a/aaaaaa"):
        r = httpx.put(f"{node.agent_url}/v1/adapters/{path}", json={"source": {"uri": "s3://x/y"}})
        assert r.status_code in (400, 404), (path, r.text)


def test_lru_eviction_unregisters_from_engines(node: Node) -> None:
    assert node.put("a", "a").status_code == 200  # a is now more recent than b
    assert node.put("c", "c").status_code == 200  # over capacity: b goes
    cached = node.cached()
    assert f"ns/b@{V1}" not in cached and {f"ns/a@{V1}", f"ns/c@{V1}"} <= set(cached)
    assert f"ns/b@{V1}" not in node.served()
    assert not (node.cache / "ns" / "b").exists()
    # What the operator's re-check asks: b is gone, a is cached and its engine serves it.
    gone = httpx.get(f"{node.agent_url}/v1/adapters/ns/b/{V1}", timeout=10)
    assert gone.status_code == 404 and gone.json()["reason"] == "NotCached"
    held = httpx.get(f"{node.agent_url}/v1/adapters/ns/a/{V1}", timeout=10).json()
    assert held["engines"] == [node.engine_url] and held["missingEngines"] == []


def test_evict_unregisters_and_deletes(node: Node) -> None:
    r = httpx.delete(f"{node.agent_url}/v1/adapters/ns/c", timeout=30)
    assert r.status_code == 200 and r.json()["evicted"] == [V1]
    assert f"ns/c@{V1}" not in node.served() and f"ns/c@{V1}" not in node.cached()
    assert not (node.cache / "ns" / "c").exists()


def test_restart_rebuilds_index_removes_partials_and_reregisters(node: Node) -> None:
    before = node.cached()
    node.agent.stop()
    debris = node.cache / ".partial" / "crashed"
    debris.mkdir(parents=True)
    (debris / "adapter_model.safetensors").write_bytes(b"half a file")
    # The engine restarts too, forgetting every adapter: the agent registers them again.
    node.engine.stop()
    engine, engine_url = start_engine(node.logs, node.cache, name="engine-2")
    node.engine, node.engine_url = engine, engine_url
    assert not any(m.startswith("ns/") for m in node.served())
    agent, _ = start_agent(node.logs, node.cache, [engine_url], port=node.agent_port,
                           capacity=str(int(2.5 * node.sizes["a"])))
    node.agent = agent
    assert node.cached() == before and not debris.exists()
    wait_for(lambda: set(before) <= node.served(), 20, "cached adapters registered again")
