"""The engine's OpenAI-compatible HTTP API against a fake engine, through a real uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from loraplane.engine.errors import (
    AdapterExistsError,
    InvalidAdapterError,
    ModelNotFoundError,
    OverloadedError,
    PromptTooLongError,
)
from loraplane.engine.outputs import AdapterInfo, EngineStats, RequestOutput
from loraplane.engine.sampling_params import SamplingParams
from loraplane.engine.server.api import build_app

BASE = "fake-base"


class FakeTokenizer:
    """One token per whitespace-separated word."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            if word not in self.vocab:
                self.vocab[word] = len(self.words)
                self.words.append(word)
            ids.append(self.vocab[word])
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        # Only the contents, so the fake echoes them back.
        return " ".join(m["content"] for m in messages)


class FakeEngine:
    """Echoes the prompt's words, one per token; honors max_tokens and stop strings.

    A prompt with the word "slow" is echoed in a loop with a delay per token (for disconnects),
    "explode" raises an unexpected error, and "midfail" fails after the first token.
    """

    model_name = BASE
    max_model_len = 64

    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()
        self.adapters: dict[str, AdapterInfo] = {}
        self.healthy = True
        self.started = self.shut_down = False
        self.aborted: set[str] = set()  # via abort()
        self.closed_early: set[str] = set()  # generator closed before it finished
        self.requests: list[tuple[str, str | list[int], SamplingParams, str | None]] = []
        self.running = 0

    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.shut_down = True

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       adapter: str | None,
                       tenant: str | None = None) -> AsyncIterator[RequestOutput]:
        if adapter is not None and adapter not in self.adapters:
            raise ModelNotFoundError(f"no model {adapter}", param="model")
        params.validate()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        if len(ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLongError("too long", param="prompt")
        words = self.tokenizer.decode(ids).split()
        if "explode" in words:
            raise RuntimeError("secret internal detail")
        self.requests.append((request_id, prompt, params, adapter))
        slow = "slow" in words
        text, n, finished = "", 0, False
        self.running += 1
        try:
            while True:
                if request_id in self.aborted:
                    finished = True
                    yield self._out(request_id, "", [], "abort", len(ids), n)
                    return
                if slow:
                    await asyncio.sleep(0.02)
                if n == 1 and "midfail" in words:
                    raise OverloadedError("engine overloaded mid-stream")
                if n >= len(words) and not slow:
                    finished = True
                    yield self._out(request_id, "", [], "stop", len(ids), n)
                    return
                word = words[n % len(words)]
                n += 1
                text += word + " "
                hit = next((s for s in params.stop if s in text), None)
                if hit is not None:
                    finished = True
                    delta = text[:text.index(hit)][len(text) - len(word) - 1:]
                    yield self._out(request_id, delta, [], "stop", len(ids), n - 1)
                    return
                done = n >= params.max_tokens
                finished = done
                yield self._out(request_id, word + " ", [ids[(n - 1) % len(ids)]],
                                "length" if done else None, len(ids), n)
                if done:
                    return
        finally:
            self.running -= 1
            if not finished:
                self.closed_early.add(request_id)

    @staticmethod
    def _out(rid: str, text: str, ids: list[int], reason: str | None, prompt_tokens: int,
             completion_tokens: int) -> RequestOutput:
        return RequestOutput(rid, text, ids, finished=reason is not None, finish_reason=reason,
                             prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    async def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    async def load_adapter(self, name: str, path: str) -> AdapterInfo:
        if path.endswith(".bin"):
            raise InvalidAdapterError(f"{path}: .bin adapters are refused, use safetensors",
                                      param="lora_path")
        if name in self.adapters:
            raise AdapterExistsError(f"adapter {name} exists")
        self.adapters[name] = AdapterInfo(name, path, 8, 16.0, ("q_proj", "v_proj"), 4096, False)
        return self.adapters[name]

    async def unload_adapter(self, name: str) -> None:
        if self.adapters.pop(name, None) is None:
            raise ModelNotFoundError(f"no adapter {name}", param="lora_name")

    def list_adapters(self) -> list[AdapterInfo]:
        return list(self.adapters.values())

    def stats(self) -> EngineStats:
        return EngineStats(running=self.running, pool_pages_total=100, pool_pages_kv=10,
                           pool_pages_adapter=5, page_bytes=4096,
                           adapters_registered=len(self.adapters))

    def is_healthy(self) -> bool:
        return self.healthy


@contextlib.contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run ``app`` in uvicorn on a free loopback port in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "server start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    e = FakeEngine()
    e.adapters["tenant-a"] = AdapterInfo("tenant-a", "/adapters/a", 8, 16.0, ("q_proj",), 1024,
                                         True, "gpu")
    return e


@pytest.fixture(scope="module")
def url(engine: FakeEngine) -> Iterator[str]:
    with serve(build_app(engine)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)


def test_lifespan_starts_and_stops_the_engine() -> None:
    e = FakeEngine()
    with serve(build_app(e)) as base:
        assert e.started and not e.shut_down
        assert httpx.get(f"{base}/health").status_code == 200
    assert e.shut_down


def test_models_lists_base_and_adapters(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) >= {BASE, "tenant-a"}
    assert models["tenant-a"].parent == BASE  # type: ignore[attr-defined]
    assert models["tenant-a"].root == "/adapters/a"  # type: ignore[attr-defined]
    assert client.models.retrieve("tenant-a").id == "tenant-a"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_completion(client: openai.OpenAI) -> None:
    r = client.completions.create(model=BASE, prompt="one two three four", max_tokens=3)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == BASE
    assert r.choices[0].text == "one two three "
    assert r.choices[0].finish_reason == "length" and r.choices[0].logprobs is None
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 3, 7)


def test_completion_defaults_and_token_prompt(client: openai.OpenAI,
                                              engine: FakeEngine) -> None:
    r = client.completions.create(model=BASE, prompt="red green")
    assert r.choices[0].text == "red green " and r.choices[0].finish_reason == "stop"
    params = engine.requests[-1][2]
    assert (params.max_tokens, params.temperature, params.top_p) == (16, 1.0, 1.0)
    ids = engine.tokenizer.encode("red green blue")
    r = client.completions.create(model=BASE, prompt=ids, max_tokens=5, temperature=0,
                                  seed=7, extra_body={"top_k": 3, "ignore_eos": True})
    assert r.choices[0].text == "red green blue "
    rid, prompt, params, _ = engine.requests[-1]
    assert prompt == ids and rid == r.id
    assert (params.temperature, params.seed, params.top_k, params.ignore_eos) == (0.0, 7, 3, True)
    r = client.completions.create(model=BASE, prompt=["just one"], max_tokens=5)
    assert r.choices[0].text == "just one "


def test_completion_stop_strings(client: openai.OpenAI) -> None:
    r = client.completions.create(model=BASE, prompt="alpha beta gamma delta", max_tokens=10,
                                  stop=["gamma", "zeta"])
    assert r.choices[0].text == "alpha beta " and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=BASE, prompt="alpha beta gamma", stop="beta")
    assert r.choices[0].text == "alpha "


