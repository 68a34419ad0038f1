"""Shared test setup: one torch thread (tests run beside server processes on 2 cores)."""

from __future__ import annotations

import os

import torch

# OpenMP threads spinning against another busy process slow CPU tests down several times.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Without a GPU, Triton kernels run in its interpreter (set before any kernel module imports).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)
