"""`python -m mpitrain plot RUN_DIR [RUN_DIR ...]`: loss, accuracy and throughput curves as PNG.

Reads each run's ``metrics.jsonl`` (train lines: step, epoch, loss, lr, samples_per_sec,
data_wait_frac, comm_frac, time, wall; eval lines: kind="eval", epoch, step, test_loss,
test_accuracy, ...) and writes ``loss.png``, ``accuracy.png`` and ``throughput.png`` to
``--out`` (default: ``RUN_DIR/plots`` of the first run). Several runs are overlaid, labelled
by their directory name; ``--x time`` puts summed training-step seconds on the x axis instead
of steps, ``--x wall`` the wall clock since the start of training (rank 0).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpitrain.errors import DataError, MpitrainError, with_hint
from mpitrain.runtime.tool_io import check_output_dir, kind_of, read_text

PLOTS = ("loss", "accuracy", "throughput")


@dataclass
class Run:
    """One run's metrics split into train and eval records."""

    name: str
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)


#: the fields a metrics line may carry that are plotted: a number (NaN, inf: a diverged run) or
#: null
NUMERIC = ("step", "epoch", "loss", "lr", "samples_per_sec", "data_wait_frac", "comm_frac",
           "time", "wall", "test_loss", "test_accuracy", "train_loss", "train_accuracy")
_HINT = "pass the --run-dir of a training run (python -m mpitrain --run-dir DIR ...)"


def load_run(run_dir: Path, name: str | None = None) -> Run:
    """Read ``run_dir/metrics.jsonl``.

    Raises:
        DataError: missing, unreadable, not UTF-8, empty, a line that is not a JSON object,
            or a plotted field that is not a number (one line naming the file and line).
    """
    path = run_dir / "metrics.jsonl"
    text = read_text(path, "metrics file", hint=_HINT)
    run = Run(name or run_dir.resolve().name)
    for lineno, line in enumerate(text.splitlines(keepends=True), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno > 1 and not line.endswith("\n"):
                break  # a run killed mid-write leaves a torn last line
            raise DataError(f"{path}:{lineno}: not JSON ({exc.msg})") from exc
        except RecursionError:
            raise DataError(f"{path}:{lineno}: nested too deeply") from None
        (run.evals if _check_record(rec, path, lineno) else run.train).append(rec)
    if not run.train and not run.evals:
        raise DataError(with_hint(f"{path} has no records", "let the run log at least one step"))
    return run


def _check_record(rec: object, path: Path, lineno: int) -> bool:
    """Check one metrics line's structure; return whether it is an evaluation line."""
    hint = "metrics.jsonl holds one JSON object per line, as the trainer writes it"
    if not isinstance(rec, dict):
        raise DataError(with_hint(f"{path}:{lineno}: {kind_of(rec)}, not a JSON object", hint))
    for key in NUMERIC:
        value = rec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise DataError(with_hint(f"{path}:{lineno}: '{key}' must be a number or null, "
                                      f"not {kind_of(value)} {json.dumps(value)[:40]}", hint))
        if key in ("step", "epoch") and value is not None and not math.isfinite(value):
            raise DataError(with_hint(f"{path}:{lineno}: '{key}' is {value}", hint))
    return rec.get("kind") == "eval"


def _x(run: Run, records: list[dict[str, Any]], axis: str) -> list[float]:
    """Return x values (step, or training seconds looked up by step for eval lines)."""
    if axis == "step":
        return [float(r.get("step", i)) for i, r in enumerate(records)]
    key = axis  # "time": summed training-step seconds; "wall": wall clock since the start
    by_step = {int(r["step"]): float(r[key]) for r in run.train if key in r and "step" in r}
    xs = []
    last = 0.0
    for r in records:
        if key in r:
            last = float(r[key])
        elif "step" in r and int(r["step"]) in by_step:
            last = by_step[int(r["step"])]
        xs.append(last)
    return xs


def _series(
    run: Run, records: list[dict[str, Any]], key: str, axis: str
) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for x, r in zip(_x(run, records, axis), records, strict=True):
        if key in r and r[key] is not None:
            xs.append(x)
            ys.append(float(r[key]))
    return xs, ys


def _smooth(ys: list[float], k: int) -> list[float]:
    """Trailing mean over ``k`` points (cheap and dependency free)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= k:
            acc -= ys[i - k]
        out.append(acc / min(i + 1, k))
    return out


def draw(runs: list[Run], out_dir: Path, axis: str = "step") -> list[Path]:
    """Write the three PNGs for ``runs`` into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    xlabel = {"step": "step", "time": "training time (s)", "wall": "wall clock (s)"}[axis]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        xs, ys = _series(run, run.train, "loss", axis)
        if xs:
            ax.plot(xs, ys, color=c, alpha=0.25, linewidth=0.8)
            ax.plot(xs, _smooth(ys, max(1, len(ys) // 50)), color=c, label=f"{run.name} train")
        xs, ys = _series(run, run.evals, "test_loss", axis)
        if xs:
            ax.plot(xs, ys, "o--", color=c, label=f"{run.name} test")
    ax.set(xlabel=xlabel, ylabel="loss", title="loss")
    ax.set_yscale("log")
    written.append(_save(fig, ax, out_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        for key, style in (("test_accuracy", "o-"), ("train_accuracy", "x:")):
            xs, ys = _series(run, run.evals, key, axis)
            if xs:
                ax.plot(xs, [100 * y for y in ys], style, color=c, label=f"{run.name} {key}")
    ax.set(xlabel=xlabel, ylabel="accuracy (%)", title="accuracy (per epoch)")
    written.append(_save(fig, ax, out_dir / "accuracy.png"))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        xs, ys = _series(run, run.train, "samples_per_sec", axis)
        if xs:
            top.plot(xs, ys, color=c, alpha=0.25, linewidth=0.8)
            top.plot(xs, _smooth(ys, max(1, len(ys) // 50)), color=c, label=run.name)
        for key, style in (("data_wait_frac", "--"), ("comm_frac", "-")):
            xs, ys = _series(run, run.train, key, axis)
            if xs:
                bottom.plot(
                    xs,
                    _smooth(ys, max(1, len(ys) // 50)),
                    style,
                    color=c,
                    label=f"{run.name} {key}",
                )
    top.set(ylabel="samples/s (global)", title="throughput")
    bottom.set(xlabel=xlabel, ylabel="fraction of step time", ylim=(0, 1))
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(fontsize="small")
    written.append(_save(fig, top, out_dir / "throughput.png"))
    return written


def _save(fig: Any, ax: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def main(argv: list[str]) -> int:
    """Run the plot command; returns the exit code (2 for unusable input)."""
    parser = argparse.ArgumentParser(prog="python -m mpitrain plot", description=__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, default=None, help="output dir (RUN_DIR/plots)")
    parser.add_argument("--x", choices=("step", "time", "wall"), default="step", dest="axis")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else args.run_dirs[0] / "plots"
    try:
        runs = [load_run(d) for d in args.run_dirs]
        check_output_dir(out, "--out", hint="give --out a directory that can be created and "
                         "written (the PNGs go into it)")
        names = [r.name for r in runs]
        for i, run in enumerate(runs):  # same basename twice: use the full path as label
            if names.count(run.name) > 1:
                run.name = str(args.run_dirs[i])
        try:
            written = draw(runs, out, args.axis)
        except OSError as exc:
            raise DataError(f"cannot write the plots into '{out}': "
                            f"{exc.strerror or exc}") from None
    except MpitrainError as exc:
        sys.stderr.write(f"mpitrain plot: error: {exc}\n")
        return 2
    for path in written:
        print(path)
    return 0
