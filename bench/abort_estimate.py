"""How good is the early-abort policy's first-token estimate? (CPU, not a test.)

Replays an overloaded S-LoRA trace (tiny random model, in-process engine, wall-clock arrivals)
under the `abort` policy, and under the estimate it replaced (`hold`, below: places in the batch
freed after the mean service time of finished requests), one after the other for each cv in one
process (this CPU's speed drifts with its other load), and compares, for every request it
admitted, the first-token time the policy expected (the engine clock,
`Sequence.expected_first_token`) with the actual one: at the first estimate after arrival and
at the last one before admission. Error = actual - expected
(positive: the estimate was optimistic). It also splits each served request's first-token
latency into its wait for admission and admission -> first token, and counts the requests the
policy kept that then missed the SLO. Prints one table per cv and writes JSON under `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import heapq
import itertools
import json
import logging
import statistics
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from loraplane.engine.bench import report
from loraplane.engine.bench.adapters import WeightSets, register
from loraplane.engine.bench.driver import replay, warm_up
from loraplane.engine.bench.workload import WorkloadSpec, adapter_ranks, make_trace
from loraplane.engine.config import EngineConfig
from loraplane.engine.engine import LLMEngine
from loraplane.engine.errors import SloUnattainableError
from loraplane.engine.policies import SERVICE_WINDOW, AbortPolicy, make_policy
from loraplane.engine.sequence import Sequence

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def quantiles(values: list[float]) -> dict[str, float | None]:
    """Mean, p10, p50, p90 and max, in seconds (None for no values)."""
    if not values:
        return {"n": 0, "mean": None, "p10": None, "p50": None, "p90": None, "max": None}
    a = np.asarray(values)
    return {"n": len(values), "mean": round(float(a.mean()), 4),
            **{f"p{q}": round(float(np.percentile(a, q)), 4) for q in (10, 50, 90)},
            "max": round(float(a.max()), 4)}


class HoldTimeAbortPolicy(AbortPolicy):
    """The estimate before bench/results/abort-*: the k-th waiting request gets the k-th place
    of the batch to free, each running or admitted request holding its place for the mean
    first-token-to-finish time of recently finished requests plus the median step."""

    def __init__(self, slo_s: float) -> None:
        super().__init__(slo_s)
        self._service: deque[float] = deque(maxlen=SERVICE_WINDOW)
        self._steps: deque[float] = deque(maxlen=SERVICE_WINDOW)
        self._round: float | None = None

    def on_finish(self, seq: Sequence, now: float) -> None:
        if seq.first_token_time is not None and seq.finish_reason in ("stop", "length"):
            self._service.append(now - seq.first_token_time)

    def _places(self, running: list[Sequence], now: float) -> Iterator[float]:
        if not self._service or not running:
            return
        hold = statistics.mean(self._service) + (statistics.median(self._steps)
                                                 if self._steps else 0.0)
        free = [hold if s.first_token_time is None else max(0.0, hold - (now - s.first_token_time))
                for s in running]  # [places]: seconds until each is free
        heapq.heapify(free)
        while True:
            t = heapq.heappop(free)
            yield t
            heapq.heappush(free, t + hold)

    def refusals(self, waiting: deque[Sequence], running: list[Sequence], now: float,
                 estimate: bool) -> list[SloUnattainableError | None]:
        if estimate:
            if self._round is not None:
                self._steps.append(now - self._round)
            self._round = now
        places = self._places(running, now) if estimate else iter(())
        out: list[SloUnattainableError | None] = []
        ahead = 0
        for seq in waiting:
            wait = next(places, 0.0)
            if seq.first_token_time is None and now - seq.arrival + wait > self.slo_s:
                out.append(self._error(now - seq.arrival + wait, ahead, wait))
                places = itertools.chain([wait], places)  # the place goes to the next one
                continue
            out.append(None)
            ahead += 1
            if estimate and self._service and seq.first_token_time is None:
                seq.expected_first_token = now + wait
        return out


def run_one(engine: LLMEngine, cfg: EngineConfig, spec: WorkloadSpec, names: list[str],
            slo: float, estimate: str) -> dict[str, Any]:
    """One replay under a fresh abort policy (``estimate``: "rate", the engine's, or "hold");
    the estimate errors and the latency split."""
    policy = make_policy(cfg) if estimate == "rate" else HoldTimeAbortPolicy(slo)
    engine.scheduler.set_policy(policy)
    engine.adapters.drop_idle()
    seqs: list[Sequence] = []
    first_estimate: dict[int, float] = {}  # id(seq) -> its first estimate (this script only)
    add_request, refusals = engine.add_request, policy.refusals

    def add(*args: Any, **kwargs: Any) -> Sequence:
        seq = add_request(*args, **kwargs)
        seqs.append(seq)
        return seq

    def refuse(waiting: deque[Sequence], running: list[Sequence], now: float,
               estimate: bool) -> list[SloUnattainableError | None]:
        out = refusals(waiting, running, now, estimate)
        for seq, error in zip(waiting, out, strict=True):
            if error is None and seq.expected_first_token is not None:
                first_estimate.setdefault(id(seq), seq.expected_first_token)
        return out

    engine.add_request = add  # type: ignore[method-assign]
    policy.refusals = refuse  # type: ignore[method-assign]
    try:
        replay(engine, make_trace(spec), names, saturate=False, seed=spec.seed)
    finally:
        del engine.add_request
    served = [s for s in seqs if s.first_token_time is not None]
    refused = [s for s in seqs if s.error is not None]
    ttft = {id(s): s.first_token_time - s.arrival for s in served}  # type: ignore[operator]
    missed = [s for s in served if ttft[id(s)] > slo]
    last_err = [s.first_token_time - s.expected_first_token for s in served  # type: ignore
                if s.expected_first_token is not None]
    first_err = [s.first_token_time - first_estimate[id(s)] for s in served  # type: ignore
                 if id(s) in first_estimate]
    return {
        "requests": len(seqs), "served": len(served), "refused": len(refused),
        "met_slo": len(served) - len(missed), "served_missed_slo": len(missed),
        "slo_attainment": round((len(served) - len(missed)) / max(len(seqs), 1), 4),
        "served_with_estimate": len(last_err),
        "error_last_estimate_s": quantiles(last_err),
        "error_first_estimate_s": quantiles(first_err),
        "optimistic_share_last": round(sum(e > 0 for e in last_err) / max(len(last_err), 1), 4),
        "ttft_served_s": quantiles(list(ttft.values())),
        "wait_for_admission_s": quantiles([s.admitted_at - s.arrival for s in served  # type: ignore
                                           if s.admitted_at is not None]),
        "admission_to_first_token_s": quantiles([
            s.first_token_time - s.admitted_at for s in served  # type: ignore[operator]
            if s.admitted_at is not None]),
        "missed_wait_for_admission_s": quantiles([
            s.admitted_at - s.arrival for s in missed if s.admitted_at is not None]),
        "missed_admission_to_first_token_s": quantiles([
            s.first_token_time - s.admitted_at for s in missed  # type: ignore[operator]
            if s.admitted_at is not None]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-requests", type=int, default=300)
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--cv", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--slo", type=float, default=0.5, help="first-token SLO, seconds")
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--input-range", type=int, nargs=2, default=[8, 64])
    p.add_argument("--output-range", type=int, nargs=2, default=[8, 64])
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--pool-memory", type=float, default=0.05, help="GiB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="", help="added to the JSON file name")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = EngineConfig(pool_bytes=int(args.pool_memory * 2**30), max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       max_waiting=max(4096, args.num_requests), seed=args.seed,
                       scheduling_policy="abort", slo_first_token=args.slo)
    engine = LLMEngine.from_spec("random:tiny", device="cpu", engine_config=cfg)
    ranks = adapter_ranks(args.num_adapters, (8,))
    sets = WeightSets(engine.config, ranks, MODULES, 8, args.seed, engine.pool.data.dtype,
                      engine.pool.data.device)
    names = register(engine, sets, ranks)
    warm_up(engine, sets, args.seed)
    spec = WorkloadSpec(args.num_requests, args.num_adapters, args.rate, 1.0,
                        input_range=tuple(args.input_range),
                        output_range=tuple(args.output_range), seed=args.seed)
    results = {}
    for cv, estimate in itertools.product(args.cv, ("hold", "rate")):
        r = run_one(engine, cfg, dataclasses.replace(spec, cv=cv), names, args.slo, estimate)
        results[f"{estimate} cv={cv:g}"] = r
        e, f = r["error_last_estimate_s"], r["error_first_estimate_s"]
        print(f"{estimate} cv {cv:g}: attainment {r['slo_attainment']:.1%}, served "
              f"{r['served']}, refused {r['refused']}, served but missed "
              f"{r['served_missed_slo']}; estimate error (s, "
              f"actual - expected) last: mean {e['mean']} p50 {e['p50']} p90 {e['p90']}, first: "
              f"mean {f['mean']} p50 {f['p50']} p90 {f['p90']}; optimistic "
              f"{r['optimistic_share_last']:.0%}; admission -> first token p50 "
              f"{r['admission_to_first_token_s']['p50']} s")
    record = {
        "benchmark": "abort_estimate", "date": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": report.machine(engine.pool.data.device), "versions": report.versions(),
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"model": "random:tiny",
                                                                         "out": str(args.out)},
        "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    day = datetime.date.today().isoformat()
    path = args.out / f"abort-estimate-{day}-cpu{'-' + args.label if args.label else ''}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
