"""GPU check of the fused decode layers (not a test): the same random llama-2-7b weights in bf16
with `fused_layers` off and on give close logits (prefill and graph-replayed decode steps, base
rows and rows with adapters of ranks 8 and 16 on all seven projections); then the decode step
time at batch 1 and 64 (CUDA graph replay alone, and the whole engine step) off and on.

Run from the repository root: `python3 bench/fused_check.py [--out bench/results]`. Prints a
short table and writes JSON to --out (date and machine in the name and the record).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
import triton

# The sibling gpu_smoke.py holds the engine and adapter helpers (run as a script, not a package).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_smoke import decode_steps, engine_for, weights  # noqa: E402

from loraplane.engine.config import LORA_MODULES, NAMED_SHAPES  # noqa: E402
from loraplane.engine.lora.triton_op import TritonLoraOp  # noqa: E402
from loraplane.engine.models.llama import build_model  # noqa: E402
from loraplane.engine.sampling_params import SamplingParams  # noqa: E402

SHAPE = "llama-2-7b"
PROMPT_LENS = (128, 37, 1, 200)
ADAPTER_OF = (None, "a0", "a1", None)
NEW_TOKENS = 8
# bf16 through 32 layers: the fused GEMMs may pick other cuBLAS kernels (other summation
# orders), so logits differ by rounding; far below this share of the logits' range.
REL_TOL = 0.05


def greedy_run(dev: torch.device, fused: bool) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Greedy tokens and every step's logits [vocab] (float32, CPU) of each request."""
    cfg = NAMED_SHAPES[SHAPE]
    model = build_model(cfg, None, 2048, torch.bfloat16, dev, seed=0)
    eng = engine_for(cfg, model, TritonLoraOp, 8.0, max_num_seqs=8, fused_layers=fused)
    for i, rank in enumerate((8, 16)):
        eng.add_adapter(f"a{i}", "", weights(cfg, rank, i, LORA_MODULES, std=0.05))
    captured: dict[str, list[torch.Tensor]] = {}
    run = eng.runner.run

    def capture(batch):  # type: ignore[no-untyped-def]
        seqs, tokens, logits = run(batch)
        for s, row in zip(seqs, logits, strict=True):
            captured.setdefault(s.request_id, []).append(row.float().cpu())
        return seqs, tokens, logits
    eng.runner.run = capture  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 30000, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    seqs = eng.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0,
                                                ignore_eos=True), list(ADAPTER_OF))
    out = [s.output_ids for s in seqs], [captured[s.request_id] for s in seqs]
    del eng, model
    torch.cuda.empty_cache()
    return out


def compare_logits(dev: torch.device) -> dict:
    """Per request: logits rows compared while both runs have produced the same tokens."""
    (ids_off, logits_off), (ids_on, logits_on) = greedy_run(dev, False), greedy_run(dev, True)
    rows = []
    for i in range(len(PROMPT_LENS)):
        same = next((j for j, (a, b) in enumerate(zip(ids_off[i], ids_on[i], strict=True))
                     if a != b), len(ids_off[i]))
        # Row j produced token j: comparable while tokens 0..j-1 agree.
        n = min(same + 1, len(logits_off[i]))
        off, on = torch.stack(logits_off[i][:n]), torch.stack(logits_on[i][:n])
        err = (off - on).abs().max().item()
        # The bound is a share of the logits' range (max - min), as the check has always said;
        # until 2026-11-30 23:20 UTC the code took the largest |logit| (about half the range).
        scale = (off.max() - off.min()).item()
        rows.append({"prompt_len": PROMPT_LENS[i], "adapter": ADAPTER_OF[i],
                     "same_tokens": same, "tokens": len(ids_off[i]), "rows_compared": n,
                     "max_abs_diff": round(err, 5),
                     "max_abs_logit": round(off.abs().max().item(), 3),
                     "logit_range": round(scale, 3),
                     "ok": err <= REL_TOL * scale})
    return {"rel_tol": REL_TOL, "requests": rows, "all_ok": all(r["ok"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--batches", default="1,64", help="decode batch sizes to time")
    args = ap.parse_args()
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name()
    res: dict = {"date": datetime.date.today().isoformat(), "gpu": gpu,
                 "host": platform.node(), "torch": torch.__version__,
                 "triton": triton.__version__, "shape": SHAPE, "dtype": "bfloat16"}
    res["logits_fused_vs_unfused"] = compare_logits(dev)
    print("logits:", json.dumps(res["logits_fused_vs_unfused"]), flush=True)
    res["decode"] = []
    for batch in (int(b) for b in args.batches.split(",")):
        for fused in (False, True):
            res["decode"].append(decode_steps(dev, batch, 0, 0, fused=fused))
            print(res["decode"][-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    slug = gpu.lower().replace("nvidia ", "").replace(" ", "-")
    path = args.out / f"fused-check-{slug}-{res['date']}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"{'batch':>6}{'fused':>7}{'replay ms':>11}{'step ms':>9}{'tok/s':>9}")
    for d in res["decode"]:
        print(f"{d['batch']:>6}{d['fused_layers']!s:>7}{d['graph_replay_ms']!s:>11}"
              f"{d['step_ms_median']:>9}{d['tokens_per_s']:>9}")
    print(f"logits within {REL_TOL:.0%} of their range: "
          f"{res['logits_fused_vs_unfused']['all_ok']}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
