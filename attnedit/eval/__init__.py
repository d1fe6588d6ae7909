"""Evaluation: KV-cache accounting and inspection (quality and speed benchmarks live here too)."""
