"""`megaserve bench serve`: a load generator for any OpenAI-compatible server, with vLLM's metric definitions.

datasets.py (request specs) -> arrival.py (send times) -> client.py (streaming requests, per-request timings)
-> metrics.py (vLLM's aggregate metrics and JSON keys) -> runner.py (run, write JSON/CSV/plots, print summary).
"""
