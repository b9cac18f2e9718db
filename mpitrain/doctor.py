"""`python -m mpitrain doctor`: what every rank sees, and what is wrong with it.

Run it alone or under ``mpiexec -n N`` / ``srun``. Each rank collects its facts (versions,
MPI library and thread level, node layout, CUDA devices, h5py, Slurm variables, writable
directories); rank 0 prints one report, optionally writes it as JSON, and the command exits
1 when a problem was found (Slurm world mismatch, ranks with different versions, a directory
that cannot be written), else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpitrain.errors import MpitrainError, with_hint
from mpitrain.runtime import env
from mpitrain.runtime.ulfm import LAUNCH_HINT, shrink_unavailable

if TYPE_CHECKING:
    from mpi4py import MPI

#: facts that must be equal on every rank
SAME_EVERYWHERE = ("python", "torch", "mpi4py", "mpi_library", "h5py")


def writable(path: Path) -> str:
    """Return "ok" when a file can be created in ``path`` (created if missing), else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-") as fh:
            fh.write(b"x")
            fh.flush()
        return "ok"
    except OSError as exc:
        return f"NOT WRITABLE ({exc.strerror or exc})"


def _h5py() -> tuple[str, str]:
    try:
        import h5py
    except ImportError:
        return "not installed", "n/a"
    return str(h5py.__version__), "yes" if h5py.get_config().mpi else "no (serial HDF5)"


def _slurm_check(world_size: int) -> str | None:
    """Return the Slurm world-size problem, or None."""
    from mpitrain.slurm.world import check_slurm_world

    try:
        check_slurm_world(world_size)
    except MpitrainError as exc:
        return str(exc)
    return None