def test_completion_stream(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model=BASE, prompt="a b c d", max_tokens=3,
                                            stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "a b c "
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and all(f is None for f in finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].usage.prompt_tokens == 4
    assert len({c.id for c in chunks}) == 1


def test_chat(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=BASE, max_tokens=4,
        messages=[{"role": "system", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "hi there"}]}])
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "be brief hi there "
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (4, 4)
    r = client.chat.completions.create(model="tenant-a", max_completion_tokens=1,
                                       messages=[{"role": "user", "content": "x y"}])
    assert r.choices[0].message.content == "x " and r.model == "tenant-a"


def test_chat_defaults_max_tokens_to_the_room_left(client: openai.OpenAI,
                                                   engine: FakeEngine) -> None:
    client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "u v w"}])
    assert engine.requests[-1][2].max_tokens == engine.max_model_len - 3


def test_chat_stream(client: openai.OpenAI, engine: FakeEngine) -> None:
    chunks = list(client.chat.completions.create(
        model="tenant-a", messages=[{"role": "user", "content": "p q r"}], stream=True,
        stream_options={"include_usage": True}))
    assert engine.requests[-1][3] == "tenant-a"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "p q r "
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="missing", prompt="a")
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="missing", messages=[{"role": "user",
                                                                   "content": "a"}])
    assert err.value.code == "model_not_found"


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 2}, "n"),
    ({"logprobs": 1}, "logprobs"),
    ({"echo": True}, "echo"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1000}, "max_tokens"),
    ({"prompt": ["one", "two"]}, "prompt"),
    ({"stop": ["x"] * 20}, "stop"),
])
def test_bad_completion_params_are_400(client: openai.OpenAI, kwargs: dict[str, object],
                                       param: str) -> None:
    args: dict[str, object] = {"model": BASE, "prompt": "a b", **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**args)  # type: ignore[call-overload]
    body = err.value.body
    assert isinstance(body, dict) and body["param"] == param, body
    assert body["type"] == "invalid_request_error" and body["message"]


