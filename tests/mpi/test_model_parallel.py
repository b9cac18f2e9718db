"""Model parallelism end to end: split GPTs == the dense GPT, trained grids == one process,
bitwise resume on the same grid, resume on another grid
(scenario: tests/mpi/scenarios/model_parallel.py). The trained runs of a test go through one
job (scenarios/train_runs.py: the train command in process, torch loaded once per rank)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from mpitrain.checkpoint import files as ckpt
from mpitrain.checkpoint.shards import load_full, read_shards
from mpitrain.train.sample_log import read_sample_log
from tests.conftest import MpiRun, job_runner

# a small GPT, plain SGD (no warm-up), 200 steps over the built-in corpus
GPT = ["--model", "gpt", "--context", "32", "--hidden", "32", "--heads", "4", "--layers", "2",
       "--optimizer", "sgd", "--lr", "0.1", "--no-scale-lr", "--warmup-epochs", "0",
       "--prefetch", "1", "--no-progress"]
COMMON = ["-m", "mpitrain", *GPT]
#: measured: 2.3e-6 after 200 steps (sums in another order); the bound leaves room
REL_TOL = 1e-4


def _passed(stdout: str) -> set[str]:
    return {line[5:] for line in stdout.splitlines() if line.startswith("PASS ")}


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 4])
def test_split_gpt_equals_dense(mpirun: MpiRun, n: int) -> None:
    proc = mpirun(n, ["model_parallel.py"], timeout=180)
    want = {f"parallelize a standard block {n}", f"pipeline {n} gpipe", f"pipeline {n} 1f1b",
            f"tensor {n}", f"tensor {n} sequence parallel",
            f"fp16 overflow on one tensor rank skips every rank {n}",
            f"pipeline {n} sends on a thread", f"pipeline {n} interleaved"}
    if n == 2:  # activation checkpointing == none
        want |= {"tensor 2 sequence parallel activation checkpointing full",
                 "tensor 2 activation checkpointing selective",
                 "pipeline 2 activation checkpointing full",
                 "ZeRO-3 x data 2 activation checkpointing"}
    if n == 4:
        want.add("tensor 2 x ZeRO-3 x data 2 activation checkpointing")
        want |= {"tensor 2 x data 2", "pipeline 2 x data 2", "tensor 2 x pipeline 2",
                 "pipeline 2 x data 2 interleaved",
                 "tensor 2 x pipeline 2 interleaved sequence parallel"}
    assert _passed(proc.stdout) == want, proc.stdout + proc.stderr


def _train(mpirun: MpiRun, n: int, out: Path, args: list[str], *, steps: int = 200,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    return mpirun(n, [*COMMON, "--max-steps", str(steps), "--checkpoint-dir", str(out / "ckpt"),
                      "--summary-json", str(out / "summary.json"), *args],
                  timeout=240, check=check)


def _args(out: Path, args: list[str], steps: int = 200) -> list[str]:
    """The train command's options of a run (as _train's) into ``out``."""
    return [*GPT, "--max-steps", str(steps), "--checkpoint-dir", str(out / "ckpt"),
            "--summary-json", str(out / "summary.json"), *args]


def _run(tmp: Path, name: str, ranks: range | list[int], args: list[str],
         steps: int = 200) -> dict[str, Any]:
    """A run of an _in_one_job phase: ``name`` on ``ranks``, into ``tmp / name``."""
    return {"name": name, "ranks": list(ranks), "argv": _args(tmp / name, args, steps)}


def _in_one_job(mpirun: MpiRun, n: int, tmp: Path, phases: list[dict[str, Any]],
                timeout: float) -> dict[str, tuple[str, str]]:
    """Run the train runs of ``phases`` in one job of ``n`` ranks (scenarios/train_runs.py:
    torch loads once per rank, not once per run); every run must exit 0. A phase is
    ``{"copy": [(src ckpt dir, new ckpt dir, step), ...], "runs": [run, ...]}`` with
    ``run = {"name": ..., "ranks": [...], "argv": [...]}``. Returns each run's (stdout,
    stderr), its ranks' in rank order, as ``mpiexec -n len(ranks) python -m mpitrain`` has."""
    logs, plan = tmp / "logs", tmp / "plan.json"
    plan.write_text(json.dumps({"logs": str(logs), "phases": phases}, default=str))
    mpirun(n, ["train_runs.py", str(plan)], timeout=timeout)
    codes = json.loads((logs / "codes.json").read_text())
    out = {}
    for name in (run["name"] for phase in phases for run in phase["runs"]):
        def text(kind: str, name: str = name) -> str:
            files = sorted(logs.glob(f"{name}.rank*.{kind}"),
                           key=lambda f: int(f.suffixes[-2].removeprefix(".rank")))
            return "".join(f.read_text() for f in files)

        out[name] = text("out"), text("err")
        assert codes.get(name) == 0, (name, codes.get(name), out[name][0][-3000:],
                                      out[name][1][-3000:])
    return out


