"""Which options each training path reads: the train command run in-process, its config traced.

For every path of :data:`PATHS` (data parallel sync, the asynchronous modes, ZeRO, the GPT's
tensor x data and pipeline x data grids) it runs ``mpitrain.train.run.main`` with
``parse_config`` patched so that the resolved ``TrainConfig`` is re-classed to a traced
subclass: every read of an option field is recorded, except reads by ``dataclasses``
(``asdict``/``replace``/``repr``) and by the configuration's own validation
(``mpitrain/config*.py``: it reads every field to check it, and ``cfg.replace`` validates
again), which honour nothing. ``dataclasses.replace`` keeps the class, so the configs derived
from it (mode defaults, the run id) stay traced. The read sets of all ranks are joined and rank
0 writes ``{path: [option, ...]}`` as JSON to OUT (tests/mpi/test_option_paths.py holds it
against ``--help``). A path runs on its own number of ranks (the grids on 4, so that they have
two data-parallel replicas); the ranks outside it wait.

    mpiexec -n 4 python tests/mpi/scenarios/option_reads.py OUT [PATH ...]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.config import TrainConfig

#: a few steps of every run, quiet, on the CPU (the same table on any machine); no lr warm-up,
#: so that the schedule is read within those steps
COMMON = ["--max-steps", "3", "--no-progress", "--log-level", "warning", "--batch-size", "16",
          "--device", "cpu", "--warmup-epochs", "0"]
#: a small GPT (the built-in corpus) that a step of takes milliseconds
GPT = ["--model", "gpt", "--context", "16", "--hidden", "32", "--heads", "4", "--layers", "2",
       "--batch-size", "8", "--prefetch", "1"]


def parents(work: Path) -> list[str]:
    """Options that switch a feature on, so that the options under it are read."""
    return [
        "--checkpoint-dir", str(work / "ckpt"), "--checkpoint-every", "2",
        "--timeline", str(work / "trace.json"), "--timeline-steps", "1:3",
        "--summary-json", str(work / "summary.json"), "--run-dir", str(work / "run"),
        "--sample-log", str(work / "samples"), "--straggler-ms", "1",
    ]


#: path -> (ranks, its own flags); ``parents`` are added unless the name says bare
PATHS: dict[str, tuple[int, list[str]]] = {
    "sync": (2, []),
    "sync-bare": (2, []),  # no parent features: what an option under one does without it
    "double-buffer": (2, ["--exchange", "double-buffer"]),
    "local-sgd": (2, ["--exchange", "local-sgd"]),
    "param-server": (2, ["--exchange", "param-server"]),  # 1 server + 1 worker
    "shard-optimizer": (2, ["--shard", "optimizer"]),
    "shard-parameters": (2, ["--shard", "parameters"]),
    "gpt-tensor": (4, [*GPT, "--tensor-parallel", "2"]),  # tensor 2 x data 2
    "gpt-pipeline": (4, [*GPT, "--pipeline-stages", "2", "--micro-batches", "2"]),  # x data 2
}
#: ranks the scenario needs (the largest path)
WORLD = max(ranks for ranks, _flags in PATHS.values())


def path_argv(name: str, work: Path) -> list[str]:
    """Return the train command's arguments of path ``name``, writing its files under ``work``."""
    extra = [] if name.endswith("-bare") else parents(work)
    return [*COMMON, *PATHS[name][1], *extra]


#: files whose reads of a config are bookkeeping, not an effect (see the module docstring)
IGNORED_FILES = ("dataclasses.py",)
IGNORED_MODULES = ("mpitrain/config.py", "mpitrain/config_checks.py",
                   "mpitrain/config_values.py", "mpitrain/config_sources.py")


def traced_class(reads: set[str]) -> type[TrainConfig]:
    """Return a ``TrainConfig`` subclass that adds the option fields read to ``reads``."""
    from mpitrain.config import TrainConfig, option_fields

    options = frozenset(option_fields())

    class Traced(TrainConfig):
        def __getattribute__(self, name: str) -> Any:
            if name in options:
                where = sys._getframe(1).f_code.co_filename.replace(os.sep, "/")
                if not where.endswith(IGNORED_FILES) and not where.endswith(IGNORED_MODULES):
                    reads.add(name)
            return object.__getattribute__(self, name)

    return Traced


def traced_parse(reads: set[str]) -> Callable[[list[str]], TrainConfig]:
    """Return a ``parse_config`` whose configs record their reads into ``reads``."""
    from mpitrain.train import run

    parse, traced = run.parse_config, traced_class(reads)

    def parse_traced(argv: list[str]) -> TrainConfig:
        cfg = parse(argv)
        object.__setattr__(cfg, "__class__", traced)
        return cfg

    return parse_traced


def wait_sleeping(comm: MPI.Intracomm) -> None:
    """Collective: a barrier that sleeps while it waits (the waiting ranks leave the cores)."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.01)


def read_options(world: MPI.Intracomm, name: str, work: Path) -> list[str]:
    """Collective: run path ``name`` on its first ranks; return the options any rank read."""
    from mpi4py import MPI

    from mpitrain.train import run

    reads: set[str] = set()
    ranks = PATHS[name][0]
    comm = cast("MPI.Intracomm", world.Split(0 if world.rank < ranks else MPI.UNDEFINED))
    if comm != MPI.COMM_NULL:
        with mock.patch.object(run, "parse_config", traced_parse(reads)):
            code = run.main(path_argv(name, work), comm)
        comm.Free()
        if code != 0:
            raise RuntimeError(f"path {name}: the train command exited {code}")
    wait_sleeping(world)
    return sorted(set().union(*world.allgather(reads)))


def main(comm: MPI.Intracomm) -> int:
    """Collective: trace every path named on the command line (default: all of them)."""
    assert comm.size == WORLD, f"run with {WORLD} ranks"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("option_reads.json")
    names = sys.argv[2:] or list(PATHS)
    root = Path(comm.bcast(tempfile.mkdtemp(prefix="option-reads-") if comm.rank == 0 else None))
    table = {name: read_options(comm, name, root / name) for name in names}
    if comm.rank == 0:
        out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        print(f"PASS read sets of {len(table)} paths written to {out}", flush=True)
    return 0


if __name__ == "__main__":
    from mpitrain.runtime.abort import run_mpi

    sys.exit(run_mpi(main))
