"""Tensor parallelism across the GPUs of one node, with S-LoRA's partition of the adapters."""
