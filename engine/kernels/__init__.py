"""Triton kernels of the engine; each file has a kernel, a checked wrapper and a torch reference."""
