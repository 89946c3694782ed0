"""Benchmarks, run as scripts (``python bench/step.py``); see bench/README.md."""
