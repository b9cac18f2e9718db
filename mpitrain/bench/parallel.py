"""Model parallelism: memory per rank and throughput of the built-in GPT, method by method.

    python -m mpitrain.bench parallel [-n 4] [--methods dp,tp2,pp2-1f1b,...] [--json PATH]

One ``mpiexec`` job per method (each reports its own peak RSS); the same GPT, global batch,
seeded random tokens and AdamW everywhere. ``dp``, ``tp2``/``tp4``, ``sp2`` (sequence
parallel), ``pp2-*``/``pp4-*`` (GPipe, 1F1B), ``tp2-pp2`` and the ZeRO compositions
``zero1``/``zero3``/``tp2-zero3``/``tp2-pp2-zero1`` run mpitrain's PipelineEngine
(one micro-batch per step without a pipeline); ``torch-pp-gpipe``/``-1f1b`` run the same
``GPTStage`` modules, one per rank, through ``torch.distributed.pipelining`` over gloo.
``torch-tp2``, ``torch-fsdp2``, ``torch-tp2-fsdp2``, ``torch-tp2-pp2`` and
``torch-tp2-pp2-fsdp2`` (alias ``torch-stack``) train the same weights on torch's own stack
over a gloo ``DeviceMesh``: DTensor tensor parallel, FSDP2, torch pipelining (1F1B)
(``parallel_dtensor``). Model state is counted from the tensors (a DTensor's local shard),
activations as the bytes saved for backward (parameters excluded), the bubble as the slowest
stage's share of the step blocked in receives; every row has the losses, which agree across
methods. ``--placement across`` puts tensor groups across nodes (docs/model-parallel.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpitrain.bench.allreduce import relaunch
from mpitrain.bench.parallel_dtensor import torch_stack_run
from mpitrain.bench.parallel_torch import Run, gpt_config, model_memory, torch_pp_run
from mpitrain.errors import ConfigError, with_hint
from mpitrain.parallel.schedule import bubble_theory
from mpitrain.runtime.abort import run_mpi

if TYPE_CHECKING:
    import torch
    from mpi4py import MPI


@dataclass(frozen=True)
class Method:
    """How one method splits the ranks (``pipeline`` 0: one stage per rank)."""

    tensor: int = 1
    pipeline: int = 1
    schedule: str = "1f1b"
    sequence_parallel: bool = False
    torch_pp: bool = False
    shard: int = 0  # ZeRO stage over the data-parallel replicas (0: plain DataParallel)
    torch_stack: bool = False  # DTensor TP + FSDP2 (shard 3) + torch pipelining on a DeviceMesh


METHODS: dict[str, Method] = {
    "dp": Method(), "tp2": Method(tensor=2), "tp4": Method(tensor=4),
    "pp2-gpipe": Method(pipeline=2, schedule="gpipe"), "pp2-1f1b": Method(pipeline=2),
    "pp4-gpipe": Method(pipeline=4, schedule="gpipe"), "pp4-1f1b": Method(pipeline=4),
    "tp2-pp2": Method(tensor=2, pipeline=2), "sp2": Method(tensor=2, sequence_parallel=True),
    "zero1": Method(shard=1), "zero3": Method(shard=3),
    "tp2-pp2-zero1": Method(tensor=2, pipeline=2, shard=1),
    "tp2-zero3": Method(tensor=2, shard=3),
    "torch-pp-gpipe": Method(pipeline=0, schedule="gpipe", torch_pp=True),
    "torch-pp-1f1b": Method(pipeline=0, torch_pp=True),
    "torch-tp2": Method(tensor=2, torch_stack=True),
    "torch-fsdp2": Method(shard=3, torch_stack=True),
    "torch-tp2-fsdp2": Method(tensor=2, shard=3, torch_stack=True),
    "torch-tp2-pp2": Method(tensor=2, pipeline=2, torch_stack=True),
    "torch-tp2-pp2-fsdp2": Method(tensor=2, pipeline=2, shard=3, torch_stack=True),
}
ALIASES = {"torch-pp": ["torch-pp-gpipe", "torch-pp-1f1b"],
           "torch-stack": [k for k, m in METHODS.items() if m.torch_stack]}


def shape(m: Method, n: int) -> tuple[int, int, int]:
    """Return (tensor, pipeline, data) of method ``m`` on ``n`` ranks."""
    p = n if m.pipeline == 0 else m.pipeline
    return m.tensor, p, n // (m.tensor * p)


def unfit(name: str, n: int, a: argparse.Namespace) -> str | None:
    """Why ``name`` cannot run with these options on ``n`` ranks (None: it can)."""
    t, p, d = shape(METHODS[name], n)
    micro = a.micro_batches if p > 1 else 1
    if min(a.context, a.dim, a.layers, a.heads, a.batch, a.micro_batches, a.steps) < 1:
        return "--context, --dim, --layers, --heads, --batch, --micro-batches, --steps must be >= 1"
    if n % (t * p):
        return f"{n} ranks do not split into tensor {t} x pipeline {p}"
    if p < 2 and METHODS[name].torch_pp:
        return "torch pipelining needs at least 2 ranks"
    if a.heads % t or a.dim % a.heads:
        return f"--heads {a.heads} does not split over {t} tensor ranks (or --dim)"
    if a.batch % (d * micro):
        return f"--batch {a.batch} is not a multiple of data {d} x micro-batches {micro}"
    if a.layers < p:
        return f"--layers {a.layers} is fewer than {p} stages"
    if METHODS[name].sequence_parallel and a.context % t:
        return f"--context {a.context} does not split over {t} tensor ranks"
    return None


def engine_run(a: argparse.Namespace, comm: MPI.Intracomm) -> Run:
    """Collective: the grid, this rank's GPT stage, engine and AdamW for ``a.method``."""
    import torch
    from mpi4py import MPI

    from mpitrain.grad.parallel import DataParallel
    from mpitrain.grad.zero.wrapper import ShardedDataParallel
    from mpitrain.parallel.grid import Grid
    from mpitrain.parallel.pipeline import PipelineEngine
    from mpitrain.runtime.world import World
    from mpitrain.train.gpt import GPTStage
    from mpitrain.train.grid import GridExchange

    m = METHODS[a.method]
    t, p, _ = shape(m, comm.size)
    world = World.create(comm)
    node = world.local_rank if a.placement == "across" else None
    grid = Grid.create(comm, tensor=t, pipeline=p, node_index=node)
    spans = comm.allreduce(len(set(grid.tp_comm.allgather(world.node_index))), op=MPI.MAX)
    given = "local rank" if node is not None else "COMM_TYPE_SHARED"
    where = "ACROSS" if spans > 1 else "inside"
    describe = (f"{grid.describe()} (node_index = {given}); on the {world.num_nodes} real "
                f"node(s) tensor groups are {where} nodes")
    world.free()
    stage = GPTStage(gpt_config(a, m.sequence_parallel), grid.tp_comm, grid.pp_rank, p)
    dp: Any = None
    if m.shard:  # ZeRO over the replicas, as the trainer composes it (train/grid.py)
        dp = ShardedDataParallel(stage, comm=grid.dp_comm, stage=m.shard,
                                 units=stage.zero3_units())
    elif grid.data > 1:
        dp = DataParallel(stage, comm=grid.dp_comm)
    engine = PipelineEngine(stage, grid, micro_batches=a.micro_batches if p > 1 else 1,
                            schedule=m.schedule, data_parallel=dp,
                            tied=stage.tied_parameters(),
                            sequence_parallel_params=stage.sequence_parallel_parameters(),
                            measure_memory=True, eval_through_exchange=m.shard == 3)
    exchange = GridExchange(stage, engine, {})  # steps ZeRO's shards, sums tied gradients
    held = list(stage.parameters()) + (list(dp.shards) if m.shard else [])
    opt = torch.optim.AdamW(dp.parameters() if m.shard else stage.parameters(), lr=1e-4)

    def train(tokens: torch.Tensor) -> tuple[float, int, float]:
        mine = tokens.chunk(grid.data)[grid.dp_rank]
        loss = engine.train_step(mine[:, :-1], mine[:, 1:])
        st = engine.stats
        return st.wait_seconds / st.step_seconds, st.peak_activation_bytes, loss

    def update() -> None:
        exchange.step(opt)
        exchange.zero_grad()

    return Run(train, update, lambda: model_memory(held, opt), describe, grid.free)


