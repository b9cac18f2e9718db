"""Model parallelism: memory per rank and throughput of a registry model, method by method.

    python -m mpitrain.bench parallel [-n 4] [--model gpt|llama|gpt2] [--methods dp,tp2,...]
        [--virtual-stages 2] [--memory-budget-mb M] [--json PATH]

One ``mpiexec`` job per method (each reports its own peak RSS); the same model (``--model``:
the registry's built-in GPT, or the Hugging Face Llama / GPT-2 specs), global batch, seeded
random tokens and AdamW everywhere. ``dp``, ``tp2``/``tp4``, ``sp2`` (sequence parallel),
``pp2-*``/``pp4-*`` (GPipe, 1F1B, interleaved with ``--virtual-stages`` chunks per
rank), ``tp2-pp2`` (``-interleaved``) and the ZeRO compositions
``zero1``/``zero3``/``tp2-zero3``/``tp2-pp2-zero1`` build their stages from the model's spec
(``parallel_engine``) and run mpitrain's PipelineEngine (one micro-batch per step without a
pipeline); ``torch-pp-gpipe``/``-1f1b``/``-interleaved`` run the same stage modules (tensor
group of one), one per rank (``v`` per rank interleaved), through
``torch.distributed.pipelining`` over gloo. ``torch-tp2``, ``torch-fsdp2``,
``torch-tp2-fsdp2``, ``torch-pp2``, ``torch-tp2-pp2`` and ``torch-tp2-pp2-fsdp2`` (alias
``torch-stack``) train the same weights on torch's own stack over a gloo ``DeviceMesh``:
DTensor tensor parallel, FSDP2, torch pipelining (1F1B) (``parallel_dtensor``).
``--memory-budget-mb M`` puts every rank in a cgroup of M MiB (``bench/budget.py``): a method
that needs more is killed by the kernel and reported as such. Model state is counted from
the tensors (a DTensor's local shard), activations as the bytes saved for backward (parameters
excluded), the bubble as the slowest stage's share of the step blocked in receives; every row
has the losses, which agree across methods. ``--placement across`` puts tensor groups across
nodes (docs/model-parallel.md).
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
from mpitrain.bench.parallel_engine import LANGUAGE_MODELS, dense_numel, engine_run
from mpitrain.bench.parallel_report import report
from mpitrain.bench.parallel_torch import Run, torch_pp_run
from mpitrain.errors import ConfigError, with_hint
from mpitrain.parallel.schedule import bubble_theory
from mpitrain.runtime.abort import run_mpi

if TYPE_CHECKING:
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
    "pp2-interleaved": Method(pipeline=2, schedule="interleaved"),
    "tp2-pp2": Method(tensor=2, pipeline=2), "sp2": Method(tensor=2, sequence_parallel=True),
    "tp2-pp2-interleaved": Method(tensor=2, pipeline=2, schedule="interleaved"),
    "zero1": Method(shard=1), "zero3": Method(shard=3),
    "tp2-pp2-zero1": Method(tensor=2, pipeline=2, shard=1),
    "tp2-zero3": Method(tensor=2, shard=3),
    "torch-pp-gpipe": Method(pipeline=0, schedule="gpipe", torch_pp=True),
    "torch-pp-1f1b": Method(pipeline=0, torch_pp=True),
    "torch-pp-interleaved": Method(pipeline=0, schedule="interleaved", torch_pp=True),
    "torch-tp2": Method(tensor=2, torch_stack=True),
    "torch-fsdp2": Method(shard=3, torch_stack=True),
    "torch-tp2-fsdp2": Method(tensor=2, shard=3, torch_stack=True),
    "torch-pp2": Method(pipeline=2, torch_stack=True),
    "torch-tp2-pp2": Method(tensor=2, pipeline=2, torch_stack=True),
    "torch-tp2-pp2-fsdp2": Method(tensor=2, pipeline=2, shard=3, torch_stack=True),
}
ALIASES = {"torch-pp": ["torch-pp-gpipe", "torch-pp-1f1b", "torch-pp-interleaved"],
           "torch-stack": [k for k, m in METHODS.items() if m.torch_stack]}


def shape(m: Method, n: int) -> tuple[int, int, int]:
    """Return (tensor, pipeline, data) of method ``m`` on ``n`` ranks."""
    p = n if m.pipeline == 0 else m.pipeline
    return m.tensor, p, n // (m.tensor * p)


def virtual(m: Method, a: argparse.Namespace) -> int:
    """Chunks per rank: ``--virtual-stages`` for the interleaved schedule, else one."""
    return a.virtual_stages if m.schedule == "interleaved" else 1


def unfit(name: str, n: int, a: argparse.Namespace) -> str | None:
    """Why ``name`` cannot run with these options on ``n`` ranks (None: it can)."""
    m = METHODS[name]
    t, p, d = shape(m, n)
    v = virtual(m, a)
    micro = a.micro_batches if p > 1 else 1
    if min(a.context, a.dim, a.layers, a.heads, a.batch, a.micro_batches, a.steps,
           a.virtual_stages) < 1:
        return ("--context, --dim, --layers, --heads, --batch, --micro-batches, --steps, "
                "--virtual-stages must be >= 1")
    if n % (t * p):
        return f"{n} ranks do not split into tensor {t} x pipeline {p}"
    if p < 2 and METHODS[name].torch_pp:
        return "torch pipelining needs at least 2 ranks"
    if a.heads % t or a.dim % a.heads:
        return f"--heads {a.heads} does not split over {t} tensor ranks (or --dim)"
    if a.batch % (d * micro):
        return f"--batch {a.batch} is not a multiple of data {d} x micro-batches {micro}"
    if a.layers < p * v:
        return f"--layers {a.layers} is fewer than {p * v} stages"
    if v > 1 and a.micro_batches % p:
        return f"interleaved: --micro-batches {a.micro_batches} is not a multiple of {p} stages"
    if m.sequence_parallel and a.context % t:
        return f"--context {a.context} does not split over {t} tensor ranks"
    if a.model == "llama" and t > 1 and _kv_heads(a.heads) % t:
        return f"llama's {_kv_heads(a.heads)} key/value heads do not split over {t} tensor ranks"
    return None


def _kv_heads(heads: int) -> int:
    return heads // 2 if heads >= 4 and heads % 2 == 0 else heads  # hf.kv_heads (no import)


def build_run(a: argparse.Namespace, comm: MPI.Intracomm, m: Method) -> Run:
    """Collective: this rank's part of method ``m`` (mpitrain's engine or torch's stack)."""
    t, p, _ = shape(m, comm.size)
    v = virtual(m, a)
    if m.torch_pp:
        return torch_pp_run(a, comm, m.schedule, v)
    if m.torch_stack:
        return torch_stack_run(a, comm, t, p, m.shard == 3, m.schedule)
    return engine_run(a, comm, t, p, v, m.schedule, m.shard, m.sequence_parallel)


