"""Tensor-parallel scaling: the S-LoRA workload at several TP sizes, with and without LoRA.

Each configuration runs as its own `loraplane bench --tensor-parallel-size N` process (a fresh
set of GPUs each time), at saturation; this script collects their JSON records, prints
throughput, first-token latency, speed-up over the smallest TP size, scaling efficiency and the
cost of LoRA (its extra collectives included) at each size, and writes one JSON record.

Issue #5 (nvidia-h200-x2), llama-2-13b S4, 100 adapters:
    python bench/tp_bench.py --setting S4 --num-adapters 100 --tp 1 2
Issue #6 (x4 / x8), S6: llama-2-70b ranks {64}, 10 and 100 adapters:
    python bench/tp_bench.py --setting S6 --num-adapters 10 100 --tp 4 8
On CPU (gloo), end to end in about a minute:
    python bench/tp_bench.py --shape tiny --ranks 2 5 --num-adapters 4 --tp 1 2 \
        --num-requests 8 --device cpu -- --dtype float32 --input-range 8 32 \
        --output-range 8 16 --pool-memory 0.01
Arguments after `--` go to every `loraplane bench` run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from loraplane.engine.bench.workload import SETTINGS

COLUMNS = ("req_per_s", "output_tokens_per_s", "first_token_ms_p50", "first_token_ms_p99",
           "decode_step_ms_p50")


def run_one(args: argparse.Namespace, tp: int, adapters: int, extra: list[str],
            out: Path) -> dict:
    """One `loraplane bench` process; returns its JSON record."""
    folder = out / f"tp{tp}-n{adapters}"
    cmd = [sys.executable, "-m", "loraplane.cli", "bench", "--setting", args.setting,
           "--model", f"random:{args.shape}", "--ranks", *map(str, args.ranks),
           "--num-adapters", str(adapters), "--tensor-parallel-size", str(tp), "--saturate",
           "--num-requests", str(args.num_requests), "--device", args.device,
           "--sets-per-rank", str(args.sets_per_rank), "--out", str(folder), *extra]
    if not args.cuda_graphs:
        cmd.append("--no-cuda-graphs")
    print("$ " + " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    (path,) = folder.glob("*.json")
    record: dict = json.loads(path.read_text())
    return record


def summarize(runs: list[dict]) -> list[dict]:
    """One row per run, with speed-up and efficiency against the smallest TP size run with
    the same adapters, LoRA's cost against the no-LoRA run at the same TP size, and the cost of
    the LoRA collectives against a run that skipped them (same TP size and adapters)."""
    rows = []
    for r in runs:
        c, res = r["config"], r["results"]["loraplane"]
        rows.append({"tp": c["tensor_parallel_size"], "adapters": c["num_adapters"],
                     "graphs": c.get("cuda_graphs", False),
                     "skip_collectives": bool(c.get("tp_skip_lora_collectives")),
                     **{k: res.get(k) for k in COLUMNS}})
    # Runs without the collectives compute wrong outputs: they only price the collectives.
    real = [o for o in rows if not o["skip_collectives"]]
    for row in rows:
        same = [o for o in real if o["adapters"] == row["adapters"]] or [row]
        base = min(same, key=lambda o: o["tp"])
        speedup = row["req_per_s"] / base["req_per_s"]
        row["speedup"] = round(speedup, 3)
        row["scaling_efficiency"] = round(speedup * base["tp"] / row["tp"], 3)
        plain = [o for o in real if o["tp"] == row["tp"] and o["adapters"] == 0]
        row["lora_cost"] = (round(1 - row["req_per_s"] / plain[0]["req_per_s"], 4)
                            if plain and row["adapters"] else None)
        skipped = [o for o in rows if o["skip_collectives"] and o["tp"] == row["tp"]
                   and o["adapters"] == row["adapters"]]
        row["collectives_cost"] = (round(1 - row["req_per_s"] / skipped[0]["req_per_s"], 4)
                                   if skipped and not row["skip_collectives"] else None)
    return rows


def table(rows: list[dict]) -> str:
    names = ("tp", "adapters", "graphs", "skip_collectives", *COLUMNS, "speedup",
             "scaling_efficiency", "lora_cost", "collectives_cost")
    lines = ["  ".join(f"{n:>8}" for n in names)]
    for row in rows:
        lines.append("  ".join(f"{'-' if row[n] is None else str(row[n]):>{max(len(n), 8)}}"
                               for n in names))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Run every (TP size, adapter count) pair plus no-LoRA at each TP size; write JSON."""
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", default="S4", choices=sorted(SETTINGS),
                   help="workload setting: its shape and ranks unless --shape/--ranks say")
    p.add_argument("--shape", default=None, help="random:<shape> model (default: the setting's)")
    p.add_argument("--ranks", type=int, nargs="+", default=None,
                   help="adapter ranks (default: the setting's)")
    p.add_argument("--num-adapters", type=int, nargs="+", default=[100])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="TP sizes to run")
    p.add_argument("--no-lora-tp", type=int, nargs="*", default=None,
                   help="TP sizes that also run without LoRA (default: every size above 1)")
    p.add_argument("--num-requests", type=int, default=300)
    p.add_argument("--sets-per-rank", type=int, default=4)
    p.add_argument("--device", default="cuda")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="let TP=1 replay decode graphs (TP>1 runs eagerly; off by default so "
                        "every size is compared eager to eager)")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--from-runs", type=Path, nargs="*", default=[], metavar="JSON",
                   help="summarize these `loraplane bench` records instead of running (runs "
                        "made one by one, e.g. by bench/gpu_issue_runs.sh tp)")
    p.add_argument("--include", type=Path, nargs="*", default=[], metavar="JSON",
                   help="earlier tp_bench records whose runs join this summary (to split the "
                        "runs over several commands)")
    args = p.parse_args(argv)
    args.shape = args.shape or SETTINGS[args.setting].model
    args.ranks = args.ranks or list(SETTINGS[args.setting].ranks)
    no_lora = args.no_lora_tp if args.no_lora_tp is not None else [t for t in args.tp if t > 1]
    plan = [(tp, n) for tp in args.tp for n in args.num_adapters]
    plan += [(tp, 0) for tp in no_lora if (tp, 0) not in plan]
    if args.from_runs:
        runs = [json.loads(path.read_text()) for path in args.from_runs]
    else:
        with tempfile.TemporaryDirectory(prefix="tp-bench-") as tmp:
            runs = [run_one(args, tp, n, extra, Path(tmp)) for tp, n in plan]
    for path in args.include:
        runs += json.loads(path.read_text())["runs"]
    rows = summarize(runs)
    date = datetime.datetime.now(datetime.timezone.utc)
    record = {
        "benchmark": "bench/tp_bench.py",
        "date": date.isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/tp_bench.py", *sys.argv[1:]]),
        "machine": runs[0]["machine"], "versions": runs[0]["versions"],
        "shape": args.shape, "ranks": args.ranks, "summary": rows,
        "runs": [{k: r[k] for k in ("machine", "config", "trace", "setup_s", "results")}
                 for r in runs],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = runs[0]["machine"].get("gpu", "cpu").split()[-1].lower()
    path = args.out / f"tp-bench-{date:%Y-%m-%dT%H%M}-{gpu}-{args.shape}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(table(rows))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
