"""Plot throughput vs number of adapters from `loraplane bench` results (docs/BENCHMARKS.md).

Reads every bench JSON in a results folder for one setting at saturation, keeps the newest run per
adapter count, and draws this engine, the same engine without LoRA (n = 0), HF PEFT (runs made
with --baseline peft) and the S-LoRA paper's numbers (A100-80GB, Poisson 10 req/s: a different
machine and load, drawn for the shape of the curve, not for a like-for-like comparison).

    pip install matplotlib
    python bench/plot_adapters.py --setting S2 --out docs/throughput-vs-adapters.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# S-LoRA paper (seeds/s-lora-summary, PERFORMANCE.md): Llama-7B on an A100-80GB, req/s.
SLORA_PAPER = {
    "S1": {5: 8.05, 100: 7.99, 1000: 7.64, 2000: 7.61},
    "S2": {5: 7.48, 100: 7.29, 1000: 6.69, 2000: 6.71},
}
PEFT_PAPER = {5: 0.88, 100: 0.25}


def load_runs(folder: Path, setting: str,
              patterns: list[str]) -> tuple[dict[int, float], dict[int, float], str]:
    """(engine req/s by adapter count, PEFT req/s by adapter count, machine) of saturated runs
    in files matching `patterns` (one sweep of one code version, not every run ever made)."""
    newest: dict[int, tuple[str, dict[str, Any]]] = {}
    peft: dict[int, float] = {}
    machine = ""
    paths = sorted({p for pattern in patterns for p in folder.glob(pattern)})
    for path in paths:
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        cfg = d.get("config", {})
        if cfg.get("setting") != setting or not cfg.get("saturate"):
            continue
        n = int(cfg.get("num_adapters", -1))
        res = d.get("results", {})
        if "peft" in res:
            peft[n] = float(res["peft"]["req_per_s"])
            continue  # PEFT runs use their own request mix (e.g. 32 fixed-length requests)
        if "loraplane" not in res:
            continue
        if n not in newest or d.get("date", "") > newest[n][0]:
            newest[n] = (d.get("date", ""), res["loraplane"])
            machine = str(d.get("machine", {}).get("gpu") or d.get("machine", ""))
    return {n: float(r["req_per_s"]) for n, (_, r) in newest.items()}, peft, machine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=Path("bench/results"))
    p.add_argument("--setting", default="S2")
    p.add_argument("--out", type=Path, default=Path("docs/throughput-vs-adapters.png"))
    p.add_argument("--files", nargs="+", default=["bench-*-S2-n*-sat.json",
                                                  "bench-*-S2-n*-sat-peft.json"],
                   help="result files (globs in --results) of the sweep to draw")
    args = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    engine, peft, machine = load_runs(args.results, args.setting, args.files)
    if not engine:
        raise SystemExit(f"no saturated {args.setting} runs in {args.results}")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lora = sorted((n, v) for n, v in engine.items() if n > 0)
    if lora:
        ax.plot([n for n, _ in lora], [v for _, v in lora], "o-", label=f"loraplane ({machine})")
    if 0 in engine:
        ax.axhline(engine[0], color="gray", linestyle="--", label="loraplane, no LoRA")
    if peft:
        ax.plot(sorted(peft), [peft[n] for n in sorted(peft)], "s",
                label="HF PEFT, same machine (its own request mix)")
    paper = SLORA_PAPER.get(args.setting)
    if paper:
        ax.plot(sorted(paper), [paper[n] for n in sorted(paper)], "^:",
                label="S-LoRA paper (A100, 10 req/s)")
        ax.plot(sorted(PEFT_PAPER), [PEFT_PAPER[n] for n in sorted(PEFT_PAPER)], "v:",
                label="PEFT in the S-LoRA paper")
    ax.set_xscale("log")
    ax.set_xlabel("adapters")
    ax.set_ylabel("requests/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{args.setting}: throughput vs number of adapters (saturation)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}: " + ", ".join(f"n={n}: {v:.2f}" for n, v in sorted(engine.items())))


if __name__ == "__main__":
    main()