def worker(a: argparse.Namespace, comm: MPI.Intracomm) -> int:
    """Collective: 2 warm-up + ``a.steps`` timed steps of ``a.method``; rank 0 writes one row."""
    import torch
    from mpi4py import MPI

    torch.set_num_threads(1)
    m = METHODS[a.method]
    numel = dense_numel(a)  # imports the model's package (transformers) before any budget
    cgroup = None
    if a.memory_budget_mb:  # before the model exists: the kernel counts all of it
        from mpitrain.bench.budget import enter_budget

        cgroup = enter_budget(int(a.memory_budget_mb * 2**20), a.budget_tag, comm.rank)
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
    charged = {}
    if cgroup is not None:  # what the kernel charged this rank (the budget's measure)
        from mpitrain.bench.budget import peak_usage

        charged = {"cgroup_peak": peak_usage(cgroup) or 0}
    per_rank = comm.gather({**mem, "model_state": model_state, "activations_peak": act,
                            "peak_rss": rss, **charged}, root=0)
    run.close()
    if comm.rank == 0:
        assert per_rank is not None
        t, p, d = shape(m, comm.size)
        v = virtual(m, a)
        step = statistics.median(times)
        row = {"method": a.method, "model": a.model, "ranks": comm.size, "tensor": t,
               "pipeline": p, "data": d, "virtual_stages": v, "shard": m.shard,
               "schedule": m.schedule if p > 1 else None, "implementation":
               "torch.distributed.pipelining" if m.torch_pp else
               "torch (DTensor, FSDP2, pipelining)" if m.torch_stack else "mpitrain",
               "micro_batches": a.micro_batches if p > 1 else 1, "placement": a.placement,
               "grid": run.describe, "numel": numel,
               "batch": a.batch, "context": a.context, "step_ms": step * 1e3,
               "step_ms_all": [x * 1e3 for x in times], "tokens_per_s": a.batch * a.context / step,
               "loss": losses[-1], "losses": losses,
               "bubble_measured": None if p == 1 or m.torch_pp or m.torch_stack
               else statistics.median(bubbles),
               "bubble_theory": bubble_theory(p, a.micro_batches, v) if p > 1 else None,
               **{k: max(r[k] for r in per_rank) for k in per_rank[0]}}
        Path(a.out).write_text(json.dumps(row))
    return 0


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


