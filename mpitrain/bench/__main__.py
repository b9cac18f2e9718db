"""``python -m mpitrain.bench <name> ...``: dispatch to a benchmark's ``main(argv)``.

Add a benchmark by adding a row to :data:`BENCHMARKS` (module exposing ``main(argv) -> int``);
modules are imported only when chosen.
"""

from __future__ import annotations

import importlib
import sys

#: name -> (module with main(argv) -> int, one-line description)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "allreduce": (
        "mpitrain.bench.allreduce",
        "all-reduce time and bus bandwidth: raw mpi4py vs mpitrain vs torch gloo",
    ),
    "train": (
        "mpitrain.bench.train",
        "training step time: single process vs mpitrain vs torch DDP (gloo)",
    ),
    "loader": ("mpitrain.bench.loader", "data loader throughput (HDF5 shards)"),
    "algo": (
        "mpitrain.bench.algo",
        "flat vs hierarchical all-reduce (pretend nodes), host / staged / CUDA-aware paths",
    ),
    "half": (
        "mpitrain.bench.half",
        "16-bit gradient sums: user-defined MPI op vs allgather + float32 reduction",
    ),
    "ps-transport": (
        "mpitrain.bench.ps_transport",
        "parameter-server round: two-sided messages vs one-sided RMA (Accumulate/Get)",
    ),
    "async": (
        "mpitrain.bench.async_study",
        "exchange modes: accuracy vs steps and wall time against sync SGD (+ plots)",
    ),
    "shard": (
        "mpitrain.bench.shard",
        "ZeRO stages 1-3 (flat or hierarchical): memory and step vs replicas, torch ZeRO, FSDP2",
    ),
    "cluster": (
        "mpitrain.bench.cluster",
        "any benchmark on emulated clusters: topologies x link rates, bytes on the links",
    ),
    "lightning": (
        "mpitrain.bench.lightning_steps",
        "lightning.Trainer steps/s: MPIStrategy (replicas, ZeRO) vs Lightning's DDP (gloo)",
    ),
    "parallel": (
        "mpitrain.bench.parallel",
        "model parallelism of gpt/llama/gpt2: memory per rank, tokens/s, bubble, vs torch",
    ),
    "recovery": (
        "mpitrain.bench.recovery",
        "a rank killed: --on-rank-loss shrink (ULFM) vs abort + relaunch --resume auto",
    ),
}


def usage() -> str:
    """Return the list of benchmarks."""
    rows = "\n".join(f"  {name:<10} {desc}" for name, (_, desc) in BENCHMARKS.items())
    return f"usage: python -m mpitrain.bench <name> [options]\n\nbenchmarks:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark named by ``argv[0]``."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if args else 2
    entry = BENCHMARKS.get(args[0])
    if entry is None:
        print(f"unknown benchmark {args[0]!r}\n{usage()}", end="", file=sys.stderr)
        return 2
    module = importlib.import_module(entry[0])
    return int(module.main(args[1:]))


if __name__ == "__main__":
    sys.exit(main())
