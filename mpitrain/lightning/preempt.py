"""Preemption under Lightning: a signal is recorded, the ranks agree at a step boundary,
save an ``hpc_ckpt_N.ckpt`` checkpoint together and exit with code 99 for the requeue.

mpitrain's :class:`~mpitrain.preempt.PreemptFlag` handles the signals (USR1 and TERM by
default; the handlers only record) while the fit loop runs; after every optimizer step one
tiny all-reduce tells every rank whether any rank was signalled, so all of them stop at the
same step with the same state. The checkpoint goes where Lightning's own SLURM requeue puts
it (``default_root_dir/hpc_ckpt_N.ckpt``): ``trainer.fit(model, ckpt_path="hpc")`` resumes
it, and under Slurm Lightning resumes it by itself.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback

from mpitrain.preempt import PREEMPTED_EXIT_CODE, PreemptFlag

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from mpi4py import MPI

_HPC = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


def next_hpc_path(folder: Path) -> Path:
    """``folder/hpc_ckpt_{N+1}.ckpt`` after the highest N there (Lightning's numbering)."""
    numbers = [int(m.group(1)) for name in (os.listdir(folder) if folder.is_dir() else [])
               if (m := _HPC.match(name))]
    return folder / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


class Preemption:
    """The strategy's preemption state: the flag, and the agreed stop (one per fit)."""

    def __init__(self, signals: list[signal.Signals], comm: MPI.Intracomm) -> None:
        self.comm = comm
        self.flag = PreemptFlag(signals)
        self.installed = False

    def start(self) -> None:
        """Handle the signals from now on (after Lightning registered its own handlers)."""
        if self.flag.signals and not self.installed:
            self.flag.received = None
            self.flag.install()
            self.installed = True

    def stop(self) -> None:
        """Give the signals back to their previous handlers."""
        if self.installed:
            self.flag.uninstall()
            self.installed = False

    def check(self, trainer: pl.Trainer) -> None:
        """Collective: when any rank was signalled, save and raise SystemExit(99) on all.

        Called at the end of every training batch that stepped the optimizer, on every rank.
        """
        if not self.installed or not self.flag.agreed(self.comm):
            return
        mine = int(self.flag.received) if self.flag.received is not None else 0
        who = self.comm.allgather(mine)
        root = Path(trainer.default_root_dir)
        path = Path(self.comm.bcast(str(next_hpc_path(root)) if self.comm.rank == 0 else None))
        trainer.save_checkpoint(path, weights_only=False)
        if self.comm.rank == 0:
            names = ", ".join(f"rank {r}: {signal.Signals(s).name}" for r, s in enumerate(who)
                              if s)
            sys.stderr.write(
                f"mpitrain: preempted ({names}) at step {trainer.global_step}: saved "
                f"'{path}'; exiting with code {PREEMPTED_EXIT_CODE} for the requeue "
                "(resume: trainer.fit(..., ckpt_path='hpc'))\n")
            sys.stderr.flush()
        self.stop()
        raise SystemExit(PREEMPTED_EXIT_CODE)


class PreemptionCallback(Callback):
    """Runs :meth:`Preemption.check` after each optimizer step (added by MPIStrategy)."""

    def __init__(self, preemption: Preemption) -> None:
        self.preemption = preemption

    @property
    def state_key(self) -> str:
        """One per trainer, whatever its arguments."""
        return "mpitrain.lightning.PreemptionCallback"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take the signals over (Lightning registered its handlers just before)."""
        self.preemption.start()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        """Collective: agree on a stop at optimizer-step boundaries (not mid-accumulation)."""
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.preemption.check(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give the signals back."""
        self.preemption.stop()
