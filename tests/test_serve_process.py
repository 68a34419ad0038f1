"""`loraplane serve` as a real process with the real default model, driven by the openai client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from loraplane.engine.adapters import write_random_adapter
from loraplane.engine.config import NAMED_SHAPES

SMOLLM2 = NAMED_SHAPES["smollm2-135m"]
BASE = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    write_random_adapter(root / "poet", SMOLLM2, 8, ("q_proj", "v_proj"), seed=1)
    write_random_adapter(root / "coder", SMOLLM2, 16, ("q_proj", "k_proj", "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"), seed=2)
    (root / "broken").mkdir()
    (root / "broken" / "adapter_model.bin").write_bytes(b"not a pickle")
    return root


@pytest.fixture(scope="module")
def server(adapters: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loraplane.cli", "serve", "--adapters", str(adapters),
             "--port", str(port), "--device", "cpu", "--served-model-name", BASE,
             "--pool-memory", "0.25", "--max-model-len", "2048"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"server exited:\n{log.read_text()}"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"server did not start:\n{log.read_text()}"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = log.read_text()
    assert "broken" in text and "pickle" in text  # the bad folder was reported, not fatal


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_models_lists_base_and_adapters(server: str) -> None:
    ids = {m.id for m in client(server).models.list().data}
    assert ids == {BASE, "poet", "coder"}


def test_chat_with_base_model_is_sensible(server: str) -> None:
    r = client(server).chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20, temperature=0)
    assert "Paris" in (r.choices[0].message.content or "")
    assert r.usage is not None and r.usage.prompt_tokens > 10


def test_completion_with_adapters_streaming_and_not(server: str) -> None:
    c = client(server)
    prompt = "Once upon a time"
    texts = {}
    for model in (BASE, "poet", "coder"):
        r = c.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].finish_reason in ("length", "stop")
        texts[model] = r.choices[0].text
        stream = c.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                      stream=True)
        assert "".join(ch.choices[0].text for ch in stream if ch.choices) == texts[model]
    assert texts["coder"] != texts[BASE]  # the adapter is applied


def test_seeded_sampling_is_reproducible(server: str) -> None:
    c = client(server)
    kw = {"model": "poet", "prompt": "My favourite food is", "max_tokens": 10,
          "temperature": 0.9, "top_p": 0.9, "seed": 7}
    a = c.completions.create(**kw).choices[0].text  # type: ignore[call-overload]
    b = c.completions.create(**kw).choices[0].text  # type: ignore[call-overload]
    assert a == b


def test_errors_are_openai_shaped(server: str) -> None:
    c = client(server)
    with pytest.raises(openai.NotFoundError) as nf:
        c.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=BASE, prompt="hi", max_tokens=100000)
    r = httpx.post(server + "/v1/load_lora_adapter",
                   json={"lora_name": "evil", "lora_path": str(Path(__file__).parent)})
    assert r.status_code == 400 and "not found" in r.json()["error"]["message"]


def test_load_unload_while_serving(server: str, adapters: Path, tmp_path: Path) -> None:
    path = write_random_adapter(tmp_path / "late", SMOLLM2, 4, ("o_proj", "down_proj"), seed=3)
    r = httpx.post(server + "/v1/load_lora_adapter", json={"lora_name": "late",
                                                           "lora_path": str(path)})
    assert r.status_code == 200, r.text
    c = client(server)
    out = c.completions.create(model="late", prompt="Hello", max_tokens=4, temperature=0)
    assert out.choices[0].text
    r = httpx.post(server + "/v1/unload_lora_adapter", json={"lora_name": "late"})
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="late", prompt="Hello", max_tokens=4)


def test_disconnect_frees_pages(server: str) -> None:
    with httpx.stream("POST", server + "/v1/completions", timeout=60,
                      json={"model": "coder", "prompt": "Count: 1, 2, 3,", "max_tokens": 1000,
                            "stream": True, "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # got a first chunk; leave mid-stream
    deadline = time.monotonic() + 30
    while metric(server, "loraplane_pool_pages{kind=\"kv\"}") > 0:
        assert time.monotonic() < deadline, "KV pages not freed after the client left"
        time.sleep(0.2)
    assert metric(server, "loraplane_requests_running") == 0


def test_bad_weights_found_at_first_use_answer_400(server: str, tmp_path: Path) -> None:
    """Registration checks the header only; NaN weights show when the adapter is first read
    into host RAM: its request gets the invalid_adapter error, the server keeps serving."""
    from safetensors.torch import load_file, save_file

    path = write_random_adapter(tmp_path / "nan", SMOLLM2, 4, ("q_proj",), seed=4)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, str(weights))
    r = httpx.post(server + "/v1/load_lora_adapter", json={"lora_name": "nan",
                                                           "lora_path": str(path)})
    assert r.status_code == 200 and r.json()["tier"] == "source", r.text
    c = client(server)
    for _ in range(2):  # at first use, and for requests after the failure
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="nan", prompt="Hello", max_tokens=4)
        assert e.value.code == "invalid_adapter" and "NaN" in e.value.message
    assert c.completions.create(model="poet", prompt="Hi", max_tokens=2).choices[0].text
    tiers = {a["name"]: a["tier"] for a in httpx.get(server + "/residency").json()["adapters"]}
    assert tiers["nan"] == "source" and tiers["poet"] == "gpu"
    assert metric(server, "loraplane_adapter_load_failures_total") == 1
