"""loraplane's edge: tenant keys, adapter access, rate limits and adapter-affinity routing."""
