"""The gateway fleet's store: Redis, with admission and settlement as Lua scripts (atomic),
run through the request path's own pipelined connection (``scripts.ScriptRunner``).

Keys (all under ``lp:``): ``tenants`` (set), ``tenant:{t}`` (hash: created, rpm, tpm, conc),
``keys:{t}`` (hash: key id -> JSON), ``keyhash`` (hash: key hash -> "tenant key-id"),
``adapters`` (hash: id -> JSON ``{"public", "shared_with", "engine_name"}``, see
schemas.AdapterRecord; the operator writes these through this class), ``rl:req:{t}`` /
``rl:tok:{t}`` (token buckets: level, ts), ``conc:{t}`` (sorted set: request id by lease end),
``usage:{t}`` (hash: "model\\tfield").
Times come from Redis's clock, so gateway replicas need not agree on theirs. The scripts name
keys they derive from the tenant, so this layout needs one Redis (or a primary with replicas),
not Redis Cluster.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis

from loraplane.gateway.keys import new_key_id
from loraplane.gateway.limits import Admission, Outcome, Settlement
from loraplane.gateway.schemas import Adapter, AdapterRecord, KeyInfo, Limits, Tenant, Usage
from loraplane.gateway.store.base import Store
from loraplane.gateway.store.scripts import Script, ScriptRunner

P = "lp:"
_LIMIT_FIELDS = (("rpm", "requests_per_minute"), ("tpm", "tokens_per_minute"),
                 ("conc", "max_concurrent_requests"))

# ARGV: key hash, adapter id ("" for the base model), tokens to reserve, request id, lease ms.
# Returns {outcome, tenant, reason, retry ms, rpm, requests left, tpm, tokens left, engine name}
# as strings; the engine name is the adapter's engine_name, else its id ("" for the base model).
ADMIT = Script("""
local P = 'lp:'
local ref = redis.call('HGET', P .. 'keyhash', ARGV[1])
if not ref then return {'unauthorized'} end
local tenant = string.match(ref, '^(%S+)')
local adapter = ARGV[2]
local served = ''
if adapter ~= '' then
  local raw = redis.call('HGET', P .. 'adapters', adapter)
  if not raw then return {'not_found', tenant} end
  local a = cjson.decode(raw)
  if string.match(adapter, '^([^/]+)/') ~= tenant then
    local ok = a.public == true
    if not ok and type(a.shared_with) == 'table' then
      for _, t in ipairs(a.shared_with) do if t == tenant then ok = true end end
    end
    if not ok then return {'not_found', tenant} end
  end
  served = adapter
  if type(a.engine_name) == 'string' and a.engine_name ~= '' then served = a.engine_name end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lim = redis.call('HMGET', P .. 'tenant:' .. tenant, 'rpm', 'tpm', 'conc')
local rpm, tpm, conc = tonumber(lim[1]), tonumber(lim[2]), tonumber(lim[3])
local cost = tonumber(ARGV[3])
local function level(key, cap)
  local v = redis.call('HMGET', key, 'level', 'ts')
  if not v[1] then return cap end
  return math.min(cap, tonumber(v[1]) + math.max(0, now - tonumber(v[2])) * cap / 60000)
end
local reason, retry = '', 0
local rk, tk, ck = P .. 'rl:req:' .. tenant, P .. 'rl:tok:' .. tenant, P .. 'conc:' .. tenant
local rlev, tlev = 0, 0
if rpm then
  rlev = level(rk, rpm)
  if rlev < 1 then reason = 'requests'; retry = (1 - rlev) * 60000 / rpm end
end
if tpm then
  tlev = level(tk, tpm)
  if cost > tpm then
    if reason == '' then reason = 'too_large' end
  elseif tlev < cost then
    if reason == '' then reason = 'tokens' end
    retry = math.max(retry, (cost - tlev) * 60000 / tpm)
  end
end
if conc then
  redis.call('ZREMRANGEBYSCORE', ck, '-inf', now)
  if redis.call('ZCARD', ck) >= conc then
    if reason == '' then reason = 'concurrency' end
    retry = math.max(retry, 1000)
  end
