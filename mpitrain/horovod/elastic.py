"""``hvd.elastic`` is not provided: Horovod's elastic mode needs its Gloo controller and
driver to add and remove hosts while the job runs.

mpitrain's MPI-native alternative is checkpoint-and-requeue: ``mpitrain.checkpoint`` saves
atomically at step boundaries, ``mpitrain.preempt`` stops every rank together on a signal,
and the Slurm templates requeue the job, which resumes from the latest complete checkpoint
(possibly on a different number of ranks). See docs/migrating-from-horovod.md.
"""

from __future__ import annotations

from typing import Any

MESSAGE = (
    "hvd.elastic ({name}) is not provided by mpitrain.horovod: Horovod's elastic mode needs "
    "its Gloo controller. HINT: use mpitrain's checkpoint-and-requeue instead (save with "
    "mpitrain.checkpoint at step boundaries, stop on preemption with mpitrain.preempt, let "
    "Slurm requeue the job and resume from the latest checkpoint); see "
    "docs/migrating-from-horovod.md"
)


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    raise NotImplementedError(MESSAGE.format(name=f"hvd.elastic.{name}"))
