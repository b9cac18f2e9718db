"""Bad input to the tools' own files, table-driven (issue 26, item 2).

Every command (``checkpoint consolidate``, ``trace summary|plot``, ``plot``, ``doctor``,
``cluster``, ``slurm render``, ``sweep-summary``, ``data_tools``, training's ``--timeline``)
checks the structure of each file it reads and turns every OSError and decode error into one
line that names the path (and the field) with a HINT; an output it could not write is refused
before the work (exit 2, nothing on stdout). Each row runs the command's ``main()`` in this
process; one test runs ``python -m mpitrain`` to show the exit code and that no traceback
escapes.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from mpitrain.checkpoint.shards import FORMAT as CKPT_FORMAT
from mpitrain.checkpoint.shards import MANIFEST, shard_name
from mpitrain.cli import main as cli_main
from mpitrain.errors import ConfigError
from mpitrain.timeline.chrome import FORMAT as TRACE_FORMAT

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"

Edit = Callable[[Any], Any]


def _keep(doc: Any) -> Any:
    return doc


# -- good inputs: a 2-rank trace, a sharded checkpoint (ZeRO or model-parallel), a run dir --


def trace_doc() -> dict[str, Any]:
    """Two ranks, three steps: backward 3-9 ms hides bucket 0 (5-8 ms); rank 1 syncs late."""
    def span(rank: int, step: int, name: str, cat: str, a: float, dur: float, tid: int = 0,
             **args: int) -> dict[str, Any]:
        return {"ph": "X", "name": name, "cat": cat, "pid": rank, "tid": tid,
                "ts": 20_000.0 * step + a, "dur": dur, "args": {"step": step, **args}}

    events: list[dict[str, Any]] = []
    for rank in (0, 1):
        events.append({"ph": "M", "name": "process_name", "pid": rank, "tid": 0,
                       "args": {"name": f"rank {rank}"}})
        for step in range(3):
            events += [span(rank, step, "step", "step", 0, 14_000),
                       span(rank, step, "backward", "compute", 3000, 6000),
                       span(rank, step, "allreduce b0", "bucket", 5000, 3000, tid=1, bucket=0,
                            bytes=2**20),
                       span(rank, step, "synchronize", "sync", 9000 + 2000 * rank, 1000)]
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"format": TRACE_FORMAT, "ranks": 2, "steps": [0, 3],
                          "clocks": [{"rank": r, "bound_ns": 2000} for r in (0, 1)]}}


def write_trace(tmp: Path, edit: Edit = _keep, name: str = "trace.json") -> Path:
    path = tmp / name
    path.write_text(json.dumps(edit(trace_doc())))
    return path


def _save(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def zero_shards() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A 2-rank ZeRO checkpoint: one bucket of 3 elements per rank holding w (2 x 2) + padding."""
    doc = {"layout": {"numel": 4, "buckets": [[0, 3]], "params": [["w", [2, 2], 0]]},
           "state_keys": ["w"], "stage": 1}
    payloads = [{"flat": {0: torch.arange(3.0) + 10 * r},
                 "optim": {"state": {}, "param_groups": [{"lr": 0.1}]},
                 "buffers": {}, "extra": {"step": 5}} for r in (0, 1)]
    return doc, payloads


