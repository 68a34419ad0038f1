"""The node agent: a per-GPU-node host-RAM cache of adapters, shared with the node's engines."""
