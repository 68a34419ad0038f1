"""`--baseline peft`: the same trace through HF transformers + PEFT, as the S-LoRA paper's baseline.

Policy: requests are served in arrival order by a fixed-size batching loop. Whenever the model
is idle it takes up to `batch_size` requests that have arrived (all of them are there at once in
saturate mode; it does not wait to fill a batch), left-pads their prompts and runs one
`generate(..., adapter_names=[...])` call, PEFT's mixed-batch LoRA, greedy, until the longest
forced output of the batch is done. A request's first token is the batch's first decoding step
and it finishes at the step that reaches its own output length (a streamer times every step);
rows past their length keep decoding, as they do in a static batch. Each adapter the trace uses
is loaded once with `PeftModel.load_adapter` under its own name, from a PEFT folder written from
the same weight sets the engine uses.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from loraplane.engine.bench.adapters import WeightSets, write_peft_folder
from loraplane.engine.bench.hf import random_hf_model
from loraplane.engine.bench.metrics import RequestRecord
from loraplane.engine.bench.workload import Request, prompt_ids
from loraplane.engine.config import ModelConfig


class StepClock:
    """A generate() streamer that only timestamps: put #0 is the prompt, put #k the k-th token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.monotonic())

    def end(self) -> None:
        pass


def load_peft(config: ModelConfig, trace: list[Request], names: list[str], ranks: list[int],
              sets: WeightSets | None, *, dtype: torch.dtype, device: torch.device,
              seed: int) -> torch.nn.Module:
    """The random HF base model, wrapped by PEFT with every adapter the trace uses."""
    from peft import PeftModel

    model = random_hf_model(config, dtype, device, seed)
    used = sorted({r.adapter for r in trace if r.adapter is not None})
    if not used or sets is None:
        return model
    peft: PeftModel | None = None
    with tempfile.TemporaryDirectory(prefix="loraplane-peft-") as tmp:
        folders: dict[str, Path] = {}
        for j in tqdm(used, desc="loading PEFT adapters", unit="adapter"):
            weights, label = sets.of(j, ranks[j])
            if label not in folders:
                folders[label] = write_peft_folder(weights, config, Path(tmp) / label.replace(
                    ":", "-"))
            if peft is None:
                peft = PeftModel.from_pretrained(model, str(folders[label]),
                                                 adapter_name=names[j])
            else:
                peft.load_adapter(str(folders[label]), adapter_name=names[j])
    assert peft is not None
    return peft.eval()


@torch.inference_mode()
def _generate(model: torch.nn.Module, prompts: list[list[int]], adapters: list[str] | None,
              new_tokens: int, device: torch.device) -> StepClock:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    clock = StepClock()
    kw = {"adapter_names": adapters} if adapters is not None else {}
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,  # type: ignore[operator]
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                   streamer=clock, **kw)
    if len(clock.times) != new_tokens + 1:
        raise RuntimeError(f"generate streamed {len(clock.times) - 1} steps, "
                           f"expected {new_tokens}")
    return clock


def run_peft(model: torch.nn.Module, trace: list[Request], names: list[str], *,
             batch_size: int, saturate: bool, seed: int, vocab_size: int,
             device: torch.device) -> list[RequestRecord]:
    """Serve the trace with the fixed-size batching loop above; returns per-request timings."""
    use_names = any(r.adapter is not None for r in trace)
    prompts = [prompt_ids(r, vocab_size, seed) for r in trace]

    def adapters_of(batch: list[Request]) -> list[str] | None:
        if not use_names:
            return None
        return [names[r.adapter] if r.adapter is not None else "__base__" for r in batch]

    warm = trace[: min(2, len(trace))]
    _generate(model, [p[:32] for p in prompts[: len(warm)]], adapters_of(warm), 4, device)
    t0 = time.monotonic()
    records = [RequestRecord(t0 if saturate else t0 + r.arrival, r.input_len, r.output_len)
               for r in trace]
    bar = tqdm(total=len(trace), desc="replaying (PEFT)", unit="req")
    nxt = 0
    while nxt < len(trace):
        wait = records[nxt].arrival - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        now = time.monotonic()
        end = nxt
        while end < len(trace) and end - nxt < batch_size and records[end].arrival <= now:
            end += 1
        batch = trace[nxt:end]
        clock = _generate(model, prompts[nxt:end], adapters_of(batch),
                          max(r.output_len for r in batch), device)
        for i, r in enumerate(batch, start=nxt):
            records[i].first_token = clock.times[1]
            records[i].finish = clock.times[r.output_len]
            records[i].tokens = r.output_len
        bar.update(len(batch))
        nxt = end
    bar.close()
    return records
