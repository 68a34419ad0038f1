"""The gateway as a real process: redis-server, real tiny engines, the official openai client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from loraplane.gateway import routing
from tests.gateway_procs import (
    ADMIN_TOKEN,
    Proc,
    load_adapter,
    metric,
    start_engine,
    start_gateway,
    start_redis,
    wait_engine,
)

BASE = "tiny"


@dataclass
class Fleet:
    gateway: str
    a: str  # engine holding beta/secret, beta/open, usage/meter
    b: str  # engine holding acme/poet, beta/open
    c: str  # spare engines for the failover test
    d: str
    redis_url: str
    folder: Path
    procs: dict[str, Proc]

    def admin(self, method: str, path: str, json: Any = None) -> httpx.Response:
        return httpx.request(method, self.gateway + "/admin/v1" + path, json=json, timeout=30,
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    def tenant(self, name: str, **limits: int) -> str:
        """Create a tenant with limits; its new key."""
        r = self.admin("POST", "/tenants", {"name": name, "limits": limits})
        assert r.status_code == 201, r.text
        r = self.admin("POST", f"/tenants/{name}/keys", {"name": "test"})
        assert r.status_code == 201, r.text
        return str(r.json()["key"])

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway + "/v1", api_key=key, max_retries=0,
                             timeout=60)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    folder = tmp_path_factory.mktemp("gateway")
    procs: dict[str, Proc] = {}
    try:
        procs["redis"], redis_url = start_redis(folder)
        urls = {}
        for name in ("a", "b", "c", "d"):  # start together: their imports overlap
            procs[name], urls[name] = start_engine(folder, f"engine-{name}")
        for name in urls:
            wait_engine(procs[name], urls[name])
        for engine, adapters in (("a", ("beta/secret", "beta/open", "usage/meter")),
                                 ("b", ("acme/poet", "beta/open")),
                                 ("c", ("beta/fo",)), ("d", ("beta/fo",))):
            for i, adapter in enumerate(adapters):
                load_adapter(urls[engine], adapter, folder, seed=i)
        procs["gateway"], gateway = start_gateway(folder, "gateway", redis_url,
                                                  [urls["a"], urls["b"]])
        f = Fleet(gateway, urls["a"], urls["b"], urls["c"], urls["d"], redis_url, folder, procs)
        for adapter, access in (("acme/poet", {"shared_with": ["beta"]}),
                                ("beta/secret", {}), ("beta/open", {"public": True}),
                                ("usage/meter", {}), ("beta/fo", {})):
            assert f.admin("PUT", f"/adapters/{adapter}", access).status_code == 200
        yield f
    finally:
        for p in reversed(procs.values()):
            p.stop()


def test_keys_accepted_and_refused(fleet: Fleet) -> None:
    key = fleet.tenant("keys")
    r = fleet.client(key).completions.create(model=BASE, prompt="hi", max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")
    for bad in ("lp-" + "x" * 43, "not-a-key", key + "x"):
        with pytest.raises(openai.AuthenticationError) as e:
            fleet.client(bad).completions.create(model=BASE, prompt="hi", max_tokens=2)
        assert e.value.code == "invalid_api_key"
        assert bad not in e.value.response.text  # keys are never echoed
    r2 = httpx.post(fleet.gateway + "/v1/completions", json={"model": BASE, "prompt": "x"})
    assert r2.status_code == 401 and r2.json()["error"]["code"] == "invalid_api_key"
    r2 = httpx.post(fleet.gateway + "/v1/completions", content=b"{not json",
                    headers={"Authorization": "Bearer lp-nope"})
    assert r2.status_code == 401  # who asks is checked before what is asked
    keys = fleet.admin("GET", "/tenants/keys/keys").json()
    assert [k["name"] for k in keys] == ["test"] and "key" not in keys[0]
    assert fleet.admin("DELETE", f"/tenants/keys/keys/{keys[0]['id']}").status_code == 204
    with pytest.raises(openai.AuthenticationError):
        fleet.client(key).models.list()
    assert httpx.get(fleet.gateway + "/admin/v1/tenants").status_code == 401
    log = (fleet.folder / "gateway.log").read_text()
    assert key not in log and "lp-" not in log


def test_models_lists_exactly_what_the_tenant_may_use(fleet: Fleet) -> None:
    acme = fleet.tenant("acme")
    beta = fleet.tenant("beta")
    assert {m.id for m in fleet.client(acme).models.list()} == {BASE, "acme/poet", "beta/open"}
    assert {m.id for m in fleet.client(beta).models.list()} == {
        BASE, "acme/poet", "beta/open", "beta/secret", "beta/fo"}
    assert fleet.client(beta).models.retrieve("acme/poet").id == "acme/poet"
    with pytest.raises(openai.NotFoundError):
        fleet.client(acme).models.retrieve("beta/secret")


def test_cross_tenant_adapter_is_404_like_a_missing_one(fleet: Fleet) -> None:
    key = fleet.tenant("other")
    c = fleet.client(key)
    errors = []
    for model in ("beta/secret", "beta/nothing-here", "nothing"):
        with pytest.raises(openai.NotFoundError) as e:
            c.completions.create(model=model, prompt="hi", max_tokens=2)
        assert e.value.code == "model_not_found"
        errors.append(e.value.response.json()["error"]["message"].replace(model, "M"))
    assert len(set(errors)) == 1  # the same answer: existence is not leaked
    # Shared and public adapters do work for another tenant.
    assert c.completions.create(model="beta/open", prompt="hi", max_tokens=2).choices
    beta_key = fleet.admin("POST", "/tenants/beta/keys", {}).json()["key"]
    assert fleet.client(beta_key).chat.completions.create(
        model="acme/poet", messages=[{"role": "user", "content": "hi"}], max_tokens=2).choices


def test_routes_to_the_replica_that_holds_the_adapter(fleet: Fleet) -> None:
    c = fleet.client(fleet.tenant("router"))
    fleet.admin("PUT", "/adapters/acme/poet", {"shared_with": ["beta", "router"]})
    fleet.admin("PUT", "/adapters/beta/secret", {"shared_with": ["router"]})
    before = {(e, m): metric(u, "loraplane_requests_total", model=m)
              for e, u in (("a", fleet.a), ("b", fleet.b)) for m in ("acme/poet", "beta/secret")}
    for _ in range(5):
        c.completions.create(model="acme/poet", prompt="hello", max_tokens=3)
        c.completions.create(model="beta/secret", prompt="hello", max_tokens=3)
    after = {k: metric(fleet.a if k[0] == "a" else fleet.b, "loraplane_requests_total",
                       model=k[1]) for k in before}
    assert after[("b", "acme/poet")] - before[("b", "acme/poet")] == 5
    assert after[("a", "acme/poet")] == before[("a", "acme/poet")]
    assert after[("a", "beta/secret")] - before[("a", "beta/secret")] == 5
    assert after[("b", "beta/secret")] == before[("b", "beta/secret")]
    replicas = fleet.admin("GET", "/replicas").json()
    assert all(r["healthy"] and r["model"] == BASE for r in replicas)


def test_streaming_and_usage_equal_to_tokens_served(fleet: Fleet) -> None:
    key = fleet.tenant("usage")
    c = fleet.client(key)
    seen = {"prompt_tokens": 0, "completion_tokens": 0}

    def add(usage: Any) -> None:
        seen["prompt_tokens"] += usage.prompt_tokens
        seen["completion_tokens"] += usage.completion_tokens

    engine_before = (metric(fleet.a, "loraplane_prompt_tokens_total", model="usage/meter"),
                     metric(fleet.a, "loraplane_generation_tokens_total", model="usage/meter"))
    r = c.completions.create(model="usage/meter", prompt="Stream me", max_tokens=9,
                             temperature=0)
    add(r.usage)
    r2 = c.chat.completions.create(model="usage/meter", max_tokens=5,
                                   messages=[{"role": "user", "content": "Hello there"}])
    add(r2.usage)
    chunks = list(c.completions.create(model="usage/meter", prompt="Stream me", max_tokens=9,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and not chunks[-1].choices
    add(chunks[-1].usage)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert list(c.completions.create(model="usage/meter", prompt="Hi", max_tokens=4,
                                     stream=True))[-1].usage is None
    chat_chunks = list(c.chat.completions.create(
        model="usage/meter", max_tokens=6, stream=True,
        messages=[{"role": "user", "content": "Hi"}]))
    assert all(ch.usage is None for ch in chat_chunks)  # not asked for: not passed on
    engine_after = (metric(fleet.a, "loraplane_prompt_tokens_total", model="usage/meter"),
                    metric(fleet.a, "loraplane_generation_tokens_total", model="usage/meter"))
    served = (engine_after[0] - engine_before[0], engine_after[1] - engine_before[1])
    deadline = time.monotonic() + 10
    while True:  # usage is settled just after each response
        u = fleet.admin("GET", "/tenants/usage/usage").json()
        if u["total"]["requests"] == 5 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert u["total"]["requests"] == 5
    assert (u["total"]["prompt_tokens"], u["total"]["completion_tokens"]) == served
    assert u["models"]["usage/meter"]["completion_tokens"] >= seen["completion_tokens"]
    m = metric(fleet.gateway, "loraplane_gateway_usage_completion_tokens_total", tenant="usage")
    assert m == served[1]


def test_request_limit_answers_429_with_headers_then_recovers(fleet: Fleet) -> None:
    c = fleet.client(fleet.tenant("limited", requests_per_minute=30))
    raw = c.completions.with_raw_response.create(model=BASE, prompt="x", max_tokens=1)
    assert raw.headers["x-ratelimit-limit-requests"] == "30"
    assert raw.headers["x-ratelimit-remaining-requests"] == "29"
    limited = None
    for _ in range(40):
        try:
            c.completions.create(model=BASE, prompt="x", max_tokens=1)
        except openai.RateLimitError as e:
            limited = e
            break
    assert limited is not None
    h = limited.response.headers
    assert limited.code == "rate_limit_exceeded"
    assert h["x-ratelimit-remaining-requests"] == "0" and 1 <= int(h["retry-after"]) <= 2
    assert h["x-ratelimit-reset-requests"].endswith("s")
    time.sleep(float(h["retry-after-ms"]) / 1000 + 0.1)
    assert c.completions.create(model=BASE, prompt="x", max_tokens=1).choices


def test_token_reservation_is_reconciled(fleet: Fleet) -> None:
    key = fleet.tenant("tokens", tokens_per_minute=600)
    c = fleet.client(key)
    with httpx.stream("POST", fleet.gateway + "/v1/completions", timeout=60,
                      headers={"Authorization": f"Bearer {key}"},
                      json={"model": BASE, "prompt": "Count", "max_tokens": 500,
                            "stream": True, "ignore_eos": True}) as r:
        assert r.status_code == 200
        assert int(r.headers["x-ratelimit-remaining-tokens"]) < 100
        lines = r.iter_lines()  # held open: breaking out of it would close the stream
        assert next(lines).startswith("data: ")
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=BASE, prompt="x", max_tokens=200)
        assert e.value.response.headers["x-ratelimit-limit-tokens"] == "600"
        assert e.value.response.json()["error"]["type"] == "tokens"
    # Leaving the stream gives back what it did not use.
    deadline = time.monotonic() + 10
    while True:
        try:
            c.completions.create(model=BASE, prompt="x", max_tokens=200)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the unused reservation did not come back"
            time.sleep(0.2)


def test_concurrency_limit(fleet: Fleet) -> None:
    key = fleet.tenant("conc", max_concurrent_requests=1)
    c = fleet.client(key)
    stream = c.completions.create(model=BASE, prompt="Go", max_tokens=300, stream=True,
                                  extra_body={"ignore_eos": True})
    events = iter(stream)  # held open while the second request is refused
    next(events)
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(model=BASE, prompt="x", max_tokens=1)
    assert e.value.response.json()["error"]["type"] == "concurrency"
    stream.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            assert c.completions.create(model=BASE, prompt="x", max_tokens=1).choices
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_client_disconnect_aborts_on_the_engine(fleet: Fleet) -> None:
    key = fleet.tenant("leaver")
    fleet.admin("PUT", "/adapters/acme/poet", {"shared_with": ["beta", "router", "leaver"]})
    aborted = metric(fleet.b, "loraplane_requests_total", model="acme/poet",
                     finish_reason="abort")
    with httpx.stream("POST", fleet.gateway + "/v1/completions", timeout=60,
                      headers={"Authorization": f"Bearer {key}"},
                      json={"model": "acme/poet", "prompt": "Count", "max_tokens": 1000,
                            "stream": True, "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    deadline = time.monotonic() + 30
    while metric(fleet.b, "loraplane_requests_total", model="acme/poet",
                 finish_reason="abort") == aborted:
        assert time.monotonic() < deadline, "the engine kept generating for a gone client"
        time.sleep(0.2)
    assert metric(fleet.b, "loraplane_requests_running") == 0


def test_new_version_on_another_replica_is_retried_before_the_next_poll(
        fleet: Fleet) -> None:
    """A replica without the adapter's new engine name answers 404: the next one serves it."""
    proc, gateway = start_gateway(fleet.folder, "gateway-stale", fleet.redis_url,
                                  [fleet.a, fleet.b], poll_interval_s=3600)  # residency stays stale
    try:
        name = "swap/bot@v2"
        # Neither replica held the name at the gateway's one poll, so it ranks them by hash
        # alone: put the new version only on the one ranked second.
        first = max((fleet.a, fleet.b), key=lambda url: routing.rendezvous(name, url))
        holder = fleet.b if first == fleet.a else fleet.a
        load_adapter(holder, name, fleet.folder, seed=21)
        assert fleet.admin("PUT", "/adapters/swap/bot", {"engine_name": name}).status_code == 200
        key = fleet.tenant("swap")
        c = openai.OpenAI(base_url=gateway + "/v1", api_key=key, max_retries=0, timeout=60)
        retries = metric(gateway, "loraplane_gateway_upstream_retries_total")
        assert c.completions.create(model="swap/bot", prompt="hi", max_tokens=2).model == (
            "swap/bot")
        chunks = list(c.chat.completions.create(
            model="swap/bot", max_tokens=2, stream=True,
            messages=[{"role": "user", "content": "hi"}]))
        assert chunks and {ch.model for ch in chunks} == {"swap/bot"}
        assert metric(holder, "loraplane_requests_total", model=name) == 2
        assert metric(gateway, "loraplane_gateway_upstream_retries_total") - retries == 2
        # A name no replica holds still ends in the tenant's 404, without the engine's name.
        fleet.admin("PUT", "/adapters/swap/bot", {"engine_name": "swap/bot@v3"})
        with pytest.raises(openai.NotFoundError) as e:
            c.completions.create(model="swap/bot", prompt="hi", max_tokens=2)
        assert e.value.code == "model_not_found" and "@v3" not in e.value.response.text
    finally:
        proc.stop()


