"""MPIStrategy under lightning.Trainer (scenario tests/mpi/scenarios/lightning_fit.py).

Three launches, each shared by the tests of its subjects (torch and Lightning import once per
launch): 4 ranks (equivalence with Lightning's DDP over gloo, ZeRO-3 checkpoints, then a
preemption that ends the job with 99), 2 ranks (equivalence, resuming the 4-rank checkpoints,
then a rank killed with SIGKILL) and 2 ranks (refusals, then a rank whose training step
raises).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mpitrain.runtime import env
from mpitrain.runtime.launch import launch_env, mpiexec_command
from tests.conftest import ROOT, SCENARIOS

pytestmark = pytest.mark.mpi

SHARDS = ("none", "optimizer", "gradients", "parameters")
RTOL = 1e-5  # float32 sums in another order (MPI vs gloo, averaged after vs before the sum)
#: the 4-rank extras (2 pretend nodes x 2 ranks): fit name -> (DDP reference, rtol)
EXTRAS = {
    "mpi none hierarchical": ("ddp", RTOL),
    "mpi parameters hierarchical": ("ddp", RTOL),
    "mpi none acc2": ("ddp acc2", RTOL),
    "mpi gradients acc2": ("ddp acc2", RTOL),
    "mpi none fp16": ("ddp", 2e-3),  # gradients travel as float16 (DDP: float32)
}


@pytest.fixture(scope="module", autouse=True)
def _lightning() -> None:
    try:
        import lightning.pytorch  # noqa: F401
    except ImportError:
        if env.get("require_mpi") == "1":
            pytest.fail("lightning is not installed but MPITRAIN_REQUIRE_MPI=1 (CI installs "
                        "mpitrain[lightning])")
        pytest.skip("lightning is not installed (pip install mpitrain[lightning])")


class Launch:
    """One finished mpiexec job of the scenario: exit code, output, results, end time."""

    def __init__(self, mpiexec: str, n: int, args: list[str], timeout: float,
                 extra_env: dict[str, str] | None = None) -> None:
        cmd = [*mpiexec_command(n, mpiexec), sys.executable, str(SCENARIOS / "lightning_fit.py"),
               *args]
        self.t0 = time.time()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(extra_env or {}),
                                  capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or b""
            text = out.decode() if isinstance(out, bytes) else out
            pytest.fail(f"timed out after {timeout}s (hang): {' '.join(cmd)}\n{text[-4000:]}")
        self.ended = time.time()
        self.rc = proc.returncode
        self.out = proc.stdout + proc.stderr
        path = Path(args[0]) / "results.json"
        self.results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def need(self, key: str) -> Any:
        assert key in self.results, f"exit {self.rc}, no {key!r} in results:\n{self.out[-6000:]}"
        return self.results[key]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lightning")


@pytest.fixture(scope="module")
def four(mpiexec: str, workdir: Path) -> Launch:
    return Launch(mpiexec, 4, [str(workdir / "a"), "--save", "--preempt"], timeout=300,
                  extra_env={"MPITRAIN_RANKS_PER_NODE": "2"})


@pytest.fixture(scope="module")
def two(mpiexec: str, workdir: Path, four: Launch) -> Launch:
    return Launch(mpiexec, 2, [str(workdir / "b"), "--resume-from", str(workdir / "a"),
                               "--kill"], timeout=240)


@pytest.fixture(scope="module")
def failing(mpiexec: str, workdir: Path) -> Launch:
    return Launch(mpiexec, 2, [str(workdir / "c"), "--raise"], timeout=120)


def _flat(params: dict[str, list[float]]) -> np.ndarray:
    return np.concatenate([np.asarray(params[k]) for k in sorted(params)])


def _same_training(got: dict[str, Any], want: dict[str, Any], what: str,
                   rtol: float = RTOL) -> None:
    assert len(got["losses"]) == len(want["losses"]) > 0, what
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=rtol, err_msg=what)
    np.testing.assert_allclose(got["lrs"], want["lrs"], rtol=RTOL, err_msg=what)
    assert [sorted(e) for e in got["epochs"]] == [sorted(e) for e in want["epochs"]], what
    for g, w in zip(got["epochs"], want["epochs"], strict=True):
        for key in w:  # val_loss, val_acc (torchmetrics), train_loss: all synced over ranks
            np.testing.assert_allclose(g[key], w[key], rtol=rtol, err_msg=f"{what} {key}")
    if want["final"]:
        np.testing.assert_allclose(_flat(got["final"]), _flat(want["final"]), rtol=rtol,
                                   atol=1e-6 if rtol == RTOL else rtol, err_msg=what)


@pytest.mark.parametrize("n", [4, 2])
def test_trains_like_lightning_ddp(request: pytest.FixtureRequest, n: int) -> None:
    """Every rank's loss at every step, the lr schedule, the sync_dist and torchmetrics
    epoch values and the final weights equal Lightning's DDP over gloo, for replicas and
    ZeRO-1/2/3 (same seeds, same DistributedSampler order)."""
    launch: Launch = request.getfixturevalue({4: "four", 2: "two"}[n])
    runs = launch.need("runs")
    ddp = runs["ddp"]
    assert len(ddp) == n
    assert ddp[0]["epochs"][-1]["val_acc"] > 0.5, ddp[0]["epochs"]  # it does learn
    for shard in SHARDS:
        for rank in range(n):
            _same_training(runs[f"mpi {shard}"][rank], ddp[rank], f"shard={shard} rank {rank}")
    assert set(runs) == {"ddp", *(f"mpi {s}" for s in SHARDS)} | (
        {"ddp acc2", *EXTRAS} if n == 4 else set())


def test_hierarchical_compressed_and_accumulating_like_ddp(four: Launch) -> None:
    """On 2 pretend nodes x 2 ranks: the hierarchical all-reduce (replicas) and
    reduce-scatter (ZeRO-3) equal DDP; with accumulate_grad_batches=2 (no_sync micro-batches)
    replicas and ZeRO-2 equal DDP accumulating; fp16 gradients stay within 2e-3."""
    runs = four.need("runs")
    for name, (ref, rtol) in EXTRAS.items():
        for rank in range(4):
            _same_training(runs[name][rank], runs[ref][rank], f"{name} rank {rank}", rtol)
    assert len(runs["ddp acc2"][0]["losses"]) == len(runs["ddp"][0]["losses"])


def test_rank_and_node_discovery_from_mpi(four: Launch) -> None:
    """Ranks, local ranks and nodes (MPITRAIN_RANKS_PER_NODE=2: two pretend nodes) reach
    Lightning, and the sampler splits the data over all ranks."""
    got = four.need("layout")
    assert got == [{"global_rank": r, "local_rank": r % 2, "node_rank": r // 2,
                    "world_size": 4, "sampler": {"num_replicas": 4, "rank": r},
                    "is_global_zero": r == 0} for r in range(4)]


@pytest.mark.parametrize("n", [4, 2])
def test_collectives_match_ddp(request: pytest.FixtureRequest, n: int) -> None:
    """reduce (every op, ints, ReduceOp), all_gather (with gradients), broadcast,
    reduce_boolean_decision and barrier return what DDPStrategy's return."""
    launch: Launch = request.getfixturevalue({4: "four", 2: "two"}[n])
    per_rank = launch.need("collectives")
    assert len(per_rank) == n and len(per_rank[0]) == 15
    for rank, checks in enumerate(per_rank):
        for name, got in checks.items():
            assert got["mpi"] == got["ddp"], f"rank {rank} {name}: {got}"


