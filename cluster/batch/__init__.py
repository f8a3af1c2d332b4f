"""Batch jobs (the OpenAI Batch API): durable store, runner, HTTP routes."""