def run_method(a: argparse.Namespace, name: str, out: Path) -> tuple[int, int]:
    """One ``mpiexec`` job of method ``name``: (its exit code, the OOM kills the kernel counted
    in its ranks' cgroups under ``--memory-budget-mb``; 0 without a budget)."""
    fwd = ["parallel", "--method", name, "--out", str(out), "--model", a.model,
           "--virtual-stages", str(a.virtual_stages), "--micro-batches", str(a.micro_batches),
           "--batch", str(a.batch), "--context", str(a.context), "--dim", str(a.dim),
           "--layers", str(a.layers), "--heads", str(a.heads), "--steps", str(a.steps),
           "--placement", a.placement]
    if not a.memory_budget_mb:
        return relaunch(a.ranks, fwd), 0
    from mpitrain.bench.budget import cgroup_path, oom_kills, remove_budgets

    tag = f"{os.getpid()}-{name}"
    try:
        code = relaunch(a.ranks, [*fwd, "--memory-budget-mb", str(a.memory_budget_mb),
                                  "--budget-tag", tag])
        kills = sum(oom_kills(cgroup_path(tag, r)) for r in range(a.ranks))
    finally:
        remove_budgets(tag, a.ranks)
    return code, kills


def killed_row(a: argparse.Namespace, name: str, code: int, kills: int) -> dict[str, Any]:
    """The row of a method the kernel killed over the budget."""
    t, p, d = shape(METHODS[name], a.ranks)
    return {"method": name, "model": a.model, "ranks": a.ranks, "tensor": t, "pipeline": p,
            "data": d, "killed": True, "oom_kills": kills, "exit": code,
            "budget_mb": a.memory_budget_mb}


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
    p.add_argument("--model", choices=LANGUAGE_MODELS, default="gpt",
                   help="the registry's language model (llama, gpt2: Hugging Face's)")
    p.add_argument("--virtual-stages", type=int, default=2,
                   help="chunks per rank of the *-interleaved methods")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after 2 warm-up)")
    p.add_argument("--placement", choices=("inside", "across"), default="inside",
                   help="tensor groups inside nodes (default) or across them")
    p.add_argument("--json", help="write results as JSON here")
    p.add_argument("--memory-budget-mb", type=float, default=0.0,
                   help="per-rank memory limit enforced by a cgroup (root); a method that "
                   "needs more is killed by the kernel and reported as such")
    p.add_argument("--budget-tag", default="", help=argparse.SUPPRESS)
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
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = Path(tmp) / f"{name}.json"
            code, kills = run_method(a, name, out)
            if kills:  # the kernel killed it over the budget: a result, not a crash
                rows.append(killed_row(a, name, code, kills))
                print(f"{name}: killed by the kernel ({kills} OOM kill(s) over the "
                      f"{a.memory_budget_mb:g} MiB per-rank budget; mpiexec exit {code})",
                      flush=True)
                continue
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
             "budget_mb": a.memory_budget_mb, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
