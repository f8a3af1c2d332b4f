"""Dispatch/combine backends behind comm.dispatch.Dispatcher, registered by name (comm.backends.registry).

    sync  the reference: count exchange, one blocking variable-size all-to-all each way
    tbo   two micro-batches inside the layer, one in flight while the other computes
    wave  the MegaMoE schedule: local expert slots in waves, a wave's tokens travel while the previous computes
    ll    fixed capacity per destination rank, no count exchange, no host synchronisation (DeepEP low-latency)

Each is a comm.backends.base.DispatchBackend subclass in its own module, registered here lazily (name,
capabilities, class path) so that ``import comm.backends`` needs no torch. Another backend registers its class
with ``@register_backend(name, Capabilities(...))`` and is then chosen by name like these.
"""

from comm.backends.registry import Capabilities, register_backend

register_backend("sync", Capabilities(overlap="none"), target="comm.backends.sync:SyncBackend")
register_backend("tbo", Capabilities(overlap="micro_batches"), target="comm.backends.tbo:TwoBatchBackend")
register_backend("wave", Capabilities(overlap="expert_waves", options=("num_waves",)),
                 target="comm.backends.wave:WaveBackend")
register_backend("ll", Capabilities(overlap="none", fixed_capacity=True, host_sync_free=True,
                                    options=("max_tokens_per_rank", "capacity")),
                 target="comm.backends.ll:LowLatencyBackend")
