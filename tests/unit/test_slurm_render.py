"""Slurm renderer: golden files, strict validation, quoting (no command injection) and the
batch script's run/requeue logic executed by bash against stub srun/scontrol/sbatch."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpitrain.errors import ConfigError
from mpitrain.slurm import cli
from mpitrain.slurm.grid import load_grid
from mpitrain.slurm.render import RenderOptions, list_templates, placeholders, render, template_dir

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "slurm" / "golden"
PWNED = "/tmp/mpitrain-pwned"

#: golden file -> renderer argv (run with --regen to rewrite the files after a deliberate change)
# fmt: off
CASES: dict[str, list[str]] = {
    "train-cpu.sbatch": [
        "train-cpu", "--nodes", "2", "--ntasks-per-node", "2", "--cpus-per-task", "4",
        "--time", "02:00:00", "--partition", "cpu", "--account", "proj-1", "--job-name", "demo",
        "--env-setup", "module load python/3.11\nsource ~/venv/bin/activate",
        "--", "--epochs", "30", "--summary-json", "out/summary.json",
    ],
    "train-gpu.sbatch": [
        "train-gpu", "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "8",
        "--time", "1-00:00:00", "--partition", "gpu", "--job-name", "big",
        "--srun-mpi", "pmix", "--preempt-seconds", "300", "--max-restarts", "5",
        "--checkpoint-dir", "/scratch/me/ckpt run", "--env-setup", "module load cuda/12.4",
        "--", "--model", "cnn", "--batch-size", "128",
    ],
    "sweep.sbatch": [
        "sweep", "--grid", "tests/slurm/golden/grid.toml", "--ntasks-per-node", "2",
        "--time", "30", "--job-name", "sw", "--sweep-dir", "sweeps/lr", "--array-parallel", "2",
        "--", "--epochs", "5", "--no-progress",
    ],
    "preprocess.sbatch": [
        "preprocess", "--ntasks-per-node", "4", "--launcher", "mpirun", "--job-name", "prep",
        "--time", "10:00", "--", "--sklearn", "digits", "--out", "data/digits",
    ],
    # the survivors of a lost rank or node go on in the job (Open MPI's mpirun --with-ft ulfm,
    # #SBATCH --no-kill); a requeue (--min-ranks, preemption) may start on 2 to 4 nodes
    "train-cpu-shrink.sbatch": [
        "train-cpu", "--nodes", "4", "--min-nodes", "2", "--ntasks-per-node", "2",
        "--time", "12:00:00", "--job-name", "ft", "--on-rank-loss", "shrink",
        "--env-setup", "source ~/venvs/mpitrain/bin/activate",
        "--", "--epochs", "30", "--global-batch", "96", "--min-ranks", "4",
        "--checkpoint-every", "200",
    ],
    # a user's Lightning script instead of python -m mpitrain (docs/lightning.md)
    "train-gpu-script.sbatch": [
        "train-gpu", "--nodes", "2", "--gpus-per-node", "4", "--time", "04:00:00",
        "--job-name", "lit", "--checkpoint-dir", "runs/lit", "--script",
        "tests/slurm/lightning_job.py", "--", "--max-epochs", "30", "--shard", "parameters",
    ],
}
# fmt: on


def render_argv(argv: list[str], out: Path) -> None:
    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        assert cli.main(["render", argv[0], "--output", str(out), *argv[1:]]) == 0
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str, tmp_path: Path) -> None:
    out = tmp_path / name
    render_argv(CASES[name], out)
    expected = (GOLDEN / name).read_text()
    assert out.read_text() == expected, (
        f"differs from {GOLDEN / name}; regenerate with "
        f"`python {Path(__file__).relative_to(ROOT)} --regen` if intended"
    )
    assert os.access(out, os.X_OK)


def test_every_template_has_a_golden_case_and_renders_completely() -> None:
    templates = {argv[0] + ".sbatch" for argv in CASES.values()}
    assert sorted(templates) == list_templates()
    for name in CASES:
        assert "@@" not in (GOLDEN / name).read_text()
    for name in templates:
        assert placeholders((template_dir() / name).read_text())
        # the symlinked copies in slurm/ are the packaged templates
        assert (ROOT / "slurm" / name).resolve() == (template_dir() / name).resolve()


def test_bash_syntax_of_rendered_scripts() -> None:
    for name in CASES:
        proc = subprocess.run(["bash", "-n", str(GOLDEN / name)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("job_name", 'x"; touch /tmp/pwned; "'),
        ("job_name", "a\nb"),
        ("job_name", "two words"),
        ("job_name", "$(id)"),
        ("partition", "gpu;id"),
        ("account", "a`id`"),
        ("log", "logs/a b.out"),
        ("log", "x\n#SBATCH --uid=0"),
        ("time", "2h"),
        ("time", "1:60"),
        ("time", "1-25:00:00"),
        ("time", "01:00:00\nid"),
        ("nodes", 0),
        ("cpus_per_task", -1),
        ("preempt_seconds", 70000),
        ("max_restarts", -1),
        ("launcher", "ssh"),
        ("srun_mpi", "pmi2; id"),
        ("python", "py\nid"),
        ("checkpoint_dir", ""),
        ("env_setup", "module load x\x00"),
    ],
)
def test_rejects_bad_values(option: str, value: object) -> None:
    opts = RenderOptions(**{option: value})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="HINT"):
        render("train-cpu", opts)


@pytest.mark.parametrize(
    "value", ["30", "30:00", "02:00:00", "100:00:00", "1-12", "1-12:30", "2-00:00:00"]
)
def test_accepts_slurm_time_formats(value: str) -> None:
    assert f"#SBATCH --time={value}\n" in render("train-cpu", RenderOptions(time=value))


def test_rejects_inconsistent_requests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train-gpu"):
        render("train-cpu", RenderOptions(gpus_per_node=2))
    with pytest.raises(ConfigError, match="one rank per GPU"):
        render("train-gpu", RenderOptions(gpus_per_node=4, ntasks_per_node=2))
    with pytest.raises(ConfigError, match="--checkpoint-dir"):
        render("train-cpu", RenderOptions(train_args=["--checkpoint-dir=/x"]))
    with pytest.raises(ConfigError, match="--resume"):
        render("train-cpu", RenderOptions(train_args=["--resume", "auto"]))
    with pytest.raises(ConfigError, match="--resum"):
        render("train-cpu", RenderOptions(train_args=["--resum", "auto"]))
    with pytest.raises(ConfigError, match="--run-dir"):
        render("sweep", RenderOptions(grid=GOLDEN / "grid.toml", train_args=["--run-dir", "x"]))
    with pytest.raises(ConfigError, match="needs a grid"):
        render("sweep", RenderOptions())
    with pytest.raises(ConfigError, match="control character"):
        render("train-cpu", RenderOptions(train_args=["--run-dir", "a\nb"]))
    with pytest.raises(ConfigError, match="no template"):
        render("nope", RenderOptions())
    assert cli.main(["render", "train-cpu", "--job-name", "a b"]) == 2


def test_train_parser_matches_the_trainers_parser() -> None:
    from mpitrain.slurm.args import train_parser
    from mpitrain.train.run import build_parser

    def options(p: argparse.ArgumentParser) -> set[str]:
        return {s for a in p._actions for s in a.option_strings}

    real, ours = build_parser(), train_parser()
    assert options(ours) == options(real) and ours.allow_abbrev == real.allow_abbrev


def test_train_args_accepted_as_the_trainer_reads_them() -> None:
    words = ["--config", "run.toml", "--epochs=3", "--no-progress", "--lr", "0.1",
             "--model", "cnn", "--hidd", "32"]
    text = render("train-cpu", RenderOptions(train_args=words))
    want = "--config run.toml --epochs=3 --no-progress --lr 0.1 --model cnn --hidd 32"
    assert f"TRAIN_ARGS=({want})" in text
    # preprocess runs data_tools, whose flags the trainer's parser does not know
    render("preprocess", RenderOptions(train_args=["--sklearn", "digits", "--resume", "--"]))


def test_output_must_not_overwrite_the_grid_or_template(tmp_path: Path) -> None:
    grid = tmp_path / "g.toml"
    grid.write_text("[grid]\nlr = [0.1]\n")
    assert cli.main(["render", "sweep", "--grid", str(grid), "-o", str(grid)]) == 2
    assert grid.read_text() == "[grid]\nlr = [0.1]\n"
    tpl = tmp_path / "mine.sbatch"
    tpl.write_text((template_dir() / "train-cpu.sbatch").read_text())
    assert cli.main(["render", str(tpl), "-o", str(tpl)]) == 2
    assert tpl.read_text() == (template_dir() / "train-cpu.sbatch").read_text()


def test_unreadable_template_file_is_a_config_error(tmp_path: Path) -> None:
    tpl = tmp_path / "bin.sbatch"
    tpl.write_bytes(b"#!/bin/bash\n\xff\xfe\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        render(str(tpl), RenderOptions())


def test_gpu_defaults_one_rank_per_gpu() -> None:
    text = render("train-gpu", RenderOptions(gpus_per_node=4))
    assert "#SBATCH --ntasks-per-node=4\n" in text and "#SBATCH --gpus-per-node=4\n" in text


# ---- grids ----


def test_grid_toml_product_then_runs() -> None:
    tasks = load_grid(GOLDEN / "grid.toml")
    assert tasks == [
        ["--lr", "0.1", "--seed", "1"],
        ["--lr", "0.1", "--seed", "2"],
        ["--lr", "0.05", "--seed", "1"],
        ["--lr", "0.05", "--seed", "2"],
        ["--lr", "0.02", "--seed", "3", "--optimizer", "adam", "--no-scale-lr"],
    ]
    text = render("sweep", RenderOptions(grid=GOLDEN / "grid.toml"))
    assert "#SBATCH --array=0-4\n" in text


def test_grid_csv_and_errors(tmp_path: Path) -> None:
    csv_file = tmp_path / "g.csv"
    csv_file.write_text("lr,batch_size,data,nesterov\n0.1,32,a b,true\n0.2,64,$(id),no\n")
    assert load_grid(csv_file) == [
        ["--lr", "0.1", "--batch-size", "32", "--data", "a b", "--nesterov"],
        ["--lr", "0.2", "--batch-size", "64", "--data", "$(id)", "--no-nesterov"],
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("lr,seed\n0.1\n")
    with pytest.raises(ConfigError, match="columns"):
        load_grid(bad)
    for text, match in [
        ('[grid]\n"lr;id" = [1]\n', "not valid"),
        ("[grid]\nrun_dir = ['x']\n", "set by the sweep"),
        ("[other]\nx = 1\n", r"\[grid\]"),
        ("[grid]\nlr = [{a = 1}]\n", "dict"),
        ("[grid]\nlr = []\n", "'lr' is an empty list"),
        ("[grid]\n", "no runs"),
    ]:
        f = tmp_path / "g.toml"
        f.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_grid(f)


def test_grid_values_that_start_with_a_dash_stay_values(tmp_path: Path) -> None:
    from mpitrain.slurm.args import train_parser

    f = tmp_path / "g.toml"
    f.write_text("[grid]\ndata = ['--resume']\ntest_split = ['-x', 'y']\n")
    assert load_grid(f) == [["--data=--resume", "--test-split=-x"], ["--data=--resume",
                            "--test-split", "y"]]  # fmt: skip
    ns = train_parser().parse_args(load_grid(f)[0])
    assert (ns.data, ns.test_split) == ("--resume", "-x")


# ---- the rendered script run by bash against stubs (no Slurm needed) ----

STUB = """#!/bin/bash
printf '%s\\0' "$@" > "$STUB_DIR/$(basename "$0").argv"
env > "$STUB_DIR/$(basename "$0").env"
if [ "$(basename "$0")" = srun ] && [ -n "${STUB_WAIT_SIGNAL:-}" ]; then
    trap 'echo USR1 > "$STUB_DIR/srun.signal"; exit 99' USR1
    touch "$STUB_DIR/ready"
    while :; do sleep 0.05; done
