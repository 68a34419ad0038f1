"""loraplane: serve thousands of LoRA adapters of one base LLM."""

__version__ = "0.1.0"
