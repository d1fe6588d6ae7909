"""Offline task definitions for lm-evaluation-harness (YAML templates and their helper module)."""
