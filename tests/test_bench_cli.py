"""`loraplane bench` end to end on the tiny random model on CPU (four runs side by side)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BASE = ["--model", "random:tiny", "--setting", "S1", "--num-requests", "12",
        "--input-range", "4", "16", "--output-range", "2", "8", "--device", "cpu", "--saturate",
        "--pool-memory", "0.05"]
RUNS = {
    "lora": ["--num-adapters", "5"],
    "base": ["--num-adapters", "0"],
    "peft": ["--num-adapters", "5", "--ranks", "2", "4", "--baseline", "peft"],
    "sweep": ["--num-adapters", "3", "--scheduling-policy", "fcfs", "abort", "--cv-sweep", "1",
              "4"],
    # Adapters in a real source tier: folders on disk, a host tier smaller than them all.
    "tiers": ["--num-adapters", "20", "--adapter-source", "disk", "--host-cache-memory",
              "0.0005", "--max-num-seqs", "2"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Start the four runs at once (each spends most of its time importing), then read them."""
    procs = {}
    for name, extra in RUNS.items():
        out = tmp_path_factory.mktemp(name)
        cmd = [sys.executable, "-m", "loraplane.cli", "bench", *BASE, *extra, "--out", str(out)]
        procs[name] = (out, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True))
    found = {}
    for name, (out, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        files = list(Path(out).glob("*.json"))
        assert len(files) == 1
        assert "req/s" in stdout and str(files[0]) in stdout
        found[name] = json.loads(files[0].read_text())
    return found


def _check_summary(r: dict, n: int) -> None:
    assert r["num_finished"] == n
    assert r["req_per_s"] > 0 and r["output_tokens_per_s"] > 0
    assert 0 <= r["first_token_ms_p50"] <= r["first_token_ms_p99"]
    assert r["slo_attainment"] == 1.0  # a tiny model answers well within 6 s


def test_engine_with_adapters(results: dict[str, dict]) -> None:
    rec = results["lora"]
    c = rec["config"]
    assert c["setting"] == "S1" and c["ranks"] == [8] and c["num_adapters"] == 5
    assert c["adapter_storage"] == "shared host tensors, distinct pool pages"
    assert c["adapter_source"] == "memory" and c["prefetch"] is True
    assert c["modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"] and c["saturate"]
    assert rec["machine"]["cpu"] and rec["versions"]["torch"]
    assert rec["date"] and "peft" not in rec["results"]
    r = rec["results"]["loraplane"]
    _check_summary(r, 12)
    # Forced lengths: the trace's output lengths are what was generated.
    assert 12 * 2 <= r["output_tokens"] <= 12 * 8
    assert r["decode_steps"] > 0 and r["decode_step_ms_p50"] > 0
    assert 1 <= rec["trace"]["distinct_adapters_used"] <= 5
    # The adapter weights a decode step had to read: its rows' distinct adapters' A and B.
    assert 1 <= r["decode_adapters_p50"] <= 5
    assert r["decode_lora_mb_p50"] > 0 and "decode_lora_floor_ms_p50" in r


def test_no_lora(results: dict[str, dict]) -> None:
    rec = results["base"]
    assert rec["config"]["num_adapters"] == 0 and rec["config"]["adapter_storage"] is None
    _check_summary(rec["results"]["loraplane"], 12)
    assert rec["trace"]["distinct_adapters_used"] == 0
    assert rec["results"]["loraplane"]["decode_lora_mb_p50"] == 0
    # The same seed gives the same lengths with or without adapters.
    lora = results["lora"]["results"]["loraplane"]
    assert rec["results"]["loraplane"]["output_tokens"] == lora["output_tokens"]


def test_peft_baseline(results: dict[str, dict]) -> None:
    rec = results["peft"]
    assert rec["config"]["ranks"] == [2, 4] and rec["config"]["baseline"] == "peft"
    ours, peft = rec["results"]["loraplane"], rec["results"]["peft"]
    _check_summary(ours, 12)
    _check_summary(peft, 12)
    assert peft["output_tokens"] == ours["output_tokens"]
    assert rec["ratios"]["req_per_s_vs_peft"] > 0


def test_policy_and_cv_sweep_in_one_run(results: dict[str, dict]) -> None:
    rec = results["sweep"]
    c = rec["config"]
    assert c["scheduling_policies"] == ["fcfs", "abort"] and c["cv_sweep"] == [1.0, 4.0]
    assert list(rec["results"]) == ["fcfs cv=1", "abort cv=1", "fcfs cv=4", "abort cv=4"]
    for r in rec["results"].values():
        _check_summary(r, 12)  # nothing is refused when every request makes the SLO
        assert r["num_refused"] == 0 and r["aborted_share"] == 0.0
    assert rec["results"]["abort cv=4"]["scheduling_policy"] == "abort"
def test_adapters_from_disk_through_the_tiers(results: dict[str, dict]) -> None:
    rec = results["tiers"]
    c = rec["config"]
    assert c["adapter_source"] == "disk" and c["prefetch"] is True
    assert c["host_cache_gib"] == 0.0005 and "own host buffer" in c["adapter_storage"]
    r = rec["results"]["loraplane"]
    _check_summary(r, 12)
    # Every trace adapter was loaded once at least; requests queued behind max-num-seqs 2
    # let prefetch bring some in ahead (hits), the first ones are loaded on admission.
    assert r["prefetch_hits"] + r["prefetch_misses"] >= rec["trace"]["distinct_adapters_used"]
    assert r["prefetch_misses"] >= 1 and r["adapter_load_failures"] == 0
    assert r["adapter_load_hidden_s"] >= 0 and r["adapter_load_exposed_s"] >= 0
    assert 0 <= r["adapter_load_hidden_share"] <= 1


def test_rank_above_limit_is_refused(tmp_path: Path) -> None:
    from loraplane.cli import main

    with pytest.raises(SystemExit, match="max-lora-rank"):
        main(["bench", *BASE, "--num-adapters", "2", "--ranks", "64", "--max-lora-rank", "16",
              "--out", str(tmp_path)])


def test_new_variants_lists_the_keys_compiled_in_between() -> None:
    from loraplane.engine.kernels.common import new_variants

    before = {"lora_shrink._shrink_kernel": {"k1"}}
    after = {"lora_shrink._shrink_kernel": {"k1", "k2"}, "rms_norm._rms_norm_kernel": {"k3"},
             "silu_mul._silu_mul_kernel": set()}
    assert new_variants(before, after) == {"lora_shrink._shrink_kernel": ["k2"],
                                           "rms_norm._rms_norm_kernel": ["k3"]}
    assert new_variants(None, after) is None