def _grid_dir(ckpt: Path, step: int) -> Path:
    """The grid state a checkpoint file of ``step`` names (the one checkpoint layout)."""
    return next(ckpt.glob(f"ckpt-step-{step:08d}-*.grid"))


def _final(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    ckpt = sorted((out / "ckpt").glob("ckpt-step-*.grid"))[-1]
    return load_full(ckpt)["model"], json.loads((out / "summary.json").read_text())


def _max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)


CLIP = ["--clip-grad-norm", "0.3"]
#: id: (ranks, batch per replica, grid options, options of the grid and its reference)
GRIDS = {
    "tensor2": (2, 16, ["--tensor-parallel", "2"], []),
    "tensor2xdata2": (4, 8, ["--tensor-parallel", "2"], []),
    # pipeline 2 x data 2, the global norm clipped over stages and replicas
    "pipeline2xdata2-clip": (4, 8, ["--pipeline-stages", "2", "--micro-batches", "2"], CLIP),
    # the loop's accumulation around the schedule: 2 x 8 samples per step
    "tensor2-accumulate2-clip": (2, 8, ["--tensor-parallel", "2", "--accumulate", "2"], CLIP),
}


@pytest.fixture(scope="module")
def grid_runs(mpiexec: str, digits_cache: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, dict[str, tuple[str, str]]]:
    """GRIDS' runs and their one-process references (batch 16, with or without clipping; one
    each, as every grid of a kind compares with the same one), 200 steps, in one job of 4
    ranks: the references and the tensor-2 grid side by side, then the other grids."""
    tmp = tmp_path_factory.mktemp("grids")

    def grid(name: str, first: int) -> dict[str, Any]:
        n, batch, opts, both = GRIDS[name]
        return _run(tmp, name, range(first, first + n), [
            "--batch-size", str(batch), *opts, *both, "--sample-log", str(tmp / f"{name}-samples")])

    phases = [
        {"runs": [_run(tmp, "ref", [0], ["--batch-size", "16"]),
                  _run(tmp, "ref-clip", [1], ["--batch-size", "16", *CLIP]),
                  grid("tensor2", 2)]},
        {"runs": [grid("tensor2xdata2", 0)]},
        {"runs": [grid("pipeline2xdata2-clip", 0)]},
        {"runs": [grid("tensor2-accumulate2-clip", 0)]},
    ]
    return tmp, _in_one_job(job_runner(mpiexec, digits_cache), 4, tmp, phases, timeout=600)


@pytest.mark.mpi
@pytest.mark.timeout(900)  # the first one runs the module's job of 6 runs
@pytest.mark.parametrize("name", list(GRIDS))
def test_grid_trains_like_one_process(
    grid_runs: tuple[Path, dict[str, tuple[str, str]]], name: str
) -> None:
    tmp, logs = grid_runs
    # --sample-log: one file per replica (not per rank of it), each step's 16 samples once
    per_step: dict[int, list[int]] = {}
    for _epoch, step, _world, idx in read_sample_log(tmp / f"{name}-samples"):
        per_step.setdefault(step, []).extend(idx)
    assert sorted(per_step) == list(range(200))
    assert all(len(v) == len(set(v)) == 16 for v in per_step.values())
    assert "tensor groups inside nodes" in logs[name][0], logs[name][0]
    ref, ref_sum = _final(tmp / ("ref-clip" if GRIDS[name][3] else "ref"))
    got, got_sum = _final(tmp / name)
    assert _max_rel(ref, got) < REL_TOL
    assert got_sum["steps"] == ref_sum["steps"] == 200
    assert abs(float(got_sum["test_loss"]) - float(ref_sum["test_loss"])) < 1e-4  # type: ignore[arg-type]
    assert float(ref_sum["test_loss"]) < 3.2  # type: ignore[arg-type]  # learnt: ln 256 = 5.5


