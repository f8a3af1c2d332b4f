"""Capacity planner: what a topology holds per rank and how fast it will run, before anything starts.

hardware.py (GPU profiles, hardware.yaml), model_spec.py (the model as the planner sees it: V4 from the
engine's manifest, V3 and V3.2 in v3.py), memory.py (weights and KV per rank), perf.py (roofline step model,
per-token FLOPs), disagg.py (disaggregated prefill/decode pools), planner.py (what a plan needs, built from a
topology, and the plan itself), report.py (table and JSON).
"""
