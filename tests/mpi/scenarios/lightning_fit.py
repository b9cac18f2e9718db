"""Scenario: MPIStrategy under lightning.Trainer against Lightning's DDP (gloo).

Run by hand (each run writes OUT/results.json from rank 0 before its last fit)::

    mpiexec -n 4 python tests/mpi/scenarios/lightning_fit.py D/a --save --preempt  # exit 99
    mpiexec -n 2 python tests/mpi/scenarios/lightning_fit.py D/b --resume-from D/a --kill
    mpiexec -n 2 python tests/mpi/scenarios/lightning_fit.py D/c --raise          # aborted

Every run first fits the same seeded LightningModule (lightning_parts.Net) under Lightning's
DDPStrategy over gloo (ranks from Lightning's MPIEnvironment) and under MPIStrategy with
shard none / optimizer / gradients / parameters, then calls the collectives of both
strategies with the same inputs. ``--save`` (the 4-rank run, launched with
MPITRAIN_RANKS_PER_NODE=2: two pretend nodes) adds the hierarchical all-reduce and
reduce-scatter, fp16 compression and gradient accumulation (against DDP accumulating too),
and keeps a sharded ModelCheckpoint per epoch of the ZeRO-3 fit (D/a/ckpt).

``--preempt``: a ZeRO-2 fit in which rank 1 sends itself SIGUSR1 before step 8 (exit 99 with
D/a/preempt/hpc_ckpt_1.ckpt). ``--resume-from``: resume D/a/ckpt/epoch=1.ckpt under
MPIStrategy(shard="gradients"), its consolidated copy under DDP and under
MPIStrategy(shard="parameters"), and the preemption checkpoint with ckpt_path="hpc".
``--kill``: rank 1 kills itself with SIGKILL at step 3 of a last fit. ``--raise``: the
refusals (options, broken checkpoint directories), then rank 1 raises in training_step at
step 2 (the scenario catches the error and sleeps: only the strategy's own abort, from
``on_exception``, can end that job in time).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch
from lightning.fabric.plugins.environments import MPIEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from mpi4py import MPI

from mpitrain.errors import CheckpointError, ConfigError
from mpitrain.lightning import MPIStrategy, consolidate_checkpoint
from mpitrain.runtime.abort import run_mpi
from tests.mpi.scenarios.lightning_parts import Signaller, datasets, fit

SHARDS = ("none", "optimizer", "gradients", "parameters")


def ddp() -> DDPStrategy:
    return DDPStrategy(process_group_backend="gloo", cluster_environment=MPIEnvironment())


def gathered(comm: MPI.Intracomm, value: Any) -> Any:
    """Every rank's ``value`` on rank 0 (None elsewhere)."""
    return comm.gather(value, root=0)


def configs(full: bool) -> dict[str, dict[str, Any]]:
    """Fit name -> MPIStrategy options and fit options (``full``: the 4-rank extras)."""
    out: dict[str, dict[str, Any]] = {f"mpi {s}": {"shard": s} for s in SHARDS}
    if full:
        out["mpi none hierarchical"] = {"shard": "none", "allreduce": "hierarchical"}
        out["mpi parameters hierarchical"] = {"shard": "parameters",
                                              "allreduce": "hierarchical"}
        out["mpi none fp16"] = {"shard": "none", "compression": "fp16"}
        out["mpi none acc2"] = {"shard": "none", "accumulate": 2}
        out["mpi gradients acc2"] = {"shard": "gradients", "accumulate": 2}
    return out


def compare(comm: MPI.Intracomm, out: Path, full: bool) -> tuple[dict[str, Any], Any, Any]:
    """Fit under DDP and every MPIStrategy config; return (records, ddp strategy, mpi one)."""
    n = comm.size
    _, trainer, rec = fit(ddp(), n)
    runs = {"ddp": gathered(comm, rec.record())}
    ddp_strategy = trainer.strategy
    if full:
        _, _, rec = fit(ddp(), n, accumulate=2)
        runs["ddp acc2"] = gathered(comm, rec.record())
    for name, opts in configs(full).items():
        opts = dict(opts)
        accumulate = opts.pop("accumulate", 1)
        cbs: list[Any] = []
        if full and name == "mpi parameters":
            cbs = [ModelCheckpoint(dirpath=out / "ckpt", filename="{epoch}", save_top_k=-1)]
        strategy = MPIStrategy(comm=comm, **opts)
        _, trainer, rec = fit(strategy, callbacks=cbs, accumulate=accumulate)
        runs[name] = gathered(comm, rec.record())
    return runs, ddp_strategy, strategy


