"""`loraplane serve --tenants FILE`: the gateway's auth, access and limits in one process."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import httpx
import openai
import pytest

from loraplane.gateway.keys import hash_key, new_key
from tests.gateway_procs import TINY, Proc, free_port
from tests.reference import write_lora_folder

ACME_KEY, BETA_KEY = new_key(), new_key()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("embedded")
    write_lora_folder(folder / "adapters" / "poet", TINY, 4, ("q_proj",), seed=1)
    write_lora_folder(folder / "adapters" / "secret", TINY, 4, ("v_proj",), seed=2)
    tenants = folder / "tenants.yaml"
    tenants.write_text(f"""
tenants:
  acme:
    keys: [{hash_key(ACME_KEY)}]
    limits: {{requests_per_minute: 8}}
  beta:
    keys: [{hash_key(BETA_KEY)}]
adapters:
  acme/poet: {{path: adapters/poet, shared_with: [beta]}}
  beta/secret: {{path: adapters/secret}}
""")
    port = free_port()
    proc = Proc("serve", [sys.executable, "-m", "loraplane.cli", "serve", "--model",
                          "random:tiny", "--served-model-name", "tiny", "--device", "cpu",
                          "--pool-memory", "0.05", "--port", str(port), "--tenants",
                          str(tenants)], folder / "serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_until(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, 180)
        yield url
    finally:
        proc.stop()
    assert ACME_KEY not in proc.log.read_text()


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_embedded_auth_and_access(server: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(server, new_key()).models.list()
    assert {m.id for m in client(server, BETA_KEY).models.list()} == {
        "tiny", "acme/poet", "beta/secret"}
    assert {m.id for m in client(server, ACME_KEY).models.list()} == {"tiny", "acme/poet"}
    c = client(server, BETA_KEY)
    assert c.completions.create(model="acme/poet", prompt="hi", max_tokens=3).choices
    chunks = list(c.chat.completions.create(model="beta/secret", max_tokens=3, stream=True,
                                            messages=[{"role": "user", "content": "hi"}]))
    assert chunks and chunks[-1].choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.NotFoundError) as e:
        client(server, ACME_KEY).completions.create(model="beta/secret", prompt="hi",
                                                     max_tokens=3)
    assert e.value.code == "model_not_found"
    # The engine's own endpoints are not reachable around the gateway.
    assert httpx.post(server + "/v1/load_lora_adapter",
                      json={"lora_name": "x", "lora_path": "/tmp"}).status_code == 404


def test_embedded_limits(server: str) -> None:
    c = client(server, ACME_KEY)
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(10):
            c.completions.create(model="tiny", prompt="x", max_tokens=1)
    assert e.value.response.headers["x-ratelimit-limit-requests"] == "8"
    assert int(e.value.response.headers["retry-after"]) >= 1
