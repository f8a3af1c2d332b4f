"""One rank's compute: the DeepSeek-V4 model, its weights and cache, the step loop."""