def layout(s: Any) -> dict[str, Any]:
    """What Lightning learns about this rank from the strategy."""
    return {"global_rank": s.global_rank, "local_rank": s.local_rank, "node_rank": s.node_rank,
            "world_size": s.world_size, "sampler": s.distributed_sampler_kwargs,
            "is_global_zero": s.is_global_zero}


def collectives(comm: MPI.Intracomm, ddp_s: Any, mpi_s: Any) -> dict[str, Any]:
    """The same calls on both strategies: {check: {"mpi": value, "ddp": value}} per rank."""
    r = comm.rank
    out: dict[str, Any] = {}

    def both(name: str, fn: Any) -> None:
        out[name] = {"mpi": fn(mpi_s), "ddp": fn(ddp_s)}

    def x() -> torch.Tensor:
        return torch.tensor([r + 1.5, -float(r), 2.0 * r + 0.25])

    for op in ("mean", "sum", "max", "min", "product"):
        both(f"reduce {op}", lambda s, op=op: s.reduce(x(), reduce_op=op).tolist())
    both("reduce ReduceOp.SUM", lambda s: s.reduce(
        x(), reduce_op=torch.distributed.ReduceOp.SUM).tolist())
    both("reduce int mean", lambda s: s.reduce(torch.tensor([3 * r + 1, 7]),
                                               reduce_op="mean").tolist())
    both("reduce returns its input", lambda s: (lambda t: s.reduce(t) is t)(x()))
    both("all_gather", lambda s: s.all_gather(torch.arange(6.0).reshape(2, 3) * (r + 1))
         .tolist())
    both("all_gather 0-dim", lambda s: s.all_gather(torch.tensor(r + 0.5)).tolist())

    def grad(s: Any) -> list[float]:
        w = torch.tensor([1.0, 2.0], requires_grad=True)
        y = s.all_gather(w * (r + 1), sync_grads=True)
        (y * torch.arange(1.0, 1.0 + y.numel()).reshape(y.shape) * (r + 2)).sum().backward()
        assert w.grad is not None
        return w.grad.tolist()

    both("all_gather sync_grads backward", grad)
    both("broadcast from 1", lambda s: s.broadcast({"rank": r, "t": [r, "x"]}, src=1))
    both("reduce_boolean_decision all", lambda s: s.reduce_boolean_decision(r == 0, all=True))
    both("reduce_boolean_decision any", lambda s: s.reduce_boolean_decision(r == 0, all=False))
    both("barrier", lambda s: s.barrier("check") is None)
    return out


def consolidated_params(path: Path) -> dict[str, list[float]]:
    from mpitrain.checkpoint.shards import load_full

    return {k: v.reshape(-1).tolist() for k, v in load_full(path)["model"].items()
            if v.is_floating_point()}


def resume(comm: MPI.Intracomm, out: Path, src: Path) -> dict[str, Any]:
    """Resume a 4-rank ZeRO-3 checkpoint and the 4-rank preemption checkpoint here."""
    n = comm.size
    epoch1 = src / "ckpt" / "epoch=1.ckpt"
    runs: dict[str, Any] = {}
    _, trainer, rec = fit(MPIStrategy(comm=comm, shard="gradients"), root=str(out / "b1"),
                          ckpt_path=str(epoch1))
    runs["resume mpi"] = gathered(comm, rec.record())
    plain = out / "epoch=1-consolidated.ckpt"
    if comm.rank == 0:
        consolidate_checkpoint(epoch1, plain)
    comm.Barrier()
    _, trainer, rec = fit(ddp(), n, root=str(out / "b2"), ckpt_path=str(plain))
    runs["resume ddp"] = gathered(comm, rec.record())
    _, trainer, rec = fit(MPIStrategy(comm=comm, shard="parameters"), root=str(out / "b3"),
                          ckpt_path=str(plain))
    runs["resume plain into zero3"] = gathered(comm, rec.record())
    _, trainer, rec = fit(MPIStrategy(comm=comm, shard="optimizer"),
                          root=str(src / "preempt"), ckpt_path="hpc")
    runs["resume hpc"] = gathered(comm, {**rec.record(), "end_step": trainer.global_step,
                                         "end_epoch": trainer.current_epoch})
    return runs


