"""Pure operator logic without any server: versions, placement, conditions, records, header
checks, S3 URIs, and the CRD schema (checked with jsonschema, as the emulator does not)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from typing import Any

import jsonschema
import pytest
import yaml

from loraplane.engine.config import NAMED_SHAPES
from loraplane.engine.errors import InvalidAdapterError
from loraplane.gateway.schemas import Adapter
from loraplane.operator.plan import (
    AgentInfo,
    build_conditions,
    build_record,
    plan_backoff,
    plan_placement,
    plan_recheck,
    plan_recheck_wanted,
    plan_version,
)
from loraplane.operator.s3 import parse_uri
from loraplane.operator.spec import LoraAdapterSpec
from loraplane.operator.verify import check_header, header_length
from tests.operator_support import ROOT, crd_schema

TINY = NAMED_SHAPES["tiny"]


def spec(**kw: Any) -> LoraAdapterSpec:
    base = {"baseModel": "tiny", "source": {"s3": {"uri": "s3://bucket/a"}}}
    return LoraAdapterSpec.model_validate(base | kw)


def agent(node: str, free: int = 100, labels: dict[str, str] | None = None,
          models: tuple[str, ...] = ("tiny",)) -> AgentInfo:
    return AgentInfo(node=node, url=f"http://{node}", labels=labels or {}, base_models=models,
                     capacity_bytes=1000, used_bytes=1000 - free)


def test_version_changes_with_weights_not_with_sharing_or_placement() -> None:
    v = plan_version(spec())
    assert v == plan_version(spec(sharing={"public": True}, placement={"nodes": 3}))
    assert v != plan_version(spec(sha256="a" * 64))
    assert v != plan_version(spec(source={"s3": {"uri": "s3://bucket/b"}}))
    assert len(v) == 12 and int(v, 16) >= 0


def test_placement_prefers_current_nodes_then_free_memory_and_filters() -> None:
    agents = [agent("n1", free=10), agent("n2", free=500), agent("n3", free=300),
              agent("gpu-x", free=900, labels={"pool": "x"}),
              agent("other", free=999, models=("llama-3-8b",))]
    chosen = plan_placement(agents, spec(placement={"nodes": 2}), current={"n1"}, size_bytes=5)
    assert [a.node for a in chosen] == ["n1", "gpu-x"]
    chosen = plan_placement(agents, spec(placement={"nodes": 2, "nodeSelector": {"pool": "x"}}),
                            current=set(), size_bytes=5)
    assert [a.node for a in chosen] == ["gpu-x"]  # fewer than wanted: the caller waits
    assert plan_placement(agents, spec(), set(), size_bytes=10**6) == []


def test_backoff_doubles_and_caps() -> None:
    assert [plan_backoff(r) for r in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_conditions_by_stage() -> None:
    now = "2026-01-01T00:00:00Z"
    conds = build_conditions("Cached", False, "ChecksumMismatch", "bad", 3, now)
    by = {c["type"]: (c["status"], c["reason"]) for c in conds}
    assert by == {"Verified": ("True", "Done"), "Cached": ("False", "ChecksumMismatch"),
                  "Loaded": ("Unknown", "Waiting"), "Ready": ("False", "ChecksumMismatch")}
    assert all(c["observedGeneration"] == 3 for c in conds)
    later = build_conditions("Cached", False, "ChecksumMismatch", "bad", 3, "later", conds)
    assert later[1]["lastTransitionTime"] == now  # unchanged status keeps its time


def test_record_for_the_gateway() -> None:
    s = spec(sharing={"sharedWith": ["t2", "t1"]})
    rec = build_record("t0", "bot", s, "abc123")
    assert rec == Adapter(id="t0/bot", public=False, shared_with=["t1", "t2"],
                          engine_name="t0/bot@abc123")
    assert rec.served_as == "t0/bot@abc123"


def test_operator_imports_without_torch_or_the_gateway_app() -> None:
    """The operator image has no torch; it writes records through the gateway's store only."""
    code = ("import sys, loraplane.operator.main, loraplane.operator.registry as r; "
            "r.make_registry('redis://127.0.0.1:1/0'); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'fastapi'}), "
            "'loraplane.gateway.main' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "False"]


def _header(modules: tuple[str, ...], rank: int, dtype: str = "F32") -> bytes:
    h: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for layer in range(TINY.num_layers):
        for m in modules:
            fan_in, fan_out = TINY.module_shape(m)
            key = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            h[f"{key}.lora_A.weight"] = {"dtype": dtype, "shape": [rank, fan_in]}
            h[f"{key}.lora_B.weight"] = {"dtype": dtype, "shape": [fan_out, rank]}
    return json.dumps(h).encode()


CONFIG = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}).encode()


def test_header_check_accepts_a_good_layout() -> None:
    assert check_header(CONFIG, _header(("q_proj", "v_proj"), 4), TINY, name="a",
                        max_rank=64) == (4, 8.0, ("q_proj", "v_proj"))


@pytest.mark.parametrize("config, header, match", [
    (CONFIG, _header(("q_proj",), 8), r"has shape \(8, 64\), expected \(4, 64\)"),
    (CONFIG, _header(("q_proj",), 4, dtype="I32"), "has dtype I32"),
    (CONFIG, b"not json", "header is not JSON"),
    (b'{"peft_type": "PREFIX_TUNING"}', _header(("q_proj",), 4), "peft_type"),
    (CONFIG, json.dumps({"lm_head.weight": {"dtype": "F32", "shape": [1]}}).encode(),
     "unexpected tensor"),
])
def test_header_check_refuses(config: bytes, header: bytes, match: str) -> None:
    with pytest.raises(InvalidAdapterError, match=match):
        check_header(config, header, TINY, name="a", max_rank=64)


