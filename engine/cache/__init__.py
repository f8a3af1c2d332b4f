"""The V4 hybrid KV cache: page pools, per-sequence layer state, and the one memory accounting."""
