"""Prints the machine, versions, configuration and a results table; writes the JSON record."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from loraplane.engine.bench.workload import SETTINGS
from loraplane.engine.config import EngineConfig

DEFAULT_POLICY = EngineConfig().scheduling_policy
DEFAULT_ADMISSION = EngineConfig().admission_batch


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """What ran the benchmark: accelerator (if any), CPU, and the host."""
    info: dict[str, object] = {
        "host": platform.node(), "platform": platform.platform(), "cpu": _cpu_name(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


def versions() -> dict:
    """Package versions and the source revision, so numbers compare across versions."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("loraplane", "transformers", "peft", "triton"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               timeout=5, cwd=Path(__file__).parent)
        if rev.returncode == 0:
            out["git"] = rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


COLUMNS = [("req/s", "req_per_s", "{:.3f}"), ("out tok/s", "output_tokens_per_s", "{:.1f}"),
           ("TTFT p50 ms", "first_token_ms_p50", "{:.1f}"),
           ("TTFT p99 ms", "first_token_ms_p99", "{:.1f}"), ("SLO", "slo_attainment", "{:.1%}"),
           ("aborted", "aborted_share", "{:.1%}"),
           ("decode ms p50", "decode_step_ms_p50", "{:.2f}"),
           ("LoRA floor ms", "decode_lora_floor_ms_p50", "{:.2f}"),
           ("prefetch hits", "prefetch_hits", "{:d}"), ("misses", "prefetch_misses", "{:d}"),
           ("load hidden", "adapter_load_hidden_share", "{:.1%}"),
           ("copy hidden", "adapter_copy_hidden_share", "{:.1%}"),
           ("queued hidden", "queued_copy_hidden_share", "{:.1%}")]


def table(results: dict[str, dict]) -> str:
    """One row per system, the headline metrics as columns."""
    head = f"{'system':<18}" + "".join(f"{c:>15}" for c, _, _ in COLUMNS)
    rows = [head]
    for system, r in results.items():
        cells = "".join(f"{fmt.format(r[k]) if r.get(k) is not None else '-':>15}"
                        for _, k, fmt in COLUMNS)
        rows.append(f"{system:<18}{cells}")
    return "\n".join(rows)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def write(record: dict, out_dir: Path, path: Path | None = None) -> Path:
    """Write the record as JSON named with date, machine, setting and run shape; never overwrite
    another run's file (`path`: this run's file, written before, rewritten)."""
    if path is not None:
        path.write_text(json.dumps(record, indent=2) + "\n")
        return path
    m = record["machine"]
    c = record["config"]
    mode = "sat" if c["saturate"] else f"rate{c['rate']:g}"
    if c.get("cv_sweep"):
        mode += "-cv" + "-".join(f"{cv:g}" for cv in c["cv_sweep"])
    policies = c.get("scheduling_policies") or []
    if policies and policies != [DEFAULT_POLICY]:
        mode += "-" + "-".join(policies)
    # A --model other than the setting's own shape is named, so runs of two shapes never
    # share a name.
    model = c.get("model")
    own = f"random:{SETTINGS[c['setting']].model}" if c["setting"] in SETTINGS else None
    shape = f"-{_slug(model.removeprefix('random:'))[:32]}" if model and model != own else ""
    base = (f"bench-{record['date'][:10]}-{_slug(m.get('gpu') or m['cpu'])[:32]}-{c['setting']}"
            + shape + f"-n{c['num_adapters']}-{mode}-alpha{c['alpha']:g}"
            + ("-disk" if c.get("adapter_source") == "disk" else "")
            + ("" if c.get("prefetch", True) else "-noprefetch")
            + ("-peft" if c["baseline"] == "peft" else "")
            + (f"-tp{c['tensor_parallel_size']}" if c.get("tensor_parallel_size", 1) > 1 else "")
            + ("-eager" if c.get("cuda_graphs") is False and "cuda" in c["device"] else "")
            # Records before the admission batch had none (they admitted at every free slot).
            + (f"-admit{c['admission_batch']}" if c.get("admission_batch", DEFAULT_ADMISSION)
               != DEFAULT_ADMISSION else "")
            + ("-skip-lora-collectives" if c.get("tp_skip_lora_collectives") else "")
            # Overlapped LoRA collectives are the default since 2026-12-01 01:10 UTC.
            + ("-no-overlap" if c.get("tp_lora_overlap") is False
               and c.get("tensor_parallel_size", 1) > 1 else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{base}.json"
    k = 2
    while path.exists():
        path = out_dir / f"{base}-{k}.json"
        k += 1
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def header(record: dict) -> str:
    """Machine, versions and configuration, a few lines."""
    m, v, c = record["machine"], record["versions"], record["config"]
    where = f"{m['gpu']} ({m['gpu_memory_gib']} GiB)" if "gpu" in m else "no GPU"
    return "\n".join([
        f"machine: {where}; CPU {m['cpu']} x{m['cpus']}",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"config: {c['model']} {c['dtype']} on {c['device']}, setting {c['setting']} ranks "
        f"{c['ranks']}, {c['num_adapters']} adapters on {','.join(c['modules'])}, "
        f"{c['num_requests']} requests, " + ("all at t=0 (saturate)" if c["saturate"] else
                                            f"rate {c['rate']} req/s cv {c['cv']}")
        + f", alpha {c['alpha']}, in {c['input_range']} out {c['output_range']}",
        f"engine: tensor parallel {c.get('tensor_parallel_size', 1)}, max_num_seqs "
        f"{c['max_num_seqs']}, max_num_batched_tokens {c['max_num_batched_tokens']}, pool "
        f"{c['pool_gib']:.1f} GiB" + (" per GPU" if c.get("tensor_parallel_size", 1) > 1 else "")
        + f", host cache {c.get('host_cache_gib', 0):.2f} GiB, prefetch "
        f"{'on' if c.get('prefetch') else 'off'}, adapters from {c.get('adapter_source') or '-'}",
        f"date: {record['date']}",
    ])