def local_facts(comm: MPI.Intracomm) -> dict[str, Any]:
    """Return this rank's facts (no communication)."""
    import mpi4py
    import torch
    from mpi4py import MPI

    from mpitrain.train.builtin import cache_root

    levels = {
        MPI.THREAD_SINGLE: "SINGLE",
        MPI.THREAD_FUNNELED: "FUNNELED",
        MPI.THREAD_SERIALIZED: "SERIALIZED",
        MPI.THREAD_MULTIPLE: "MULTIPLE",
    }
    h5_version, h5_mpi = _h5py()
    cuda = bool(torch.cuda.is_available())
    devices = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    )
    cache = cache_root()
    tmp = Path(tempfile.gettempdir())
    return {
        "rank": comm.Get_rank(),
        "pid": os.getpid(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "mpi4py": str(mpi4py.__version__),
        "mpi_library": " ".join(MPI.Get_library_version().splitlines()[0].split()),
        "mpi_standard": "{}.{}".format(*MPI.Get_version()),
        "thread_level": levels.get(MPI.Query_thread(), str(MPI.Query_thread())),
        "shrink": shrink_unavailable() or "available",
        "cuda_devices": devices,
        "cuda_visible_devices": env.get("cuda_visible_devices"),
        "h5py": h5_version,
        "h5py_mpi": h5_mpi,
        "slurm": env.snapshot(("SLURM_",)),
        "slurm_problem": _slurm_check(comm.Get_size()),
        "tmp_dir": str(tmp),
        "tmp_writable": writable(tmp),
        "cache_dir": str(cache),
        "cache_writable": writable(cache),
    }


def cuda_aware_line(comm: MPI.Intracomm, have_cuda: bool) -> str:
    """Collective: the CUDA-aware MPI decision, or why there is none."""
    from mpi4py import MPI

    if not comm.allreduce(have_cuda, op=MPI.LAND):
        return "no CUDA device" + (
            "" if not comm.allreduce(have_cuda, op=MPI.LOR) else " on some ranks"
        )
    try:
        from mpitrain.runtime.cuda_aware import decide_cuda_aware
        from mpitrain.runtime.device import bind_device
        from mpitrain.runtime.world import World
    except ImportError:
        return "not available (mpitrain.runtime.cuda_aware missing)"
    try:
        world = World.create(comm)
        device = bind_device(world, "auto", set_current=True)
        return decide_cuda_aware(world.comm, device, "auto").describe()
    except MpitrainError as exc:
        return f"not decided: {exc}"


def problems(facts: list[dict[str, Any]]) -> list[str]:
    """Return every problem found in the ranks' facts (pure function)."""
    out: list[str] = []
    for key in SAME_EVERYWHERE:
        values = {f[key] for f in facts}
        if len(values) > 1:
            per = ", ".join(f"rank {f['rank']}: {f[key]}" for f in facts)
            out.append(with_hint(f"ranks disagree on {key} ({per})", "use one environment"))
    for f in facts:
        if f.get("slurm_problem"):
            out.append(f["slurm_problem"])
            break  # the same on every rank
    for f in facts:
        for kind in ("tmp", "cache"):
            if f[f"{kind}_writable"] != "ok":
                out.append(
                    with_hint(
                        f"rank {f['rank']} on {f['host']}: {kind} dir {f[f'{kind}_dir']} "
                        f"{f[f'{kind}_writable']}",
                        "set TMPDIR" if kind == "tmp" else "set MPITRAIN_CACHE to a writable dir",
                    )
                )
    return out


def cuda_facts(comm: MPI.Intracomm) -> list[str]:
    """Return what the MPI library and the environment say about CUDA support (no communication)."""
    try:
        from mpitrain.runtime.cuda_aware import facts_lines
    except ImportError:
        return []
    try:
        lines = facts_lines(comm)
    except Exception as exc:  # a query that fails must not stop the report
        return [f"CUDA queries failed: {type(exc).__name__}: {exc}"]
    return [ln for ln in lines if not ln.startswith("MPI library:")]  # printed already


def render(
    facts: list[dict[str, Any]],
    cuda_aware: str,
    found: list[str],
    cuda_notes: list[str] | None = None,
) -> str:
    """Return the readable report printed by rank 0."""
    f0 = facts[0]
    lines = [
        "mpitrain doctor",
        f"  python {f0['python']}  torch {f0['torch']}  mpi4py {f0['mpi4py']}",
        f"  MPI library: {f0['mpi_library']} (MPI {f0['mpi_standard']})",
        f"  thread level: {f0['thread_level']}"
        + ("" if f0["thread_level"] == "MULTIPLE" else "  (MULTIPLE recommended: watchdog/loader)"),
        f"  h5py {f0['h5py']}, parallel HDF5: {f0['h5py_mpi']}",
        "  --on-rank-loss shrink: " + ((f0.get("shrink") == "available" and "available (ULFM)")
                                       or f"not in this launch: {f0.get('shrink')}; {LAUNCH_HINT}"),
        f"  world: {len(facts)} ranks on {len({f['host'] for f in facts})} node(s)",
        f"  cuda-aware MPI: {cuda_aware}",
        *[f"    {line}" for line in cuda_notes or []],
        f"  tmp dir: {f0['tmp_dir']} ({f0['tmp_writable']})  cache dir: {f0['cache_dir']}"
        f" ({f0['cache_writable']})",
    ]
    slurm = f0["slurm"]
    if slurm:
        keys = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_PROCID")
        shown = "  ".join(f"{k}={slurm[k]}" for k in keys if k in slurm)
        lines.append(f"  Slurm: {len(slurm)} SLURM_* variables; {shown}")
        try:  # rank 0 formats the report alone: a bad value is shown, never raised here
            ntasks = env.get_int("slurm_ntasks", environ=slurm, minimum=1)
        except MpitrainError as exc:
            lines.append(f"  note: {exc}")
            ntasks = None
        if ntasks is not None and ntasks != len(facts) and not f0.get("slurm_problem"):
            lines.append(
                f"  note: SLURM_NTASKS={ntasks} differs from the MPI world size {len(facts)}; "
                "not an error when an mpirun/mpiexec (not srun) started the ranks"
            )
    else:
        lines.append("  Slurm: not inside a Slurm job")
    lines.append(f"  {'rank':>4}  {'host':<20} {'node':>4} {'local':>7} {'pid':>8}  cuda devices")
    for f in facts:
        cuda = ", ".join(f["cuda_devices"]) or "none"
        if f["cuda_visible_devices"] is not None:
            cuda += f" (CUDA_VISIBLE_DEVICES={f['cuda_visible_devices']})"
        local = f"{f['local_rank']}/{f['local_size']}"
        host = f["host"][:20]
        lines.append(
            f"  {f['rank']:>4}  {host:<20} {f['node']:>4} {local:>7} {f['pid']:>8}  {cuda}"
        )
    if found:
        lines += ["PROBLEMS:"] + [f"  - {p}" for p in found]
    else:
        lines.append("OK: no problems found")
    return "\n".join(lines) + "\n"


def grid_lines(
    facts: list[dict[str, Any]], tensor: int, pipeline: int, found: list[str]
) -> list[str]:
    """The model-parallel grid's placement of these ranks (a problem when it does not fit)."""
    from mpitrain.errors import ConfigError
    from mpitrain.parallel.grid import placement

    try:
        table = placement([int(f["node"]) for f in facts], tensor, pipeline)
    except ConfigError as exc:
        found.append(f"grid: {exc}")
        return []
    groups: dict[tuple[int, int], set[int]] = {}
    for f, c in zip(facts, table, strict=True):
        groups.setdefault((c.pp, c.dp), set()).add(int(f["node"]))
    inside = all(len(nodes) == 1 for nodes in groups.values())
    data = len(facts) // (tensor * pipeline)
    out = [f"grid: tensor {tensor} x pipeline {pipeline} x data {data}; tensor groups "
           f"{'inside nodes' if inside else 'ACROSS nodes (slow: give each node >= T ranks)'}\n"]
    out += [f"  rank {r} on {f['host']}: tensor {c.tp}, stage {c.pp}, replica {c.dp}\n"
            for r, (f, c) in enumerate(zip(facts, table, strict=True))]
    return out


def main(argv: list[str], comm: MPI.Intracomm) -> int:
    """Collective: gather every rank's facts, print the report on rank 0; 1 when problems."""
    from mpitrain.runtime.collective import agree
    from mpitrain.runtime.files import write_atomic, write_failure
    from mpitrain.runtime.tool_io import check_output_file
    from mpitrain.runtime.world import World

    parser = argparse.ArgumentParser(prog="python -m mpitrain doctor", description=__doc__)
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="T",
                        help="show where a tensor x pipeline grid would place the ranks")
    parser.add_argument("--pipeline-stages", type=int, default=1, metavar="P")
    args = parser.parse_args(argv)
    if args.json is not None:  # rank 0 writes it after the work: refuse an unusable place now
        agree(comm, lambda: check_output_file(args.json, "--json", example="doctor.json")
              if comm.Get_rank() == 0 else None)
    world = World.create(comm)
    mine = local_facts(world.comm)
    mine.update(
        host=world.hostname,
        node=world.node_index,
        local_rank=world.local_rank,
        local_size=world.local_size,
    )
    cuda_aware = cuda_aware_line(world.comm, bool(mine["cuda_devices"]))
    facts: list[dict[str, Any]] | None = world.comm.gather(mine, root=0)
    found: list[str] = []
    failure: str | None = None
    if facts is not None:
        found = problems(facts)
        grid = grid_lines(facts, args.tensor_parallel, args.pipeline_stages, found)
        notes = cuda_facts(world.comm)
        sys.stdout.write(render(facts, cuda_aware, found, notes) + "".join(grid))
        sys.stdout.flush()
        if args.json is not None:
            report = {
                "ranks": facts,
                "cuda_aware": cuda_aware,
                "cuda_facts": notes,
                "problems": found,
                "grid": grid,
            }
            try:
                write_atomic(args.json, (json.dumps(report, indent=2) + "\n").encode())
            except OSError as exc:
                failure = write_failure(args.json, exc, None)
    bad, failure = world.comm.bcast((bool(found), failure), root=0)
    if failure is not None:
        raise MpitrainError(failure)
    return 1 if bad else 0