def test_bad_chat_requests_are_400(client: openai.OpenAI) -> None:
    image: list[Any] = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model=BASE, messages=image)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model=BASE, logprobs=True,
                                       messages=[{"role": "user", "content": "a"}])
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BASE, messages=[])
    assert err.value.param == "messages"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BASE, max_tokens=60,
                                       messages=[{"role": "user", "content": "a b c d e"}])
    assert err.value.code == "context_length_exceeded"


def test_error_shape_for_malformed_requests(url: str) -> None:
    def post(body: bytes | dict[str, object], path: str = "/v1/completions") -> httpx.Response:
        if isinstance(body, dict):
            return httpx.post(url + path, json=body)
        return httpx.post(url + path, content=body, headers={"content-type": "application/json"})

    r = post(b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = post({"model": BASE, "prompt": "a", "max_tokens": "many"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "max_tokens", r.json()
    r = httpx.post(url + "/v1/completions", content=b'{"model": "x"}')  # no content-type
    assert r.status_code == 400 and "application/json" in r.json()["error"]["message"]
    r = post({"model": BASE, "prompt": [1, "a"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = post({"prompt": "a"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = post({"model": BASE, "messages": [{"role": "tool", "content": "a"}]},
             "/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    r = post({"model": BASE, "messages": [{"role": "user", "content": "a"}] * 5000},
             "/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.get(url + "/v1/nothing-here")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_request_body_size_cap() -> None:
    body = b'{"model": "fake-base", "prompt": "' + b"a " * 100 + b'"}'
    headers = {"content-type": "application/json"}
    with serve(build_app(FakeEngine(), max_body_bytes=128)) as base:
        r = httpx.post(base + "/v1/completions", content=body, headers=headers)
        assert r.status_code == 413 and "larger than 128 bytes" in r.json()["error"]["message"]
        chunked = iter([body[:50], body[50:]])  # no Content-Length
        r = httpx.post(base + "/v1/completions", content=chunked, headers=headers)
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        r = httpx.post(base + "/v1/completions", json={"model": BASE, "prompt": "a"})
        assert r.status_code == 200


def test_unexpected_error_is_a_generic_500(url: str) -> None:
    r = httpx.post(url + "/v1/completions", json={"model": BASE, "prompt": "explode now"})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and "secret" not in r.text


def test_engine_error_mid_stream_is_an_error_event(url: str) -> None:
    body = {"model": BASE, "prompt": "midfail a b", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-1])["error"]["code"] == "overloaded"


def test_load_and_unload_adapter(url: str, client: openai.OpenAI) -> None:
    load = {"lora_name": "tenant-b", "lora_path": "/adapters/b"}
    r = httpx.post(url + "/v1/load_lora_adapter", json=load)
    assert r.status_code == 200, r.text
    assert r.json()["lora_name"] == "tenant-b" and r.json()["status"] == "loaded"
    assert "tenant-b" in {m.id for m in client.models.list()}
    r = httpx.post(url + "/v1/load_lora_adapter", json=load)
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_exists"
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": "/x.bin"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "/x.bin: .bin adapters are refused, use safetensors"
    assert r.json()["error"]["code"] == "invalid_adapter"
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": BASE, "lora_path": "/b"})
    assert r.status_code == 409
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "a b", "lora_path": "/b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "tenant-b"})
    assert r.status_code == 200 and r.json()["status"] == "unloaded"
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "tenant-b"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_health(url: str, engine: FakeEngine) -> None:
    assert httpx.get(url + "/health").status_code == 200
    engine.healthy = False
    try:
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    finally:
        engine.healthy = True


def test_metrics(url: str, client: openai.OpenAI) -> None:
    client.completions.create(model="tenant-a", prompt="m n o", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE, prompt="a", temperature=5)
    text = httpx.get(url + "/metrics").text
    for line in [
        'loraplane_requests_total{finish_reason="length",model="tenant-a"}',
        'loraplane_prompt_tokens_total{model="tenant-a"}',
        'loraplane_generation_tokens_total{model="tenant-a"}',
        'loraplane_request_errors_total{code="invalid_request_error"}',
        "loraplane_request_latency_seconds_bucket",
        "loraplane_time_to_first_token_seconds_bucket",
        "loraplane_requests_running ", "loraplane_requests_waiting ", "loraplane_batch_size ",
        'loraplane_pool_pages{kind="kv"} 10.0', 'loraplane_pool_pages{kind="adapter"} 5.0',
        'loraplane_pool_pages{kind="free"} 85.0', "loraplane_pool_page_bytes 4096.0",
        "loraplane_adapters_registered ", "loraplane_adapters_resident ",
        "loraplane_adapters_host ", 'loraplane_host_cache_bytes{kind="used"}',
        'loraplane_adapter_prefetch_total{outcome="hit"}',
        'loraplane_adapter_prefetch_total{outcome="miss"}',
        'loraplane_adapter_load_seconds_total{kind="hidden"}',
        'loraplane_adapter_load_seconds_total{kind="exposed"}',
        "loraplane_adapter_load_failures_total ",
    ]:
        assert line in text, line


def test_residency_reports_each_tier(url: str, engine: FakeEngine) -> None:
    engine.adapters["t-host"] = AdapterInfo("t-host", "/h", 4, 8.0, ("q_proj",), 64, False, "host")
    engine.adapters["t-src"] = AdapterInfo("t-src", "/s", 4, 8.0, ("q_proj",), 64, False)
    try:
        tiers = {a["name"]: a["tier"] for a in httpx.get(url + "/residency").json()["adapters"]}
        assert {k: tiers[k] for k in ("tenant-a", "t-host", "t-src")} == {
            "tenant-a": "gpu", "t-host": "host", "t-src": "source"}
    finally:
        del engine.adapters["t-host"], engine.adapters["t-src"]


def test_disconnect_mid_stream_aborts_the_request(url: str, engine: FakeEngine) -> None:
    body = {"model": BASE, "prompt": "slow words", "max_tokens": 50, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    rid = json.loads(first[6:])["id"]
    wait_for(lambda: rid in engine.closed_early and rid in engine.aborted, "abort of " + rid)


def test_disconnect_while_waiting_aborts_the_request(url: str, engine: FakeEngine) -> None:
    before = {r[0] for r in engine.requests}
    body = {"model": BASE, "prompt": "slow chat", "max_tokens": 50}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=0.2)
    wait_for(lambda: len(engine.requests) > len(before), "the request")
    rid = engine.requests[-1][0]
    wait_for(lambda: rid in engine.closed_early and rid in engine.aborted, "abort of " + rid)
