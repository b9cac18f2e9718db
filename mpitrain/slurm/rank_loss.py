"""The ``--on-rank-loss shrink`` variant of the train templates (issue 25, item 6).

``abort`` (the default) is today's job: a dead rank ends the step and the job, and a requeue
resumes from the last checkpoint. ``shrink`` lets the survivors go on inside the job
(:mod:`mpitrain.runtime.ulfm`), which needs three things from the script: Open MPI's
``mpirun --with-ft ulfm`` started inside the allocation (ULFM does not work when ``srun``
starts the ranks) on the ob1 messaging layer (``--mca pml ob1``: ULFM does not cover UCX);
``#SBATCH --no-kill``, so Slurm keeps the allocation when a node fails; and
``SLURM_NO_KILL``, so the ``srun`` through which mpirun starts its daemons on the other nodes
is not ended with the failed node (``--no-kill`` does not set it). The launch itself is in
``templates/_run.sh``; this module holds what the renderer refuses and adds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mpitrain.config import TrainConfig, coerce, valid_keys
from mpitrain.config_checks import check_rank_loss
from mpitrain.errors import ConfigError, with_hint

#: what the job does when a rank dies (the trainer's --on-rank-loss)
ON_RANK_LOSS = ("abort", "shrink")
#: the #SBATCH lines shrink adds (after --partition/--account)
NO_KILL = ("# --on-rank-loss shrink: a failed node does not end the job; the survivors go on\n"
           "#SBATCH --no-kill")


def launcher_for(on_rank_loss: str, launcher: str | None, script: str | None) -> str:
    """Return the launcher to render (None given: srun, or mpirun for shrink).

    Raises:
        ConfigError: shrink with ``--launcher srun`` or with ``--script``.
    """
    if on_rank_loss != "shrink":
        return launcher or "srun"
    if launcher == "srun":
        raise ConfigError(with_hint(
            "--on-rank-loss shrink cannot use --launcher srun: ULFM does not work when srun "
            "starts the ranks", "drop --launcher (shrink launches Open MPI's mpirun --with-ft "
            "ulfm inside the allocation)"))
    if script is not None:
        raise ConfigError(with_hint(
            f"--on-rank-loss shrink is not available with --script {script!r}: only "
            "python -m mpitrain goes on without a lost rank", "drop --on-rank-loss (a lost rank "
            "ends the job and a requeue resumes it), or train with python -m mpitrain"))
    return launcher or "mpirun"


def check_rank_loss_slot(names: set[str], template: str, on_rank_loss: str) -> None:
    """Refuse shrink for a template without an ``@@{on_rank_loss}`` placeholder (``names``):
    it would be ignored."""
    if on_rank_loss == "shrink" and "on_rank_loss" not in names:
        raise ConfigError(with_hint(
            f"--on-rank-loss {on_rank_loss} is not available with template '{template}': it is "
            "for the train templates", "render train-cpu or train-gpu, or drop --on-rank-loss"))


def check_rank_loss_args(given: Mapping[str, Any], on_rank_loss: str, where: str) -> None:
    """Refuse training flags that the rendered ``--on-rank-loss`` cannot run with.

    ``--min-ranks`` needs shrink; with shrink the trainer's own check runs on the flags alone
    (the template sets ``--checkpoint-dir``), skipped with ``--config`` (read in the job).

    Args:
        given: the flags as :func:`mpitrain.slurm.args.check_train_args` returned them.
        on_rank_loss: the renderer's ``--on-rank-loss``.
        where: what the flags are, for the message.

    Raises:
        ConfigError: one line naming the flag and a fix.
    """
    if on_rank_loss != "shrink":
        if "min_ranks" in given:
            raise ConfigError(with_hint(
                f"{where}: --min-ranks applies to --on-rank-loss shrink",
                "render with --on-rank-loss shrink (a renderer option, before the '--'), "
                "or drop --min-ranks"))
        return
    if "config" in given:
        return
    keys = set(valid_keys())
    typed = {k: coerce(k, v, where) for k, v in given.items() if k in keys}
    cfg = dataclasses.replace(TrainConfig(), **typed, on_rank_loss="shrink",
                              checkpoint_dir="(set by the template)")
    try:
        check_rank_loss(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
