"""Expert parallelism on top of the core step loop: the collective parts of a step, and N ranks without Ray."""
