"""Lightning's training loop: steps/s under MPIStrategy vs Lightning's DDPStrategy (gloo).

``python -m mpitrain.bench lightning [-n 2] [--methods ...] [--json PATH]`` starts ONE
``mpiexec -n N`` job in which the methods take turns, ``--rounds`` times, each a full
``Trainer.fit`` of the same seeded model on the same synthetic data (batch 64 per rank,
``DistributedSampler`` order, SGD with momentum, 1 torch thread per rank):

- ``ddp``: Lightning's ``DDPStrategy`` over gloo (ranks from Lightning's ``MPIEnvironment``;
  the process group is started from the MPI ranks, rank 0's host listening, before each
  turn and destroyed after it: Lightning broadcasts a SIGTERM flag through any process group
  at every step, which the MPI turns must not pay for);
- ``mpi[:SHARD][:COMPRESSION]``: ``MPIStrategy(shard=SHARD, compression=COMPRESSION)``
  (``mpi`` = replicas over mpitrain's DataParallel; ``mpi:gradients`` = ZeRO-2 ...).

A turn times ``--steps`` optimizer steps after ``--warmup`` ones: from the start of the first
timed batch to the end of the last (the whole Lightning step: loop, hooks, forward, backward,
exchange, optimizer), the slowest rank's time; the median over rounds is reported. Across
emulated nodes: ``sudo python -m mpitrain.bench cluster --topologies 2x1 -- lightning``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpitrain.bench.allreduce import init_gloo, machine
from mpitrain.bench.train import build_model, quiet_barrier
from mpitrain.runtime.abort import run_mpi
from mpitrain.runtime.launch import launch_env, mpiexec_command

if TYPE_CHECKING:
    from mpi4py import MPI


def parse_method(spec: str) -> dict[str, str]:
    """Parse ``ddp`` | ``mpi[:SHARD][:COMPRESSION]``."""
    name, *opts = spec.split(":")
    if name not in ("ddp", "mpi") or (name == "ddp" and opts) or len(opts) > 2:
        raise SystemExit(f"mpitrain.bench lightning: method {spec!r} is not ddp or "
                         "mpi[:SHARD][:COMPRESSION] (e.g. mpi:gradients, mpi:none:bf16)")
    return {"spec": spec, "mode": name, "shard": opts[0] if opts else "none",
            "compression": opts[1] if len(opts) > 1 else "none"}


def _fit_once(args: argparse.Namespace, m: dict[str, str], comm: MPI.Intracomm,
              layout: tuple[int, int]) -> float:
    """Collective: one Trainer.fit under method ``m``; the slowest rank's timed seconds."""
    import lightning.pytorch as pl
    import torch
    from lightning.fabric.plugins.environments.mpi import MPIEnvironment
    from lightning.pytorch.strategies import DDPStrategy
    from mpi4py import MPI
    from torch.utils.data import DataLoader, TensorDataset

    from mpitrain.lightning import MPIStrategy

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_model(args.model)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.t0 = self.t1 = 0.0

        def on_train_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
            if trainer.global_step == args.warmup:
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
            self.t1 = time.perf_counter()

    local, nodes = layout
    steps = args.warmup + args.steps
    g = torch.Generator().manual_seed(0)
    n = steps * args.batch * comm.size
    data = TensorDataset(torch.randn(n, 1, 28, 28, generator=g),
                         torch.randint(0, 10, (n,), generator=g))
    strategy: Any
    if m["mode"] == "ddp":
        init_gloo(comm)  # Lightning finds it started (its own rendezvous needs env vars)
        strategy = DDPStrategy(process_group_backend="gloo",
                               cluster_environment=MPIEnvironment())
    else:
        strategy = MPIStrategy(comm=comm, shard=m["shard"], compression=m["compression"])
    timer = Timer()
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=local, num_nodes=nodes,
                         max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[timer])
    quiet_barrier(comm)
    trainer.fit(Module(), DataLoader(data, batch_size=args.batch))
    if m["mode"] == "ddp":
        # Lightning broadcasts a SIGTERM flag over torch.distributed at every step when a
        # process group exists: the MPI turns must not pay for DDP's group
        torch.distributed.destroy_process_group()
    return float(comm.allreduce(timer.t1 - timer.t0, op=MPI.MAX))


def worker(args: argparse.Namespace, comm: MPI.Intracomm) -> int:
    """Collective: time every method in turns; rank 0 writes the rows."""
    import logging
    import warnings

    import torch

    from mpitrain.runtime.world import World

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    methods = [parse_method(s) for s in args.methods.split(",")]
    world = World.create(comm)
    layout = (world.local_size, world.num_nodes)
    times: list[list[float]] = [[] for _ in methods]
    for _ in range(args.rounds):
        for i, m in enumerate(methods):
            times[i].append(_fit_once(args, m, comm, layout) / args.steps)
    if comm.rank == 0:
        rows = []
        for m, ts in zip(methods, times, strict=True):
            t = statistics.median(ts)
            rows.append({**m, "model": args.model, "ranks": comm.size, "nodes": world.num_nodes,
                         "step_ms": t * 1e3, "steps_per_s": 1 / t,
                         "samples_per_s": comm.size * args.batch / t,
                         "step_ms_rounds": [round(v * 1e3, 2) for v in ts]})
        Path(args.out).write_text(json.dumps(rows))
    return 0


def main(argv: list[str]) -> int:
    """Entry point: one job, then the side-by-side table."""
    p = argparse.ArgumentParser(prog="python -m mpitrain.bench lightning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, default=2)
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    p.add_argument("--methods", default="ddp,mpi,mpi:gradients",
                   help="comma list: ddp, mpi[:SHARD][:COMPRESSION]")
    p.add_argument("--batch", type=int, default=64, help="per-rank batch")
    p.add_argument("--steps", type=int, default=30, help="timed steps per turn")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per turn")
    p.add_argument("--rounds", type=int, default=5, help="turns per method (median)")
    p.add_argument("--json", help="write results as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return run_mpi(lambda comm: worker(args, comm))
    for s in args.methods.split(","):
        parse_method(s)
    print(f"lightning steps, {args.ranks} ranks, {args.model}, batch {args.batch}/rank, "
          f"{args.steps} timed steps per turn, median of {args.rounds} rounds", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [*mpiexec_command(args.ranks), sys.executable, "-m", "mpitrain.bench",
               "lightning", "--worker", "--out", str(out), *argv]
        proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True,
                              timeout=3600)
        if proc.returncode != 0 or not out.exists():
            print(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}",
                  file=sys.stderr)
            return 1
        rows: list[dict[str, Any]] = json.loads(out.read_text())
    ddp = next((r for r in rows if r["mode"] == "ddp"), None)
    print(f"{'method':<18} {'ranks':>5} {'nodes':>5} {'step ms':>8} {'steps/s':>8} "
          f"{'samples/s':>10} {'vs ddp':>7}")
    for r in rows:
        r["vs_ddp"] = r["steps_per_s"] / ddp["steps_per_s"] if ddp else None
        vs = f"{r['vs_ddp']:.2f}x" if r["vs_ddp"] else "-"
        print(f"{r['spec']:<18} {r['ranks']:>5} {r['nodes']:>5} {r['step_ms']:>8.2f} "
              f"{r['steps_per_s']:>8.1f} {r['samples_per_s']:>10.0f} {vs:>7}")
    if args.json:
        result = {"benchmark": "lightning", "ranks": args.ranks, "model": args.model,
                  "batch": args.batch, "machine": machine(), "argv": argv, "rows": rows,
                  "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