def build_run(a: argparse.Namespace, comm: MPI.Intracomm, m: Method) -> Run:
    """Collective: this rank's part of method ``m`` (mpitrain's engine or torch's stack)."""
    if m.torch_pp:
        return torch_pp_run(a, comm, m.schedule)
    if m.torch_stack:
        t, p, _ = shape(m, comm.size)
        return torch_stack_run(a, comm, t, p, m.shard == 3, m.schedule)
    return engine_run(a, comm)


def worker(a: argparse.Namespace, comm: MPI.Intracomm) -> int:
    """Collective: 2 warm-up + ``a.steps`` timed steps of ``a.method``; rank 0 writes one row."""
    import torch
    from mpi4py import MPI

    torch.set_num_threads(1)
    m = METHODS[a.method]
    run = build_run(a, comm, m)
    if comm.rank == 0:
        print(f"{a.method}: {run.describe}", flush=True)
    times: list[float] = []
    bubbles: list[float] = []
    act = 0
    mem: dict[str, int] = {}
    losses: list[float] = []
    for i in range(2 + a.steps):
        g = torch.Generator().manual_seed(1000 + i)
        tokens = torch.randint(0, 256, (a.batch, a.context + 1), generator=g)
        comm.Barrier()
        t0 = time.perf_counter()
        bubble, nbytes, loss = run.train(tokens)
        if i == 1 + a.steps:
            mem = run.memory()
        run.update()
        dt = time.perf_counter() - t0
        mine = [x for x in comm.allgather(loss) if not math.isnan(x)]  # each replica's
        losses.append(sum(mine) / len(mine))
        if i >= 2:
            times.append(comm.allreduce(dt, op=MPI.MAX))
            bubbles.append(comm.allreduce(bubble, op=MPI.MAX))
            act = max(act, nbytes)
    model_state = sum(mem.values())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    per_rank = comm.gather({**mem, "model_state": model_state, "activations_peak": act,
                            "peak_rss": rss}, root=0)
    run.close()
    if comm.rank == 0:
        assert per_rank is not None
        t, p, d = shape(m, comm.size)
        step = statistics.median(times)
        row = {"method": a.method, "ranks": comm.size, "tensor": t, "pipeline": p, "data": d,
               "schedule": m.schedule if p > 1 else None, "implementation":
               "torch.distributed.pipelining" if m.torch_pp else
               "torch (DTensor, FSDP2, pipelining)" if m.torch_stack else "mpitrain",
               "micro_batches": a.micro_batches if p > 1 else 1, "placement": a.placement,
               "grid": run.describe, "numel": gpt_config(a, False).parameters_count(),
               "batch": a.batch, "context": a.context, "step_ms": step * 1e3,
               "step_ms_all": [x * 1e3 for x in times], "tokens_per_s": a.batch * a.context / step,
               "loss": losses[-1], "losses": losses,
               "bubble_measured": None if p == 1 or m.torch_pp or m.torch_stack
               else statistics.median(bubbles),
               "bubble_theory": bubble_theory(p, a.micro_batches) if p > 1 else None,
               **{k: max(r[k] for r in per_rank) for k in per_rank[0]}}
        Path(a.out).write_text(json.dumps(row))
    return 0


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def _opt(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def report(rows: list[dict[str, Any]], a: argparse.Namespace) -> None:
    """Print the table (model state and step time relative to ``dp`` where it ran; the last
    step's loss, the same for every method up to float rounding)."""
    base = next((r for r in rows if r["method"] == "dp"), rows[0])
    cores = os.cpu_count() or 1
    print(f"GPT {rows[0]['numel'] / 1e6:.2f}M params (dim {a.dim}, {a.layers} layers, "
          f"{a.heads} heads, context {a.context}), AdamW, global batch {a.batch}, "
          f"{a.micro_batches} micro-batches in pipelines, {a.ranks} ranks on {cores} cores, "
          f"placement {a.placement}")
    if a.ranks > cores:
        print(f"OVERSUBSCRIBED ({a.ranks} ranks > {cores} cores): times are not those of a "
              "cluster; read the memory columns and the ratios")
    print("MiB per rank (max over ranks); step ms median; bubble = blocked-in-receive share "
          "of the slowest stage (mpitrain's engine only)")
    print(f"{'method':<19} {'T':>2} {'P':>2} {'D':>2} {'params':>7} {'grads':>7} {'optim':>7} "
          f"{'model':>7} {'of dp':>6} {'activ':>7} {'rss':>7} {'step ms':>8} {'of dp':>6} "
          f"{'tok/s':>8} {'bubble':>6} {'theory':>6} {'loss':>8}")
    for r in rows:
        print(f"{r['method']:<19} {r['tensor']:>2} {r['pipeline']:>2} {r['data']:>2} "
              f"{_mib(r['parameters']):>7} {_mib(r['gradients']):>7} "
              f"{_mib(r['optimizer']):>7} {_mib(r['model_state']):>7} "
              f"{r['model_state'] / base['model_state']:>6.2f} "
              f"{_mib(r['activations_peak']):>7} {_mib(r['peak_rss']):>7} "
              f"{r['step_ms']:>8.1f} {r['step_ms'] / base['step_ms']:>6.2f} "
              f"{r['tokens_per_s']:>8.0f} {_opt(r['bubble_measured'], '.2f'):>6} "
              f"{_opt(r['bubble_theory'], '.2f'):>6} {r['loss']:>8.5f}")


def choose(a: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The methods to run and notes on defaults skipped (explicit misfits raise ConfigError)."""
    explicit = a.methods is not None
    asked = (a.methods or ",".join(METHODS)).split(",")
    names = [x for name in asked for x in ALIASES.get(name, [name])]
    notes, run = [], []
    for name in names:
        if name not in METHODS:
            raise ConfigError(with_hint(f"unknown method {name!r}",
                                        f"pick from {', '.join([*METHODS, *ALIASES])}"))
        why = unfit(name, a.ranks, a)
        if why is not None and explicit:
            raise ConfigError(with_hint(f"method {name}: {why}",
                                        "change -n/--batch/--micro-batches or drop it"))
        if why is None:
            run.append(name)
        else:
            notes.append(f"{name} ({why})")
    return run, notes


def main(argv: list[str]) -> int:
    """Entry point: one job per method, then the table (and JSON)."""
    p = argparse.ArgumentParser(prog="python -m mpitrain.bench parallel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, default=4)
    p.add_argument("--methods", help=f"comma list (default: all that fit -n): "
                   f"{','.join([*METHODS, *ALIASES])}")
    p.add_argument("--micro-batches", type=int, default=8, help="per step, in pipelines")
    p.add_argument("--batch", type=int, default=32, help="global batch (sequences)")
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after 2 warm-up)")
    p.add_argument("--placement", choices=("inside", "across"), default="inside",
                   help="tensor groups inside nodes (default) or across them")
    p.add_argument("--json", help="write results as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return run_mpi(lambda comm: worker(a, comm))
    try:
        names, notes = choose(a)
    except ConfigError as exc:
        print(f"bench parallel: error: {exc}", file=sys.stderr)
        return 2
    if notes:
        print(f"skipped at -n {a.ranks}: {'; '.join(notes)}", flush=True)
    rows = []
    shared = ["--micro-batches", str(a.micro_batches), "--batch", str(a.batch),
              "--context", str(a.context), "--dim", str(a.dim), "--layers", str(a.layers),
              "--heads", str(a.heads), "--steps", str(a.steps), "--placement", a.placement]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = Path(tmp) / f"{name}.json"
            code = relaunch(a.ranks, ["parallel", "--method", name, "--out", str(out), *shared])
            if code != 0 or not out.exists():
                print(f"bench parallel: method {name} failed (mpiexec exit {code}); its ranks' "
                      "messages are above", file=sys.stderr)
                return code or 1
            rows.append(json.loads(out.read_text()))
    report(rows, a)
    if a.json:
        from mpitrain.bench.shard import machine_info

        Path(a.json).write_text(json.dumps(
            {"benchmark": "parallel", "machine": machine_info(), "skipped": notes,
             "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