def test_zero3_checkpoints_are_sharded_directories(four: Launch, workdir: Path) -> None:
    """ModelCheckpoint under ZeRO-3 writes one shard per rank, the manifest and Lightning's
    state; the last one holds exactly the trained weights."""
    final = four.need("runs")["mpi parameters"][0]["final"]
    assert four.need("ckpt epoch=2") == final
    for epoch in range(3):
        d = workdir / "a" / "ckpt" / f"epoch={epoch}.ckpt"
        names = sorted(p.name for p in d.iterdir())
        assert names == ["lightning.pt", "manifest.json"] + [
            f"shard-{r:05d}-of-00004.pt" for r in range(4)], names


def test_resume_4_rank_zero3_checkpoint_on_2_ranks(two: Launch) -> None:
    """Saved by 4 ranks under ZeRO-3, resumed by 2 under ZeRO-2: weights, step, epoch and lr
    restored, and the rest of the run equals Lightning's DDP resumed from the consolidated
    (plain) checkpoint, which also resumes under ZeRO-3 to the same losses."""
    resumed = two.need("resumed")
    ckpt = two.need("ckpt epoch=1")
    for rank in range(2):
        mpi, ddp = resumed["resume mpi"][rank], resumed["resume ddp"][rank]
        assert mpi["start"]["params"] == ckpt, "MPIStrategy restored other weights"
        assert ddp["start"]["params"] == ckpt, "DDP restored other weights"
        assert mpi["start"]["global_step"] == ddp["start"]["global_step"] == 12  # 2 x 6 steps
        assert mpi["start"]["epoch"] == ddp["start"]["epoch"] == 2
        assert mpi["start"]["lr"] == ddp["start"]["lr"] == pytest.approx(0.2 * 0.7**2)
        assert len(mpi["losses"]) == 12  # one epoch at 2 ranks
        _same_training(mpi, ddp, f"resumed rank {rank}")
        # and the plain (consolidated) file resumes under ZeRO-3 too
        _same_training(resumed["resume plain into zero3"][rank], ddp, f"plain->zero3 {rank}")


