"""Latency: op keys, measurement backends, latency tables and the resumable profiler."""