def test_failover_when_a_replica_is_killed(fleet: Fleet) -> None:
    proc, gateway = start_gateway(fleet.folder, "gateway-2", fleet.redis_url,
                                  [fleet.c, fleet.d])
    try:
        key = fleet.admin("POST", "/tenants/beta/keys", {}).json()["key"]
        c = openai.OpenAI(base_url=gateway + "/v1", api_key=key, max_retries=0, timeout=60)
        c.completions.create(model="beta/fo", prompt="warm", max_tokens=2)
        served_by_c = metric(fleet.c, "loraplane_requests_total", model="beta/fo") > 0
        victim, survivor = ("c", "d") if served_by_c else ("d", "c")
        results: list[str] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                r = c.completions.create(model="beta/fo", prompt="again", max_tokens=4)
                results.append(r.choices[0].finish_reason or "")

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(traffic) for _ in range(2)]
            time.sleep(1.0)
            fleet.procs[victim].kill()
            time.sleep(2.0)
            stop.set()
            for f in futures:
                f.result()  # no request failed
        assert len(results) > 4
        survivor_url = fleet.c if survivor == "c" else fleet.d
        assert metric(survivor_url, "loraplane_requests_total", model="beta/fo") > 0
        deadline = time.monotonic() + 10
        while True:
            replicas = {r["url"]: r for r in httpx.get(
                gateway + "/admin/v1/replicas",
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()}
            victim_url = fleet.c if victim == "c" else fleet.d
            if not replicas[victim_url]["healthy"]:
                break
            assert time.monotonic() < deadline, "a dead replica stayed in rotation"
            time.sleep(0.2)
        assert replicas[survivor_url]["healthy"]
        # With every replica down the base model is still known: a 503 to retry, not a 404.
        fleet.procs[survivor].kill()
        deadline = time.monotonic() + 10
        while any(r["healthy"] for r in httpx.get(
                gateway + "/admin/v1/replicas",
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()):
            assert time.monotonic() < deadline, "a dead replica stayed in rotation"
            time.sleep(0.2)
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model=BASE, prompt="hi", max_tokens=2)
        assert e.value.status_code == 503 and e.value.code == "no_replica_available"
    finally:
        proc.stop()


def test_tenants_cli_wraps_the_admin_api(fleet: Fleet) -> None:
    env = {**os.environ, "LORAPLANE_GATEWAY_URL": fleet.gateway,
           "LORAPLANE_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}

    def cli(*args: str) -> Any:
        out = subprocess.run([sys.executable, "-m", "loraplane.cli", "tenants", *args],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout) if out.stdout.strip() else None

    assert cli("create", "clitenant", "--rpm", "50")["limits"]["requests_per_minute"] == 50
    key = cli("add-key", "clitenant", "--name", "laptop")["key"]
    assert key.startswith("lp-")
    assert cli("set-limits", "clitenant", "--tpm", "9000") == {
        "requests_per_minute": None, "tokens_per_minute": 9000, "max_concurrent_requests": None}
    assert cli("share", "clitenant/tool", "--public")["public"] is True
    fleet.client(key).completions.create(model=BASE, prompt="hi", max_tokens=2)
    assert cli("usage", "clitenant")["total"]["requests"] in (0, 1)  # settles just after
    assert [k["name"] for k in cli("keys", "clitenant")] == ["laptop"]
    assert "clitenant" in {t["name"] for t in cli("list")}
    cli("unregister", "clitenant/tool")
    cli("delete", "clitenant")
    with pytest.raises(openai.AuthenticationError):
        fleet.client(key).models.list()


def test_engine_name_is_forwarded_and_hidden_from_the_tenant(fleet: Fleet) -> None:
    """The operator's records name a versioned engine model; tenants only ever see their id."""
    for i, version in enumerate(("v1", "v2")):
        load_adapter(fleet.b, f"vers/bot@{version}", fleet.folder, seed=10 + i)
    deadline = time.monotonic() + 10
    while not {"vers/bot@v1", "vers/bot@v2"} <= set(
            {r["url"]: r for r in fleet.admin("GET", "/replicas").json()}[fleet.b]["adapters"]):
        assert time.monotonic() < deadline, "the gateway did not see the new residency"
        time.sleep(0.1)
    c = fleet.client(fleet.tenant("vers"))
    assert fleet.admin("PUT", "/adapters/vers/bot",
                       {"engine_name": "vers/bot@v1"}).status_code == 200
    served = metric(fleet.b, "loraplane_requests_total", model="vers/bot@v1")
    assert c.completions.create(model="vers/bot", prompt="hi", max_tokens=3).model == "vers/bot"
    chunks = list(c.completions.create(model="vers/bot", prompt="hi", max_tokens=3, stream=True,
                                       stream_options={"include_usage": True}))
    assert chunks and {ch.model for ch in chunks} == {"vers/bot"}
    chat = c.chat.completions.create(model="vers/bot", max_tokens=3,
                                     messages=[{"role": "user", "content": "hi"}])
    assert chat.model == "vers/bot"
    chat_chunks = list(c.chat.completions.create(
        model="vers/bot", max_tokens=3, stream=True, messages=[{"role": "user", "content": "hi"}]))
    assert {ch.model for ch in chat_chunks} == {"vers/bot"}
    assert metric(fleet.b, "loraplane_requests_total", model="vers/bot@v1") - served == 4
    assert "vers/bot" in {m.id for m in c.models.list()}
    assert not any("@" in m.id for m in c.models.list())
    # A new version: the next request goes out under the new name.
    fleet.admin("PUT", "/adapters/vers/bot", {"engine_name": "vers/bot@v2"})
    assert c.completions.create(model="vers/bot", prompt="hi", max_tokens=2).model == "vers/bot"
    assert metric(fleet.b, "loraplane_requests_total", model="vers/bot@v2") == 1
    # A sharing change through the admin API keeps the engine name.
    fleet.admin("PUT", "/adapters/vers/bot", {"shared_with": ["beta"]})
    assert fleet.admin("GET", "/adapters/vers/bot").json()["engine_name"] == "vers/bot@v2"
    # An engine's error quotes the tenant's id, not the engine's name.
    fleet.admin("PUT", "/adapters/vers/bot", {"engine_name": "vers/bot@gone"})
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="vers/bot", prompt="hi", max_tokens=2)
    assert "@gone" not in e.value.response.text and "vers/bot" in e.value.response.text
    assert fleet.admin("DELETE", "/adapters/vers/bot").status_code == 204
