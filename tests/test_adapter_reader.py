"""Reading PEFT safetensors files straight into page buffers (engine/adapter_reader.py): the pages
hold what the plain path (load every tensor, stack, transpose, scale, concatenate) computes, for
odd ranks, module subsets, dtypes, page widths that cut rows, and files whose tensors are in any
order or misaligned; bad offsets and values are refused; the host tier loads folders this way."""

from __future__ import annotations

import json
import math
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraplane.engine.adapter_format import CONFIG_FILE, MODULE_PARENT, WEIGHTS_FILE
from loraplane.engine.adapter_source import FolderSource
from loraplane.engine.adapters import (
    LoraSpec,
    read_adapter,
    read_header,
    write_random_adapter,
    write_weights,
)
from loraplane.engine.config import LORA_MODULES, NAMED_SHAPES
from loraplane.engine.errors import InvalidAdapterError
from loraplane.engine.host_tier import HostTier
from loraplane.engine.memory_pool import PoolLayout

TINY = NAMED_SHAPES["tiny"]
LIMITS = {"max_rank": 64, "max_bytes": 1 << 30}
ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def reference(folder: Path, spec: LoraSpec, dtype: torch.dtype) -> torch.Tensor:
    """[num_layers, elems] in pool order, computed the plain way from safetensors' own reader."""
    t = load_file(str(folder / WEIGHTS_FILE))
    parts = []
    for m in spec.modules:
        key = f"base_model.model.model.layers.{{}}.{MODULE_PARENT[m]}.{m}.lora_{{}}.weight"
        a = torch.stack([t[key.format(i, "A")] for i in range(TINY.num_layers)]).to(dtype)
        b = torch.stack([t[key.format(i, "B")] for i in range(TINY.num_layers)]).to(dtype)
        parts += [a.flatten(1), (b.transpose(1, 2) * spec.scale).flatten(1)]
    return torch.cat(parts, dim=1)


