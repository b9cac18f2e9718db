"""Benchmarks run side by side against peers: ``python -m mpitrain.bench <name> [--json PATH]``."""
