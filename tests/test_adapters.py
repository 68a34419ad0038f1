"""read_adapter on real PEFT folders: what it accepts, how it lays weights out, and each refusal."""

from __future__ import annotations

import copy
import json
import math
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from loraplane.engine.adapters import WEIGHTS_FILE, read_adapter
from loraplane.engine.config import LORA_MODULES, NAMED_SHAPES
from loraplane.engine.errors import InvalidAdapterError
from tests.reference import random_hf_model

TINY = NAMED_SHAPES["tiny"]
PREFIX = "base_model.model.model.layers"


def save_adapter(base: LlamaForCausalLM, folder: Path, seed: int = 0, **lora: object) -> Path:
    """Save a PEFT LoRA adapter of base with random non-zero A and B; lora: LoraConfig fields."""
    torch.manual_seed(seed)
    cfg = LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora)
    model = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.05)
    model.save_pretrained(str(folder))
    return folder


def read(folder: Path, *, max_rank: int = 64, max_bytes: int = 1 << 30):
    return read_adapter(folder, "ad", TINY, max_rank=max_rank, max_bytes=max_bytes)


def refused(folder: Path | str, match: str, **kw: int) -> InvalidAdapterError:
    with pytest.raises(InvalidAdapterError, match=match) as info:
        read(Path(folder), **kw)
    assert str(info.value).startswith("adapter 'ad': ")
    assert info.value.status_code == 400 and info.value.code == "invalid_adapter"
    return info.value


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    return random_hf_model(TINY, seed=0)


