"""A user's Lightning training script, as `slurm render train-cpu --script` runs it.

What docs/lightning.md tells users to write: ``MPIStrategy`` under ``run_mpi``, the
Trainer's ``default_root_dir`` from ``MPITRAIN_CHECKPOINT_DIR`` (the rendered job exports its
checkpoint directory there; a preemption writes ``hpc_ckpt_N.ckpt`` into it) and
``ckpt_path="hpc"`` when one is there (after a requeue). Rank 0 prints ``lightning_job:
step N`` after every step (``--step-sleep`` slows the steps so a test can signal mid-run) and
writes ``--out`` (JSON: the step and epoch it started and ended at, the final weights).

    mpiexec -n 2 python tests/slurm/lightning_job.py --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl
from mpi4py import MPI
from torch.utils.data import DataLoader

from mpitrain.lightning import MPIStrategy
from mpitrain.runtime.abort import run_mpi
from tests.mpi.scenarios.lightning_parts import Net, datasets, params_of


class Progress(pl.Callback):
    """Rank 0 reports each step (and where the fit started); every rank sleeps a little."""

    def __init__(self, step_sleep: float) -> None:
        self.step_sleep = step_sleep
        self.start: dict[str, int] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = {"global_step": trainer.global_step, "epoch": trainer.current_epoch}
        if trainer.is_global_zero:
            print(f"lightning_job: start at step {trainer.global_step}", flush=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.is_global_zero:
            print(f"lightning_job: step {trainer.global_step}", flush=True)
        time.sleep(self.step_sleep)


def main(comm: MPI.Intracomm) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--max-epochs", type=int, default=2)
    p.add_argument("--shard", default="gradients")
    p.add_argument("--step-sleep", type=float, default=0.0)
    args = p.parse_args()
    root = Path(os.environ.get("MPITRAIN_CHECKPOINT_DIR", "checkpoints"))
    resume = "hpc" if list(root.glob("hpc_ckpt_*.ckpt")) else None  # after a requeue
    pl.seed_everything(1, verbose=False)
    progress = Progress(args.step_sleep)
    trainer = pl.Trainer(
        strategy=MPIStrategy(comm=comm, shard=args.shard), accelerator="cpu",
        max_epochs=args.max_epochs, default_root_dir=root, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[progress])
    model = Net()
    train, val = datasets()
    trainer.fit(model, DataLoader(train, batch_size=8, shuffle=True),
                DataLoader(val, batch_size=8), ckpt_path=resume)
    if trainer.is_global_zero:
        Path(args.out).write_text(json.dumps({
            "resumed": resume, "start": progress.start, "end_step": trainer.global_step,
            "end_epoch": trainer.current_epoch, "ranks": comm.size,
            "final": params_of(model)}))
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
