"""Render the sbatch templates: validate every value, shell-quote everything that is data.

Templates use ``@@{name}`` placeholders (a :class:`string.Template` with delimiter ``@@``)
so the shell's own ``$`` syntax passes through untouched. No value may hold a control
character (newlines included). Values that land on ``#SBATCH`` lines must match strict
patterns in full (sbatch parses those lines itself, not the shell); values that land in shell
code go through :func:`shlex.quote`; training flags are parsed as the trainer will parse them
(with ``--script`` the train templates run the user's script instead, whose arguments are its
own: only their characters are checked). The one exception is ``env_setup``: shell code the
user writes, inserted verbatim in a marked block.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from mpitrain.errors import ConfigError, with_hint
from mpitrain.slurm.args import (
    MANAGED,
    SWEEP_MANAGED,
    bad_character,
    check_text,
    check_train_args,
)
from mpitrain.slurm.grid import MAX_ARRAY_SIZE, load_grid
from mpitrain.slurm.rank_loss import (
    NO_KILL,
    ON_RANK_LOSS,
    check_rank_loss_args,
    check_rank_loss_slot,
    launcher_for,
)

TEMPLATE_SUFFIX = ".sbatch"
LAUNCHERS = ("srun", "mpirun")
SRUN_MPI = ("pmi2", "pmix", "pmix_v3", "pmix_v4", "pmix_v5", "cray_shasta", "none")
REQUEUE = ("scontrol", "sbatch", "none")
#: Slurm's largest MaxArraySize
ARRAY_SIZE_LIMIT = 4_000_001

# every pattern is matched in full (fullmatch: a trailing newline does not pass)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_NAME_LIST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}(,[A-Za-z0-9][A-Za-z0-9_.+-]{0,127})*")
NO_ENV_SETUP = "# (none given: the job inherits the submitting shell's environment)"
# minutes | min:sec | h:min:sec | d-h | d-h:min | d-h:min:sec  (sbatch --time); ASCII digits
_TIME = re.compile(r"(?:([0-9]{1,5})-)?([0-9]{1,7})(?::([0-9]{1,2}))?(?::([0-9]{1,2}))?")
_LOG = re.compile(r"[A-Za-z0-9_.%+/-]{1,255}")
#: options whose values are plain text (shell-quoted), checked for control characters
_TEXT = ("python", "checkpoint_dir", "sweep_dir", "script")
#: options whose values must not start with '-' (they follow an option of srun/mpirun/the
#: trainer/python, which would read them as one of their own)
_NO_DASH = {"python": "srun/mpirun", "checkpoint_dir": "the trainer", "sweep_dir": "the trainer",
            "script": "python"}


class _Template(string.Template):
    delimiter = "@@"
    idpattern = r"[a-z_][a-z0-9_]*"
    flags = re.ASCII


@dataclass(frozen=True)
class RenderOptions:
    """Everything a template can be rendered with (defaults are the renderer's defaults)."""

    nodes: int = 1
    #: elastic: ``--nodes=MIN-NODES``; a requeued job may start on any count in the range
    min_nodes: int | None = None
    ntasks_per_node: int | None = None  # None: 1 on CPU templates, gpus_per_node on GPU ones
    gpus_per_node: int | None = None
    cpus_per_task: int = 1
    time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    job_name: str = "mpitrain"
    env_setup: str = ""
    #: None: srun, or mpirun with ``on_rank_loss="shrink"`` (ULFM needs Open MPI's mpirun)
    launcher: str | None = None
    srun_mpi: str = "pmi2"
    preempt_seconds: int = 120
    max_restarts: int = 3
    requeue: str = "scontrol"
    #: shrink: the survivors of a lost rank or node go on in the job (train templates)
    on_rank_loss: str = "abort"
    python: str = "python"
    log: str = "slurm-%x-%j.out"
    checkpoint_dir: str | None = None
    grid: Path | None = None
    sweep_dir: str | None = None
    array_parallel: int | None = None
    max_array_size: int = MAX_ARRAY_SIZE
    #: run ``python SCRIPT TRAIN_ARGS`` instead of ``python -m mpitrain`` (train templates)
    script: str | None = None
    train_args: list[str] = field(default_factory=list)


def template_dir() -> Path:
    """Return the directory of the packaged templates."""
    return Path(str(resources.files("mpitrain.slurm") / "templates"))


def list_templates() -> list[str]:
    """Return the names of the packaged templates."""
    return sorted(p.name for p in template_dir().glob("*" + TEMPLATE_SUFFIX))


def find_template(name: str) -> Path:
    """Return a packaged template by name (with or without .sbatch) or a template file path."""
    found = bad_character(name)
    if found is not None:
        raise ConfigError(with_hint(f"template name {name!r} has {found}", "remove it"))
    path = Path(name)
    if path.is_file() and (path.suffix == TEMPLATE_SUFFIX or "/" in name):
        return path
    base = name if name.endswith(TEMPLATE_SUFFIX) else name + TEMPLATE_SUFFIX
    packaged = template_dir() / base
    if "/" not in base and packaged.is_file():
        return packaged
    raise ConfigError(
        with_hint(f"no template '{name}'", f"pick one of {', '.join(list_templates())} or a file")
    )


def _bad(option: str, value: object, hint: str) -> ConfigError:
    return ConfigError(with_hint(f"--{option.replace('_', '-')} {value!r} is not valid", hint))


def _check_int(option: str, value: object, low: int, high: int = 1 << 20) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(option, value, f"give an integer from {low} to {high}")


def _elastic(opts: RenderOptions) -> bool:
    return opts.min_nodes is not None and opts.min_nodes != opts.nodes


def _tasks_directive(opts: RenderOptions) -> str:
    """``--ntasks-per-node``, except for a node range: there sbatch would fix the task count at
    MIN x K, and Slurm then never gives the job more than MIN nodes (seen: --nodes=2-4 with
    --ntasks-per-node=1 started on 2 of 4 idle nodes); srun starts the K ranks per node."""
    if not _elastic(opts):
        return f"#SBATCH --ntasks-per-node={opts.ntasks_per_node}"
    cpus = (opts.ntasks_per_node or 1) * opts.cpus_per_task
    return ("# elastic (--min-nodes): no --ntasks-per-node here (it would pin the job to the\n"
            "# fewest nodes of the range); srun starts RANKS_PER_NODE ranks on each node\n"
            f"#SBATCH --mincpus={cpus}")


def _check_time(value: str) -> None:
    m = _TIME.fullmatch(value)
    ok = m is not None
    if m is not None:
        days, first, second, third = m.groups()
        if days is not None:  # d-h, d-h:m, d-h:m:s
            parts = [first, second, third]
            ok = int(first) < 24 and all(p is None or int(p) < 60 for p in parts[1:])
        elif third is not None:  # h:m:s
            ok = int(second) < 60 and int(third) < 60
        elif second is not None:  # m:s
            ok = int(second) < 60
    if not ok:
        raise _bad(
            "time", value, "use MINUTES, HH:MM:SS or D-HH:MM:SS (sbatch --time), e.g. 02:00:00"
        )


def _check_text(option: str, value: object, *, code: bool = False) -> None:
    if not isinstance(value, str):
        raise _bad(option, value, "give a string")
    check_text(f"--{option.replace('_', '-')}", value, code=code)


def _check_train_words(words: object) -> list[str]:
    """Check that the training arguments are strings without control characters."""
    if not isinstance(words, list | tuple):
        raise ConfigError(with_hint(f"training arguments {words!r} are not a list", "fix it"))
    for i, word in enumerate(words):
        if not isinstance(word, str):
            raise ConfigError(
                with_hint(f"training argument {i} ({word!r}) is not a string", "pass strings")
            )
        after = f" (after {words[i - 1]!r})" if i and not word.startswith("-") else ""
        check_text(f"training argument{after}", word)
    return list(words)


def _check_strings(opts: RenderOptions) -> None:
    """Refuse a control character in any string option, before any pattern is tried."""
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if f.name == "env_setup":
            _check_text(f.name, value, code=True)
        elif f.type in ("str", "str | None") and value is not None:
            _check_text(f.name, value)
    _check_train_words(opts.train_args)


def validate(template: str, opts: RenderOptions) -> RenderOptions:
    """Check every option for ``template`` (a file name); return them with defaults filled.

    Raises:
        ConfigError: naming the option, the bad value and a fix.
    """
    gpu = "gpu" in template
    sweep = template.startswith("sweep")
    _check_strings(opts)
    for name in ("nodes", "cpus_per_task", "ntasks_per_node", "gpus_per_node", "array_parallel"):
        _check_int(name, getattr(opts, name), 1)
    if opts.min_nodes is not None:
        _check_int("min_nodes", opts.min_nodes, 1, opts.nodes if isinstance(opts.nodes, int)
                   and not isinstance(opts.nodes, bool) else 1)
    _check_int("preempt_seconds", opts.preempt_seconds, 0, 65535)
    _check_int("max_restarts", opts.max_restarts, 0, 1000)
    _check_int("max_array_size", opts.max_array_size, 1, ARRAY_SIZE_LIMIT)
    _check_time(opts.time)
    opts = dataclasses.replace(opts, launcher=launcher_for(opts.on_rank_loss, opts.launcher,
                                                           opts.script))
    if not _NAME.fullmatch(opts.job_name):
        raise _bad("job_name", opts.job_name, "use letters, digits and _ . + - (no spaces, quotes)")
    if opts.account is not None and not _NAME.fullmatch(opts.account):
        raise _bad("account", opts.account, "use letters, digits and _ . + -")
    if opts.partition is not None and not _NAME_LIST.fullmatch(opts.partition):
        raise _bad("partition", opts.partition, "use letters, digits and _ . + - (comma-separated)")
    if not _LOG.fullmatch(opts.log) or ".." in opts.log.split("/"):
        raise _bad("log", opts.log, "use letters, digits, _ . % + - and / (e.g. logs/%x-%j.out)")
    for name, choices in (("launcher", LAUNCHERS), ("srun_mpi", SRUN_MPI), ("requeue", REQUEUE),
                          ("on_rank_loss", ON_RANK_LOSS)):
        if getattr(opts, name) not in choices:
            raise _bad(name, getattr(opts, name), f"pick one of {', '.join(choices)}")
    for name in _TEXT:
        value = getattr(opts, name)
        if value is not None and not value:
            raise _bad(name, value, "give a non-empty value")
        if value is not None and value.startswith("-"):
            hint = f"{_NO_DASH[name]} would read it as an option: write ./{value}"
            raise _bad(name, value, hint)
    if opts.script is not None:  # the arguments are the script's own: checked for characters
        _check_script(opts.script)
    elif not template.startswith("preprocess"):  # preprocess runs data_tools, not the trainer
        given = check_train_args(opts.train_args, "training arguments",
                                 SWEEP_MANAGED if sweep else MANAGED)
        check_rank_loss_args(given, opts.on_rank_loss, "training arguments")
    if gpu:
        gpus = opts.gpus_per_node or 1
        tasks = opts.ntasks_per_node or gpus
        if tasks != gpus:
            raise ConfigError(
                with_hint(
                    f"--ntasks-per-node {tasks} differs from --gpus-per-node {gpus}",
                    "the GPU template runs one rank per GPU: give equal values (or omit one)",
                )
            )
        opts = dataclasses.replace(opts, gpus_per_node=gpus, ntasks_per_node=tasks)
    else:
        if opts.gpus_per_node is not None:
            raise _bad("gpus_per_node", opts.gpus_per_node, "use train-gpu.sbatch for GPU jobs")
        opts = dataclasses.replace(opts, ntasks_per_node=opts.ntasks_per_node or 1)
    if opts.min_nodes is not None and not template.startswith("train"):
        raise _bad("min_nodes", opts.min_nodes, "elastic node counts are for the train templates")
    if sweep and opts.grid is None:
        raise ConfigError(
            with_hint("sweep.sbatch needs a grid", "pass --grid FILE (.toml or .csv)")
        )
    if not sweep and (opts.grid is not None or opts.sweep_dir is not None):
        raise ConfigError(with_hint("--grid/--sweep-dir are for sweep.sbatch", "drop them"))
    return opts


def _check_script(script: str) -> None:
    """Refuse a ``--script`` that is neither a file nor a directory python can run."""
    path = Path(script)
    try:
        runnable = path.is_file() or (path / "__main__.py").is_file()
        exists = runnable or path.exists()
    except OSError:
        runnable = exists = False
    if not runnable:
        what = "is a directory without __main__.py" if exists else "does not exist"
        raise ConfigError(with_hint(
            f"--script {script!r} {what} (looked from {str(Path.cwd())!r})",
            "give the path of your training script (e.g. train.py), as seen from the "
            "directory you will submit the job from"))


def _check_script_slot(text: str, template: str, opts: RenderOptions) -> None:
    """Refuse ``--script`` for a template that runs its own program (it would be ignored)."""
    if opts.script is not None and "script" not in placeholders(text):
        raise ConfigError(with_hint(
            f"--script {opts.script!r} is not available with template '{template}': it runs "
            "its own program (python -m mpitrain over a grid, or data_tools)",
            "render train-cpu or train-gpu for your script, or drop --script"))


def _quote_words(words: list[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)


def _grid_cases(tasks: list[list[str]]) -> str:
    return "\n".join(f"    {i}) TASK_ARGS=({_quote_words(w)}) ;;" for i, w in enumerate(tasks))


def placeholders(text: str) -> set[str]:
    """Return the placeholder names a template uses."""
    return set(_Template(text).get_identifiers())


def render_text(text: str, template: str, opts: RenderOptions) -> str:
    """Render template source ``text`` (named ``template``) with validated options."""
    _check_script_slot(text, template, opts)
    check_rank_loss_slot(placeholders(text), template, opts.on_rank_loss)
    opts = validate(template, opts)
    shrink = opts.on_rank_loss == "shrink"
    directives = [f"#SBATCH --partition={opts.partition}"] if opts.partition else []
    directives += [f"#SBATCH --account={opts.account}"] if opts.account else []
    directives += [NO_KILL] if shrink else []
    tasks = load_grid(opts.grid, max_tasks=opts.max_array_size) if opts.grid is not None else []
    array = f"0-{len(tasks) - 1}" + (f"%{opts.array_parallel}" if opts.array_parallel else "")
    values = {
        "job_name": opts.job_name,
        "nodes": (f"{opts.min_nodes}-{opts.nodes}" if opts.min_nodes not in (None, opts.nodes)
                  else str(opts.nodes)),
        "ntasks_per_node": str(opts.ntasks_per_node),
        "tasks_directive": _tasks_directive(opts),
        "srun_extra": f" --ntasks-per-node={opts.ntasks_per_node}" if _elastic(opts) else "",
        "gpus_per_node": str(opts.gpus_per_node),
        "cpus_per_task": str(opts.cpus_per_task),
        "time": opts.time,
        "log": opts.log,
        "signal": f"B:USR1@{opts.preempt_seconds}",
        "directives": "\n".join(directives) or "# (no --partition / --account given)",
        "launcher": shlex.quote(opts.launcher or ""),
        "on_rank_loss": shlex.quote(opts.on_rank_loss),
        # shrink: empty, the job asks mpitrain for Open MPI's mpirun (make setup's)
        "mpirun": "" if shrink else "mpirun",
        "srun_mpi": shlex.quote(opts.srun_mpi),
        "requeue": shlex.quote(opts.requeue),
        "max_restarts": str(opts.max_restarts),
        "python": shlex.quote(opts.python),
        # a fixed expression (not user data) when no directory is given
        "checkpoint_dir": shlex.quote(opts.checkpoint_dir)
        if opts.checkpoint_dir
        else '"checkpoints/${SLURM_JOB_NAME}-${SLURM_JOB_ID}"',
        "sweep_dir": shlex.quote(opts.sweep_dir)
        if opts.sweep_dir
        else '"sweeps/${SLURM_JOB_NAME}-${SLURM_ARRAY_JOB_ID}"',
        "script": shlex.quote(opts.script or ""),
        "train_args": _quote_words(opts.train_args),
        "env_setup": opts.env_setup.rstrip("\n") or NO_ENV_SETUP,
        "grid_cases": _grid_cases(tasks),
        "array": array,
        "run_block": (template_dir() / "_run.sh").read_text(),
    }
    tpl = _Template(text)
    if not tpl.is_valid():
        raise ConfigError(with_hint(f"template '{template}': malformed @@ placeholder", "fix it"))
    unknown = placeholders(text) - set(values)
    if unknown:
        raise ConfigError(
            with_hint(f"template '{template}': unknown placeholders {sorted(unknown)}", "fix it")
        )
    return tpl.substitute({k: v for k, v in values.items() if k in placeholders(text)})


def render(template: str, opts: RenderOptions) -> str:
    """Render a packaged template (or a template file) and return the script text."""
    path = find_template(template)
    try:
        text = path.read_bytes().decode()
    except OSError as exc:
        raise ConfigError(
            with_hint(f"template {str(path)!r}: {exc.strerror or exc}", "check the path")
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(
            with_hint(f"template {str(path)!r} is not UTF-8 text", "pass an sbatch template")
        ) from None
    return render_text(text, path.name, opts)
