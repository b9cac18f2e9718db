"""Draw one step of a timeline across ranks as a PNG (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpitrain.errors import ConfigError, DataError, with_hint

#: colour per span name (compute phases) or category
COLOURS = {
    "data": "#bbbbbb", "forward": "#9ecae9", "backward": "#4c78a8", "optimizer": "#1f3b5c",
    "compute": "#6b8fb8", "sync": "#f58518", "wait": "#e45756",
    "bucket": "#54a24b", "launch": "#1b5e20", "agree": "#b279a2", "io": "#9d755d",
    "eval": "#72b7b2", "step": "#e6e6e6",  # step: time in the step outside any phase
}


def steps_in(doc: dict[str, Any]) -> list[int]:
    """The steps that have a step span in the trace, sorted."""
    return sorted({int(ev["args"]["step"]) for ev in doc["traceEvents"]
                   if ev.get("ph") == "X" and ev.get("cat") == "step"})


def plot_step(doc: dict[str, Any], out: Path, step: int | None = None) -> int:
    """Write a PNG of ``step`` (default: the middle recorded step); returns the step drawn.

    Raises:
        ConfigError: matplotlib is not installed.
        DataError: the trace has no such step.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError as exc:
        raise ConfigError(with_hint("trace plot needs matplotlib",
                                    "pip install matplotlib")) from exc
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
    ax.set_yticklabels([f"rank {p} " + ("steps" if t == 0 else f"bucket {t - 1}")
                        for p, t in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the step began on the earliest rank")
    ax.set_title(f"step {step}")
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()]
    ax.legend(handles, list(COLOURS), ncol=len(COLOURS), fontsize=7, loc="upper center",
              bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return step
