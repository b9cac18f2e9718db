"""`slurm render train-cpu|train-gpu --script FILE -- ARGS`: the rendered job runs the user's
script (e.g. a Lightning script under MPIStrategy) instead of python -m mpitrain, run by bash
against stub srun/scontrol/sbatch (the golden file is in test_slurm_render.py)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from mpitrain.errors import ConfigError
from mpitrain.slurm.render import RenderOptions, render
from tests.unit.test_slurm_render import PWNED, STUB, argv_of, render_argv

ROOT = Path(__file__).resolve().parents[2]
JOB = "tests/slurm/lightning_job.py"  # relative to ROOT, where render_argv renders
#: the script's own arguments: no trainer flags, '--' and the managed names allowed, hostile text
ARGS = ["--max-epochs", "3", "--checkpoint-dir", "x", "--resume", "--", "$(touch /tmp/"
        "mpitrain-pwned)"]

#: srun that waits for USR1, then leaves what STUB_HPC says in MPITRAIN_CHECKPOINT_DIR and
#: exits like a rank ended by srun --kill-on-bad-exit while the others exited 99
SIGNALLED = """#!/bin/bash
printf '%s\\0' "$@" > "$STUB_DIR/$(basename "$0").argv"
env > "$STUB_DIR/$(basename "$0").env"
[ "$(basename "$0")" = srun ] || exit "${STUB_SCONTROL_RC:-0}"
on_usr1() {
    case "$STUB_HPC" in
        file) touch "$MPITRAIN_CHECKPOINT_DIR/hpc_ckpt_2.ckpt" ;;
        sharded) mkdir -p "$MPITRAIN_CHECKPOINT_DIR/hpc_ckpt_2.ckpt"
                 touch "$MPITRAIN_CHECKPOINT_DIR/hpc_ckpt_2.ckpt/lightning.pt" ;;
        unfinished) mkdir -p "$MPITRAIN_CHECKPOINT_DIR/hpc_ckpt_2.ckpt" ;;
    esac
    exit 143
}
trap on_usr1 USR1
touch "$STUB_DIR/ready"
while :; do sleep 0.05; done
"""


def run_job(tmp_path: Path, *, stub: str = STUB, signal_it: bool = False, script: str = JOB,
            **env: str) -> tuple[int, str]:
    """Render train-cpu --script, run it with bash under the stubs; return (status, output)."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name in ("srun", "scontrol", "sbatch", "mpirun"):
        (stubs / name).write_text(stub)
        (stubs / name).chmod(0o755)
    ckpt = tmp_path / "ck $(touch /tmp/mpitrain-pwned)"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "hpc_ckpt_1.ckpt").touch()  # an older one: the rule looks for a newer name
    job = tmp_path / "job.sbatch"
    render_argv(["train-cpu", "--ntasks-per-node", "2", "--job-name", "lit", "--script", script,
                 "--checkpoint-dir", str(ckpt), "--", *ARGS], job)
    (tmp_path / Path(JOB).parent).mkdir(parents=True, exist_ok=True)
    (tmp_path / JOB).touch()  # the job runs in tmp_path: the script is there too
    child_env = {"PATH": f"{stubs}:/usr/bin:/bin", "STUB_DIR": str(tmp_path),
                 "SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1", **env}
    proc = subprocess.Popen(["bash", str(job)], env=child_env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if signal_it:
        deadline = time.monotonic() + 10
        while not (tmp_path / "ready").exists():
            assert time.monotonic() < deadline, "stub srun never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=20)
    return proc.returncode, out


def test_runs_the_script_with_its_own_arguments_then_requeues(tmp_path: Path) -> None:
    """python SCRIPT ARGS (verbatim, no --checkpoint-dir/--resume added), the directory in
    MPITRAIN_CHECKPOINT_DIR; exit 99 requeues, and the requeued run is started the same way."""
    Path(PWNED).unlink(missing_ok=True)
    rc, out = run_job(tmp_path, STUB_RC="99")
    assert rc == 0, out
    assert argv_of(tmp_path, "srun") == ["--mpi=pmi2", "--kill-on-bad-exit=1", "python", JOB,
                                         *ARGS]
    env = (tmp_path / "srun.env").read_text().splitlines()
    assert f"MPITRAIN_CHECKPOINT_DIR={tmp_path}/ck $(touch /tmp/mpitrain-pwned)" in env
    assert argv_of(tmp_path, "scontrol") == ["requeue", "7"]
    (tmp_path / "again").mkdir()
    rc, out = run_job(tmp_path / "again", SLURM_RESTART_COUNT="1")
    assert rc == 0, out
    assert argv_of(tmp_path / "again", "srun")[3:] == [JOB, *ARGS]  # it resumes by itself
    assert not Path(PWNED).exists()


def test_crash_is_not_requeued_and_the_restart_limit_holds(tmp_path: Path) -> None:
    rc, _ = run_job(tmp_path, STUB_RC="1")
    assert rc == 1 and not (tmp_path / "scontrol.argv").exists()
    (tmp_path / "b").mkdir()
    rc, out = run_job(tmp_path / "b", STUB_RC="99", SLURM_RESTART_COUNT="3")
    assert rc == 99 and "not requeueing" in out and not (tmp_path / "b/scontrol.argv").exists()


@pytest.mark.parametrize(("left", "requeued"),
                         [("file", True), ("sharded", True), ("unfinished", False), ("", False)])
def test_status_143_after_signal_counts_as_preempted_with_a_new_hpc_checkpoint(
        tmp_path: Path, left: str, requeued: bool) -> None:
    """srun reports 143 (a rank ended while the others exited 99): requeued only when a newer
    finished hpc_ckpt_N.ckpt (a file, or a ZeRO directory with lightning.pt) appeared."""
    rc, out = run_job(tmp_path, stub=SIGNALLED, signal_it=True, STUB_HPC=left)
    if requeued:
        assert rc == 0 and "treating it as preempted (99)" in out, out
        assert argv_of(tmp_path, "scontrol") == ["requeue", "7"]
    else:
        assert rc == 143 and "treating it as preempted" not in out, out
        assert not (tmp_path / "scontrol.argv").exists()


def test_script_missing_in_the_job_stops_before_the_launch(tmp_path: Path) -> None:
    """Rendered from one directory, submitted from another that lacks the (relative) script:
    status 2 with the reason and a hint; nothing launched, nothing requeued."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("srun", "scontrol"):
        (stubs / name).write_text(STUB)
        (stubs / name).chmod(0o755)
    job = tmp_path / "job.sbatch"
    render_argv(["train-cpu", "--script", JOB], job)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "STUB_DIR": str(tmp_path), "SLURM_JOB_ID": "8",
           "SLURM_JOB_NAME": "j", "SLURM_JOB_NODELIST": "n1"}
    proc = subprocess.run(["bash", str(job)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=20)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"--script '{JOB}' is not a file seen from {tmp_path}" in proc.stderr
    assert "HINT: " in proc.stderr
    assert not (tmp_path / "srun.argv").exists() and not (tmp_path / "scontrol.argv").exists()


def test_gpu_template_and_script_arguments_are_not_trainer_flags() -> None:
    """The GPU template takes --script too; the words after -- are the script's, so trainer
    checks (unknown flags, --resume, a bare --) do not apply, only the character checks."""
    text = render("train-gpu", RenderOptions(gpus_per_node=2, script=str(ROOT / JOB),
                                             train_args=["--max-epochs", "2", "--", "x y"]))
    assert f"SCRIPT={ROOT / JOB}\n" in text and "TRAIN_ARGS=(--max-epochs 2 -- 'x y')" in text
    assert "SRUN_EXTRA=(--gpus-per-node=2)" in text
    without = render("train-gpu", RenderOptions(gpus_per_node=2))
    assert "SCRIPT=''\n" in without
    with pytest.raises(ConfigError, match="control character"):
        render("train-cpu", RenderOptions(script=str(ROOT / JOB), train_args=["a\x85"]))
