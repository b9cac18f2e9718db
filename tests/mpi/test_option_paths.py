"""Every option of ``--help`` x every training path is honoured or refused, none ignored (issue 22).

The scenario (tests/mpi/scenarios/option_reads.py) runs each path of its ``PATHS`` table for a
few steps with a traced configuration and reports which options the run read. Then, for every
option and path, the option is set to a valid non-default value on that path's command line:
either the path reads it (honoured), or the configuration refuses it the way the train command
resolves it before building anything (``parse_config``, the GPT's and the exchange mode's
defaults with ``grad.protocol.mode_options``) with a one-line error naming the option and a
HINT. An option that is neither is silently ignored: a violation. The refusals themselves are
``mpitrain.config_checks`` (``EFFECTS``, ``check_model_parallel``) and the modes' own option
checks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mpitrain.config import option_fields, option_type
from mpitrain.errors import ConfigError
from tests.conftest import MpiRun
from tests.mpi.scenarios.option_reads import PATHS, WORLD, path_argv

#: options the table does not hold to a path, and why (none today: every option is held)
NOT_PER_PATH: dict[str, str] = {}

#: values for options whose value needs care (the others come from the type, choices, default)
VALUES: dict[str, str] = {
    "train_split": "other",
    "test_split": "",
    "model": "cnn",
    "resume": "auto",
    "preempt_signals": "USR1",
    "timeline_steps": "1:2",
    "bucket_mb": "4",  # (0 is "auto", refused off the sync exchange by its own check)
    "sync_warmup_steps": "2",
}
#: options whose value is a path: one under the test's directory
PATH_OPTIONS = ("data", "run_dir", "summary_json", "checkpoint_dir", "tensorboard", "timeline",
                "sample_log")


def option_argv(name: str, work: Path) -> list[str]:
    """Return the flags that set option ``name`` to a valid value other than its default."""
    flag = "--" + name.replace("_", "-")
    field = option_fields()[name]
    default: Any = field.default
    typ = option_type(name)
    if name in PATH_OPTIONS:
        return [flag, str(work / f"other-{name}")]
    if name in VALUES:
        return [flag, VALUES[name]]
    if typ is bool:
        return [f"--no-{flag[2:]}" if default else flag]
    choices = field.metadata["choices"]
    if choices:
        return [flag, next(c for c in choices if c != default)]
    rng = field.metadata["accepted"]
    if rng is None:
        raise AssertionError(f"add a value for option {name!r} to VALUES")
    base = default or 0
    for candidate in (base * 2, base + 1, 2, 1, 0.5):
        value = typ(candidate)
        if value != default and value == candidate and rng.contains(value):
            return [flag, str(value)]
    raise AssertionError(f"add a value for option {name!r} to VALUES")


def configure(argv: list[str], ranks: int) -> None:
    """Resolve ``argv`` as the train command does before it builds anything (ConfigError).

    ``mpitrain.train.run.main``: ``parse_config`` (flags; no environment here), the GPT's
    defaults, then the exchange mode's (which refuses options of other modes).
    """
    from mpitrain.config import resolve
    from mpitrain.train import run

    cfg = resolve(vars(run.build_parser().parse_args(argv)), environ={})
    if cfg.model == "gpt":
        cfg = run.with_gpt_defaults(cfg, announce=False)
    run.with_mode_defaults(cfg, ranks, announce=False)


def refusal(argv: list[str], ranks: int) -> str | None:
    """Return the ConfigError that configuring ``argv`` raises (None: accepted)."""
    try:
        configure(argv, ranks)
    except ConfigError as exc:
        return str(exc)
    return None


def verdict(name: str, path: str, reads: set[str], work: Path) -> str | None:
    """Return None where ``name`` is honoured or refused properly on ``path``, else why not."""
    if name in reads:
        return None
    flags = option_argv(name, work)
    message = refusal([*path_argv(path, work), *flags], PATHS[path][0])
    if message is None:
        return f"{' '.join(flags)}: accepted but never read (silently ignored)"
    flag = "--" + name.replace("_", "-")
    if "\n" in message or ". HINT: " not in message or (flag not in message
                                                         and name not in message):
        return f"{' '.join(flags)}: refused without one line naming {flag} and a HINT: {message}"
    return None


@pytest.mark.mpi
@pytest.mark.timeout(600)
def test_every_option_is_honoured_or_refused_on_every_path(mpirun: MpiRun, tmp_path: Path) -> None:
    out = tmp_path / "reads.json"
    mpirun(WORLD, ["option_reads.py", str(out)], timeout=480)
    table: dict[str, list[str]] = json.loads(out.read_text())
    assert sorted(table) == sorted(PATHS)
    # the tracer tells paths apart: another mode's option is read on its own path only
    assert "local_steps" in table["local-sgd"] and "local_steps" not in table["sync"]
    assert "max_staleness" in table["param-server"] and "context" in table["gpt-tensor"]
    options = [n for n in option_fields() if n not in NOT_PER_PATH]
    assert set(NOT_PER_PATH) <= set(option_fields()), "NOT_PER_PATH names a removed option"
    violations = []
    for path, read in table.items():
        for name in options:
            why = verdict(name, path, set(read), tmp_path / "values")
            if why is not None:
                violations.append(f"{name:<28} {path:<17} {why}")
    assert not violations, (
        f"{len(violations)} option x path cells neither honoured nor refused:\n"
        + "\n".join(violations))


# ---- the refusals, serially (no MPI) ----------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--keep-last", "5"], "--keep-last has no effect without --checkpoint-dir"),
        (["--straggler", "random"], "--straggler has no effect without --straggler-ms"),
        (["--step-every", "5"], "--step-every has no effect with --lr-schedule cosine"),
        (["--test-split", "", "--eval-every", "2"], "--eval-every has no effect with --test-split"),
        (["--optimizer", "adam", "--momentum", "0.5"], "--momentum has no effect with --optimizer "
                                                       "adam"),
        (["--model", "gpt", "--nesterov"], "--optimizer adamw (--model gpt's default)"),
        (["--exchange", "local-sgd", "--bucket-mb", "4"], "--bucket-mb has no effect with "
                                                          "--exchange local-sgd"),
        (["--exchange", "param-server", "--allreduce", "flat"], "--allreduce has no effect"),
        (["--exchange", "param-server", "--sync-warmup-steps", "3"],
         "--sync-warmup-steps has no effect with --exchange param-server --max-staleness 0"),
        (["--device", "cpu", "--cuda-aware", "yes"], "--cuda-aware has no effect with --device "
                                                     "cpu"),
        (["--device", "cpu", "--allow-shared-gpu"], "--allow-shared-gpu has no effect"),
        (["--exchange", "param-server", "--cuda-aware", "no"], "stages device buffers"),
    ],
)
def test_option_without_effect_is_refused(argv: list[str], says: str) -> None:
    message = refusal(argv, 2)
    assert message is not None and says in message and ". HINT: " in message, message


@pytest.mark.parametrize(
    "argv",
    [
        ["--keep-last", "5", "--checkpoint-dir", "ck"],
        ["--straggler", "random", "--straggler-ms", "5"],
        ["--step-every", "5", "--lr-schedule", "step"],
        ["--model", "gpt", "--optimizer", "sgd", "--momentum", "0.5", "--nesterov"],
        ["--exchange", "param-server", "--max-staleness", "2", "--sync-warmup-steps", "3"],
        ["--shard", "parameters", "--bucket-mb", "4"],
        ["--cuda-aware", "yes", "--allow-shared-gpu"],  # --device auto: decided at binding
        ["--optimizer", "adam"],  # --momentum unset: its default is never refused
        ["--model", "gpt", "--tensor-parallel", "2", "--exchange", "local-sgd"],
    ],
)
def test_option_with_effect_is_accepted(argv: list[str]) -> None:
    assert refusal(argv, 2) is None


def test_device_options_refused_without_cuda() -> None:
    from mpitrain.config import resolve
    from mpitrain.config_checks import check_device_options

    cfg = resolve({"cuda_aware": "yes", "allow_shared_gpu": True}, environ={})
    with pytest.raises(ConfigError, match=r"--cuda-aware and --allow-shared-gpu have no effect: "
                                          r"this run has no CUDA device.*HINT"):
        check_device_options(cfg, "cpu")
    check_device_options(cfg, "cuda")
    check_device_options(resolve({}, environ={}), "cpu")