@pytest.mark.mpi
@pytest.mark.timeout(900)  # one job of 8 ranks on 2 cores, eight runs
def test_zero_over_the_replicas_of_a_grid_trains_like_one_process(
    mpirun: MpiRun, tmp_path: Path
) -> None:
    """ZeRO over the data dimension composed with tensor and pipeline parallelism, clipped to
    the global norm: 30 steps equal one process (measured 4.3e-7 relative; without the tied
    embedding's sum over the shards 0.74). Checkpoints are joined from the shards."""
    clip = ["--clip-grad-norm", "0.3", "--checkpoint-every", "30"]
    grids = {
        "t2p2d2-zero1": (8, ["--tensor-parallel", "2", "--pipeline-stages", "2",
                             "--shard", "optimizer"]),
        "p2d2-zero3": (4, ["--pipeline-stages", "2", "--shard", "parameters"]),
        "t2d2-zero3-sp": (4, ["--tensor-parallel", "2", "--sequence-parallel",
                              "--shard", "parameters"]),
    }
    # each grid's step-30 state resumes on another grid (ZeRO state joined and re-cut) and
    # goes on as one process does from step 30 (a plain checkpoint resumes the reference)
    then = {
        "t2p2d2-zero1": (4, ["--pipeline-stages", "2", "--shard", "parameters",
                             "--batch-size", "8"]),
        "p2d2-zero3": (4, ["--tensor-parallel", "2", "--batch-size", "8"]),
        "t2d2-zero3-sp": (4, ["--shard", "optimizer", "--batch-size", "4"]),
    }

    def grid(name: str, first: int) -> dict[str, Any]:
        n, opts = grids[name]
        return _run(tmp_path, name, range(first, first + n),
                    ["--batch-size", "8", "--micro-batches", "2", *opts, *clip], 30)

    def resumed(name: str, first: int) -> dict[str, Any]:
        n, opts = then[name]
        return _run(tmp_path, f"{name}-then", range(first, first + n),
                    ["--micro-batches", "2", *opts, *clip, "--resume", "auto"], 40)

    def copy(name: str) -> tuple[Path, Path, int]:
        return tmp_path / name / "ckpt", tmp_path / f"{name}-then" / "ckpt", 30

    ref = ["--batch-size", "16", *clip]
    # one job of 8 ranks, the runs side by side where the ranks allow
    _in_one_job(mpirun, 8, tmp_path, [
        {"runs": [grid("t2p2d2-zero1", 0)]},
        {"runs": [grid("p2d2-zero3", 0), grid("t2d2-zero3-sp", 4)]},
        {"copy": [copy("t2p2d2-zero1"), copy("p2d2-zero3")],
         "runs": [resumed("t2p2d2-zero1", 0), resumed("p2d2-zero3", 4)]},
        {"copy": [copy("t2d2-zero3-sp")],
         "runs": [resumed("t2d2-zero3-sp", 0), _run(tmp_path, "ref", [4], ref, 30)]},
        {"copy": [(tmp_path / "ref" / "ckpt", tmp_path / "ref40" / "ckpt", 30)],
         "runs": [_run(tmp_path, "ref40", [4], [*ref, "--resume", "auto"], 40)]},
    ], timeout=840)
    ref_final, ref_sum = _final(tmp_path / "ref")
    for name in grids:
        got, got_sum = _final(tmp_path / name)
        assert _max_rel(ref_final, got) < REL_TOL, name
        assert abs(float(got_sum["final_loss"]) - float(ref_sum["final_loss"])) < 1e-4, name
    want, want_sum = _final(tmp_path / "ref40")
    for name in then:
        got, got_sum = _final(tmp_path / f"{name}-then")
        assert _max_rel(want, got) < REL_TOL, name
        assert abs(float(got_sum["final_loss"]) - float(want_sum["final_loss"])) < 1e-4, name


