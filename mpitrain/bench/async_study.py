"""Convergence and speed of the exchange modes: ``python -m mpitrain.bench async``.

Trains each mode through ``python -m mpitrain`` (one mpiexec per run) on the digits demo and on
a synthetic classification task, for several rank counts, with and without a straggler rank
(``--straggler-ms``); prints a table of accuracy / wall time, writes JSON, and draws
accuracy-vs-step and accuracy-vs-time plots with ``python -m mpitrain plot``. Results and
discussion: docs/async.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

#: mode label -> (extra train flags, extra server ranks). Only the mode's own structure is
#: given: learning rate, momentum and batch come from the mode's tuned defaults (docs/async.md).
MODES: dict[str, tuple[list[str], int]] = {
    "sync": ([], 0),
    "double-buffer": (["--exchange", "double-buffer"], 0),
    "local-sgd-H4": (["--exchange", "local-sgd", "--local-steps", "4"], 0),
    "ps-tau2": (["--exchange", "param-server", "--max-staleness", "2"], 1),
}


def make_synthetic(out: Path, seed: int = 0) -> Path:
    """Write a 10-class, 64-feature make_classification task (train/test splits) once."""
    if (out / "manifest.json").exists():
        return out
    import numpy as np
    from sklearn.datasets import make_classification

    from mpitrain.data.writer import write_dataset

    x, y = make_classification(
        n_samples=12000, n_features=64, n_informative=32, n_redundant=8, n_classes=10,
        n_clusters_per_class=2, class_sep=1.5, random_state=seed,
    )
    idx = np.arange(len(y))
    write_dataset(
        out, {"x": x.astype(np.float32), "y": y.astype(np.int64)}, name="synth",
        samples_per_shard=4000, splits={"train": idx[:10000], "test": idx[10000:]},
    )
    return out


def run_one(
    mpiexec: str, ranks: int, flags: list[str], run_dir: Path, timeout: float
) -> dict[str, Any]:
    """Run one training job; return its summary.json (plus the rank count)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = run_dir / "summary.json"
    cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpitrain", *flags,
           "--run-dir", str(run_dir), "--summary-json", str(summary), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], "ranks": ranks}
    out: dict[str, Any] = json.loads(summary.read_text())
    out["ranks"] = ranks
    return out


def main(argv: list[str]) -> int:
    """Run the study; print the table; write JSON and plots."""
    ap = argparse.ArgumentParser(prog="python -m mpitrain.bench async", description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("runs/async"), help="run directories")
    ap.add_argument("--plots", type=Path, default=None, help="PNG dir (default OUT/plots)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--straggler-ms", type=float, default=20.0)
    ap.add_argument("--straggler", choices=("last", "random"), default="last",
                    help="slow the last rank every step, or a random rank each step (jitter)")
    ap.add_argument("--only-straggler", action="store_true", help="skip the no-straggler runs")
    ap.add_argument("--datasets", nargs="+", default=["digits", "synth"])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--mpiexec", default=None)
    ap.add_argument("--timeout", type=float, default=300.0)
    a = ap.parse_args(argv)
    from mpitrain.runtime.launch import find_mpiexec

    mpiexec = a.mpiexec or find_mpiexec()
    if mpiexec is None:
        print("mpiexec not found", file=sys.stderr)
        return 1
    plots = a.plots or a.out / "plots"
    groups: list[tuple[str, int, float]] = []
    for ds in a.datasets:
        if not a.only_straggler:
            groups += [(ds, n, 0.0) for n in a.workers]
        if a.straggler_ms:
            groups += [(ds, n, a.straggler_ms) for n in a.workers]
    rows: list[dict[str, Any]] = []
    print(f"{'data':<7}{'N':>3}{'slow ms':>8}  {'mode':<14}{'acc':>7}{'train s':>9}"
          f"{'wall s':>8}{'samples/s':>11}")
    for ds, n, slow in groups:
        data = [] if ds == "digits" else ["--data", str(make_synthetic(a.out / "synth-data"))]
        tag = "-random" if slow and a.straggler == "random" else ""
        group = a.out / f"{ds}-n{n}-slow{int(slow)}{tag}"
        dirs = []
        for mode in a.modes:
            flags, servers = MODES[mode]
            argv_run = [*data, "--epochs", str(a.epochs), "--seed", "0", *flags]
            if slow:
                argv_run += ["--straggler-ms", str(slow), "--straggler", a.straggler]
            res = run_one(mpiexec, n + servers, argv_run, group / mode, a.timeout)
            res.update(data=ds, workers=n, straggler_ms=slow, mode=mode,
                       straggler=a.straggler if slow else "")
            rows.append(res)
            dirs.append(str(group / mode))
            if "error" in res:
                print(f"{ds:<7}{n:>3}{slow:>8.0f}  {mode:<14} FAILED: {res['error'][-300:]}")
                continue
            print(f"{ds:<7}{n:>3}{slow:>8.0f}  {mode:<14}{res['test_accuracy']:>7.4f}"
                  f"{res['train_seconds']:>9.2f}{res['wall_seconds']:>8.2f}"
                  f"{res['samples_per_sec']:>11.0f}", flush=True)
        for x in ("step", "wall"):
            out = plots / f"{group.name}-{x}"
            subprocess.run([sys.executable, "-m", "mpitrain", "plot", *dirs, "--out", str(out),
                            "--x", x], check=False, capture_output=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        keep = ("data", "workers", "straggler_ms", "straggler", "mode", "ranks", "test_accuracy",
                "train_seconds", "wall_seconds", "samples_per_sec", "error")
        a.json.write_text(json.dumps([{k: r.get(k) for k in keep} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
