"""Draw one step of a timeline across ranks as an image, PNG by default (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpitrain.errors import ConfigError, DataError, with_hint
from mpitrain.runtime.files import temporary_path, write_failure
from mpitrain.runtime.tool_io import check_output_dir, check_output_file

#: colour per span name (compute phases) or category
COLOURS = {
    "data": "#bbbbbb", "forward": "#9ecae9", "backward": "#4c78a8", "optimizer": "#1f3b5c",
    "compute": "#6b8fb8", "sync": "#f58518", "wait": "#e45756", "comm": "#54a24b",
    "bucket": "#54a24b", "launch": "#1b5e20", "agree": "#b279a2", "io": "#9d755d",
    "eval": "#72b7b2", "step": "#e6e6e6",  # step: time in the step outside any phase
}


def steps_in(doc: dict[str, Any]) -> list[int]:
    """The steps that have a step span in the trace, sorted."""
    return sorted({int(ev["args"]["step"]) for ev in doc["traceEvents"]
                   if ev.get("ph") == "X" and ev.get("cat") == "step"})


def _pyplot() -> Any:
    """Return matplotlib.pyplot on the Agg backend, or say how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError(with_hint("trace plot needs matplotlib",
                                    "pip install matplotlib")) from exc
    return plt


def check_out(out: Path) -> None:
    """Refuse an ``--out`` the plot cannot be written to, before the trace is read (the
    image format comes from the suffix: ``png`` for a directory or a name without one).

    Raises:
        ConfigError: matplotlib is missing, the suffix is no image format it writes, or the
            place is unusable (a path under a regular file, an unwritable directory).
    """
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    if out.is_dir():
        check_output_dir(out, "--out")
        return
    fmt = out.suffix[1:].lower() or "png"
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if fmt not in formats:
        raise ConfigError(with_hint(f"--out '{out}': matplotlib cannot write '.{fmt}' images",
                                    f"use one of .{', .'.join(formats)}"))
    check_output_file(target(out, Path("trace"), 0), "--out", example="step.png")


def target(out: Path, trace: Path, step: int) -> Path:
    """The file ``--out`` names: itself; with ``.png`` added when it has no suffix; in an
    existing directory, ``TRACE-stepN.png`` (the trace's name without .json/.gz)."""
    if out.is_dir():
        stem = trace.name.removesuffix(".gz").removesuffix(".json") or "trace"
        return out / f"{stem}-step{step}.png"
    return out if out.suffix else out.with_name(out.name + ".png")


def plot_step(doc: dict[str, Any], out: Path, step: int | None = None, *,
              trace: Path = Path("trace")) -> tuple[int, Path]:
    """Draw ``step`` (default: the middle recorded step) to ``out`` (see :func:`target`);
    return the step drawn and the file written (atomically).

    Raises:
        ConfigError: matplotlib is not installed.
        DataError: the trace has no such step.
    """
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    have = steps_in(doc)
    if not have:
        raise DataError("the trace has no complete step to plot")
    if step is None:
        step = have[len(have) // 2]
    if step not in have:
        raise DataError(with_hint(f"step {step} is not in the trace",
                                  f"recorded steps: {have[0]}..{have[-1]}"))
    evs = [ev for ev in doc["traceEvents"] if ev.get("ph") == "X"
           and int(ev["args"].get("step", -1)) == step]
    t0 = min(ev["ts"] for ev in evs)
    rows = sorted({(int(ev["pid"]), int(ev["tid"])) for ev in evs if ev["cat"] != "step"})
    y_of = {key: i for i, key in enumerate(rows)}
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(rows) + 1.5))
    for ev in evs:
        key = (int(ev["pid"]), int(ev["tid"]))
        if key not in y_of:
            continue
        nested = ev["cat"] in ("wait", "launch")
        ax.broken_barh([((ev["ts"] - t0) / 1000.0, max(ev["dur"], 0.5) / 1000.0)],
                       (y_of[key] - (0.2 if nested else 0.4), 0.4 if nested else 0.8),
                       facecolors=COLOURS.get(ev["name"], COLOURS.get(ev["cat"], "#999999")))
    ax.set_yticks(range(len(rows)))
    names = {(int(ev["pid"]), int(ev["tid"])): str(ev["args"]["name"])
             for ev in doc["traceEvents"] if ev.get("ph") == "M" and ev["name"] == "thread_name"}
    ax.set_yticklabels([f"rank {p} " + names.get((p, t), "steps" if t == 0 else f"bucket {t - 1}")
                        for p, t in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the step began on the earliest rank")
    ax.set_title(f"step {step}")
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()]
    ax.legend(handles, list(COLOURS), ncol=len(COLOURS), fontsize=7, loc="upper center",
              bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    path = target(out, trace, step)
    fmt = path.suffix[1:].lower()
    try:
        with temporary_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=fmt)
    except OSError as exc:
        raise DataError(write_failure(path, exc, None)) from None
    finally:
        plt.close(fig)
    return step, path
