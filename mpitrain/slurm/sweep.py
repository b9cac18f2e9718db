"""`python -m mpitrain sweep-summary DIR`: tabulate a sweep's run directories, best first."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpitrain.errors import ConfigError, with_hint
from mpitrain.runtime.files import write_atomic
from mpitrain.runtime.tool_io import check_output_file

#: config keys that differ per task by construction, not hyperparameters
_PER_TASK = frozenset({"run_dir", "summary_json", "checkpoint_dir", "resume", "tensorboard"})


@dataclass(frozen=True)
class Result:
    """One finished task: its directory name, summary and score."""

    name: str
    summary: dict[str, Any]
    score: float | None


def _score(summary: dict[str, Any], metric: str) -> float | None:
    value = summary.get(metric)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def collect(directory: Path, metric: str) -> tuple[list[Result], list[str]]:
    """Read ``DIR/*/summary.json``; return results and the names of dirs without a summary.

    Raises:
        ConfigError: DIR missing, or a summary that is not a UTF-8 JSON object (with an
            object or nothing under "config").
    """
    if not directory.is_dir():
        raise ConfigError(
            with_hint(f"sweep directory '{directory}' does not exist", "pass the --sweep-dir")
        )
    results: list[Result] = []
    missing: list[str] = []
    for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
        path = sub / "summary.json"
        if not path.is_file():
            missing.append(sub.name)
            continue
        summary = _read_summary(path)
        results.append(Result(sub.name, summary, _score(summary, metric)))
    return results, missing


def _read_summary(path: Path) -> dict[str, Any]:
    hint = "delete it or rerun the task"
    try:
        doc = json.loads(path.read_bytes().decode())
    except UnicodeDecodeError:
        raise ConfigError(with_hint(f"summary {str(path)!r} is not UTF-8 text", hint)) from None
    except (OSError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise ConfigError(
            with_hint(f"summary {str(path)!r} is unreadable: {reason}", hint)
        ) from None
    if not isinstance(doc, dict):
        raise ConfigError(
            with_hint(f"summary {str(path)!r} is not a JSON object ({type(doc).__name__})", hint)
        )
    if not isinstance(doc.get("config") or {}, dict):
        raise ConfigError(with_hint(f"summary {str(path)!r}: 'config' is not a JSON object", hint))
    return doc


def rank(results: list[Result], *, lower_is_better: bool) -> list[Result]:
    """Sort best first; results without the metric go last (by name)."""

    def key(r: Result) -> tuple[int, float, str]:
        if r.score is None:
            return (1, 0.0, r.name)
        return (0, r.score if lower_is_better else -r.score, r.name)

    return sorted(results, key=key)


def varying_keys(results: list[Result]) -> list[str]:
    """Return config keys whose values differ between results (the swept hyperparameters)."""
    configs = [r.summary.get("config") or {} for r in results]
    keys = sorted({k for c in configs for k in c} - _PER_TASK)
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def table(results: list[Result], metric: str) -> str:
    """Return a plain-text table: rank, task, metric, final loss, swept hyperparameters."""
    params = varying_keys(results)
    header = ["#", "task", metric, "final_loss", "wall_s", *params]
    rows = [header]
    for i, r in enumerate(results, 1):
        cfg = r.summary.get("config") or {}
        rows.append(
            [
                str(i),
                r.name,
                _fmt(r.score),
                _fmt(r.summary.get("final_loss")),
                _fmt(r.summary.get("wall_seconds")),
                *(_fmt(cfg.get(p)) for p in params),
            ]
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the sweep-summary parser."""
    p = argparse.ArgumentParser(
        prog="python -m mpitrain sweep-summary",
        description="Tabulate the runs of a sweep (DIR/task-N/summary.json), best first.",
    )
    p.add_argument("directory", type=Path, help="the sweep directory (SWEEP_DIR)")
    p.add_argument("--metric", default="test_accuracy", help="summary key to rank by")
    p.add_argument(
        "--lower-is-better",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: yes for metrics named *loss*, *seconds*, *time*",
    )
    p.add_argument("--json", type=Path, help="also write the ranked results here")
    return p


def main(argv: list[str]) -> int:
    """Run sweep-summary; returns 0 when at least one task finished, else 1 (2: bad input)."""
    ns = build_parser().parse_args(argv)
    lower = ns.lower_is_better
    if lower is None:
        lower = any(word in ns.metric for word in ("loss", "seconds", "time"))
    try:
        if ns.json is not None:
            check_output_file(ns.json, "--json", example="ranked.json")
        results, missing = collect(ns.directory, ns.metric)
    except ConfigError as exc:
        sys.stderr.write(f"mpitrain sweep-summary: error: {exc}\n")
        return exc.exit_code
    ranked = rank(results, lower_is_better=lower)
    if ranked:
        print(table(ranked, ns.metric))
    for name in missing:
        print(f"{name}: no summary.json (still running, failed or preempted)")
    if ns.json is not None:
        doc = [{"task": r.name, ns.metric: r.score, "summary": r.summary} for r in ranked]
        try:
            write_atomic(ns.json, (json.dumps(doc, indent=2) + "\n").encode())
        except OSError as exc:
            sys.stderr.write(
                f"mpitrain sweep-summary: error: cannot write {str(ns.json)!r}: "
                f"{exc.strerror or exc}\n"
            )
            return 1
    if not ranked:
        sys.stderr.write(f"mpitrain sweep-summary: no finished task under '{ns.directory}'\n")
        return 1
    return 0
