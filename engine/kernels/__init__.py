"""Fast paths per device: `cpu/` (C, compiled at first use). Each is tested against `engine.model`'s reference."""
