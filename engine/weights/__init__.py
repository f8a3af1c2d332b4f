"""Weights: checkpoint reading and validation, the manifest, the FP8/FP4 formats, the loader, and the writers
of random checkpoints and tokenizers in the official V4 layout."""
