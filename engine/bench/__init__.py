"""`loraplane bench`: the S-LoRA synthetic workload replayed against the engine and HF PEFT."""