fi
case "$(basename "$0")" in
    srun) exit "${STUB_RC:-0}" ;;
    scontrol) exit "${STUB_SCONTROL_RC:-0}" ;;
    *) exit 0 ;;
esac
"""

NASTY = ["--run-dir", 'r\'un; touch /tmp/mpitrain-pwned; "$(touch /tmp/mpitrain-pwned)" `id` *']


def run_script(tmp_path: Path, *, wait_signal: bool = False, **env: str) -> tuple[int, Path]:
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name in ("srun", "scontrol", "sbatch", "mpirun"):
        (stubs / name).write_text(STUB)
        (stubs / name).chmod(0o755)
    script = tmp_path / "job.sbatch"
    render_argv(
        [
            "train-cpu",
            "--python",
            "/opt/my python/bin/python3",
            "--checkpoint-dir",
            "ck $(touch /tmp/mpitrain-pwned)",
            "--job-name",
            "t",
            "--",
            *NASTY,
        ],
        script,
    )
    child_env = {
        "PATH": f"{stubs}:/usr/bin:/bin",
        "STUB_DIR": str(tmp_path),
        "SLURM_JOB_ID": "7",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "n1",
        "SLURM_CPUS_PER_TASK": "3",
        **env,
    }
    if wait_signal:
        child_env["STUB_WAIT_SIGNAL"] = "1"
    proc = subprocess.Popen(
        ["bash", str(script)],
        env=child_env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if wait_signal:
        deadline = time.monotonic() + 10
        while not (tmp_path / "ready").exists():
            assert time.monotonic() < deadline, "stub srun never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=20)
    (tmp_path / "script.out").write_text(out)
    return proc.returncode, tmp_path


def argv_of(d: Path, name: str) -> list[str]:
    return (d / f"{name}.argv").read_text().split("\0")[:-1]


def test_script_passes_values_verbatim_and_runs_nothing_injected(tmp_path: Path) -> None:
    Path(PWNED).unlink(missing_ok=True)
    rc, d = run_script(tmp_path)
    assert rc == 0, (d / "script.out").read_text()
    assert argv_of(d, "srun") == [
        "--mpi=pmi2",
        "--kill-on-bad-exit=1",
        "/opt/my python/bin/python3",
        "-m",
        "mpitrain",
        *NASTY,
        "--checkpoint-dir",
        "ck $(touch /tmp/mpitrain-pwned)",
    ]
    assert not Path(PWNED).exists()
    assert not (d / "scontrol.argv").exists()
    env = (d / "srun.env").read_text().splitlines()
    assert "OMP_NUM_THREADS=3" in env


def test_preempted_run_requeues_once_then_resumes(tmp_path: Path) -> None:
    rc, d = run_script(tmp_path, STUB_RC="99")
    assert rc == 0
    assert argv_of(d, "scontrol") == ["requeue", "7"]
    assert "--resume" not in argv_of(d, "srun")
    (tmp_path / "again").mkdir()
    rc, d = run_script(tmp_path / "again", SLURM_RESTART_COUNT="1")
    assert rc == 0
    assert argv_of(d, "srun")[-2:] == ["--resume", "auto"]


def test_no_requeue_after_crash_or_at_max_restarts(tmp_path: Path) -> None:
    rc, d = run_script(tmp_path, STUB_RC="1")
    assert rc == 1 and not (d / "scontrol.argv").exists()
    (tmp_path / "b").mkdir()
    rc, d = run_script(tmp_path / "b", STUB_RC="99", SLURM_RESTART_COUNT="3")
    assert rc == 99 and not (d / "scontrol.argv").exists()
    (tmp_path / "c").mkdir()
    rc, d = run_script(tmp_path / "c", SLURM_RESTART_COUNT="4")
    assert rc == 1 and not (d / "srun.argv").exists()


# (variable, value): each must stop the job before the launch, never requeue it
MALFORMED_COUNTERS = [
    ("MPITRAIN_MAX_RESTARTS", "abc"),
    ("MPITRAIN_MAX_RESTARTS", "-1"),
    ("MPITRAIN_MAX_RESTARTS", "1.5"),
    ("MPITRAIN_MAX_RESTARTS", " 3"),
    ("MPITRAIN_MAX_RESTARTS", "3 "),
    ("MPITRAIN_MAX_RESTARTS", ""),
    ("MPITRAIN_MAX_RESTARTS", "0x10"),
    ("MPITRAIN_MAX_RESTARTS", "1001"),
    ("MPITRAIN_MAX_RESTARTS", "99999999999999999999"),
    ("MPITRAIN_MAX_RESTARTS", "3\n"),
    ("SLURM_RESTART_COUNT", "abc"),
    ("SLURM_RESTART_COUNT", "-1"),
    ("SLURM_RESTART_COUNT", "1 2"),
    ("SLURM_RESTART_COUNT", ""),
    ("SLURM_RESTART_COUNT", "99999999999999999999"),
    ("SLURM_RESTART_COUNT", "18446744073709551615"),
    ("MPITRAIN_CONTINUATION", "x[$(touch /tmp/mpitrain-pwned)]"),
    ("MPITRAIN_CONTINUATION", "+1"),
    ("MPITRAIN_CONTINUATION", "\t"),
    ("MPITRAIN_CONTINUATION", "1e3"),
    ("MPITRAIN_CONTINUATION", "-9223372036854775808"),
]


@pytest.mark.parametrize(("var", "value"), MALFORMED_COUNTERS)
def test_malformed_restart_counters_stop_and_never_requeue(
    tmp_path: Path, var: str, value: str
) -> None:
    Path(PWNED).unlink(missing_ok=True)
    rc, d = run_script(tmp_path, STUB_RC="99", STUB_SCONTROL_RC="1", **{var: value})
    out = (d / "script.out").read_text()
    assert rc == 2, out
    line = next(x for x in out.splitlines() if var in x)
    shown = "".join("?" if ord(c) < 32 else c for c in value)  # one line, controls as '?'
    assert "HINT: " in line and f"{var}='{shown}'" in line, out
    for cmd in ("srun", "scontrol", "sbatch"):
        assert not (d / f"{cmd}.argv").exists(), (cmd, out)
    assert not Path(PWNED).exists()


def test_counters_with_leading_zeros_are_decimal(tmp_path: Path) -> None:
    rc, d = run_script(
        tmp_path, STUB_RC="99", STUB_SCONTROL_RC="1",
        MPITRAIN_CONTINUATION="08", SLURM_RESTART_COUNT="01", MPITRAIN_MAX_RESTARTS="010",
    )  # fmt: skip
    out = (d / "script.out").read_text()
    assert rc == 0, out
    assert "restart 9 " in out and argv_of(d, "srun")[-2:] == ["--resume", "auto"]
    assert "MPITRAIN_CONTINUATION=10" in (d / "sbatch.env").read_text().splitlines()


@pytest.mark.parametrize("template", ["train-gpu", "sweep"])
def test_every_training_template_checks_the_counters(tmp_path: Path, template: str) -> None:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("srun", "scontrol", "sbatch"):
        (stubs / name).write_text(STUB)
        (stubs / name).chmod(0o755)
    script = tmp_path / "job.sbatch"
    extra = ["--grid", str(GOLDEN / "grid.toml")] if template == "sweep" else []
    render_argv([template, *extra], script)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "STUB_DIR": str(tmp_path), "SLURM_JOB_ID": "9",
           "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_ARRAY_TASK_ID": "0",
           "SLURM_JOB_NAME": "j", "SLURM_ARRAY_JOB_ID": "9", "STUB_RC": "99"}  # fmt: skip
    for var, value in [("MPITRAIN_MAX_RESTARTS", ""), ("MPITRAIN_CONTINUATION", "two")]:
        proc = subprocess.run(["bash", str(script)], env={**env, var: value}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=20)  # fmt: skip
        assert proc.returncode == 2 and var in proc.stderr, proc.stdout + proc.stderr
        assert not (tmp_path / "srun.argv").exists() and not (tmp_path / "scontrol.argv").exists()


def test_continuation_job_when_scontrol_fails(tmp_path: Path) -> None:
    rc, d = run_script(tmp_path, STUB_RC="99", STUB_SCONTROL_RC="1")
    assert rc == 0
    args = argv_of(d, "sbatch")
    assert "--dependency=afterany:7" in args and args[-1].endswith("job.sbatch")
    env = (d / "sbatch.env").read_text().splitlines()
    assert "MPITRAIN_CONTINUATION=1" in env
    assert "MPITRAIN_CHECKPOINT_DIR=ck $(touch /tmp/mpitrain-pwned)" in env


def test_continuation_counts_restarts_once(tmp_path: Path) -> None:
    # a requeued job (SLURM_RESTART_COUNT=1) whose scontrol fails: the continuation carries
    # the total in MPITRAIN_CONTINUATION and must not inherit the old restart count as well
    rc, d = run_script(tmp_path, STUB_RC="99", STUB_SCONTROL_RC="1", SLURM_RESTART_COUNT="1")
    assert rc == 0, (d / "script.out").read_text()
    env = (d / "sbatch.env").read_text().splitlines()
    assert "MPITRAIN_CONTINUATION=2" in env
    assert not [line for line in env if line.startswith("SLURM_RESTART_COUNT=")]


def test_trap_forwards_usr1_to_the_step_and_requeues(tmp_path: Path) -> None:
    rc, d = run_script(tmp_path, wait_signal=True)
    assert (d / "srun.signal").read_text().strip() == "USR1"
    assert rc == 0, (d / "script.out").read_text()
    assert argv_of(d, "scontrol") == ["requeue", "7"]


def test_sweep_script_picks_its_grid_row(tmp_path: Path) -> None:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("srun", "scontrol"):
        (stubs / name).write_text(STUB)
        (stubs / name).chmod(0o755)
    script = tmp_path / "sweep.sbatch"
    render_argv(["sweep", "--grid", str(GOLDEN / "grid.toml"), "--sweep-dir", "sw dir",
                 "--", "--epochs", "1"], script)  # fmt: skip
    base = {"PATH": f"{stubs}:/usr/bin:/bin", "STUB_DIR": str(tmp_path), "SLURM_JOB_ID": "9",
            "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"}  # fmt: skip
    ok = subprocess.run(["bash", str(script)], env={**base, "SLURM_ARRAY_TASK_ID": "4"},
                        cwd=tmp_path, capture_output=True, text=True, timeout=20)  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    run_dir = "sw dir/task-4"
    assert argv_of(tmp_path, "srun")[5:] == [
        "--epochs", "1", "--lr", "0.02", "--seed", "3", "--optimizer", "adam", "--no-scale-lr",
        "--run-dir", run_dir, "--summary-json", f"{run_dir}/summary.json",
        "--checkpoint-dir", f"{run_dir}/checkpoints",
    ]  # fmt: skip
    assert (tmp_path / run_dir).is_dir()
    bad = subprocess.run(["bash", str(script)], env={**base, "SLURM_ARRAY_TASK_ID": "5"},
                         cwd=tmp_path, capture_output=True, text=True, timeout=20)  # fmt: skip
    assert bad.returncode == 2 and "no grid row 5" in bad.stderr


if __name__ == "__main__" and "--regen" in sys.argv:
    for golden_name, argv in CASES.items():
        render_argv(argv, GOLDEN / golden_name)
        (GOLDEN / golden_name).chmod(0o644)
        print("wrote", GOLDEN / golden_name)


def test_elastic_node_range_leaves_the_task_count_to_srun(tmp_path: Path) -> None:
    """--min-nodes: #SBATCH --nodes=MIN-MAX without --ntasks-per-node (which would pin the job
    to MIN nodes: sbatch sets ntasks = MIN x K), CPUs per node kept with --mincpus, and srun /
    mpirun start K ranks on every node the job got."""
    out = tmp_path / "elastic.sbatch"
    render_argv(["train-cpu", "--nodes", "4", "--min-nodes", "2", "--ntasks-per-node", "2",
                 "--cpus-per-task", "3", "--", "--global-batch", "96"], out)
    text = out.read_text()
    assert "#SBATCH --nodes=2-4\n" in text
    assert "#SBATCH --ntasks-per-node" not in text
    assert "#SBATCH --mincpus=6\n" in text
    assert "SRUN_EXTRA=( --ntasks-per-node=2)\nRANKS_PER_NODE=2\n" in text
    assert subprocess.run(["bash", "-n", str(out)], capture_output=True).returncode == 0
    same = tmp_path / "same.sbatch"  # MIN == MAX is a plain fixed count
    render_argv(["train-cpu", "--nodes", "2", "--min-nodes", "2"], same)
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n" in same.read_text()
    with pytest.raises(ConfigError, match=r"--min-nodes 3 .*HINT: give an integer from 1 to 2"):
        render("train-cpu", RenderOptions(nodes=2, min_nodes=3))
    with pytest.raises(ConfigError, match="elastic node counts are for the train templates"):
        render("sweep", RenderOptions(nodes=2, min_nodes=1, grid=GOLDEN / "grid.toml"))
