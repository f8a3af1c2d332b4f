"""Capacity planner: what a topology holds per rank and how fast it will run, before anything starts.

hardware.py (GPU profiles, hardware.yaml), model_spec.py (the model as the planner sees it: V4 from the
engine's manifest, V3 in v3.py), memory.py (weights and KV per rank), perf.py (roofline step model),
inputs.py (what a plan needs; built from a topology), report.py (table and JSON).
"""
