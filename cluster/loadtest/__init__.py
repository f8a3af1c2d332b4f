"""`megaserve bench`: a load generator for any OpenAI-compatible server, with vLLM's metric definitions.

datasets.py (request specs) -> arrival.py (send times) -> client.py (streaming requests, per-request timings)
-> metrics.py (vLLM's aggregate metrics and JSON keys) -> runner.py (run, write JSON/CSV/plots, print summary),
with progress.py (the live progress line). sweep.py runs runner.py over request rates and finds the highest rate
meeting goodput SLOs (`bench sweep`); offline.py is the offline-API workload (`bench offline`, bench/offline.py).
"""
