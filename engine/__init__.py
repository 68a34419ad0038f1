"""loraplane's data plane: the paged multi-adapter LLM engine."""