@pytest.fixture(scope="module")
def good(base: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid rank-4 adapter on q_proj and v_proj; tests tamper with copies of it."""
    return save_adapter(base, tmp_path_factory.mktemp("good") / "ad", r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj"])


@pytest.fixture()
def bad(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "ad"))


def edit_config(folder: Path, **changes: object) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def edit_weights(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = folder / WEIGHTS_FILE
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


# ---- accepted ------------------------------------------------------------------------------

@pytest.mark.parametrize("rank, alpha, modules, rslora", [
    (1, 1.0, ("q_proj",), False),
    (4, 8.0, ("q_proj", "v_proj"), False),
    (5, 10.0, ("o_proj", "k_proj"), False),
    (8, 16.0, LORA_MODULES, False),
    (16, 8.0, ("down_proj", "gate_proj", "up_proj"), True),
    (3, 6.0, ("k_proj", "up_proj"), True),
])
def test_accepts_peft_adapters(base: LlamaForCausalLM, tmp_path: Path, rank: int, alpha: float,
                               modules: tuple[str, ...], rslora: bool) -> None:
    folder = save_adapter(base, tmp_path / "ad", seed=rank, r=rank, lora_alpha=alpha,
                          target_modules=list(modules), use_rslora=rslora)
    w = read(folder, max_rank=rank)  # max_rank is inclusive
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    assert w.rank == rank and w.alpha == alpha
    assert w.scale == pytest.approx(scale)
    # Modules come in the pool's order, whatever the order of target_modules.
    assert w.modules == tuple(m for m in LORA_MODULES if m in modules)
    assert set(w.a) == set(w.bt) == set(modules)

    saved = load_file(str(folder / WEIGHTS_FILE))
    for m in modules:
        fan_in, fan_out = TINY.module_shape(m)
        assert w.a[m].shape == (TINY.num_layers, rank, fan_in)
        assert w.bt[m].shape == (TINY.num_layers, rank, fan_out)
        assert w.a[m].dtype == w.bt[m].dtype == torch.float32
        for layer in range(TINY.num_layers):
            parent = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"{PREFIX}.{layer}.{parent}.{m}"
            a = saved[f"{key}.lora_A.weight"]  # [r, in]
            b = saved[f"{key}.lora_B.weight"]  # [out, r]
            torch.testing.assert_close(w.a[m][layer], a.float())
            torch.testing.assert_close(w.bt[m][layer], b.float().T * scale)
    assert w.num_bytes == sum(4 * TINY.num_layers * rank * sum(TINY.module_shape(m))
                              for m in modules)
    segs = w.segments(TINY)
    assert [(m, k) for m, k, _ in segs] == [(m, k) for m in w.modules for k in ("a", "bt")]
    assert w.flatten(TINY).shape == (TINY.num_layers, sum(n for _, _, n in segs))


def test_delta_matches_peft(base: LlamaForCausalLM, tmp_path: Path) -> None:
    """x A^T (B^T*scale) is PEFT's LoRA delta of the projection, for plain and rsLoRA scaling."""
    for rslora in (False, True):
        folder = save_adapter(base, tmp_path / f"ad{rslora}", r=4, lora_alpha=12,
                              target_modules=["v_proj"], use_rslora=rslora)
        w = read(folder)
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=4, lora_alpha=12, target_modules=["v_proj"], use_rslora=rslora))
        peft_model.load_adapter(str(folder), adapter_name="t")
        peft_model.set_adapter("t")
        layer = peft_model.base_model.model.model.layers[1].self_attn.v_proj
        x = torch.randn(3, TINY.hidden_size)
        with torch.no_grad():
            want = layer(x) - layer.base_layer(x)
        got = x @ w.a["v_proj"][1].T @ w.bt["v_proj"][1]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_half_precision_weights_are_read_as_float32(bad: Path) -> None:
    edit_weights(bad, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    w = read(bad)
    assert w.a["q_proj"].dtype == torch.float32


# ---- refused -------------------------------------------------------------------------------

def test_refuses_pickle_only_folder_without_unpickling(bad: Path, monkeypatch) -> None:
    (bad / WEIGHTS_FILE).unlink()
    # Garbage: unpickling it would fail with a different error than the refusal.
    (bad / "adapter_model.bin").write_bytes(b"\x80\x05not a pickle at all\xff" * 8)

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pickle file was loaded")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    err = refused(bad, "pickle")
    assert "adapter_model.bin" in str(err) and WEIGHTS_FILE in str(err)


def test_refuses_missing_weights(bad: Path) -> None:
    (bad / WEIGHTS_FILE).unlink()
    err = refused(bad, f"{WEIGHTS_FILE} not found")
    assert "pickle" not in str(err)


def test_refuses_missing_config(bad: Path) -> None:
    (bad / "adapter_config.json").unlink()
    refused(bad, "adapter_config.json not found")


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    (b"\xff\xfe\x00", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_refuses_bad_config_file(bad: Path, text: str | bytes, match: str) -> None:
    path = bad / "adapter_config.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    refused(bad, match)


@pytest.mark.parametrize("changes, match", [
    ({"r": 0}, r"rank r=0 must be an integer in \[1, 64\]"),
    ({"r": -2}, "rank r=-2"),
    ({"r": 2.0}, "rank r=2.0"),
    ({"r": True}, "rank r=True"),
    ({"r": None}, "rank r=None"),
    ({"peft_type": "IA3"}, "peft_type IA3 is not supported"),
    ({"peft_type": "LOHA"}, "peft_type LOHA is not supported"),
    ({"lora_alpha": "8"}, "lora_alpha='8' must be a finite number"),
    ({"lora_alpha": float("inf")}, "lora_alpha=inf"),
    ({"use_dora": True}, "use_dora=true is not supported"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out=true"),
    ({"bias": "all"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"r": 8}, r"has shape \(4, 64\), expected \(8, 64\)"),  # config and tensors disagree
])
def test_refuses_unsupported_config(bad: Path, changes: dict, match: str) -> None:
    edit_config(bad, **changes)
    refused(bad, match)


def test_refuses_rank_above_max_rank(good: Path) -> None:
    refused(good, r"rank r=4 must be an integer in \[1, 3\]", max_rank=3)


def test_refuses_real_dora_adapter(base: LlamaForCausalLM, tmp_path: Path) -> None:
    folder = save_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj"], use_dora=True)
    refused(folder, "use_dora=true is not supported")


def test_refuses_real_modules_to_save(base: LlamaForCausalLM, tmp_path: Path) -> None:
    folder = save_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj"],
                          modules_to_save=["lm_head"])
    refused(folder, "modules_to_save")


def test_refuses_embedding_lora(base: LlamaForCausalLM, tmp_path: Path) -> None:
    folder = save_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj", "embed_tokens"])
    refused(folder, "unexpected tensor '.*embed_tokens.*': only lora_A/lora_B of q_proj")


def test_refuses_adapter_of_another_base_model(tmp_path: Path) -> None:
    other = random_hf_model(TINY.with_updates(hidden_size=32, intermediate_size=96), seed=1)
    folder = save_adapter(other, tmp_path / "ad", r=4, target_modules=["q_proj", "down_proj"])
    refused(folder, r"q_proj.lora_A has shape \(4, 32\), expected \(4, 64\) for rank 4")


def test_refuses_more_layers_than_the_base_model(tmp_path: Path) -> None:
    other = random_hf_model(TINY.with_updates(num_layers=3), seed=1)
    folder = save_adapter(other, tmp_path / "ad", r=4, target_modules=["q_proj"])
    refused(folder, "names layer 2, the base model has 2")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_refuses_non_finite_values(bad: Path, value: float) -> None:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t[f"{PREFIX}.1.self_attn.v_proj.lora_B.weight"][3, 1] = value

    edit_weights(bad, poison)
    refused(bad, r"layers.1.self_attn.v_proj.lora_B holds NaN or infinite values")


def test_refuses_integer_tensors(bad: Path) -> None:
    key = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
    edit_weights(bad, lambda t: t.update({key: t[key].to(torch.int32)}))
    refused(bad, "has dtype I32")


@pytest.mark.parametrize("layer, module, ab", [(1, "q_proj", "A"), (0, "v_proj", "B")])
def test_refuses_missing_layer(bad: Path, layer: int, module: str, ab: str) -> None:
    edit_weights(bad, lambda t: t.pop(f"{PREFIX}.{layer}.self_attn.{module}.lora_{ab}.weight"))
    refused(bad, rf"{module}.lora_{ab} missing for layers \[{layer}\]")


def test_refuses_half_a_pair(bad: Path) -> None:
    """B without A for a module is a missing tensor, not a module without LoRA."""
    def drop_a(t: dict[str, torch.Tensor]) -> None:
        for layer in range(TINY.num_layers):
            t.pop(f"{PREFIX}.{layer}.self_attn.q_proj.lora_A.weight")

    edit_weights(bad, drop_a)
    refused(bad, r"q_proj.lora_A missing for layers \[0, 1\]")


def test_refuses_unexpected_tensor_name(bad: Path) -> None:
    edit_weights(bad, lambda t: t.update({"base_model.model.lm_head.lora_A.weight":
                                          torch.zeros(4, 64)}))
    refused(bad, "unexpected tensor 'base_model.model.lm_head.lora_A.weight'")


def test_refuses_empty_weights(bad: Path) -> None:
    save_file({}, str(bad / WEIGHTS_FILE))
    refused(bad, "no LoRA weights found")


def test_refuses_corrupt_weights_file(bad: Path) -> None:
    path = bad / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:100])
    refused(bad, f"cannot read {WEIGHTS_FILE}")