@pytest.mark.mpi
def test_bf16_on_a_grid_trains_like_one_process(mpirun: MpiRun, tmp_path: Path) -> None:
    """--precision bf16 (the stages send bf16 activations, the loss in float32) and bf16
    gradient compression with clipping over pipeline 2 x data 2 follow one process within
    bf16's rounding (measured: the same final loss to 4 digits, parameters 2.3e-2)."""
    runs = {
        "ref-bf16": (1, ["--batch-size", "16", "--precision", "bf16"]),
        "grid-bf16": (4, ["--batch-size", "16", "--precision", "bf16", "--tensor-parallel",
                          "2", "--pipeline-stages", "2", "--micro-batches", "2"]),
        "ref-clip": (1, ["--batch-size", "16", "--clip-grad-norm", "0.3"]),
        "p2d2-bf16-compression": (4, ["--batch-size", "8", "--pipeline-stages", "2",
                                      "--micro-batches", "2", "--compression", "bf16",
                                      "--clip-grad-norm", "0.3"]),
    }
    # one job of 4 ranks: the two references side by side, then each grid
    _in_one_job(mpirun, 4, tmp_path, [
        {"runs": [_run(tmp_path, "ref-bf16", [0], runs["ref-bf16"][1], 20),
                  _run(tmp_path, "ref-clip", [1], runs["ref-clip"][1], 20)]},
        {"runs": [_run(tmp_path, "grid-bf16", range(4), runs["grid-bf16"][1], 20)]},
        {"runs": [_run(tmp_path, "p2d2-bf16-compression", range(4),
                       runs["p2d2-bf16-compression"][1], 20)]},
    ], timeout=600)
    out = {name: _final(tmp_path / name) for name in runs}
    for ref, got in (("ref-bf16", "grid-bf16"), ("ref-clip", "p2d2-bf16-compression")):
        (a, sa), (b, sb) = out[ref], out[got]
        assert _max_rel(a, b) < 5e-2, got
        assert abs(float(sa["final_loss"]) - float(sb["final_loss"])) < 1e-2, got
        assert abs(float(sa["test_loss"]) - float(sb["test_loss"])) < 1e-2, got