def test_preemption_saves_agreed_checkpoint_and_exits_99(four: Launch, two: Launch,
                                                           workdir: Path) -> None:
    """SIGUSR1 to rank 1 only: every rank stops after the same step, a sharded
    hpc_ckpt_1.ckpt is written and the job exits 99; ckpt_path="hpc" resumes it on 2 ranks."""
    assert four.rc == 99, four.out[-6000:]
    assert "rank 1 (pid" in four.out and "SIGUSR1 myself" in four.out
    assert re.search(r"mpitrain: preempted \(rank 1: SIGUSR1\) at step 9: saved '.*"
                     r"hpc_ckpt_1\.ckpt'; exiting with code 99", four.out), four.out[-4000:]
    for rank in range(4):
        assert f"rank {rank}: stopped at step 9 (SystemExit)" in four.out, four.out[-4000:]
    assert (workdir / "a" / "preempt" / "hpc_ckpt_1.ckpt" / "lightning.pt").exists()
    hpc = two.need("resumed")["resume hpc"]
    for rank in range(2):
        assert hpc[rank]["start"]["global_step"] == 9
        assert hpc[rank]["start"]["params"] == two.need("ckpt hpc")
        assert hpc[rank]["end_epoch"] == 3 and hpc[rank]["end_step"] > 9


def test_killed_rank_ends_the_job(two: Launch) -> None:
    """kill -9 of rank 1 mid-fit: mpiexec ends, non-zero, well within 30 s."""
    m = re.search(r"rank 1 \(pid (\d+)\): SIGKILL myself at ([\d.]+)", two.out)
    assert m is not None, two.out[-6000:]
    assert two.rc != 0
    assert "survived the kill" not in two.out
    assert "signal 9" in two.out and f"PID {m.group(1)} " in two.out, two.out[-3000:]
    assert two.ended - float(m.group(2)) < 30, two.ended - float(m.group(2))


def test_hang_watchdog_ends_a_frozen_fit(mpiexec: str, workdir: Path) -> None:
    """MPIStrategy(hang_timeout=3): rank 1 frozen (SIGSTOP) before step 3; rank 0's watchdog
    names it and aborts the job, timeout + grace after the freeze (without it: a hang)."""
    hang = Launch(mpiexec, 2, [str(workdir / "d"), "--hang"], timeout=90)
    m = re.search(r"rank 1 \(pid \d+\): SIGSTOP myself at ([\d.]+)", hang.out)
    assert m is not None, hang.out[-6000:]
    assert hang.rc != 0 and "survived the hang" not in hang.out
    assert "never answered: rank 1" in hang.out, hang.out[-6000:]
    assert hang.ended - float(m.group(1)) < 30, hang.ended - float(m.group(1))


def test_failing_rank_aborts_the_job(failing: Launch) -> None:
    """An exception in rank 1's training_step aborts every rank (from the strategy's
    on_exception, before Lightning's teardown), with the rank and traceback."""
    out = failing.out
    assert failing.rc != 0
    assert "rank 1: raising at step 2" in out, out[-6000:]
    assert "rank 1/2 on " in out and "RuntimeError: injected failure on rank 1" in out, out
    assert "fit raised instead of aborting" not in out and "survived" not in out
    assert failing.ended - failing.t0 < 100


def test_misuse_is_refused_alike_on_every_rank(failing: Launch) -> None:
    """Bad options, a devices/launch mismatch, norm clipping under ZeRO, a full save after a
    ZeRO fit, and unfinished / mixed / damaged / missing checkpoints: the same one line with
    a HINT on both ranks."""
    refusals = failing.need("refusals")
    assert refusals[0] == refusals[1]
    got = refusals[0]
    assert set(got) == {"bad shard", "ef with sharding", "devices", "norm clipping with ZeRO",
                        "full save after a ZeRO fit", "unfinished checkpoint",
                        "mixed checkpoint", "damaged checkpoint", "missing checkpoint"}, got
    assert all("HINT:" in v and "\n" not in v for v in got.values()), got
    assert "pass devices=2, num_nodes=1" in got["devices"]
    assert "clip_grad_norm_" in got["norm clipping with ZeRO"]
    assert got["full save after a ZeRO fit"].startswith("CheckpointError: ") and \
        "weights_only=True" in got["full save after a ZeRO fit"]
    assert "lightning.pt' does not exist" in got["unfinished checkpoint"], got
    assert "mixes two saves" in got["mixed checkpoint"], got
    assert "shard-00001-of-00002.pt' is damaged" in got["damaged checkpoint"], got
    assert "does not exist" in got["missing checkpoint"], got


def test_bench_lightning_smoke(mpiexec: str, tmp_path: Path) -> None:
    """The side-by-side benchmark runs (tiny sizes) and writes its rows."""
    out = tmp_path / "lightning.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mpitrain.bench", "lightning", "--steps", "2", "--warmup", "1",
         "--rounds", "1", "--json", str(out)], cwd=ROOT, env=launch_env(), capture_output=True,
        text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["spec"] for r in rows] == ["ddp", "mpi", "mpi:gradients"]
    assert all(r["steps_per_s"] > 0 and r["ranks"] == 2 for r in rows)
    assert rows[0]["vs_ddp"] == 1.0 and "vs ddp" in proc.stdout
