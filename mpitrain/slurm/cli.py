"""`python -m mpitrain slurm render TEMPLATE [options] [--script FILE] -- ARGS...` and
`slurm list`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mpitrain.errors import ConfigError, with_hint
from mpitrain.runtime.files import write_atomic
from mpitrain.runtime.tool_io import check_output_file
from mpitrain.slurm.rank_loss import ON_RANK_LOSS
from mpitrain.slurm.render import (
    LAUNCHERS,
    REQUEUE,
    SRUN_MPI,
    RenderOptions,
    find_template,
    list_templates,
    render,
)

EPILOG = """\
Everything after `--` is passed to the program the template runs (training flags, or
data_tools convert flags for preprocess.sbatch, or with --script the script's own
arguments); each word is shell-quoted.
Examples:
  python -m mpitrain slurm render train-gpu --nodes 2 --gpus-per-node 4 --time 02:00:00 \\
      --partition gpu --env-setup 'module load cuda; source ~/venv/bin/activate' \\
      --output job.sbatch -- --epochs 30 --summary-json out/summary.json
  python -m mpitrain slurm render train-gpu --nodes 2 --gpus-per-node 4 --script train.py \\
      --output job.sbatch -- --max-epochs 30     # your Lightning script under MPIStrategy
  python -m mpitrain slurm render train-cpu --nodes 4 --ntasks-per-node 8 \\
      --on-rank-loss shrink --output job.sbatch -- --epochs 30 --min-ranks 16
"""


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the slurm command."""
    parser = argparse.ArgumentParser(prog="python -m mpitrain slurm")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list the packaged templates")
    r = sub.add_parser(
        "render",
        help="render a template into a ready sbatch script",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = RenderOptions()
    r.add_argument("template", help=f"one of {', '.join(list_templates())}, or a template file")
    r.add_argument("--nodes", type=int, default=d.nodes, help="nodes (the most, with --min-nodes)")
    r.add_argument("--min-nodes", type=int, help="elastic: accept from this many to --nodes "
                   "nodes (#SBATCH --nodes=MIN-MAX; see slurm/README.md)")
    r.add_argument("--ntasks-per-node", type=int, help="ranks per node (GPU: = --gpus-per-node)")
    r.add_argument("--gpus-per-node", type=int, help="GPUs per node (train-gpu: one rank each)")
    r.add_argument(
        "--cpus-per-task", type=int, default=d.cpus_per_task, help="also OMP_NUM_THREADS"
    )
    r.add_argument("--time", default=d.time, help="wall time: MINUTES, HH:MM:SS or D-HH:MM:SS")
    r.add_argument("--partition")
    r.add_argument("--account")
    r.add_argument("--job-name", default=d.job_name)
    r.add_argument(
        "--env-setup", default=d.env_setup, help="shell code run first (module loads...)"
    )
    r.add_argument("--launcher", choices=LAUNCHERS, default=d.launcher,
                   help="default: srun (mpirun with --on-rank-loss shrink)")
    r.add_argument("--srun-mpi", choices=SRUN_MPI, default=d.srun_mpi, help="srun --mpi= plugin")
    r.add_argument(
        "--preempt-seconds",
        type=int,
        default=d.preempt_seconds,
        help="USR1 this long before the time limit (--signal=B:USR1@N)",
    )
    r.add_argument("--max-restarts", type=int, default=d.max_restarts)
    r.add_argument(
        "--requeue",
        choices=REQUEUE,
        default=d.requeue,
        help="after preemption: scontrol requeue, or a dependent sbatch job",
    )
    r.add_argument(
        "--on-rank-loss",
        choices=ON_RANK_LOSS,
        default=d.on_rank_loss,
        help="train templates: shrink = the survivors of a lost rank or node go on in the job "
        "(Open MPI's mpirun --with-ft ulfm, #SBATCH --no-kill; slurm/README.md)",
    )
    r.add_argument("--python", default=d.python, help="python executable inside the job")
    r.add_argument("--log", default=d.log, help="sbatch --output pattern")
    r.add_argument("--checkpoint-dir", help="default: checkpoints/JOBNAME-JOBID (with "
                   "--script: exported as MPITRAIN_CHECKPOINT_DIR)")
    r.add_argument("--script", help="train templates: run `python SCRIPT ARGS` on every rank "
                   "instead of python -m mpitrain (e.g. a Lightning script under MPIStrategy; "
                   "docs/lightning.md)")
    r.add_argument("--grid", type=Path, help="sweep: TOML or CSV grid, one array task per run")
    r.add_argument("--sweep-dir", help="sweep: parent of the task-N run directories")
    r.add_argument("--array-parallel", type=int, help="sweep: at most this many tasks at once")
    r.add_argument(
        "--max-array-size",
        type=int,
        default=d.max_array_size,
        help="sweep: refuse grids with more runs (Slurm's MaxArraySize; default %(default)s)",
    )
    r.add_argument("--output", "-o", type=Path, help="write the script here (default: stdout)")
    return parser


def _check_output(output: Path | None, template: str, grid: Path | None) -> None:
    """Refuse an --output that is one of the command's own inputs (it would be replaced)."""
    if output is None:
        return
    inputs = [p for p in (grid, find_template(template)) if p is not None]
    for path in inputs:
        try:
            same = output.exists() and os.path.samefile(output, path)
        except OSError:
            same = False
        if same:
            raise ConfigError(
                with_hint(
                    f"--output {str(output)!r} is the input {str(path)!r}: "
                    "writing would replace it",
                    "write the script to another file",
                )
            )


def main(argv: list[str]) -> int:
    """Run the slurm command; returns the exit code."""
    args = list(argv)
    train_args: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, train_args = args[:cut], args[cut + 1 :]
    ns = build_parser().parse_args(args)
    if ns.action == "list":
        for name in list_templates():
            print(name)
        return 0
    opts = RenderOptions(
        nodes=ns.nodes,
        min_nodes=ns.min_nodes,
        ntasks_per_node=ns.ntasks_per_node,
        gpus_per_node=ns.gpus_per_node,
        cpus_per_task=ns.cpus_per_task,
        time=ns.time,
        partition=ns.partition,
        account=ns.account,
        job_name=ns.job_name,
        env_setup=ns.env_setup,
        launcher=ns.launcher,
        srun_mpi=ns.srun_mpi,
        preempt_seconds=ns.preempt_seconds,
        max_restarts=ns.max_restarts,
        requeue=ns.requeue,
        on_rank_loss=ns.on_rank_loss,
        python=ns.python,
        log=ns.log,
        checkpoint_dir=ns.checkpoint_dir,
        grid=ns.grid,
        sweep_dir=ns.sweep_dir,
        array_parallel=ns.array_parallel,
        max_array_size=ns.max_array_size,
        script=ns.script,
        train_args=train_args,
    )
    try:
        if ns.output is not None:
            check_output_file(ns.output, "--output", example="job.sbatch")
        text = render(ns.template, opts)
        _check_output(ns.output, ns.template, ns.grid)
    except ConfigError as exc:
        sys.stderr.write(f"mpitrain slurm: error: {exc}\n")
        return exc.exit_code
    if ns.output is None:
        sys.stdout.write(text)
    else:
        try:
            write_atomic(ns.output, text.encode())
            os.chmod(ns.output, 0o755)
        except OSError as exc:
            sys.stderr.write(f"mpitrain slurm: error: cannot write '{ns.output}': {exc}\n")
            return 1
        sys.stderr.write(f"mpitrain slurm: wrote {ns.output} (submit: sbatch {ns.output})\n")
    return 0