@pytest.mark.mpi
def test_resume_is_bitwise_on_the_same_grid(mpirun: MpiRun, tmp_path: Path) -> None:
    grid = ["--tensor-parallel", "2", "--pipeline-stages", "2", "--micro-batches", "2",
            "--batch-size", "8", "--checkpoint-every", "30", "--keep-last", "5"]
    # on another grid the state is re-cut (parameters and momentum) and the run goes on as
    # the uninterrupted one did (measured: 1.7e-7 relative after 30 more steps)
    others = {"t1p2d2": ["--pipeline-stages", "2", "--micro-batches", "2", "--batch-size", "4"],
              "t1p1d4": ["--batch-size", "2"]}
    a, b = tmp_path / "a" / "ckpt", tmp_path / "b" / "ckpt"
    # one job of 4 ranks: a, then step 30 alone (its checkpoint file, checksum and grid
    # state) resumed on the same grid (b) and on the others
    logs = _in_one_job(mpirun, 4, tmp_path, [
        {"runs": [_run(tmp_path, "a", range(4), grid, 60)]},
        {"copy": [(a, tmp_path / name / "ckpt", 30) for name in ("b", *others)],
         "runs": [_run(tmp_path, "b", range(4), [*grid, "--resume", "auto"], 60)]},
        *({"runs": [_run(tmp_path, name, range(4), [*other, "--checkpoint-every", "30",
                                                    "--resume", "auto"], 60)]}
          for name, other in others.items()),
    ], timeout=600)
    stdout = logs["b"][0]
    assert "resumed from" in stdout and "step 30" in stdout, stdout
    a_doc, a_files = read_shards(_grid_dir(a, 60))
    b_doc, b_files = read_shards(_grid_dir(b, 60))
    assert a_doc["run_id"] == b_doc["run_id"]
    for fa, fb in zip(a_files, b_files, strict=True):
        for k, v in fa["model"].items():
            assert torch.equal(v, fb["model"][k]), k
        for i, st in fa["optim"]["state"].items():
            for k, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(fb["optim"]["state"][i][k]))
    assert ckpt.load(a / "step-000000060.pt")["sampler"] == ckpt.load(
        b / "step-000000060.pt")["sampler"]
    want = load_full(_grid_dir(a, 60))["model"]
    want_sum = json.loads((tmp_path / "a" / "summary.json").read_text())
    for name in others:
        got_sum = json.loads((tmp_path / name / "summary.json").read_text())
        assert _max_rel(want, load_full(_grid_dir(tmp_path / name / "ckpt", 60))["model"]
                        ) < REL_TOL, name
        assert abs(float(got_sum["final_loss"]) - float(want_sum["final_loss"])) < 1e-4, name
    # another model shape is refused with one line naming it
    bad = _train(mpirun, 2, tmp_path / "b", ["--tensor-parallel", "2", "--batch-size", "8",
                                             "--hidden", "64", "--resume", "auto"], steps=90,
                 check=False)
    assert bad.returncode != 0
    assert "hidden 32 (now 64)" in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr
    # a fresh run into a directory of another run's checkpoints is refused
    fresh = _train(mpirun, 2, tmp_path / "b", ["--tensor-parallel", "2", "--batch-size", "8"],
                   steps=10, check=False)
    assert fresh.returncode != 0 and "--resume auto" in fresh.stderr + fresh.stdout
    out = tmp_path / "dense.pt"
    cli = subprocess.run([sys.executable, "-m", "mpitrain", "checkpoint", "consolidate",
                          str(_grid_dir(b, 60)), str(out)],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    dense = torch.load(out, weights_only=True)
    assert "head.weight" not in dense and "tok.weight" in dense and "blocks.1.qkv.weight" in dense


def _rank_pids(marker: str, launcher: int) -> list[int]:
    """Pids of this job's Python ranks (their command line holds ``marker``)."""
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    pids = []
    for pid in (int(p) for p in out.split()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if pid != launcher and argv and Path(argv[0].decode()).name.startswith("python"):
            pids.append(pid)
    return pids


def _start_grid(mpiexec: str, cache: Path, out: Path, steps: int,
                n: int = 4) -> subprocess.Popen[str]:
    from mpitrain.runtime.launch import launch_env, mpiexec_command

    out.mkdir()
    # --sample-log: its lines are flushed step by step (metrics.jsonl only every 64 KiB, some
    # 200 steps, which the test would wait for and then train again for its reference)
    args = [*COMMON, "--tensor-parallel", "2", "--pipeline-stages", "2", "--micro-batches",
            "2", "--batch-size", "8", "--lr-schedule", "constant",  # the same lr at any length
            "--max-steps", str(steps), "--checkpoint-every", "1000",
            "--checkpoint-dir", str(out / "ckpt"), "--sample-log", str(out / "samples")]
    return subprocess.Popen([*mpiexec_command(n, mpiexec), sys.executable, *args],
                            cwd=Path(__file__).resolve().parents[2],
                            env=launch_env({"MPITRAIN_CACHE": str(cache)}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc: subprocess.Popen[str], out: Path, steps: int) -> None:
    """Wait until the run of _start_grid into ``out`` has trained ``steps`` steps (its sample
    log has a line of step ``steps``, counted from 0)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        for log in out.glob("samples.rank*"):
            lines = log.read_text().split("\n")[:-1]  # whole lines only
            if any(int(line.split()[1]) >= steps for line in lines if not line.startswith("#")):
                return
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no {steps} steps within 120 s: {proc.communicate()[1][-3000:]}")


@pytest.mark.mpi
def test_grid_preemption_resumes_bitwise_and_kill_9_ends_the_job(
    mpirun: MpiRun, mpiexec: str, digits_cache: Path, tmp_path: Path
) -> None:
    """USR1 to one rank of a tensor 2 x pipeline 2 run: the agreed checkpoint and exit 99 on
    every rank; the resume equals an uninterrupted run bitwise. kill -9 of a rank of a
    tensor 2 x pipeline 2 x data 2 run ends it within 30 s."""
    a = tmp_path / "a"
    proc = _start_grid(mpiexec, digits_cache, a, 400)
    _wait_for_steps(proc, a, 5)
    pids = _rank_pids(str(a / "ckpt"), proc.pid)
    assert len(pids) == 4, pids
    os.kill(pids[-1], signal.SIGUSR1)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 99, (proc.returncode, err[-3000:])
    assert "preempted" in out, out
    latest = ckpt.find_latest(a / "ckpt")
    assert latest is not None
    step = ckpt.read_info(latest).step
    grid = ["--tensor-parallel", "2", "--pipeline-stages", "2", "--micro-batches", "2",
            "--batch-size", "8", "--lr-schedule", "constant"]
    # one job of 4 ranks: the resume, then the uninterrupted run
    _in_one_job(mpirun, 4, tmp_path, [
        {"runs": [_run(tmp_path, "a", range(4), [*grid, "--resume", "auto"], step + 5)]},
        {"runs": [_run(tmp_path, "b", range(4), grid, step + 5)]},
    ], timeout=240)
    _, got = read_shards(_grid_dir(a / "ckpt", step + 5))
    _, want = read_shards(_grid_dir(tmp_path / "b" / "ckpt", step + 5))
    for fa, fb in zip(got, want, strict=True):
        for k, v in fa["model"].items():
            assert torch.equal(v, fb["model"][k]), k
    # kill -9 of one rank of a tensor 2 x pipeline 2 x data 2 run: the whole job ends
    c = tmp_path / "c"
    proc = _start_grid(mpiexec, digits_cache, c, 400, n=8)
    _wait_for_steps(proc, c, 3)
    pids = _rank_pids(str(c / "ckpt"), proc.pid)
    t0 = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 30


@pytest.mark.mpi
def test_local_sgd_and_bucket_autotune_on_a_grid(mpirun: MpiRun, tmp_path: Path) -> None:
    """The replicas of a grid take --exchange local-sgd (the DiLoCo shape: each pipeline
    replica trains alone, its slices averaged over the data group every H steps): equal to
    local SGD over dense replicas, not to sync; a resume between two averages continues
    bitwise (each replica's own slices are checkpointed); --bucket-mb auto tunes the
    replicas' buckets without changing the result."""
    local = ["--exchange", "local-sgd", "--local-steps", "4", "--sync-warmup-steps", "0",
             "--batch-size", "8", "--checkpoint-every", "10", "--keep-last", "5"]
    grid = ["--pipeline-stages", "2", "--micro-batches", "2"]
    tp = ["--tensor-parallel", "2", "--batch-size", "8"]
    # one job of 4 ranks: local SGD over 2 dense replicas (the reference) beside sync SGD,
    # then the grid; its step 10 resumed (two local steps after the average of step 8: the
    # replicas differ); --bucket-mb auto and fixed over a tensor 2 x data 2 grid
    logs = _in_one_job(mpirun, 4, tmp_path, [
        {"runs": [_run(tmp_path, "ref", [0, 1], local, 30),
                  _run(tmp_path, "sync", [2, 3], ["--batch-size", "8"], 30)]},
        {"runs": [_run(tmp_path, "grid", range(4), [*local, *grid], 30)]},
        {"copy": [(tmp_path / "grid" / "ckpt", tmp_path / "again" / "ckpt", 10)],
         "runs": [_run(tmp_path, "again", range(4), [*local, *grid, "--resume", "auto"], 30)]},
        {"runs": [_run(tmp_path, "auto", range(4), [*tp, "--bucket-mb", "auto"], 30)]},
        {"runs": [_run(tmp_path, "fixed", range(4), [*tp, "--bucket-mb", "4"], 30)]},
    ], timeout=600)
    ref, ref_sum = _final(tmp_path / "ref")
    got, got_sum = _final(tmp_path / "grid")
    assert _max_rel(ref, got) < REL_TOL
    assert abs(float(got_sum["final_loss"]) - float(ref_sum["final_loss"])) < 1e-4  # type: ignore[arg-type]
    assert _max_rel(ref, _final(tmp_path / "sync")[0]) > 100 * REL_TOL  # local, not sync
    # the resume at step 10 continues bitwise
    a, c = tmp_path / "grid" / "ckpt", tmp_path / "again" / "ckpt"
    for fa, fc in zip(read_shards(_grid_dir(a, 30))[1], read_shards(_grid_dir(c, 30))[1],
                      strict=True):
        for k, v in fa["model"].items():
            assert torch.equal(v, fc["model"][k]), k
    # --bucket-mb auto: tuned, the same numbers as fixed buckets
    assert "bucket autotune:" in logs["auto"][1] + logs["auto"][0], logs["auto"][1]
    tuned, fixed = _final(tmp_path / "auto")[0], _final(tmp_path / "fixed")[0]
    assert all(torch.equal(tuned[k], fixed[k]) for k in fixed)
    # one replica (tensor 2 on 2 ranks): the replicas' options are refused, not ignored
    one = _train(mpirun, 2, tmp_path / "one", [*tp, "--compression", "bf16", "--exchange",
                                               "local-sgd"], steps=2, check=False)
    assert one.returncode != 0 and "Traceback" not in one.stderr, one.stderr
    assert "--compression, --exchange act on the data-parallel replicas" in one.stderr
    assert "has one replica" in one.stderr, one.stderr