def test_refuses_file_over_max_bytes(good: Path) -> None:
    size = (good / WEIGHTS_FILE).stat().st_size
    read(good, max_bytes=size)  # the limit is inclusive
    refused(good, f"{size} bytes, over the limit of {size - 1}", max_bytes=size - 1)


def test_refuses_paths_that_are_not_directories(good: Path, tmp_path: Path) -> None:
    refused(good / WEIGHTS_FILE, "is not a directory")
    refused(tmp_path / "nowhere", "is not a directory")


def test_packed_weights_are_views_of_their_pool_order_buffer() -> None:
    """A tensor-parallel worker packs each shard once: flatten then returns the buffer itself
    (no concatenation in a step), and the weights are views of it with unchanged values."""
    from loraplane.engine.adapters import random_lora_weights
    from loraplane.engine.distributed.sharding import shard_lora_weights

    cfg = NAMED_SHAPES["tiny-kv8"]
    for weights in (random_lora_weights(cfg, 5, LORA_MODULES),
                    shard_lora_weights(random_lora_weights(cfg, 5, ("q_proj", "down_proj")), 1, 4)):
        packed = weights.packed(cfg, pin=False)
        assert packed.flat is not None and packed.flatten(cfg) is packed.flat
        assert torch.equal(packed.flat, weights.flatten(cfg))
        for m in weights.modules:
            assert torch.equal(packed.a[m], weights.a[m])
            assert torch.equal(packed.bt[m], weights.bt[m])
            storage = packed.flat.untyped_storage().data_ptr()
            assert packed.a[m].untyped_storage().data_ptr() == storage
        packed.a[weights.modules[0]][0, 0, 0] = 7.0  # a view: the buffer sees it
        assert packed.flat[0, 0] == 7.0
