"""Scenario: fp16 loss scaling (Lightning's MixedPrecision) and bf16-mixed under MPIStrategy.

Run by hand (2 ranks; rank 0 writes OUT/results.json)::

    mpiexec -n 2 python tests/mpi/scenarios/lightning_precision.py OUT

``fp16 SHARD``: one epoch of lightning_parts.Net with ``MixedPrecision("16-mixed", "cpu")`` (a
plugin instance: Lightning turns the string on CPU into bf16) and a GradScaler at 1024 that
never grows, under shard none / optimizer / gradients / parameters. At step 4 rank 1's local
gradient gets one inf (a hook on the first layer's weight), before the exchange: replicas
all-reduce it to every rank, ZeRO reduce-scatters it into one rank's shard only. Recorded per
rank and step: the loss, the scale after the step and whether this rank's optimizer
parameters (its shard under ZeRO) changed. The ZeRO-2 fit also saves a sharded checkpoint at
the end of the epoch (the scaler's state is in its lightning.pt). ``bf16 SHARD``:
``precision="bf16-mixed"`` (no scaler) under replicas and ZeRO-2. ``refused``: a MixedPrecision
subclass with its own optimizer_step under ZeRO (its scaler cannot be routed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from mpi4py import MPI
from torch.utils.data import DataLoader

from mpitrain.errors import ConfigError
from mpitrain.lightning import MPIStrategy
from mpitrain.runtime.abort import run_mpi
from tests.mpi.scenarios.lightning_parts import BATCH, SEED, Net, datasets

SHARDS = ("none", "optimizer", "gradients", "parameters")
POISON_STEP, POISON_RANK = 4, 1
SCALE = 1024.0


class PoisonedNet(Net):
    """Net whose rank ``POISON_RANK`` gets an inf in one element of its local gradient at
    step ``POISON_STEP`` (a one-shot hook on the first layer's weight, before the exchange)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == POISON_STEP and self.global_rank == POISON_RANK:
            weight = next(self.net.parameters())  # the first layer's weight

            def poison(grad: torch.Tensor) -> torch.Tensor:
                handle.remove()
                grad = grad.clone()
                grad.view(-1)[0] = float("inf")
                return grad

            handle = weight.register_hook(poison)  # type: ignore[no-untyped-call]
        return super().training_step(batch, batch_idx)


class Steps(pl.Callback):
    """Per step on this rank: the loss, the scaler's scale after it, whether this rank's
    optimizer parameters (its ZeRO shard, or the replica) changed."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.before: list[torch.Tensor] = []

    @staticmethod
    def _held(trainer: pl.Trainer) -> list[torch.Tensor]:
        return [p.detach().clone() for g in trainer.optimizers[0].param_groups
                for p in g["params"]]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self.before = self._held(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        after = self._held(trainer)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.rows.append({
            "loss": float(outputs["loss"]),
            "scale": None if scaler is None else float(scaler.get_scale()),
            "changed": any(not torch.equal(a, b) for a, b in zip(after, self.before,
                                                                 strict=True))})


def fp16() -> MixedPrecision:
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1_000_000)
    return MixedPrecision("16-mixed", "cpu", scaler=scaler)


def fit(comm: MPI.Intracomm, shard: str, model: Net, *, plugins: list[Any] | None = None,
        precision: Any = None, ckpt: Path | None = None) -> list[dict[str, Any]]:
    """One epoch under MPIStrategy(shard); returns this rank's step rows."""
    pl.seed_everything(SEED, verbose=False)
    steps = Steps()
    callbacks: list[pl.Callback] = [steps]
    if ckpt is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt, filename="{epoch}"))
    trainer = pl.Trainer(
        strategy=MPIStrategy(comm=comm, shard=shard), accelerator="cpu", max_epochs=1,
        precision=precision, plugins=plugins, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        enable_checkpointing=ckpt is not None, callbacks=callbacks)
    train, _ = datasets()
    trainer.fit(model, DataLoader(train, batch_size=BATCH, shuffle=True))
    return steps.rows


def refused(comm: MPI.Intracomm) -> str:
    """A MixedPrecision subclass that steps its own way, under ZeRO: refused at setup."""

    class OwnStep(MixedPrecision):
        def optimizer_step(self, *args: Any, **kwargs: Any) -> Any:
            return super().optimizer_step(*args, **kwargs)

    plugin = OwnStep("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    try:
        fit(comm, "gradients", Net(), plugins=[plugin])
    except ConfigError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def main(comm: MPI.Intracomm) -> int:
    assert comm.size == 2, "run with 2 ranks"
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Any] = {}
    for shard in SHARDS:
        pl.seed_everything(SEED, verbose=False)
        ckpt = out / "ckpt" if shard == "gradients" else None
        rows = fit(comm, shard, PoisonedNet(), plugins=[fp16()], ckpt=ckpt)
        runs[f"fp16 {shard}"] = comm.gather(rows, root=0)
    for shard in ("none", "gradients"):
        pl.seed_everything(SEED, verbose=False)
        runs[f"bf16 {shard}"] = comm.gather(fit(comm, shard, Net(), precision="bf16-mixed"),
                                            root=0)
    results: dict[str, Any] = {"runs": runs, "refused": comm.gather(refused(comm), root=0)}
    if comm.rank == 0:
        meta = torch.load(out / "ckpt" / "epoch=0.ckpt" / "lightning.pt", weights_only=False)
        results["checkpoint scaler"] = meta.get("MixedPrecision")
        (out / "results.json").write_text(json.dumps(results, default=float))
    comm.Barrier()
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
