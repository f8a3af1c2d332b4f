"""Dispatch/combine backends behind comm.dispatch.Dispatcher: ``sync`` (reference), ``tbo``, ``wave``.

Each backend module exposes ``run(ex, placement, layer, x, topk_idx, topk_weights, expert_fn, shared_fn,
**opts) -> Tensor``; comm.dispatch picks one by name.
"""