end
local outcome = 'limited'
if reason == '' then
  outcome = 'ok'
  if rpm then
    rlev = rlev - 1
    redis.call('HSET', rk, 'level', tostring(rlev), 'ts', now)
    redis.call('PEXPIRE', rk, 120000)
  end
  if tpm then
    tlev = tlev - cost
    redis.call('HSET', tk, 'level', tostring(tlev), 'ts', now)
    redis.call('PEXPIRE', tk, 120000)
  end
  if conc then
    local lease = tonumber(ARGV[5])
    redis.call('ZADD', ck, now + lease, ARGV[4])
    redis.call('PEXPIRE', ck, lease)
  end
end
return {outcome, tenant, reason, tostring(retry), lim[1] or '', tostring(rlev), lim[2] or '',
        tostring(tlev), served}
""")

# ARGV: tenant, request id, model, reserved tokens, prompt tokens, completion tokens, metered.
SETTLE = Script("""
local P = 'lp:'
local tenant = ARGV[1]
local used = tonumber(ARGV[5]) + tonumber(ARGV[6])
local tpm = tonumber(redis.call('HGET', P .. 'tenant:' .. tenant, 'tpm'))
local tk = P .. 'rl:tok:' .. tenant
if tpm then
  local lv = redis.call('HGET', tk, 'level')
  if lv then
    local refund = tonumber(ARGV[4]) - used
    redis.call('HSET', tk, 'level', tostring(math.min(tpm, tonumber(lv) + refund)))
  end
