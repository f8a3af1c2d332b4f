"""The HTTP frontend: OpenAI-compatible endpoints over the router (`python -m cluster.server`)."""
