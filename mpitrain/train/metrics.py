"""Metrics on rank 0: JSON lines, optional TensorBoard, progress lines and the summary."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import IO, Any

from mpitrain.runtime.files import write_atomic

log = logging.getLogger("mpitrain")


class MetricsLog:
    """Append metric records to ``RUN_DIR/metrics.jsonl`` (rank 0 only; others pass None)."""

    def __init__(self, run_dir: Path | None, tensorboard: str | None = None) -> None:
        self._fh: IO[str] | None = None
        self._tb: Any = None
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._fh = open(run_dir / "metrics.jsonl", "a", buffering=1 << 16)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning(
                    "--tensorboard needs the 'tensorboard' package (pip install tensorboard); "
                    "writing metrics.jsonl only"
                )
            else:
                self._tb = SummaryWriter(tensorboard)

    def write(self, record: dict[str, Any]) -> None:
        """Write one record (a dict of JSON-able scalars)."""
        if self._fh is not None:
            self._fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = int(record.get("step", 0))
            prefix = "eval/" if record.get("kind") == "eval" else "train/"
            for key, value in record.items():
                if isinstance(value, int | float) and key not in ("step", "epoch"):
                    self._tb.add_scalar(prefix + key, value, step)

    def close(self) -> None:
        """Flush and close."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Write the run summary as JSON atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(summary, indent=2) + "\n").encode())


def summary_line(s: dict[str, Any]) -> str:
    """Return the final one-line summary printed by rank 0."""
    acc, ppl = s.get("test_accuracy"), s.get("test_perplexity")
    if ppl is not None:  # a language model
        quality = f"test loss {s['test_loss']:.4f} (perplexity {ppl:.2f})"
    else:
        quality = "test accuracy " + ("n/a" if acc is None else f"{100 * acc:.2f}%")
    grid = s.get("grid") or {}
    ranks = f"{s['world_size']} ranks"
    if grid.get("tensor", 1) * grid.get("pipeline", 1) > 1:
        ranks += (f" (tensor {grid['tensor']} x pipeline {grid['pipeline']} x "
                  f"data {grid['data']})")
    return (
        f"mpitrain: done: {ranks}, {s['epochs']} epochs, {s['steps']} steps, "
        f"final loss {s['final_loss']:.4f}, {quality}, "
        f"{s['samples_per_sec']:.0f} samples/s, {s['wall_seconds']:.1f} s"
    )


def print_line(text: str) -> None:
    """Print a progress line to stdout and flush (Slurm logs)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Progress:
    """Rank-0 tqdm bar for one epoch (loss, samples/s, ETA); silent when not a TTY.

    Slurm logs are not TTYs: there the per-epoch lines printed by the loop are the progress.
    """

    def __init__(self, *, enabled: bool, total: int, desc: str) -> None:
        self._bar: Any = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, loss: float, rate: float) -> None:
        """Advance by one step."""
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", sps=f"{rate:.0f}", refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        """Remove the bar (the epoch line replaces it)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