end
redis.call('ZREM', P .. 'conc:' .. tenant, ARGV[2])
if ARGV[7] ~= '1' then return 0 end
local u = P .. 'usage:' .. tenant
redis.call('HINCRBY', u, ARGV[3] .. '\\trequests', 1)
redis.call('HINCRBY', u, ARGV[3] .. '\\tprompt_tokens', ARGV[5])
redis.call('HINCRBY', u, ARGV[3] .. '\\tcompletion_tokens', ARGV[6])
return 1
""")


def _num(value: str) -> int | None:
    return int(value) if value else None


class RedisStore(Store):
    """State shared by every gateway replica, in one Redis."""

    def __init__(self, url: str, concurrency_lease_s: float = 600.0,
                 timeout_s: float | None = None) -> None:
        # Any: answers are str (decode_responses), which redis-py's annotations cannot express.
        self._redis: Any = aioredis.from_url(url, decode_responses=True,
                                             socket_connect_timeout=timeout_s,
                                             socket_timeout=timeout_s)
        self._scripts = ScriptRunner(url, timeout_s)  # the request path's lean connection
        self._lease_ms = int(concurrency_lease_s * 1000)

    async def close(self) -> None:
        await self._scripts.close()
        await self._redis.aclose()

    async def ping(self) -> None:
        await self._redis.ping()

    @staticmethod
    def _tenant(name: str, fields: dict[str, str]) -> Tenant:
        limits = Limits(**{long: _num(fields.get(short, "")) for short, long in _LIMIT_FIELDS})
        return Tenant(name=name, created=int(fields.get("created", 0)), limits=limits)

    async def create_tenant(self, name: str, limits: Limits) -> Tenant | None:
        created = int(time.time())
        if not await self._redis.hsetnx(P + "tenant:" + name, "created", created):
            return None
        await self._redis.sadd(P + "tenants", name)
        await self.set_limits(name, limits)
        return Tenant(name=name, created=created, limits=limits)

    async def get_tenant(self, name: str) -> Tenant | None:
        fields = await self._redis.hgetall(P + "tenant:" + name)
        return self._tenant(name, fields) if fields else None

    async def list_tenants(self) -> list[Tenant]:
        names = sorted(await self._redis.smembers(P + "tenants"))
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(P + "tenant:" + name)
            rows = await pipe.execute()
        return [self._tenant(n, f) for n, f in zip(names, rows, strict=True) if f]

    async def delete_tenant(self, name: str) -> bool:
        keys = await self._redis.hgetall(P + "keys:" + name)
        async with self._redis.pipeline(transaction=True) as pipe:
            for raw in keys.values():
                pipe.hdel(P + "keyhash", json.loads(raw)["hash"])
            pipe.delete(P + "keys:" + name, P + "rl:req:" + name, P + "rl:tok:" + name,
                        P + "conc:" + name)
            pipe.srem(P + "tenants", name)
            pipe.delete(P + "tenant:" + name)
            *_, deleted = await pipe.execute()
        return bool(deleted)

    async def set_limits(self, name: str, limits: Limits) -> bool:
        key = P + "tenant:" + name
        if not await self._redis.exists(key):
            return False
        values = {short: getattr(limits, long) for short, long in _LIMIT_FIELDS}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(key, *(k for k, v in values.items() if v is None), "_")
            set_ = {k: v for k, v in values.items() if v is not None}
            if set_:
                pipe.hset(key, mapping=set_)
            await pipe.execute()
        return True

    async def add_key(self, tenant: str, key_hash: str, name: str) -> KeyInfo:
        info = KeyInfo(id=new_key_id(), name=name, created=int(time.time()))
        record = json.dumps({"hash": key_hash, "name": name, "created": info.created})
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(P + "keys:" + tenant, info.id, record)
            pipe.hset(P + "keyhash", key_hash, f"{tenant} {info.id}")
            await pipe.execute()
        return info

    async def list_keys(self, tenant: str) -> list[KeyInfo]:
        rows = await self._redis.hgetall(P + "keys:" + tenant)
        infos = [KeyInfo(id=k, name=(r := json.loads(v))["name"], created=r["created"])
                 for k, v in rows.items()]
        return sorted(infos, key=lambda i: (i.created, i.id))

    async def revoke_key(self, tenant: str, key_id: str) -> bool:
        raw = await self._redis.hget(P + "keys:" + tenant, key_id)
        if raw is None:
            return False
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(P + "keyhash", json.loads(raw)["hash"])
            pipe.hdel(P + "keys:" + tenant, key_id)
            await pipe.execute()
        return True

    async def authenticate(self, key_hash: str) -> str | None:
        ref = await self._redis.hget(P + "keyhash", key_hash)
        return ref.split(" ", 1)[0] if ref else None

    async def put_adapter(self, adapter: Adapter) -> None:
        record = AdapterRecord(**adapter.model_dump(exclude={"id"}))
        await self._redis.hset(P + "adapters", adapter.id,
                               record.model_dump_json(exclude_none=True))

    async def get_adapter(self, adapter_id: str) -> Adapter | None:
        raw = await self._redis.hget(P + "adapters", adapter_id)
        return Adapter(id=adapter_id, **json.loads(raw)) if raw else None

    async def list_adapters(self) -> list[Adapter]:
        rows = await self._redis.hgetall(P + "adapters")
        return [Adapter(id=k, **json.loads(v)) for k, v in sorted(rows.items())]

    async def delete_adapter(self, adapter_id: str) -> bool:
        return bool(await self._redis.hdel(P + "adapters", adapter_id))

    async def admit(self, key_hash: str, adapter: str | None, tokens: int,
                    request_id: str) -> Admission:
        (r,) = await self._scripts.run(ADMIT, [(key_hash, adapter or "", tokens, request_id,
                                                 self._lease_ms)])
        outcome = Outcome(r[0])
        if len(r) < 3:
            return Admission(outcome, r[1] if len(r) > 1 else "")
        return Admission(outcome, r[1], reason=r[2], retry_after_s=float(r[3]) / 1000,
                         limit_requests=_num(r[4]), remaining_requests=float(r[5]),
                         limit_tokens=_num(r[6]), remaining_tokens=float(r[7]),
                         engine_name=r[8])

    async def settle(self, done: list[Settlement]) -> None:
        await self._scripts.run(SETTLE, [(d.tenant, d.request_id, d.model, d.reserved,
                                          d.prompt_tokens, d.completion_tokens, int(d.metered))
                                         for d in done])

    async def usage(self, tenant: str) -> dict[str, Usage]:
        rows = await self._redis.hgetall(P + "usage:" + tenant)
        out: dict[str, Usage] = {}
        for key, value in rows.items():
            model, _, name = key.rpartition("\t")
            setattr(out.setdefault(model, Usage()), name, int(value))
        return dict(sorted(out.items()))
