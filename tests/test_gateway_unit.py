"""Pure logic of the gateway: routing, keys, buckets and headers, request costs, discovery."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loraplane.gateway import routing
from loraplane.gateway.cost import request_shape
from loraplane.gateway.discovery import ready_endpoints
from loraplane.gateway.embedded import read_tenants_file
from loraplane.gateway.errors import GatewayError
from loraplane.gateway.keys import bearer, hash_key, new_key, same_hash
from loraplane.gateway.limits import Admission, Outcome, format_duration, ratelimit_headers, refill
from loraplane.gateway.proxy import retry_elsewhere
from loraplane.gateway.rename import rename_event, rename_json


@dataclass
class R:
    url: str
    load: int = 0
    tiers: dict[str, str] = field(default_factory=dict)


def test_routing_prefers_gpu_then_host_then_neither() -> None:
    reps = [R("a"), R("b", tiers={"t/x": "host"}), R("c", tiers={"t/x": "gpu"})]
    assert [r.url for r in routing.rank("t/x", reps, 0.25)][:2] == ["c", "b"]
    reps[2].tiers = {}
    assert routing.rank("t/x", reps, 0.25)[0].url == "b"


def test_routing_bounds_load_and_spills_hot_adapter() -> None:
    reps = [R(f"r{i}", load=2) for i in range(4)]
    reps[0].tiers = {"t/hot": "gpu"}
    assert routing.rank("t/hot", reps, 0.25)[0].url == "r0"
    reps[0].load = 4  # bound: ceil(1.25 * (4 + 6 + 1) / 4) = 4; r0 would be at 5
    first = routing.rank("t/hot", reps, 0.25)
    assert first[0].url != "r0" and first[-1].url == "r0"  # still a fallback


def test_routing_sticks_adapters_to_few_replicas() -> None:
    reps = [R(f"http://10.0.0.{i}:8000") for i in range(8)]
    picks = Counter(routing.rank("acme/poet", reps, 0.25)[0].url for _ in range(50))
    assert len(picks) == 1  # same adapter, same replica while loads are even
    spread = Counter(routing.rank(f"t/a{i}", reps, 0.25)[0].url for i in range(400))
    assert len(spread) == 8 and max(spread.values()) < 100  # different adapters spread out
    # Removing one replica moves only the adapters that were on it.
    before = {i: routing.rank(f"t/a{i}", reps, 0.25)[0].url for i in range(400)}
    after = {i: routing.rank(f"t/a{i}", reps[1:], 0.25)[0].url for i in range(400)}
    moved = [i for i in before if before[i] != after[i]]
    assert all(before[i] == reps[0].url for i in moved)


def test_routing_base_model_goes_to_least_loaded() -> None:
    reps = [R("a", load=3), R("b", load=1), R("c", load=2)]
    assert [r.url for r in routing.rank(None, reps, 0.25)] == ["b", "c", "a"]
    assert routing.rank("t/x", [], 0.25) == []


def test_keys_are_prefixed_random_and_hashed() -> None:
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(re.fullmatch(r"lp-[A-Za-z0-9_-]{43}", k) for k in keys)
    k = next(iter(keys))
    assert len(hash_key(k)) == 64 and k not in hash_key(k)
    assert same_hash(hash_key(k), hash_key(k)) and not same_hash(hash_key(k), hash_key(k + "x"))
    assert bearer("Bearer lp-abc") == "lp-abc" and bearer("bearer  lp-abc ") == "lp-abc"
    assert bearer("Basic xyz") is None and bearer("Bearer ") is None and bearer(None) is None


def test_bucket_refill_and_headers() -> None:
    assert refill(None, None, 1000.0, 60) == 60
    assert refill(0.0, 0.0, 1000.0, 60) == pytest.approx(1.0)  # 1 per second
    assert refill(59.0, 0.0, 10_000.0, 60) == 60  # capped
    assert [format_duration(s) for s in (0.02, 1, 59.5, 360)] == ["20ms", "1s", "1m0s", "6m0s"]
    a = Admission(Outcome.LIMITED, "t", "requests", retry_after_s=2.5, limit_requests=30,
                  remaining_requests=0.25, limit_tokens=1000, remaining_tokens=400.7)
    h = ratelimit_headers(a)
    assert h["retry-after"] == "3" and h["retry-after-ms"] == "2500"
    assert h["x-ratelimit-limit-requests"] == "30" and h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-remaining-tokens"] == "400" and h["x-ratelimit-reset-tokens"] == "36s"
    assert "retry-after" not in ratelimit_headers(Admission(Outcome.OK, "t"))


def test_request_shape_and_reservation() -> None:
    s = request_shape({"model": "t/x", "prompt": "a" * 40, "max_tokens": 10}, chat=False)
    assert (s.model, s.stream, s.prompt_tokens, s.reserved(2048)) == ("t/x", False, 11, 21)
    s = request_shape({"model": "m", "prompt": [1, 2, 3]}, chat=False)
    assert s.reserved(2048) == 3 + 16  # OpenAI's default max_tokens
    s = request_shape({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                       "stream": True, "stream_options": {"include_usage": True}}, chat=True)
    assert s.stream and s.client_wants_usage and s.max_tokens is None
    assert s.reserved(100) == 100  # no max_tokens: up to the context
    s = request_shape({"model": "m", "messages": [], "max_completion_tokens": 7}, chat=True)
    assert s.max_tokens == 7
    for bad in ([], {"prompt": "x"}, {"model": 3}, {"model": "m", "max_tokens": "9"},
                {"model": "m", "max_tokens": -1}):
        with pytest.raises(GatewayError) as e:
            request_shape(bad, chat=False)
        assert e.value.status == 400


def _pod(ip: str, phase: str = "Running", ready: str = "True", port: int | None = None,
         deleting: bool = False) -> dict:
    containers = [{"name": "engine", "ports": [{"name": "http", "containerPort": port}]}
                  ] if port else [{"name": "engine"}]
    meta = {"name": ip, "deletionTimestamp": "2026-01-01T00:00:00Z"} if deleting else {}
    return {"metadata": meta, "spec": {"containers": containers},
            "status": {"phase": phase, "podIP": ip,
                       "conditions": [{"type": "Ready", "status": ready}]}}


def test_kubernetes_discovery_picks_ready_pods() -> None:
    pods = {"items": [_pod("10.0.0.2"), _pod("10.0.0.1", port=9000),
                      _pod("10.0.0.3", phase="Pending"), _pod("10.0.0.4", ready="False"),
                      _pod("10.0.0.5", deleting=True), _pod("fd00::7"),
                      {"status": {"phase": "Running"}}]}
    assert ready_endpoints(pods, 8000) == ["http://10.0.0.1:9000", "http://10.0.0.2:8000",
                                           "http://[fd00::7]:8000"]
    assert ready_endpoints({}, 8000) == []


def test_tenants_file_is_checked(tmp_path: Path) -> None:
    good = tmp_path / "t.yaml"
    good.write_text(f"tenants:\n  acme:\n    keys: [{hash_key('lp-x')}]\n"
                    "    limits: {requests_per_minute: 5}\n"
                    "adapters:\n  acme/poet: {path: ad/poet, shared_with: [beta]}\n")
    spec = read_tenants_file(good)
    assert spec.tenants["acme"].limits.requests_per_minute == 5
    assert spec.adapters["acme/poet"].path == tmp_path / "ad" / "poet"
    for text in ("tenants:\n  acme:\n    keys: [lp-plaintext-key]\n",
                 "tenants:\n  Not_A_Tenant: {}\n", "adapters:\n  noslash: {}\n",
                 "tenants: {acme: {unknown: 1}}\n", "tenants: [\n"):
        good.write_text(text)
        with pytest.raises(SystemExit):
            read_tenants_file(good)


def test_model_name_is_put_back_whatever_the_json_spacing() -> None:
    served, model = "acme/poet@v2", "acme/poet"
    spaced = b'{ "id" : "cmpl-1",\n  "model" :  "acme/poet@v2" , "choices": [{"text": ' \
             b'"I am acme/poet@v2", "index": 0}], "usage": {"prompt_tokens": 2} }'
    out, obj = rename_json(spaced, served, model)
    answer = json.loads(out)
    assert answer["model"] == model and obj["usage"] == {"prompt_tokens": 2}
    assert answer["choices"][0]["text"] == "I am acme/poet@v2"  # generated text is untouched
    escaped = b'{"model":"acme\\/poet@v2"}'  # "\/" is a legal escape of "/"
    assert json.loads(rename_json(escaped, served, model)[0])["model"] == model
    same = b'{"model": "acme/poet", "choices": []}'
    assert rename_json(same, model, model)[0] is same  # nothing to rename: the bytes as sent
    # Errors lose the engine name wherever they quote it, JSON or not.
    error = b'{"error": {"message": "The model `acme/poet@v2` does not exist.", "code": null}}'
    out, _ = rename_json(error, served, model, error=True)
    assert b"@v2" not in out and "`acme/poet`" in json.loads(out)["error"]["message"]
    assert rename_json(b"no acme/poet@v2 here", served, model, error=True)[0] == (
        b"no acme/poet here")
    # SSE events: spaced data, "data:" without a space, other fields kept, [DONE] passed on.
    event = b'id: 7\ndata: {"model" : "acme/poet@v2", "choices" : [ ]}\n\n'
    out, data = rename_event(event, served, model)
    assert out.startswith(b"id: 7\ndata: ") and out.endswith(b"\n\n")
    assert json.loads(out.split(b"data: ", 1)[1])["model"] == model and data["choices"] == []
    out, data = rename_event(b'data: {"model" : "acme/poet@v2", "usage": null}\n\n', served, model)
    assert out == b'data: {"model":"acme/poet","usage":null}\n\n' and data["usage"] is None
    out, data = rename_event(b'data:{"model":"acme/poet@v2"}\n\n', served, model)
    assert json.loads(out[6:]) == {"model": model}
    split = b'data: {"model":\ndata:  "acme/poet@v2"}\n\n'  # one value over two data lines
    out, data = rename_event(split, served, model)
    assert out.count(b"data:") == 1 and data == {"model": model}
    assert rename_event(b"data: [DONE]\n\n", served, model) == (b"data: [DONE]\n\n",
                                                                  b"[DONE]")
    assert rename_event(b": keep-alive\n\n", served, model) == (b": keep-alive\n\n", None)


def test_retry_elsewhere_on_overload_and_missing_engine_name() -> None:
    missing = json.dumps({"error": {"message": "no", "code": "model_not_found"}}).encode()
    assert retry_elsewhere(503, b"") and retry_elsewhere(404, missing)
    assert not retry_elsewhere(404, b'{"error": {"code": "not_found"}}')
    assert not retry_elsewhere(404, b"<html>") and not retry_elsewhere(400, missing)
    assert not retry_elsewhere(200, b"{}")
