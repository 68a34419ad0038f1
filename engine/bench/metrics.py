"""Per-request timings of a replay and the summary the S-LoRA benchmark reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

# The H200's measured device-to-device copy bandwidth (../shared/PERFORMANCE.md), bytes/s: the
# rate at which a decode step's adapter weights could at best be read.
HBM_BYTES_PER_S = 4.27e12


@dataclass
class RequestRecord:
    """When one request arrived, got its first token and finished (time.monotonic seconds)."""

    arrival: float
    input_len: int
    output_len: int
    first_token: float | None = None
    finish: float | None = None
    tokens: int = 0  # output tokens produced
    refused: bool = False  # the policy refused it before its first token (early abort)


def _ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 3) if values else float("nan")


def summarize(records: list[RequestRecord], slo_s: float) -> dict:
    """Throughput over the busy interval, first-token latency p50/p99 and SLO attainment."""
    done = [r for r in records if r.finish is not None and r.first_token is not None]
    refused = sum(r.refused for r in records)
    if not done:
        return {"num_finished": 0, "num_refused": refused,
                "aborted_share": round(refused / max(len(records), 1), 4)}
    start = min(r.arrival for r in records)
    end = max(r.finish for r in done if r.finish is not None)
    busy = max(end - start, 1e-9)
    ttft = [r.first_token - r.arrival for r in done if r.first_token is not None]
    latency = [r.finish - r.arrival for r in done if r.finish is not None]
    out_tokens = sum(r.tokens for r in done)
    in_tokens = sum(r.input_len for r in done)
    return {
        "num_finished": len(done),
        "busy_s": round(busy, 4),
        "req_per_s": round(len(done) / busy, 4),
        "output_tokens_per_s": round(out_tokens / busy, 2),
        "total_tokens_per_s": round((in_tokens + out_tokens) / busy, 2),
        "output_tokens": out_tokens,
        "prompt_tokens": in_tokens,
        "first_token_ms_p50": _ms(ttft, 50),
        "first_token_ms_p99": _ms(ttft, 99),
        "first_token_ms_mean": round(float(np.mean(ttft)) * 1000, 3),
        "latency_ms_p50": _ms(latency, 50),
        "latency_ms_p99": _ms(latency, 99),
        "slo_s": slo_s,
        # Every request counts: one that never finished, or was refused, missed its SLO.
        "slo_attainment": round(sum(t <= slo_s for t in ttft) / len(records), 4),
        "num_refused": refused,
        "aborted_share": round(refused / len(records), 4),
    }


class StepRecord(NamedTuple):
    """One engine step of a replay: wall seconds, rows that sampled a token, whether it was a
    pure decode step, and (decode steps) the distinct adapters its rows used and the bytes of
    their A and B weights, which the step's LoRA kernels must read at least once."""

    seconds: float
    rows: int
    all_decode: bool
    adapters: int = 0
    lora_bytes: int = 0


def decode_steps(steps: list[StepRecord]) -> dict:
    """Median time and batch size of pure-decode steps, where the steps' time went (pure-decode
    steps vs the others: prefill or mixed), and the adapter weights a decode step read: its
    distinct adapters, their bytes, and the least time reading those bytes takes at the H200's
    copy bandwidth (the LoRA floor of a decode step, whatever the kernels)."""
    pure = [st for st in steps if st.all_decode]
    if not pure:
        return {"decode_steps": 0}
    secs = [st.seconds for st in pure]
    other = [st.seconds for st in steps if not st.all_decode]
    lora_bytes = [st.lora_bytes for st in pure]
    return {
        "decode_steps_s": round(sum(secs), 3),
        "other_steps_s": round(sum(other), 3),
        "other_step_ms_p50": _ms(other, 50),
        "decode_steps": len(pure),
        "decode_step_ms_p50": _ms(secs, 50),
        "decode_step_ms_p99": _ms(secs, 99),
        "decode_batch_p50": float(np.median([st.rows for st in pure])),
        "decode_tokens_per_s": round(sum(st.rows for st in pure) / sum(secs), 2),
        "decode_adapters_p50": float(np.median([st.adapters for st in pure])),
        "decode_lora_mb_p50": round(float(np.median(lora_bytes)) / 1e6, 2),
        "decode_lora_floor_ms_p50": round(float(np.median(lora_bytes)) / HBM_BYTES_PER_S * 1e3,
                                          3),
        "steps_total": len(steps),
    }