def refusals(comm: MPI.Intracomm, out: Path) -> dict[str, str]:
    """Misuse and broken checkpoints refused with one line (the same on every rank)."""
    import lightning.pytorch as pl

    from tests.mpi.scenarios.lightning_parts import Net

    got: dict[str, str] = {}

    def catch(name: str, fn: Any) -> None:
        try:
            fn()
            got[name] = "no error"
        except (ConfigError, CheckpointError) as exc:
            got[name] = f"{type(exc).__name__}: {exc}"

    catch("bad shard", lambda: MPIStrategy(comm=comm, shard="everything"))
    catch("ef with sharding", lambda: MPIStrategy(comm=comm, shard="gradients",
                                                  compression="bf16-ef"))
    catch("devices", lambda: pl.Trainer(strategy=MPIStrategy(comm=comm), accelerator="cpu",
                                        devices=3, logger=False))

    def clip() -> None:
        trainer = pl.Trainer(strategy=MPIStrategy(comm=comm, shard="parameters"),
                             accelerator="cpu", max_epochs=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             gradient_clip_val=1.0)
        train, _ = datasets()
        trainer.fit(Net(), torch.utils.data.DataLoader(train, batch_size=8))

    catch("norm clipping with ZeRO", clip)
    # a ZeRO-2 fit that saves one checkpoint, then broken copies of it
    saved = out / "ckpt" / "epoch=0.ckpt"
    _, trainer, _ = fit(MPIStrategy(comm=comm, shard="gradients"), max_epochs=1,
                        callbacks=[ModelCheckpoint(dirpath=out / "ckpt", filename="{epoch}")])
    catch("full save after a ZeRO fit", lambda: trainer.save_checkpoint(out / "after.ckpt"))
    if comm.rank == 0:
        for name in ("unfinished", "mixed", "damaged"):
            shutil.copytree(saved, out / name)
        (out / "unfinished" / "lightning.pt").unlink()
        manifest = out / "mixed" / "manifest.json"
        manifest.write_text(manifest.read_text() + "\n")
        shard = out / "damaged" / "shard-00001-of-00002.pt"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    comm.Barrier()
    reader = MPIStrategy(comm=comm, shard="gradients")
    for name in ("unfinished", "mixed", "damaged", "missing"):
        catch(f"{name} checkpoint", lambda name=name: reader.load_checkpoint(out / name))
    return got


def main(comm: MPI.Intracomm) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--save", action="store_true")
    p.add_argument("--preempt", action="store_true")
    p.add_argument("--resume-from")
    p.add_argument("--kill", action="store_true")
    p.add_argument("--raise", dest="fail", action="store_true")
    p.add_argument("--hang", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"ranks": comm.size}
    if args.hang:  # rank 1 freezes (SIGSTOP) before step 3: the strategy's watchdog ends it
        fit(MPIStrategy(comm=comm, hang_timeout=3), callbacks=[Signaller(1, 3, signal.SIGSTOP)])
        print("survived the hang", flush=True)
        return 0
    if args.fail:
        results["refusals"] = gathered(comm, refusals(comm, out))
    else:
        runs, ddp_s, mpi_s = compare(comm, out, args.save)
        results["runs"] = runs
        results["layout"] = gathered(comm, layout(mpi_s))
        results["collectives"] = gathered(comm, collectives(comm, ddp_s, mpi_s))
    if args.save and comm.rank == 0:
        results["ckpt epoch=2"] = consolidated_params(out / "ckpt" / "epoch=2.ckpt")
    if args.resume_from:
        src = Path(args.resume_from)
        results["resumed"] = resume(comm, out, src)
        if comm.rank == 0:
            results["ckpt epoch=1"] = consolidated_params(src / "ckpt" / "epoch=1.ckpt")
            results["ckpt hpc"] = consolidated_params(src / "preempt" / "hpc_ckpt_1.ckpt")
    if comm.rank == 0:
        (out / "results.json").write_text(json.dumps(results))
        print("results written", flush=True)
    comm.Barrier()
    if args.preempt:
        fit(MPIStrategy(comm=comm, shard="gradients"), root=str(out / "preempt"),
            callbacks=[Signaller(1, 8, signal.SIGUSR1)])
        print("preemption did not stop the run", flush=True)
    if args.kill:
        fit(MPIStrategy(comm=comm), callbacks=[Signaller(1, 3, signal.SIGKILL)])
        print("survived the kill", flush=True)
    if args.fail:
        try:
            fit(MPIStrategy(comm=comm), fail_at=2 if comm.rank == 1 else None)
        except RuntimeError:
            # only the strategy's own abort ends the job: run_mpi never sees this error
            print(f"rank {comm.rank}: fit raised instead of aborting the job", flush=True)
            time.sleep(3600)
        print("survived the failure", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
