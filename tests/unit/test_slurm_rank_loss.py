"""`slurm render train-cpu|train-gpu --on-rank-loss shrink`: what the script asks Slurm for and
how it launches (Open MPI's mpirun --with-ft ulfm, --on-rank-loss shrink, SLURM_NO_KILL), run by
bash against stub mpirun/srun/scontrol (the golden file is in test_slurm_render.py; the
refusals in test_bad_input_slurm.py; a real job in tests/slurm/test_rank_loss.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mpitrain.config import TrainConfig
from mpitrain.config_checks import check_rank_loss
from mpitrain.errors import ConfigError
from mpitrain.slurm.render import RenderOptions, render
from tests.unit.test_slurm_render import argv_of, render_argv

#: records its arguments and environment; answers --version as Open MPI's mpirun (or, with
#: STUB_FLAVOR=hydra, as MPICH's), exits STUB_RC; writes MPITRAIN_DONE_FILE as a finished
#: training does (not with STUB_LOST: Open MPI ending the job on a lost daemon, status 0)
STUB = """#!/bin/bash
if [ "${1:-}" = --version ]; then
    case "${STUB_FLAVOR:-openmpi}" in
        openmpi) echo "mpirun (Open MPI) 5.0.11" ;;
        *) echo "HYDRA build details:" ;;
    esac
    exit 0
fi
printf '%s\\0' "$@" > "$STUB_DIR/$(basename "$0").argv"
env > "$STUB_DIR/$(basename "$0").env"
if [ -n "${MPITRAIN_DONE_FILE:-}" ] && [ "${STUB_RC:-0}" = 0 ] && [ -z "${STUB_LOST:-}" ]; then
    mkdir -p "$(dirname "$MPITRAIN_DONE_FILE")" && : > "$MPITRAIN_DONE_FILE"  # training done
fi
case "$(basename "$0")" in
    mpirun | srun) exit "${STUB_RC:-0}" ;;
    *) exit 0 ;;
esac
"""
#: stands in for --python: asked for Open MPI's mpirun (-c ...find_ulfm_mpirun), prints STUB_FOUND
PYTHON = """#!/bin/bash
if [ "${1:-}" = -c ]; then echo "${STUB_FOUND:-}"; exit 0; fi
exit 3
"""
TRAIN = ["--epochs", "2", "--min-ranks", "3", "--run-dir", "r $(x)"]


def run_job(tmp_path: Path, *extra: str, **env: str) -> tuple[int, str]:
    """Render train-cpu --on-rank-loss shrink (4 ranks) and run it under the stubs."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name in ("mpirun", "srun", "scontrol", "sbatch"):
        (stubs / name).write_text(STUB)
        (stubs / name).chmod(0o755)
    python = tmp_path / "py thon"
    python.write_text(PYTHON)
    python.chmod(0o755)
    job = tmp_path / "job.sbatch"
    render_argv(["train-cpu", "--on-rank-loss", "shrink", "--ntasks-per-node", "4",
                 "--python", str(python), "--checkpoint-dir", "ck", *extra, "--", *TRAIN], job)
    child = {"PATH": f"{stubs}:/usr/bin:/bin", "STUB_DIR": str(tmp_path),
             "STUB_FOUND": str(stubs / "mpirun"), "SLURM_JOB_ID": "7", "SLURM_NTASKS": "4",
             "SLURM_JOB_NODELIST": "n[1-2]", **env}
    proc = subprocess.run(["bash", str(job)], env=child, cwd=tmp_path, capture_output=True,
                          text=True, timeout=20)
    return proc.returncode, proc.stdout + proc.stderr


def test_shrink_renders_mpirun_no_kill_and_the_flag() -> None:
    """Shrink: #SBATCH --no-kill, mpirun by default, MPITRAIN_MPIRUN left to the job, on both
    train templates; abort (the default) keeps srun and no --no-kill."""
    for template, opts in [("train-cpu", RenderOptions(on_rank_loss="shrink")),
                           ("train-gpu", RenderOptions(on_rank_loss="shrink", gpus_per_node=4)),
                           ("train-cpu", RenderOptions(on_rank_loss="shrink",
                                                       launcher="mpirun"))]:
        text = render(template, opts)
        assert "\n#SBATCH --no-kill\n" in text and "\nON_RANK_LOSS=shrink\n" in text
        assert "\nMPITRAIN_LAUNCHER=${MPITRAIN_LAUNCHER:-mpirun}\n" in text
        assert "\nMPITRAIN_MPIRUN=${MPITRAIN_MPIRUN:-}\n" in text
        assert "#SBATCH --requeue\n" in text  # preemption and requeue stay
    text = render("train-cpu", RenderOptions())
    assert "--no-kill\n" not in text and "\nON_RANK_LOSS=abort\n" in text
    assert "\nMPITRAIN_LAUNCHER=${MPITRAIN_LAUNCHER:-srun}\n" in text
    assert "\nMPITRAIN_MPIRUN=${MPITRAIN_MPIRUN:-mpirun}\n" in text


