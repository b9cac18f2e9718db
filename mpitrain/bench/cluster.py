"""Run any benchmark on emulated clusters: ``python -m mpitrain.bench cluster ... -- BENCH ...``.

For each topology (``NODESxRANKS``, e.g. ``2x1,2x2,4x1``) and link rate (``1gbit``, ``10gbit``,
``none``) it brings the emulated cluster up (``python -m mpitrain cluster up``, root), runs
``python -m mpitrain.bench BENCH -n NODES*RANKS ... --json DIR/BENCH_TOPO_LINK.json`` with its
ranks placed on the nodes (``MPITRAIN_MPIEXEC`` = the cluster's wrapper), reads the link
counters before and after, and takes the cluster down at the end (also on failure)::

    python -m mpitrain.bench cluster --topologies 2x2 --links 1gbit --out docs/cluster \\
        -- algo --algo flat,hierarchical --ranks-per-node 0

Rows are not merged: each benchmark prints its own side-by-side table per point (the
benchmarks already compare their methods in one job); this driver adds what one point
cannot: the same benchmark on several node layouts and links, and the bytes on the links.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from mpitrain.cluster.state import STATE_DIR

WRAPPER = STATE_DIR / "mpiexec"


def _cluster(*args: str) -> dict[str, Any] | None:
    cmd = [sys.executable, "-m", "mpitrain", "cluster", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"mpitrain.bench cluster: `{' '.join(cmd[2:])}` failed: "
                         f"{proc.stderr.strip()[-500:]}")
    if args[0] == "status":
        return json.loads(proc.stdout)  # type: ignore[no-any-return]
    return None


def _topology(spec: str) -> tuple[int, int]:
    nodes, _, ranks = spec.partition("x")
    if not (nodes.isdigit() and ranks.isdigit() and int(nodes) >= 1 and int(ranks) >= 1):
        raise SystemExit(f"mpitrain.bench cluster: topology {spec!r} is not NODESxRANKS "
                         "(e.g. 2x1, 2x2, 4x1)")
    return int(nodes), int(ranks)


def _sent(status: dict[str, Any]) -> dict[str, int]:
    return {str(n["name"]): int(n.get("sent_bytes", 0)) for n in status.get("nodes", [])}


def main(argv: list[str]) -> int:
    """Run ``BENCH`` for every topology x link; write one JSON per point under ``--out``."""
    if "--" not in argv:
        raise SystemExit("usage: python -m mpitrain.bench cluster [options] -- BENCH [args]")
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m mpitrain.bench cluster",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--topologies", default="2x1", help="comma list of NODESxRANKS")
    p.add_argument("--links", default="1gbit", help="comma list of link rates (tc units, none)")
    p.add_argument("--out", default=".", help="directory for the JSON files")
    args = p.parse_args(argv[:cut])
    bench = argv[cut + 1 :]
    if not bench:
        raise SystemExit("mpitrain.bench cluster: name the benchmark after --")
    points = [(_topology(t), link) for t in args.topologies.split(",")
              for link in args.links.split(",")]
    if os.geteuid() != 0:
        raise SystemExit("mpitrain.bench cluster: needs root (network namespaces). "
                         "HINT: run it with sudo")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    code = 0
    try:
        for (nodes, per_node), link in points:
            _cluster("up", "--nodes", str(nodes), "--link", link)
            before = _sent(_cluster("status", "--json") or {})
            tag = f"{bench[0]}_{nodes}x{per_node}_{link}"
            env = {**os.environ, "MPITRAIN_MPIEXEC": str(WRAPPER),
                   "MPITRAIN_CLUSTER_PER_NODE": str(per_node), "OMP_NUM_THREADS": "1"}
            print(f"== {bench[0]} on {nodes} node(s) x {per_node} rank(s), link {link}",
                  flush=True)
            cmd = [sys.executable, "-m", "mpitrain.bench", *bench, "-n" if bench[0] != "algo"
                   else "--ranks", str(nodes * per_node), "--json", str(out / f"{tag}.json")]
            path = out / f"{tag}.json"
            fresh = path.with_name(path.name + ".partial")  # the benchmark writes here
            cmd[-1] = str(fresh)
            rc = subprocess.run(cmd, env=env, timeout=3600).returncode
            after = _sent(_cluster("status", "--json") or {})
            sent = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            print(f"   bytes sent per node link: {sent}", flush=True)
            if rc == 0 and fresh.exists():  # an older result is replaced only by a complete one
                data = json.loads(fresh.read_text())
                data["cluster"] = {"nodes": nodes, "per_node": per_node, "link": link,
                                   "bytes_sent": sent, "command": [*cmd[2:-1], str(path)]}
                fresh.write_text(json.dumps(data, indent=1))
                os.replace(fresh, path)
            # the next topology needs a fresh cluster (a different number of nodes)
            _cluster("down", "--kill")
            code = code or rc
    finally:
        subprocess.run([sys.executable, "-m", "mpitrain", "cluster", "down", "--kill"],
                       capture_output=True, timeout=300)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
