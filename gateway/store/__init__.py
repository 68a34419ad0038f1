"""Where the gateway keeps tenants, keys, the adapter registry, limit state and usage."""
