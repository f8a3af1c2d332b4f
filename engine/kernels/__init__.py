"""Fast paths per device: `cpu/` (C, compiled at first use), `triton/` (CUDA kernels in Triton, an optional
dependency imported only when a kernel runs). Each is tested against `engine.model`'s reference. `select` is the
one place that picks the path for routed experts and linears."""