def read_pages(folder: Path, dtype: torch.dtype, page_elems: int,
               spec: LoraSpec | None = None) -> tuple[torch.Tensor, int]:
    """The folder written over garbage-filled pages, concatenated, and the used width."""
    spec = spec or read_header(folder, "ad", TINY, **LIMITS)
    total = spec.elems_per_layer(TINY)
    pages = [torch.full((TINY.num_layers, page_elems), -7.0, dtype=dtype)
             for _ in range(-(-total // page_elems))]
    write_weights(folder, "ad", TINY, spec, pages, **LIMITS)
    return torch.cat(pages, dim=1), total


def write_file(folder: Path, tensors: dict[str, torch.Tensor], order: list[str],
               gaps: list[int]) -> None:
    """A safetensors file with tensors in `order`, `gaps[i]` bytes before the i-th (safetensors'
    own writer always sorts and aligns), and its data start at an odd offset when gaps do."""
    header: dict[str, object] = {}
    blobs = []
    pos = 0
    for key, gap in zip(order, gaps, strict=True):
        t = tensors[key].contiguous()
        raw = t.view(torch.uint8).flatten().numpy().tobytes() if t.numel() else b""
        blobs.append(b"\0" * gap + raw)
        pos += gap
        header[key] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [pos, pos + len(raw)]}
        pos += len(raw)
    text = json.dumps(header).encode()
    (folder / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def adapter(tmp_path: Path, rank: int, modules: tuple[str, ...], seed: int = 0,
            dtype: torch.dtype = torch.float32, alpha: float | None = None) -> Path:
    folder = write_random_adapter(tmp_path / f"r{rank}-{seed}", TINY, rank, modules, seed=seed,
                                  alpha=alpha)
    if dtype != torch.float32:
        t = load_file(str(folder / WEIGHTS_FILE))
        write_file(folder, {k: v.to(dtype) for k, v in t.items()}, sorted(t), [0] * len(t))
    return folder


@pytest.mark.parametrize("rank, modules", [
    (1, ("q_proj",)), (3, ("k_proj", "v_proj")), (5, ("o_proj", "down_proj")),
    (8, LORA_MODULES), (16, ("gate_proj", "up_proj"))])
@pytest.mark.parametrize("page_elems", [37, 256, 4096])  # cuts rows; whole rows; one page
def test_pages_hold_the_plain_layout(tmp_path: Path, rank: int, modules: tuple[str, ...],
                                     page_elems: int) -> None:
    folder = adapter(tmp_path, rank, modules, seed=rank, alpha=rank * 1.5)
    spec = read_header(folder, "ad", TINY, **LIMITS)
    got, total = read_pages(folder, torch.float32, page_elems, spec)
    torch.testing.assert_close(got[:, :total], reference(folder, spec, torch.float32),
                               rtol=0, atol=0)
    assert torch.all(got[:, total:] == 0)  # the last page's tail is zeroed


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_convert_and_scale_as_the_plain_path(tmp_path: Path, file_dtype: torch.dtype,
                                                    dtype: torch.dtype) -> None:
    folder = adapter(tmp_path, 4, ("q_proj", "v_proj"), dtype=file_dtype, alpha=3.0)
    spec = read_header(folder, "ad", TINY, **LIMITS)
    got, total = read_pages(folder, dtype, 96, spec)
    assert torch.equal(got[:, :total], reference(folder, spec, dtype))  # bit for bit


def test_read_adapter_is_the_same_layout(tmp_path: Path) -> None:
    folder = adapter(tmp_path, 5, ("q_proj", "o_proj", "up_proj"))
    spec = read_header(folder, "ad", TINY, **LIMITS)
    w = read_adapter(folder, "ad", TINY, **LIMITS)
    assert torch.equal(w.flatten(TINY), reference(folder, spec, torch.float32))


@pytest.mark.parametrize("seed", range(3))
def test_any_tensor_order_and_misaligned_data(tmp_path: Path, seed: int) -> None:
    """Layers at no constant stride, tensors at odd offsets: per-layer views and aligned
    copies give the same pages."""
    folder = adapter(tmp_path, 3, ("q_proj", "k_proj", "down_proj"), seed=seed)
    spec = read_header(folder, "ad", TINY, **LIMITS)
    want, total = read_pages(folder, torch.bfloat16, 100, spec)
    t = {k: v.to(torch.bfloat16) for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    order = sorted(t)
    rng = random.Random(seed)
    rng.shuffle(order)
    write_file(folder, t, order, [rng.choice([0, 1, 2, 3, 8]) for _ in order])
    assert read_header(folder, "ad", TINY, **LIMITS) == spec
    got, _ = read_pages(folder, torch.bfloat16, 100, spec)
    assert torch.equal(got, want)


def corrupt_offsets(folder: Path, change) -> None:
    """Rewrite the header's data_offsets of one tensor in place (same header length)."""
    path = folder / WEIGHTS_FILE
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    key = sorted(k for k in header if k != "__metadata__")[1]
    header[key]["data_offsets"] = change(header[key]["data_offsets"])
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


@pytest.mark.parametrize("change", [
    lambda o: [o[0], o[1] + 4],  # more bytes than the shape holds
    lambda o: [10**12, 10**12 + o[1] - o[0]],  # past the end of the file
    lambda o: [-4, o[1] - o[0] - 4],
    lambda o: [str(o[0]), o[1]],
    lambda o: [False, o[1] - o[0]],
    lambda o: [o[0]],
    lambda o: None,
])
def test_refuses_bad_data_offsets(tmp_path: Path, change) -> None:
    folder = adapter(tmp_path, 2, ("q_proj",))
    spec = read_header(folder, "ad", TINY, **LIMITS)
    corrupt_offsets(folder, change)
    with pytest.raises(InvalidAdapterError, match=r"^adapter 'ad': .*data_offsets"):
        read_pages(folder, torch.float32, 64, spec)


def test_refuses_values_that_overflow_the_pool_dtype(tmp_path: Path) -> None:
    folder = adapter(tmp_path, 2, ("q_proj", "v_proj"))
    t = load_file(str(folder / WEIGHTS_FILE))
    t["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"][0, 3] = 1e5
    write_file(folder, t, sorted(t), [0] * len(t))
    spec = read_header(folder, "ad", TINY, **LIMITS)
    read_pages(folder, torch.float32, 64, spec)  # finite in float32
    with pytest.raises(InvalidAdapterError,
                       match=r"layers.1.self_attn.q_proj.lora_A holds NaN or infinite"):
        read_pages(folder, torch.float16, 64, spec)  # over float16's range


def test_refuses_modules_changed_since_registration(tmp_path: Path) -> None:
    folder = adapter(tmp_path, 2, ("q_proj", "v_proj"))
    spec = read_header(folder, "ad", TINY, **LIMITS)
    other = adapter(tmp_path, 2, ("q_proj",), seed=1)
    (folder / WEIGHTS_FILE).write_bytes((other / WEIGHTS_FILE).read_bytes())
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps(cfg | {"target_modules": ["q_proj"]}))
    with pytest.raises(InvalidAdapterError, match="changed since it was registered"):
        read_pages(folder, torch.float32, 64, spec)


def test_refuses_alpha_changed_since_registration(tmp_path: Path) -> None:
    folder = adapter(tmp_path, 2, ("q_proj", "v_proj"))
    spec = read_header(folder, "ad", TINY, **LIMITS)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps(cfg | {"lora_alpha": 99}))
    with pytest.raises(InvalidAdapterError, match=r"changed since it was registered \(rank"):
        read_pages(folder, torch.float32, 64, spec)


def test_host_tier_loads_folders_into_its_blocks(tmp_path: Path) -> None:
    layout = PoolLayout.for_model(TINY, 8)
    host: HostTier[str] = HostTier(64 * layout.page_bytes(torch.bfloat16), TINY, layout,
                                   torch.bfloat16, pin=False, workers=2)
    folders = {"a": adapter(tmp_path, 7, ("k_proj", "o_proj", "gate_proj")),
               "b": adapter(tmp_path, 16, LORA_MODULES, seed=2)}
    bad = adapter(tmp_path, 4, ("q_proj",), seed=3)
    t = load_file(str(bad / WEIGHTS_FILE))
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][1, 1] = math.nan
    write_file(bad, t, sorted(t), [0] * len(t))
    folders["bad"] = bad
    specs = {}
    for key, folder in folders.items():
        specs[key] = spec = read_header(folder, key, TINY, **LIMITS)
        pages = -(-spec.elems_per_layer(TINY) // layout.page_elems_per_layer)
        source = FolderSource(folder, key, TINY, spec, **LIMITS)
        assert host.start(key, source, pages, lambda k: False)
    done = {}
    while host.num_loading:
        host.wait(0.05)
        done.update(host.poll())
    assert done["a"] is None and done["b"] is None
    assert "holds NaN or infinite values" in str(done["bad"]) and "bad" not in host
    for key in "ab":
        runs = host.blocks(key)
        assert runs is not None
        got = torch.cat([p for run in runs for p in run], dim=1)
        want = reference(folders[key], specs[key], torch.bfloat16)
        assert torch.equal(got[:, :want.shape[1]], want)
    host.check_invariants()
