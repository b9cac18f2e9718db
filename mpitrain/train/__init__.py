"""The training loop, built-in models and datasets, metrics and progress."""
