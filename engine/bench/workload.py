"""The S-LoRA synthetic workload: settings and a seeded request trace (pure; no torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Setting:
    """A benchmark setting of the S-LoRA paper: a model shape and the adapters' ranks."""

    model: str
    ranks: tuple[int, ...]


SETTINGS: dict[str, Setting] = {
    "S1": Setting("llama-2-7b", (8,)),
    "S2": Setting("llama-2-7b", (8, 16, 32, 64)),
    "S4": Setting("llama-2-13b", (16, 32, 64)),
    # S-LoRA's S6 shape (70B, rank 64) with this harness's S4-style lengths and arrivals.
    "S6": Setting("llama-2-70b", (64,)),
}


@dataclass(frozen=True)
class Request:
    """One request of a trace; adapter is an index into the adapters (None: base model)."""

    index: int
    arrival: float  # seconds after the trace starts
    adapter: int | None
    input_len: int
    output_len: int


@dataclass(frozen=True)
class WorkloadSpec:
    """What a trace is drawn from."""

    num_requests: int
    num_adapters: int  # 0: every request uses the base model
    rate: float  # requests per second
    cv: float = 1.0  # coefficient of variation of inter-arrival times; 1 is Poisson
    alpha: float = 1.0  # adapter popularity numpy.random.power(alpha); 1 uniform, < 1 skewed
    input_range: tuple[int, int] = (8, 512)  # inclusive
    output_range: tuple[int, int] = (8, 512)  # inclusive
    round_robin_adapters: bool = False  # request i uses adapter i mod n instead of power(alpha)
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first field out of range."""
        if self.num_requests < 1:
            raise ValueError("num_requests must be at least 1")
        if self.num_adapters < 0:
            raise ValueError("num_adapters must be 0 (no LoRA) or positive")
        if self.rate <= 0 or self.cv <= 0 or self.alpha <= 0:
            raise ValueError("rate, cv and alpha must be positive")
        for name, (lo, hi) in (("input", self.input_range), ("output", self.output_range)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} range must satisfy 1 <= low <= high, got {lo} {hi}")


def adapter_ranks(num_adapters: int, ranks: tuple[int, ...]) -> list[int]:
    """Rank of each adapter: round-robin over the setting's ranks."""
    return [ranks[j % len(ranks)] for j in range(num_adapters)]


def make_trace(spec: WorkloadSpec) -> list[Request]:
    """Gamma inter-arrival times, power-law adapter choice, uniform lengths; seeded."""
    spec.validate()
    rng = np.random.default_rng(spec.seed)
    n = spec.num_requests
    # Gamma with shape k = 1/cv^2 and scale 1/(rate k): mean 1/rate, coefficient of variation cv.
    shape = 1.0 / spec.cv**2
    gaps = rng.gamma(shape, 1.0 / (spec.rate * shape), size=n)
    arrivals = np.concatenate(([0.0], np.cumsum(gaps[1:])))  # the first request opens the trace
    # Lengths before adapters: traces with any number of adapters share arrivals and lengths.
    ins = rng.integers(spec.input_range[0], spec.input_range[1] + 1, size=n)
    outs = rng.integers(spec.output_range[0], spec.output_range[1] + 1, size=n)
    if spec.num_adapters == 0:
        adapters: list[int | None] = [None] * n
    elif spec.round_robin_adapters:
        adapters = [i % spec.num_adapters for i in range(n)]
    else:
        # As the S-LoRA benchmark: power(alpha) in [0, 1) scaled to n adapters, low ids popular.
        picks = (rng.power(spec.alpha, size=n) * spec.num_adapters).astype(np.int64)
        adapters = [int(a) for a in np.minimum(picks, spec.num_adapters - 1)]
    return [Request(i, float(arrivals[i]), adapters[i], int(ins[i]), int(outs[i]))
            for i in range(n)]


def prompt_ids(request: Request, vocab_size: int, seed: int) -> list[int]:
    """Random token ids for a request's prompt, avoiding the low (special) ids."""
    rng = np.random.default_rng([seed, request.index])
    low = min(3, vocab_size - 1)
    return [int(t) for t in rng.integers(low, vocab_size, size=request.input_len)]
