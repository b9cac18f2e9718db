"""Several runs of the train command (``python -m mpitrain``) in one job, so that torch and
mpitrain load once per rank instead of once per run (about 5 s of CPU per rank and launch).

Run by hand: mpiexec -n N python tests/mpi/scenarios/train_runs.py PLAN.json

PLAN.json: ``{"phases": [{"copy": [[SRC, DST, STEP], ...], "runs": [RUN, ...]}, ...],
"logs": DIR}`` with RUN = ``{"name": NAME, "ranks": [R, ...], "argv": [ARG, ...]}``.
The phases run one after another; the runs of a phase run side by side on their own ranks
(disjoint), each on a communicator of just those ranks, through the train command's own
``main(argv, comm)`` (the argument parsing, checks and trainer of ``python -m mpitrain``).
``copy`` (before the phase, by rank 0) puts step STEP's checkpoint of the checkpoint directory
SRC (file, checksum, grid state) into the new directory DST, to resume from it. Each rank of a
run writes its stdout and stderr to ``DIR/NAME.rankR.out`` and ``.err``; rank 0 writes the
runs' exit codes (of their rank 0) to ``DIR/codes.json``. Ranks that wait sleep (a busy
barrier would take the CPU from the ranks that train).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from mpi4py import MPI

from mpitrain.runtime.abort import run_mpi
from mpitrain.train.run import main as train_main


def copy_step(src: Path, dst: Path, step: int) -> None:
    """Copy step ``step``'s checkpoint (file, checksum, grid state) into a new directory."""
    dst.mkdir(parents=True)
    for name in (f"step-{step:09d}.pt", f"step-{step:09d}.pt.sha256"):
        shutil.copy(src / name, dst / name)
    for grid in src.glob(f"ckpt-step-{step:08d}-*.grid"):
        shutil.copytree(grid, dst / grid.name)


def wait_all(comm: MPI.Intracomm) -> None:
    """Collective: a barrier whose waiting ranks sleep instead of polling MPI hot."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.01)


def train_logged(argv: list[str], comm: MPI.Intracomm, out: Path, err: Path) -> int:
    """Collective: run the train command on ``comm`` with this rank's file descriptors 1 and 2
    (and so sys.stdout and sys.stderr) in ``out`` and ``err``; returns its exit code. If it
    raises, the end of ``err`` is copied to the job's stderr first."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    failed = True
    with out.open("w") as fo, err.open("w") as fe:
        os.dup2(fo.fileno(), 1)
        os.dup2(fe.fileno(), 2)
        try:
            code = int(train_main(argv, comm))
            failed = False
            return code
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            if failed:
                sys.stderr.write(f"--- {err}\n{err.read_text()[-4000:]}\n")
                sys.stderr.flush()


def main(comm: MPI.Intracomm) -> int:
    plan: dict[str, Any] = json.loads(Path(sys.argv[1]).read_text())
    logs = Path(plan["logs"])
    codes: dict[str, int] = {}
    for phase in plan["phases"]:
        if comm.rank == 0:
            logs.mkdir(parents=True, exist_ok=True)
            for src, dst, step in phase.get("copy", []):
                copy_step(Path(src), Path(dst), int(step))
        wait_all(comm)
        runs = phase["runs"]
        mine = [i for i, run in enumerate(runs) if comm.rank in run["ranks"]]
        assert len(mine) <= 1, f"rank {comm.rank} is in more than one run of a phase"
        sub = comm.Split(mine[0] if mine else MPI.UNDEFINED, comm.rank)
        if mine:
            run = runs[mine[0]]
            assert sub.size == len(run["ranks"]), run
            name = f"{run['name']}.rank{sub.rank}"
            code = train_logged(list(run["argv"]), sub, logs / f"{name}.out",
                                logs / f"{name}.err")
            if sub.rank == 0:
                codes[run["name"]] = code
            sub.Free()
        wait_all(comm)
    every = comm.gather(codes, root=0)
    if every is not None:
        (logs / "codes.json").write_text(json.dumps({k: v for d in every for k, v in d.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