@pytest.mark.parametrize("exchange", ["sync", "local-sgd", "param-server"])
def test_render_agrees_with_the_trainers_check(exchange: str) -> None:
    """The renderer refuses exactly what the trainer's --on-rank-loss check refuses (the
    template always sets --checkpoint-dir); --min-ranks is accepted with shrink."""
    cfg = TrainConfig().replace(exchange=exchange, checkpoint_dir="ck")
    try:
        check_rank_loss(cfg.replace(on_rank_loss="shrink"))
        trainer_ok = True
    except ConfigError:
        trainer_ok = False
    opts = RenderOptions(on_rank_loss="shrink",
                         train_args=["--exchange", exchange, "--min-ranks", "2"])
    if trainer_ok:
        render("train-cpu", opts)
    else:
        with pytest.raises(ConfigError, match=r"^training arguments: .*HINT"):
            render("train-cpu", opts)
    # a --config file is read in the job: not checked here
    render("train-cpu", RenderOptions(on_rank_loss="shrink", train_args=["--config", "x.toml"]))


def test_job_launches_open_mpi_with_ulfm_and_passes_shrink(tmp_path: Path) -> None:
    """mpirun found by python (make setup's), --with-ft ulfm on ob1 without binding, -n from
    Slurm, --on-rank-loss shrink after the user's flags, SLURM_NO_KILL=set for mpirun's srun."""
    rc, out = run_job(tmp_path)
    assert rc == 0, out
    assert argv_of(tmp_path, "mpirun") == [
        "--with-ft", "ulfm", "--mca", "pml", "ob1", "--mca", "async_mpi_finalize", "1",
        "--bind-to", "none", "-n", "4",
        str(tmp_path / "py thon"), "-m", "mpitrain", *TRAIN, "--checkpoint-dir", "ck",
        "--on-rank-loss", "shrink"]
    assert "SLURM_NO_KILL=set" in (tmp_path / "mpirun.env").read_text().splitlines()
    assert not (tmp_path / "srun.argv").exists() and not (tmp_path / "scontrol.argv").exists()


def test_exit_99_requeues_and_the_requeued_job_resumes(tmp_path: Path) -> None:
    """Below --min-ranks (or preempted) the ranks exit 99: requeued as before; the next
    incarnation (all its nodes again) resumes with --resume auto, still shrinking."""
    rc, out = run_job(tmp_path, STUB_RC="99")
    assert rc == 0, out
    assert argv_of(tmp_path, "scontrol") == ["requeue", "7"]
    again = tmp_path / "again"
    again.mkdir()
    rc, out = run_job(again, SLURM_RESTART_COUNT="1",
                      MPITRAIN_MPIRUN=str(tmp_path / "stubs" / "mpirun"))
    assert rc == 0, out
    assert argv_of(again, "mpirun")[-5:] == ["ck", "--on-rank-loss", "shrink", "--resume", "auto"]


@pytest.mark.parametrize(("env", "needle"), [
    ({"MPITRAIN_LAUNCHER": "srun"}, "needs MPITRAIN_LAUNCHER=mpirun, not 'srun'"),
    ({"STUB_FOUND": ""}, "none found by "),
    ({"STUB_FLAVOR": "hydra"}, "Open MPI's mpirun (ULFM); MPITRAIN_MPIRUN="),
    ({"MPITRAIN_MPIRUN": "/no/such/mpirun"}, "MPITRAIN_MPIRUN='/no/such/mpirun' is not one"),
], ids=["srun-launcher", "no-open-mpi", "mpich-mpirun", "missing-mpirun"])
def test_launch_that_cannot_shrink_stops_before_running(
        tmp_path: Path, env: dict[str, str], needle: str) -> None:
    """What the environment changes at submit time is checked in the job: status 2, one line
    with a HINT, nothing launched or requeued."""
    if env.get("STUB_FLAVOR") == "hydra":
        env = {**env, "MPITRAIN_MPIRUN": str(tmp_path / "stubs" / "mpirun")}
    rc, out = run_job(tmp_path, STUB_RC="99", **env)
    assert rc == 2, out
    line = next(x for x in out.splitlines() if needle in x)
    assert line.startswith("mpitrain: --on-rank-loss shrink needs ") and "HINT: " in line, out
    for cmd in ("mpirun", "srun", "scontrol", "sbatch"):
        assert not (tmp_path / f"{cmd}.argv").exists(), (cmd, out)


def test_status_0_without_a_finished_training_is_requeued(tmp_path: Path) -> None:
    """Open MPI (PRRTE 3.0) ends the whole job with status 0 when a node's daemon is lost: no
    done file from rank 0, so the script requeues it (as preempted) instead of reporting a
    finished job; a finished one writes it and is not requeued."""
    rc, out = run_job(tmp_path, STUB_LOST="1")
    assert rc == 0, out
    assert "status 0 but training did not finish" in out, out
    assert argv_of(tmp_path, "scontrol") == ["requeue", "7"]
    assert "MPITRAIN_DONE_FILE=ck/.done-7-0.json" in (tmp_path / "mpirun.env").read_text()
    done = tmp_path / "done"
    done.mkdir()
    rc, out = run_job(done)
    assert rc == 0 and "did not finish" not in out, out
    assert not (done / "scontrol.argv").exists()
