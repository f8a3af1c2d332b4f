"""The step loop (schedule -> execute -> update), the model runner, the sampler, and the offline API.

`core.ep` adds only what is collective for an expert-parallel group."""