def test_header_length_is_bounded() -> None:
    assert header_length(struct.pack("<Q", 100), 200, "a") == 100
    for n, size in ((10**12, 10**13), (100, 50), (0, 100)):
        with pytest.raises(InvalidAdapterError):
            header_length(struct.pack("<Q", n), size, "a")


@pytest.mark.parametrize("uri, ok", [("s3://bucket/a/b", ("bucket", "a/b")),
                                     ("s3://bucket", ("bucket", "")),
                                     ("s3://bucket/a/../b", None), ("s3://bucket/a//b", None),
                                     ("http://bucket/a", None), ("s3://B/a", None)])
def test_parse_uri(uri: str, ok: tuple[str, str] | None) -> None:
    if ok is None:
        with pytest.raises(ValueError):
            parse_uri(uri)
    else:
        assert parse_uri(uri) == ok


def _cr(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "loraplane.io/v1alpha1", "kind": "LoraAdapter",
            "metadata": {"name": "a", "namespace": "t"}, "spec": spec}


def test_crd_schema_accepts_the_example_and_refuses_bad_specs() -> None:
    schema = crd_schema()
    docs = list(yaml.safe_load_all((ROOT / "manifests" / "example-loraadapter.yaml").read_text()))
    example = next(d for d in docs if d["kind"] == "LoraAdapter")
    jsonschema.validate(example, schema)
    LoraAdapterSpec.model_validate(example["spec"])  # the operator reads what the schema allows
    good = {"baseModel": "tiny", "source": {"s3": {"uri": "s3://b1/x"}}}
    for bad in ({"baseModel": "tiny"}, good | {"sha256": "XYZ"},
                good | {"placement": {"nodes": 0}},
                good | {"source": {"s3": {"uri": "https://b1/x"}}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(_cr(bad), schema)


def test_crd_names_columns_and_rules() -> None:
    crd = yaml.safe_load((ROOT / "manifests" / "crd-loraadapter.yaml").read_text())
    assert crd["spec"]["names"]["shortNames"] == ["la"]
    version = crd["spec"]["versions"][0]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert {"Base Model", "Rank", "Phase", "Ready Nodes", "Age"} <= set(columns)
    assert version["subresources"] == {"status": {}}
    text = json.dumps(version["schema"])
    assert text.count("x-kubernetes-validations") >= 3  # CEL: immutable base model, uri, sharing


def placed(*nodes: tuple[str, str, str]) -> list[dict[str, Any]]:
    return [{"name": n, "version": v, "state": s, "engines": ["http://e"]} for n, v, s in nodes]


def test_recheck_wanted_only_for_a_placed_current_generation() -> None:
    ready = {"phase": "Ready", "version": "v1", "observedGeneration": 2, "reason": "Loaded"}
    assert plan_recheck_wanted(ready, 2)
    assert not plan_recheck_wanted(ready, 3)  # an update is being rolled out
    assert plan_recheck_wanted(ready | {"phase": "Fetching", "reason": "NodeLost"}, 2)
    for busy in ("NotEnoughNodes", "AgentUnavailable", "Fetching"):  # reconcile's own retries
        assert not plan_recheck_wanted(ready | {"phase": "Fetching", "reason": busy}, 2)
    assert not plan_recheck_wanted(ready | {"phase": "Failed"}, 2)
    assert not plan_recheck_wanted({"phase": "Ready", "observedGeneration": 2}, 2)


def test_recheck_all_held_changes_nothing() -> None:
    nodes = placed(("n1", "v1", "Loaded"), ("n2", "v1", "Loaded"))
    check = plan_recheck(nodes, "v1", {"n1": "Loaded", "n2": "Loaded"}, desired=2)
    assert check.ready and check.repair == [] and check.nodes == nodes
    assert check.ready_nodes == 2


def test_recheck_lost_and_unreachable_nodes() -> None:
    nodes = placed(("n1", "v1", "Loaded"), ("n2", "v1", "Loaded"), ("n3", "v1", "Loaded"),
                   ("n4", "v1", "Failed"), ("n5", "v0", "Loaded"))
    check = plan_recheck(nodes, "v1", {"n1": "Loaded", "n2": "Lost"}, desired=3)
    states = {n["name"]: n["state"] for n in check.nodes}
    assert states == {"n1": "Loaded", "n2": "Lost", "n3": "Unavailable", "n4": "Failed",
                      "n5": "Loaded"}  # failed placements and other versions left alone
    assert check.repair == ["n2"] and check.ready_nodes == 1 and not check.ready
    assert "n2" in check.message and "1/3" in check.message
    done = check.after_repair({})
    assert done.ready_nodes == 2 and not done.ready and done.repair == []
    assert {n["name"]: n["state"] for n in done.nodes}["n2"] == "Loaded"
    assert "message" not in done.nodes[1]
    failed = check.after_repair({"n2": "S3 down"})
    assert failed.ready_nodes == 1
    assert failed.nodes[1]["state"] == "Lost" and "S3 down" in failed.nodes[1]["message"]


def test_recheck_repaired_to_desired_is_ready() -> None:
    check = plan_recheck(placed(("n1", "v1", "Loaded")), "v1", {"n1": "Lost"}, desired=1)
    assert not check.ready and check.after_repair({}).ready