def parallel_shards() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A tensor-parallel (2 x 1) checkpoint as ``save_parallel`` writes it: w split on dim 0."""
    doc = {"kind": "model-parallel", "step": 5, "run_id": "r1", "meta": {},
           "grid": {"tensor": 2, "pipeline": 1, "data": 1},
           "rules": [{"w": [0, 1, False], "b": [None, 1, False]}]}
    payloads = [{"model": {"w": torch.full((1, 2), float(r)), "b": torch.ones(2)}}
                for r in (0, 1)]
    return doc, payloads


def write_ckpt(tmp: Path, edit: Edit = _keep, *, parallel: bool = False,
               shard0: Callable[[dict[str, Any]], Any] | None = None) -> Path:
    """Write a checkpoint directory; ``edit`` changes the manifest, ``shard0`` rank 0's payload
    (bytes: the file itself). The manifest records each file's real checksum, so only the
    structure is wrong."""
    d = tmp / "ckpt"
    d.mkdir()
    doc, payloads = parallel_shards() if parallel else zero_shards()
    files = []
    for r, payload in enumerate(payloads):
        new = shard0(payload) if shard0 is not None and r == 0 else payload
        data = new if isinstance(new, bytes) else _save(new)
        (d / shard_name(r, 2)).write_bytes(data)
        files.append({"name": shard_name(r, 2), "sha256": hashlib.sha256(data).hexdigest(),
                      "bytes": len(data)})
    manifest = {**doc, "format": CKPT_FORMAT, "ranks": 2, "files": files}
    (d / MANIFEST).write_text(json.dumps(edit(manifest)))
    return d


def write_run(tmp: Path, text: bytes | None = None) -> Path:
    run = tmp / "run"
    run.mkdir()
    lines = [{"step": s, "epoch": 1, "loss": 2.0 / s, "samples_per_sec": 100.0 + s,
              "data_wait_frac": 0.1, "comm_frac": 0.2, "time": 0.01 * s} for s in range(1, 9)]
    lines.append({"kind": "eval", "epoch": 1, "step": 8, "test_loss": 0.5, "test_accuracy": 0.8})
    body = "".join(json.dumps(x) + "\n" for x in lines).encode()
    (run / "metrics.jsonl").write_bytes(body if text is None else text)
    return run


def a_file(tmp: Path) -> Path:
    """A regular file: a path under it is unusable for reading and writing alike."""
    path = tmp / "a-file"
    path.write_text("x")
    return path


def a_dir(tmp: Path) -> Path:
    path = tmp / "a-dir"
    path.mkdir(exist_ok=True)
    return path


def setitem(*keys: Any, value: Any) -> Edit:
    def edit(doc: Any) -> Any:
        doc = copy.deepcopy(doc)
        node = doc
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
        return doc

    return edit


def delitem(*keys: Any) -> Edit:
    def edit(doc: Any) -> Any:
        doc = copy.deepcopy(doc)
        node = doc
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
        return doc

    return edit


def raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- the table --

Build = Callable[[Path, pytest.MonkeyPatch], list[str]]


@dataclass(frozen=True)
class Case:
    """One bad input: ``build`` writes it into a temporary directory and returns the words
    given to ``python -m mpitrain``; the exit code and what the one line must say."""

    build: Build
    code: int
    needles: tuple[str, ...]


def consolidate(edit: Edit = _keep, **kw: Any) -> Build:
    return lambda t, _m: ["checkpoint", "consolidate", str(write_ckpt(t, edit, **kw)),
                          str(t / "out.pt")]


def summary(build: Callable[[Path], Path], *more: str) -> Build:
    return lambda t, _m: ["trace", "summary", str(build(t)), *more]


def bad_trace(edit: Edit) -> Build:
    return summary(lambda t: write_trace(t, edit))


def plot(text: bytes) -> Build:
    return lambda t, _m: ["plot", str(write_run(t, text))]


def cluster_state(doc: Any) -> Build:
    def build(t: Path, mp: pytest.MonkeyPatch) -> list[str]:
        from mpitrain.cluster import cli, netns

        mp.setattr(cli, "STATE_DIR", t)  # never the machine's own /run/mpitrain-cluster
        mp.setattr(netns, "check_tools", lambda: None)
        data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        (t / "state.json").write_bytes(data)
        return ["cluster", "status"]

    return build


def consolidate_of(make: Callable[[Path], Path]) -> Build:
    return lambda t, _m: ["checkpoint", "consolidate", str(make(t)), str(t / "o.pt")]


def manifest_bytes(data: bytes) -> Callable[[Path], Path]:
    def make(t: Path) -> Path:
        d = write_ckpt(t)
        (d / MANIFEST).write_bytes(data)
        return d

    return make


def manifest_is_a_dir(t: Path) -> Path:
    (t / MANIFEST).mkdir()
    return t


def shard_missing(t: Path) -> Path:
    d = write_ckpt(t)
    (d / shard_name(1, 2)).unlink()
    return d


def metrics_is_a_dir(t: Path, _m: pytest.MonkeyPatch) -> list[str]:
    (t / "metrics.jsonl").mkdir()
    return ["plot", str(t)]


def state_is_a_dir(t: Path, mp: pytest.MonkeyPatch) -> list[str]:
    words = cluster_state(GOOD_STATE)(t, mp)
    (t / "state.json").unlink()
    (t / "state.json").mkdir()
    return words


def sweep(t: Path) -> Path:
    (t / "sweep" / "task-0").mkdir(parents=True)
    (t / "sweep" / "task-0" / "summary.json").write_text('{"test_accuracy": 0.9}')
    return t / "sweep"


GOOD_STATE = {"version": 1, "nodes": ["mpt-node1", "mpt-node2"], "subnet": "10.213.0.0/24",
              "link": "none", "items": [{"kind": "netns", "name": "mpt-head", "inode": 7}]}
NOT_A_DIR = ("a-file", "which is not a directory", "HINT: give")

CASES: dict[str, Case] = {
    # checkpoint consolidate: the manifest, the shards, OUT
    "consolidate-manifest-is-a-list": Case(consolidate(lambda d: [d]), 1,
                                           ("manifest.json'", "must be a JSON object, not a list")),
    "consolidate-no-files-key": Case(consolidate(delitem("files")), 1, ("'files' is missing",)),
    "consolidate-files-is-an-object": Case(consolidate(setitem("files", value={"a": 1})), 1,
                                           ("'files' must be a list, not an object",)),
    "consolidate-fewer-files-than-ranks": Case(consolidate(setitem("ranks", value=3)), 1,
                                               ("'files' must hold 3 items, holds 2",)),
    "consolidate-file-name-is-a-number": Case(consolidate(setitem("files", 1, "name", value=5)),
                                              1, ("'files[1].name' must be a string, not an "
                                                  "integer 5",)),
    "consolidate-file-name-leaves-the-dir": Case(
        consolidate(setitem("files", 0, "name", value="../x.pt")), 1,
        ("'files[0].name'", "path separator")),
    "consolidate-sha-not-hex": Case(consolidate(setitem("files", 0, "sha256", value="zz")), 1,
                                    ("'files[0].sha256' must be 64 lowercase hex digits",)),
    "consolidate-ranks-is-a-string": Case(consolidate(setitem("ranks", value="2")), 1,
                                          ("'ranks' must be an integer, not a string",)),
    "consolidate-no-layout": Case(consolidate(delitem("layout")), 1, ("'layout' is missing",)),
    "consolidate-bucket-past-the-end": Case(
        consolidate(setitem("layout", "buckets", value=[[2, 3]])), 1,
        ("'layout.buckets[0]' reaches past the 6 elements",)),
    "consolidate-param-past-the-end": Case(
        consolidate(setitem("layout", "params", 0, 1, value=[3, 3])), 1,
        ("'layout.params[0]' reaches past the 6 elements",)),
    "consolidate-param-not-a-triple": Case(
        consolidate(setitem("layout", "params", 0, value=["w", [2, 2]])), 1,
        ("'layout.params[0]' must hold 3 items",)),
    "consolidate-state-keys-not-strings": Case(
        consolidate(setitem("state_keys", value=[1])), 1, ("'state_keys[0]' must be a string",)),
    "consolidate-unknown-kind": Case(consolidate(setitem("kind", value="pipeline")), 1,
                                     ("'kind'", "'pipeline' is not a kind")),
    "consolidate-parallel-grid-mismatch": Case(
        consolidate(setitem("grid", "tensor", value=3), parallel=True), 1,
        ("'grid' tensor 3 x pipeline 1 needs 3 files",)),
    "consolidate-parallel-rule-interleave-0": Case(
        consolidate(setitem("rules", 0, "w", value=[0, 0, False]), parallel=True), 1,
        ("'rules[0].w[1]' must be in [1,",)),
    "consolidate-parallel-rule-dropped-not-bool": Case(
        consolidate(setitem("rules", 0, "b", value=[None, 1, "no"]), parallel=True), 1,
        ("'rules[0].b[2]' must be true or false",)),
    "consolidate-manifest-not-utf8": Case(
        consolidate_of(manifest_bytes(b'{"\xff"}')), 1,
        ("manifest.json' is not UTF-8 text (byte 0xff at offset 2)",)),
    "consolidate-manifest-gzip": Case(
        consolidate_of(manifest_bytes(gzip.compress(b"{}"))), 1,
        ("manifest.json' is gzip-compressed", "gunzip")),
    "consolidate-manifest-not-json": Case(
        consolidate_of(manifest_bytes(b'{"format": 1,')), 1,
        ("manifest.json' is not valid JSON", "line 1")),
    "consolidate-manifest-is-a-directory": Case(consolidate_of(manifest_is_a_dir), 1,
                                                ("manifest.json' is a directory",)),
    "consolidate-dir-is-a-file": Case(consolidate_of(a_file), 1,
        ("a-file' is a file, not a sharded checkpoint directory",)),
    "consolidate-shard-missing": Case(consolidate_of(shard_missing), 1,
                                      ("shard '", "shard-00001-of-00002.pt' does not exist")),
    "consolidate-shard-not-a-torch-file": Case(
        consolidate(shard0=lambda p: b"not a pickle"), 1,
        ("shard-00000-of-00002.pt' is not a checkpoint file torch can load",)),
    "consolidate-shard-holds-a-list": Case(consolidate(shard0=lambda p: [p]), 1,
                                           ("shard-00000-of-00002.pt' holds list, not a shard",)),
    "consolidate-shard-chunk-wrong-size": Case(
        consolidate(shard0=lambda p: {**p, "flat": {0: torch.zeros(2)}}), 1,
        ("shard-00000-of-00002.pt' holds shape (2,) for bucket 0", "says 3 elements")),
    "consolidate-shard-without-optim": Case(
        consolidate(shard0=lambda p: {k: v for k, v in p.items() if k != "optim"}), 1,
        ("shard-00000-of-00002.pt' has no 'optim' dict",)),
    "consolidate-parallel-shard-without-model": Case(
        consolidate(shard0=lambda p: {"state": {}}, parallel=True), 1,
        ("shard-00000-of-00002.pt' has no 'model' state_dict",)),
    "consolidate-out-is-a-directory": Case(
        lambda t, _m: ["checkpoint", "consolidate", str(write_ckpt(t)), str(a_dir(t))], 2,
        ("OUT '", "a-dir' is a directory", "a-dir/model.pt")),
    "consolidate-out-under-a-file": Case(
        lambda t, _m: ["checkpoint", "consolidate", str(write_ckpt(t)),
                       str(a_file(t) / "o.pt")], 2, NOT_A_DIR),
    # trace summary / plot: the trace, --json, --out
    "trace-not-utf8": Case(summary(lambda t: raw(t / "t.json", b'{"a": "\xfe"}')), 1,
                           ("t.json' is not UTF-8 text (byte 0xfe at offset 7)",)),
    "trace-damaged-gzip": Case(summary(lambda t: raw(t / "t.json.gz", b"\x1f\x8b\x08junk")), 1,
                               ("t.json.gz' is a damaged gzip file",)),
    "trace-is-a-directory": Case(summary(a_dir), 1, ("trace '", "a-dir' is a directory")),
    "trace-missing": Case(summary(lambda t: t / "none.json"), 1, ("none.json' does not exist",)),
    "trace-not-json": Case(summary(lambda t: raw(t / "t.json", b'{"traceEvents": [')), 1,
                           ("t.json' is not valid JSON",)),
    "trace-is-a-list": Case(bad_trace(lambda d: [d]), 1, ("is not an mpitrain timeline",)),
    "trace-other-data-is-a-list": Case(bad_trace(setitem("otherData", value=[1])), 1,
                                       ("is not an mpitrain timeline",)),
    "trace-ranks-is-a-string": Case(bad_trace(setitem("otherData", "ranks", value="two")), 1,
                                    ("'otherData.ranks' must be an integer, not a string",)),
    "trace-ranks-0": Case(bad_trace(setitem("otherData", "ranks", value=0)), 1,
                          ("'otherData.ranks' must be in [1,",)),
    "trace-clock-bound-is-a-string": Case(
        bad_trace(setitem("otherData", "clocks", 1, "bound_ns", value="2us")), 1,
        ("'otherData.clocks[1].bound_ns' must be a number",)),
    "trace-window-not-a-pair": Case(bad_trace(setitem("otherData", "steps", value=[10])), 1,
                                    ("'otherData.steps' must hold 2 items, holds 1",)),
    "trace-comm-flight-without-op": Case(
        bad_trace(setitem("traceEvents", 3, "cat", value="comm")), 1,
        ("'traceEvents[3].args.op' is missing",)),
    "trace-events-is-a-number": Case(bad_trace(setitem("traceEvents", value=5)), 1,
                                     ("'traceEvents' must be a list, not an integer",)),
    "trace-event-is-a-string": Case(bad_trace(setitem("traceEvents", 3, value="x")), 1,
                                    ("'traceEvents[3]' must be a JSON object, not a string",)),
    "trace-pid-past-the-ranks": Case(bad_trace(setitem("traceEvents", 1, "pid", value=7)), 1,
                                     ("'traceEvents[1].pid' must be in [0, 1], got 7",)),
    "trace-span-without-args": Case(bad_trace(delitem("traceEvents", 2, "args")), 1,
                                    ("'traceEvents[2].args' is missing",)),
    "trace-ts-is-a-string": Case(bad_trace(setitem("traceEvents", 2, "ts", value="0")), 1,
                                 ("'traceEvents[2].ts' must be a number, not a string",)),
    "trace-step-is-null": Case(bad_trace(setitem("traceEvents", 1, "args", "step", value=None)),
                               1, ("'traceEvents[1].args.step' must be an integer, not null",)),
    "trace-bucket-without-bytes": Case(
        bad_trace(delitem("traceEvents", 3, "args", "bytes")), 1,
        ("'traceEvents[3].args.bytes' is missing",)),
    "trace-json-is-a-directory": Case(
        lambda t, _m: ["trace", "summary", str(write_trace(t)), "--json", str(a_dir(t))], 2,
        ("--json '", "a-dir' is a directory", "a-dir/summary.json")),
    "trace-json-under-a-file": Case(
        lambda t, _m: ["trace", "summary", str(write_trace(t)), "--json",
                       str(a_file(t) / "s.json")], 2, NOT_A_DIR),
    "trace-plot-out-under-a-file": Case(
        lambda t, _m: ["trace", "plot", str(t / "not-read.json"), "--out",
                       str(a_file(t) / "p.png")], 2, NOT_A_DIR),
    "trace-plot-out-unknown-format": Case(
        lambda t, _m: ["trace", "plot", str(write_trace(t)), "--out", str(t / "p.v2")], 2,
        ("--out '", "p.v2': matplotlib cannot write '.v2' images", ".png")),
    # plot: metrics.jsonl, --out
    "plot-line-is-a-list": Case(plot(b'{"step": 1, "loss": 1}\n[1, 2]\n'), 2,
                                ("metrics.jsonl:2: a list, not a JSON object",)),
    "plot-loss-is-a-string": Case(plot(b'{"step": 1, "loss": "low"}\n'), 2,
                                  ("metrics.jsonl:1: 'loss' must be a number or null, not a "
                                   'string "low"',)),
    "plot-accuracy-is-a-boolean": Case(plot(b'{"kind": "eval", "test_accuracy": true}\n'), 2,
                                       ("'test_accuracy' must be a number or null",)),
    "plot-step-is-nan": Case(plot(b'{"step": NaN, "loss": 1}\n'), 2,
                             ("metrics.jsonl:1: 'step' is nan",)),
    "plot-not-utf8": Case(plot(b'{"step": 1, "loss": 1}\n\xff\n'), 2,
                          ("metrics.jsonl' is not UTF-8 text (byte 0xff at offset 23)",)),
    "plot-gzip": Case(plot(gzip.compress(b'{"step": 1}\n')), 2,
                      ("metrics.jsonl' is gzip-compressed", "gunzip")),
    "plot-metrics-is-a-directory": Case(metrics_is_a_dir, 2,
        ("metrics.jsonl' is a directory", "--run-dir")),
    "plot-run-dir-is-a-file": Case(lambda t, _m: ["plot", str(a_file(t))], 2,
                                   ("a-file/metrics.jsonl' lies under something that is not",)),
    "plot-out-is-a-file": Case(
        lambda t, _m: ["plot", str(write_run(t)), "--out", str(a_file(t))], 2,
        ("--out '", "a-file' is not a directory")),
    "plot-out-under-a-file": Case(
        lambda t, _m: ["plot", str(write_run(t)), "--out", str(a_file(t) / "p")], 2, NOT_A_DIR),
    # cluster: the state file
    "cluster-state-is-a-list": Case(cluster_state([GOOD_STATE]), 1,
                                    ("state file '", "must be a JSON object, not a list")),
    "cluster-state-not-utf8": Case(cluster_state(b'{"version": "\xff"}'), 1,
                                   ("state.json' is not UTF-8 text",)),
    "cluster-state-is-a-directory": Case(state_is_a_dir, 1, ("state.json' is a directory",)),
    "cluster-state-nodes-is-a-string": Case(cluster_state({**GOOD_STATE, "nodes": "mpt-node1"}),
                                            1, ("'nodes' must be a list, not a string",)),
    "cluster-state-foreign-node-name": Case(cluster_state({**GOOD_STATE, "nodes": ["eth0"]}), 1,
                                            ("'nodes' must be mpt-node1",)),
    "cluster-state-bad-subnet": Case(cluster_state({**GOOD_STATE, "subnet": "10.0.0.0/33"}), 1,
                                     ("'subnet' '10.0.0.0/33' is not an IPv4 /24",)),
    "cluster-state-item-name-is-a-number": Case(
        cluster_state({**GOOD_STATE, "items": [{"kind": "netns", "name": 3}]}), 1,
        ("'items[0].name' must be a string, not an integer 3",)),
    "cluster-state-item-unknown-field": Case(
        cluster_state({**GOOD_STATE, "items": [{"kind": "netns", "name": "x", "pid": 1}]}), 1,
        ("'items[0].pid' is not a field of an item",)),
    # slurm render --output, sweep-summary --json
    "slurm-output-is-a-directory": Case(
        lambda t, _m: ["slurm", "render", "train-cpu", "--output", str(a_dir(t))], 2,
        ("--output '", "a-dir' is a directory", "a-dir/job.sbatch")),
    "slurm-output-under-a-file": Case(
        lambda t, _m: ["slurm", "render", "train-cpu", "--output", str(a_file(t) / "j.sbatch")],
        2, NOT_A_DIR),
    "sweep-json-is-a-directory": Case(
        lambda t, _m: ["sweep-summary", str(sweep(t)), "--json", str(a_dir(t))], 2,
        ("--json '", "a-dir' is a directory", "a-dir/ranked.json")),
    "sweep-json-under-a-file": Case(
        lambda t, _m: ["sweep-summary", str(sweep(t)), "--json", str(a_file(t) / "r.json")], 2,
        NOT_A_DIR),
}


@pytest.mark.parametrize("name", list(CASES))
def test_refused_with_one_line(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    case = CASES[name]
    words = case.build(tmp_path, monkeypatch)
    code = cli_main(words)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == case.code, err
    assert len(lines) == 1 and "HINT: " in lines[0] and "Traceback" not in err, err
    assert str(tmp_path) in lines[0], err  # the path is named
    for needle in case.needles:
        assert needle in lines[0], (needle, err)
    assert out == "", out  # nothing was reported or written: refused before the work
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "o.pt").exists()


# -- good inputs still work, and the outputs say where they went --


def test_consolidate_good_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new" / "full.pt"  # a missing parent directory is created
    assert cli_main(["checkpoint", "consolidate", str(write_ckpt(tmp_path)), str(out)]) == 0
    flat = torch.cat([torch.arange(3.0), torch.arange(3.0) + 10])
    assert torch.equal(torch.load(out, weights_only=True)["w"], flat[:4].reshape(2, 2))
    assert f"wrote {out}: 1 tensors, 4 elements" in capsys.readouterr().out
    mp = tmp_path / "mp"
    mp.mkdir()
    assert cli_main(["checkpoint", "consolidate", str(write_ckpt(mp, parallel=True)),
                     str(mp / "full.pt")]) == 0
    state = torch.load(mp / "full.pt", weights_only=True)
    assert torch.equal(state["w"], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert torch.equal(state["b"], torch.ones(2))


def test_gzip_trace_gives_the_same_report(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    plain = write_trace(tmp_path)
    packed = tmp_path / "trace.json.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    reports = []
    for path in (plain, packed):
        assert cli_main(["trace", "summary", str(path), "--json", str(path) + ".s.json"]) == 0
        reports.append(json.loads(Path(str(path) + ".s.json").read_text()))
        assert "2 ranks, steps 0..2 (3)" in capsys.readouterr().out
    assert reports[0].pop("path") == str(plain) and reports[1].pop("path") == str(packed)
    assert reports[0] == reports[1]
    assert reports[0]["comm_ms"] == pytest.approx(18.0)  # 3 ms per rank and step
    assert reports[0]["last_counts"] == {"0": 0, "1": 3}  # rank 1 syncs late in every step


@pytest.mark.parametrize("kind", ["directory", "no-suffix", "svg"])
def test_trace_plot_says_where_it_wrote(kind: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    trace = write_trace(tmp_path, name="run7.json")
    out = {"directory": a_dir(tmp_path), "no-suffix": tmp_path / "plot",
           "svg": tmp_path / "plot.svg"}[kind]
    assert cli_main(["trace", "plot", str(trace), "--out", str(out), "--step", "1"]) == 0
    said = capsys.readouterr().out.strip()
    written = {"directory": out / "run7-step1.png", "no-suffix": tmp_path / "plot.png",
               "svg": out}[kind]
    assert said == f"wrote {written} (step 1)"
    head = written.read_bytes()[:200]
    assert head.startswith(PNG) if kind != "svg" else b"<svg" in head
    assert sorted(p.name for p in written.parent.iterdir() if p.name.startswith(".")) == []


def test_timeline_refused_before_the_run(tmp_path: Path) -> None:
    from mpi4py import MPI

    from mpitrain.train.run import main as train_main

    for bad, needle in ((a_dir(tmp_path), "a-dir' is a directory"),
                        (a_file(tmp_path) / "t.json", "which is not a directory"),
                        (Path("/proc/mpitrain-trace.json"), "is not writable")):  # even as root
        with pytest.raises(ConfigError, match=r"--timeline '.*HINT") as info:
            # the dataset does not exist either: the refusal comes before any data is opened
            train_main(["--timeline", str(bad), "--data", str(tmp_path / "no-dataset")],
                       MPI.COMM_SELF)
        assert needle in str(info.value)


def test_doctor_json_refused_before_the_report(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from mpi4py import MPI

    from mpitrain.doctor import main as doctor_main

    with pytest.raises(ConfigError, match=r"--json '.*a-file/d\.json' lies under .*HINT"):
        doctor_main(["--json", str(a_file(tmp_path) / "d.json")], MPI.COMM_SELF)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("words, needle, code", [
    (["convert", "--csv", "{tmp}/missing.csv", "--out", "{tmp}/a-file/o"],
     "--out '{tmp}/a-file/o' lies under", 2),  # before the (missing) input is read
    (["corpus", "--context", "8", "--out", "{tmp}/a-file/o"], "--out '{tmp}/a-file/o' lies", 2),
    (["convert", "--csv", "{tmp}/a-dir", "--out", "{tmp}/o"], "--csv '{tmp}/a-dir' is a dir", 1),
    (["convert", "--csv", "{tmp}/g.csv", "--out", "{tmp}/o"], "gzip-compressed: gunzip it", 1),
], ids=["convert-out-under-a-file", "corpus-out-under-a-file", "csv-is-a-directory",
        "csv-is-gzip"])
def test_data_tools(words: list[str], needle: str, code: int, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    from mpi4py import MPI

    from data_tools.cli import main as data_tools_main

    a_file(tmp_path), a_dir(tmp_path)
    (tmp_path / "g.csv").write_bytes(gzip.compress(b"a,label\n1,0\n"))
    t = str(tmp_path)
    assert data_tools_main([w.replace("{tmp}", t) for w in words], MPI.COMM_SELF) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HINT: " in err and needle.replace("{tmp}", t) in err
    assert not (tmp_path / "o").exists()


def test_hosts_file_that_is_not_text_is_one_line(tmp_path: Path) -> None:
    from mpitrain.cluster import ClusterError, hosts

    path = raw(tmp_path / "hosts", b"127.0.0.1 localhost\n10.0.0.1 caf\xe9\n")
    for read in (lambda: hosts.block(path), lambda: hosts.foreign(path, ["mpt-node1"])):
        with pytest.raises(ClusterError, match=r"hosts file '.*hosts' is not UTF-8 text .*HINT"):
            read()


def test_output_checks_create_parents_and_leave_nothing(tmp_path: Path) -> None:
    from mpitrain.runtime.tool_io import check_output_dir, check_output_file

    target = tmp_path / "a" / "b" / "x.json"
    assert check_output_file(target, "--json") == target and target.parent.is_dir()
    assert check_output_dir(tmp_path / "c" / "d", "--out").is_dir()
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []  # the probes are gone
    with pytest.raises(ConfigError, match=r"--json '/dev/null' is not a regular file.*HINT"):
        check_output_file(Path("/dev/null"), "--json")  # an atomic write would replace it
    with pytest.raises(ConfigError, match=r"--out '/proc/plots' cannot be written: its "
                                          r"directory '/proc/plots' cannot be created.*HINT"):
        check_output_dir(Path("/proc/plots"), "--out")  # read-only, even for root


@pytest.mark.parametrize("words, code, needle", [
    (["trace", "summary", "{tmp}/t.json"], 1, "t.json' is not UTF-8 text"),
    (["doctor", "--json", "{tmp}"], 2, "--json '{tmp}' is a directory"),
], ids=["trace-summary-not-utf8", "doctor-json-is-a-directory"])
def test_cli_exit_code_without_traceback(words: list[str], code: int, needle: str,
                                         tmp_path: Path) -> None:
    (tmp_path / "t.json").write_bytes(b"\xff\xfe")
    t = str(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "mpitrain", *(w.replace("{tmp}", t)
                                                               for w in words)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "HINT: " in lines[0] and needle.replace("{tmp}", t) in lines[0]
    assert proc.stdout == ""

