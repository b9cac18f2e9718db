"""The LightningModule, data, callbacks and Trainer factory of the lightning_fit scenario.

A 3-layer MLP classifier on a fixed synthetic set (192 train / 64 validation samples, 8
features, 4 classes), SGD with momentum and a StepLR schedule, validation that logs its loss
with ``sync_dist=True`` and a torchmetrics accuracy; :class:`Recorder` keeps what the tests
compare (every step's local loss and lr, the synced epoch metrics, the restored state at
train start, the final parameters).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BATCH = 8  # per rank
SEED = 1


def datasets() -> tuple[TensorDataset, TensorDataset]:
    """The same samples on every rank (the sampler gives each rank its part)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x @ torch.randn(8, 4, generator=g)).argmax(1)
    return TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:])


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                 nn.Linear(16, 4))
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=4,
                                                                      average="micro")
        self.fail_at: int | None = None  # training_step raises here (the abort check)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail_at is not None and self.global_step == self.fail_at:
            print(f"rank {self.global_rank}: raising at step {self.global_step}", flush=True)
            raise RuntimeError(f"injected failure on rank {self.global_rank}")
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.val_acc.update(logits, y)
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1, 0.7)]


def params_of(module: nn.Module) -> dict[str, list[float]]:
    return {k: v.detach().reshape(-1).tolist() for k, v in module.state_dict().items()
            if v.is_floating_point()}


class Recorder(pl.Callback):
    """What the tests compare, per fit (rank-local; the scenario gathers it)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.epochs: list[dict[str, float]] = []
        self.start: dict[str, Any] = {}
        self.final: dict[str, list[float]] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opt = trainer.optimizers[0]
        self.start = {"global_step": trainer.global_step, "epoch": trainer.current_epoch,
                      "lr": opt.param_groups[0]["lr"]}
        if trainer.strategy.__class__.__name__ != "MPIStrategy" or \
                getattr(trainer.strategy.options, "stage", 0) != 3:
            self.start["params"] = params_of(pl_module)  # stage 3 holds shards only here

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))
        self.lrs.append(float(trainer.optimizers[0].param_groups[0]["lr"]))

    def on_validation_epoch_end(self, trainer: pl.Trainer,
                                pl_module: pl.LightningModule) -> None:
        self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.final = params_of(pl_module)  # after the strategy's teardown: full parameters

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        print(f"rank {trainer.global_rank}: stopped at step {trainer.global_step} "
              f"({type(exception).__name__})", flush=True)

    def record(self) -> dict[str, Any]:
        return {"losses": self.losses, "lrs": self.lrs, "epochs": self.epochs,
                "start": self.start, "final": self.final}


class Signaller(pl.Callback):
    """Rank ``rank`` sends itself ``sig`` before training step ``step`` (SIGKILL: dies)."""

    def __init__(self, rank: int, step: int, sig: signal.Signals) -> None:
        self.rank, self.step, self.sig = rank, step, sig

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            print(f"rank {self.rank} (pid {os.getpid()}): {self.sig.name} myself at "
                  f"{time.time():.3f}", flush=True)
            sys.stdout.flush()
            os.kill(os.getpid(), self.sig)


def fit(strategy: Any, devices: int = 1, *, callbacks: list[pl.Callback] | None = None,
        root: str | None = None, ckpt_path: str | None = None, max_epochs: int = 3,
        fail_at: int | None = None, accumulate: int = 1) -> tuple[Net, pl.Trainer, Recorder]:
    """Seed, build and fit a fresh Net under ``strategy``; returns (module, trainer, record).

    ``devices``: DDP needs the ranks per node; MPIStrategy takes the layout from MPI at 1.
    """
    pl.seed_everything(SEED, verbose=False)
    model = Net()
    model.fail_at = fail_at
    rec = Recorder()
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=devices, max_epochs=max_epochs,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[rec, *(callbacks or [])],
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint)
                                 for c in callbacks or []),
        default_root_dir=root, accumulate_grad_batches=accumulate)
    train, val = datasets()
    trainer.fit(model, DataLoader(train, batch_size=BATCH, shuffle=True),
                DataLoader(val, batch_size=BATCH), ckpt_path=ckpt_path)
    return model, trainer, rec
