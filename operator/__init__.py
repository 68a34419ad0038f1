"""loraplane's control plane: the LoraAdapter operator (Kopf) and the node agent."""
