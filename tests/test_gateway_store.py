"""The store contract, run against a real redis-server and against the in-memory store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from loraplane.gateway.keys import hash_key, new_key
from loraplane.gateway.limits import Outcome, Settlement
from loraplane.gateway.schemas import Adapter, Limits
from loraplane.gateway.store.base import Store
from loraplane.gateway.store.memory import MemoryStore
from loraplane.gateway.store.redis import RedisStore
from tests.gateway_procs import start_redis

T = TypeVar("T")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.stop()


@pytest.fixture(params=["memory", "redis"])
def with_store(request: pytest.FixtureRequest) -> Callable[[Callable[[Store], Awaitable[T]]], T]:
    """Run an async test body against a fresh store of each kind."""

    def run(body: Callable[[Store], Awaitable[T]]) -> T:
        async def main() -> T:
            if request.param == "memory":
                store: Store = MemoryStore()
            else:
                store = RedisStore(request.getfixturevalue("redis_url"))
                await store._redis.flushdb()  # type: ignore[attr-defined]
            try:
                return await body(store)
            finally:
                await store.close()

        return asyncio.run(main())

    return run


async def _tenant_with_key(store: Store, name: str, limits: Limits | None = None) -> str:
    assert await store.create_tenant(name, limits or Limits()) is not None
    key = new_key()
    await store.add_key(name, hash_key(key), "test")
    return hash_key(key)


def test_tenants_keys_and_revocation(with_store: Callable) -> None:
    async def body(store: Store) -> None:
        h = await _tenant_with_key(store, "acme", Limits(requests_per_minute=5))
        assert await store.create_tenant("acme", Limits()) is None  # taken
        assert [t.name for t in await store.list_tenants()] == ["acme"]
        assert (await store.get_tenant("acme")).limits.requests_per_minute == 5  # type: ignore
        assert await store.authenticate(h) == "acme"
        assert await store.authenticate(hash_key("lp-wrong")) is None
        keys = await store.list_keys("acme")
        assert len(keys) == 1 and keys[0].name == "test"
        assert await store.revoke_key("acme", keys[0].id)
        assert await store.authenticate(h) is None
        assert not await store.revoke_key("acme", keys[0].id)
        h2 = await _tenant_with_key(store, "beta")
        assert await store.set_limits("beta", Limits(tokens_per_minute=100))
        assert (await store.get_tenant("beta")).limits == Limits(  # type: ignore[union-attr]
            tokens_per_minute=100)
        assert await store.delete_tenant("beta")
        assert await store.authenticate(h2) is None  # its keys went with it
        assert not await store.delete_tenant("beta")
        assert not await store.set_limits("beta", Limits())

    with_store(body)


def test_adapter_access_rules(with_store: Callable) -> None:
    async def body(store: Store) -> None:
        acme = await _tenant_with_key(store, "acme")
        beta = await _tenant_with_key(store, "beta")
        await store.put_adapter(Adapter(id="acme/poet", shared_with=["beta"]))
        await store.put_adapter(Adapter(id="acme/secret"))
        await store.put_adapter(Adapter(id="gamma/open", public=True))
        assert await store.accessible_adapters("acme") == ["acme/poet", "acme/secret",
                                                           "gamma/open"]
        assert await store.accessible_adapters("beta") == ["acme/poet", "gamma/open"]
        cases = [(acme, "acme/secret", Outcome.OK), (beta, "acme/poet", Outcome.OK),
                 (beta, "acme/secret", Outcome.NOT_FOUND), (beta, "acme/nope", Outcome.NOT_FOUND),
                 (acme, "acme/nope", Outcome.NOT_FOUND), (beta, "gamma/open", Outcome.OK),
                 (beta, None, Outcome.OK), (hash_key("lp-x"), None, Outcome.UNAUTHORIZED)]
        for i, (key_hash, adapter, outcome) in enumerate(cases):
            a = await store.admit(key_hash, adapter, 10, f"r{i}")
            assert a.outcome is outcome, (adapter, a)

    with_store(body)


def test_admission_names_the_engine_model(with_store: Callable) -> None:
    async def body(store: Store) -> None:
        acme = await _tenant_with_key(store, "acme")
        beta = await _tenant_with_key(store, "beta")
        await store.put_adapter(Adapter(id="acme/bot", shared_with=["beta"],
                                        engine_name="acme/bot@v1"))
        await store.put_adapter(Adapter(id="acme/plain"))
        got = await store.get_adapter("acme/bot")
        assert got is not None and got.served_as == "acme/bot@v1"
        assert [a.served_as for a in await store.list_adapters()] == ["acme/bot@v1",
                                                                      "acme/plain"]
        for key_hash in (acme, beta):
            assert (await store.admit(key_hash, "acme/bot", 1, "r")).engine_name == "acme/bot@v1"
        assert (await store.admit(acme, "acme/plain", 1, "r")).engine_name == "acme/plain"
        assert (await store.admit(acme, None, 1, "r")).engine_name == ""
        # A new version is a new record: the next admission already names it.
        await store.put_adapter(Adapter(id="acme/bot", shared_with=["beta"],
                                        engine_name="acme/bot@v2"))
        assert (await store.admit(beta, "acme/bot", 1, "r")).engine_name == "acme/bot@v2"

    with_store(body)


def test_request_and_token_buckets(with_store: Callable) -> None:
    async def body(store: Store) -> None:
        h = await _tenant_with_key(store, "acme", Limits(requests_per_minute=3,
                                                         tokens_per_minute=1000))
        for i in range(3):
            a = await store.admit(h, None, 100, f"r{i}")
            assert a.outcome is Outcome.OK and a.limit_requests == 3
            assert int(a.remaining_requests) == 2 - i
        a = await store.admit(h, None, 100, "r3")
        assert a.outcome is Outcome.LIMITED and a.reason == "requests"
        assert 0 < a.retry_after_s <= 20  # one request comes back every 20 s
        assert 690 <= a.remaining_tokens <= 710  # 3 x 100 taken, a little refilled
        a = await store.admit(h, None, 5000, "big")
        assert a.outcome is Outcome.LIMITED  # over the bucket: never admissible

    with_store(body)


def test_settle_refunds_and_meters(with_store: Callable) -> None:
    async def body(store: Store) -> None:
        h = await _tenant_with_key(store, "acme", Limits(tokens_per_minute=600))
        a = await store.admit(h, None, 500, "r1")
        assert a.outcome is Outcome.OK
        assert (await store.admit(h, None, 500, "r2")).reason == "tokens"
        await store.settle([Settlement("acme", "r1", "tiny", 500, prompt_tokens=7,
                                       completion_tokens=13)])
        a = await store.admit(h, None, 500, "r3")  # 480 came back
        assert a.outcome is Outcome.OK, a
        await store.settle([Settlement("acme", "r3", "tiny", 500, metered=False)])
        usage = await store.usage("acme")
        assert usage["tiny"].model_dump() == {"requests": 1, "prompt_tokens": 7,
                                              "completion_tokens": 13}
        assert (await store.all_usage())["acme"]["tiny"].requests == 1

    with_store(body)


def test_concurrency_slots(with_store: Callable) -> None:
    async def body(store: Store) -> None:
        h = await _tenant_with_key(store, "acme", Limits(max_concurrent_requests=2))
        assert (await store.admit(h, None, 1, "a")).outcome is Outcome.OK
        assert (await store.admit(h, None, 1, "b")).outcome is Outcome.OK
        a = await store.admit(h, None, 1, "c")
        assert a.outcome is Outcome.LIMITED and a.reason == "concurrency"
        await store.settle([Settlement("acme", "a", "tiny", 1, 1, 0)])
        assert (await store.admit(h, None, 1, "c")).outcome is Outcome.OK

    with_store(body)


def test_limits_are_atomic_across_gateway_replicas(redis_url: str, tmp_path: Path) -> None:
    """Three clients (as three gateway replicas would) race for a 25-request budget."""

    async def main() -> list[Outcome]:
        stores = [RedisStore(redis_url) for _ in range(3)]
        await stores[0]._redis.flushdb()
        h = await _tenant_with_key(stores[0], "race", Limits(requests_per_minute=25))
        results = await asyncio.gather(*(stores[i % 3].admit(h, None, 1, f"r{i}")
                                         for i in range(90)))
        for s in stores:
            await s.close()
        return [r.outcome for r in results]

    outcomes = asyncio.run(main())
    assert outcomes.count(Outcome.OK) == 25
    assert outcomes.count(Outcome.LIMITED) == 65


def test_request_path_connection_recovers_from_flush_and_kill(redis_url: str) -> None:
    """Admission reloads its script after SCRIPT FLUSH and reconnects after the server drops it."""

    async def main() -> None:
        store = RedisStore(redis_url)
        await store._redis.flushdb()
        try:
            h = await _tenant_with_key(store, "recover", Limits(requests_per_minute=100))
            assert (await store.admit(h, None, 1, "a")).outcome is Outcome.OK
            await store._redis.script_flush()
            assert (await store.admit(h, None, 1, "b")).outcome is Outcome.OK
            killed = await store._redis.client_kill_filter(_type="normal", skipme=True)
            assert killed >= 1
            await asyncio.sleep(0.2)  # the loop sees the connection end
            assert (await store.admit(h, None, 1, "c")).outcome is Outcome.OK
            await store.settle([Settlement("recover", r, "tiny", 1, 1, 0) for r in "abc"])
            assert (await store.usage("recover"))["tiny"].requests == 3
        finally:
            await store.close()

    asyncio.run(main())
