"""``bench parallel``'s table and its targets (issue 23's benchmark).

The targets, checked against the measured rows:

- model state per rank <= ``1/(T*P) + 0.10`` of a replica's (ZeRO-3 also divides by ``D``),
  a replica's being the dense model's fp32 parameters, gradients and AdamW's two moments
  (16 bytes per parameter);
- the interleaved schedule's measured bubble within 10% (relative) of its theory
  ``(P - 1) / (v m + P - 1)``;
- step time <= torch's on the same ranks: the torch row of the same shape (tensor, pipeline,
  data, schedule, virtual stages, ZeRO-3 or not).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

#: bytes of model state per parameter in a replica: fp32 parameter, gradient, AdamW's 2 moments
REPLICA_BYTES = 16


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def _opt(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _key(r: dict[str, Any]) -> tuple[Any, ...]:
    """The shape two rows must share to be compared (mpitrain's vs torch's)."""
    return (r["tensor"], r["pipeline"], r["data"], r.get("schedule"),
            r.get("virtual_stages", 1), r.get("shard", 0) == 3)


def torch_twin(r: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The torch row run on the same shape as mpitrain's row ``r`` (None: none ran)."""
    if r.get("killed") or r["implementation"] != "mpitrain":
        return None
    return next((o for o in rows if not o.get("killed") and o["implementation"] != "mpitrain"
                 and _key(o) == _key(r)), None)


def state_bound(r: dict[str, Any]) -> float:
    """The model-state target of row ``r`` as a share of a replica's."""
    split: int = r["tensor"] * r["pipeline"] * (r["data"] if r.get("shard", 0) == 3 else 1)
    return 1 / split + 0.10


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """One line per target and row it applies to: the measure, the bound, met or MISSED."""
    out: list[str] = []
    done = [r for r in rows if not r.get("killed")]
    for r in done:
        replica = r["numel"] * REPLICA_BYTES
        share, bound = r["model_state"] / replica, state_bound(r)
        if bound < 1.0:
            out.append(f"state     {r['method']:<21} {share:.3f} of a replica <= {bound:.3f}: "
                       f"{'met' if share <= bound else 'MISSED'}")
    for r in done:
        if r.get("virtual_stages", 1) > 1 and r.get("bubble_measured") is not None:
            got, theory = r["bubble_measured"], r["bubble_theory"]
            off = (got - theory) / theory
            out.append(f"bubble    {r['method']:<21} {got:.3f} vs theory {theory:.3f} "
                       f"({off:+.0%}; within 10%: {'met' if abs(off) <= 0.10 else 'MISSED'})")
    for r in done:
        twin = torch_twin(r, done)
        if twin is not None:
            ratio = r["step_ms"] / twin["step_ms"]
            out.append(f"step      {r['method']:<21} {r['step_ms']:.1f} ms vs "
                       f"{twin['method']} {twin['step_ms']:.1f} ms = {ratio:.2f}: "
                       f"{'met' if ratio <= 1.0 else 'MISSED'}")
    return out


def report(rows: list[dict[str, Any]], a: argparse.Namespace) -> None:
    """Print the table (model state as a share of a replica's, step time against torch's on
    the same shape, the last step's loss: the same for every method up to float rounding),
    the killed methods, then the targets."""
    numel = next((r["numel"] for r in rows if "numel" in r), 0)
    cores = os.cpu_count() or 1
    budget = a.memory_budget_mb
    print(f"{a.model} {numel / 1e6:.2f}M params (dim {a.dim}, {a.layers} layers, "
          f"{a.heads} heads, context {a.context}), AdamW, global batch {a.batch}, "
          f"{a.micro_batches} micro-batches in pipelines, {a.virtual_stages} virtual stages "
          f"interleaved, {a.ranks} ranks on {cores} cores, placement {a.placement}")
    print(f"a replica's model state: {_mib(numel * REPLICA_BYTES)} MiB (16 B per parameter)"
          + (f"; per-rank budget {budget:g} MiB (cgroup, kernel-enforced)" if budget else ""))
    if a.ranks > cores:
        print(f"OVERSUBSCRIBED ({a.ranks} ranks > {cores} cores): times are not those of a "
              "cluster; read the memory columns and the ratios")
    print("MiB per rank (max over ranks); step ms median; torch = step / torch's on the same "
          "shape; bubble = blocked-in-receive share of the slowest stage (mpitrain's engine)")
    charged = any("cgroup_peak" in r for r in rows)
    print(f"{'method':<21} {'T':>2} {'P':>2} {'V':>2} {'D':>2} {'params':>7} {'grads':>7} "
          f"{'optim':>7} {'model':>7} {'of rep':>6} {'activ':>7} {'rss':>7} "
          + (f"{'charged':>8} " if charged else "")
          + f"{'step ms':>8} {'torch':>6} {'tok/s':>8} {'bubble':>6} {'theory':>6} {'loss':>8}")
    for r in rows:
        head = (f"{r['method']:<21} {r['tensor']:>2} {r['pipeline']:>2} "
                f"{r.get('virtual_stages', 1):>2} {r['data']:>2} ")
        if r.get("killed"):
            print(head + f"KILLED by the kernel: {r['oom_kills']} OOM kill(s) over the "
                  f"{r['budget_mb']:g} MiB per-rank budget (mpiexec exit {r['exit']})")
            continue
        twin = torch_twin(r, rows)
        vs = None if twin is None else r["step_ms"] / twin["step_ms"]
        print(head + f"{_mib(r['parameters']):>7} {_mib(r['gradients']):>7} "
              f"{_mib(r['optimizer']):>7} {_mib(r['model_state']):>7} "
              f"{r['model_state'] / (numel * REPLICA_BYTES):>6.3f} "
              f"{_mib(r['activations_peak']):>7} {_mib(r['peak_rss']):>7} "
              + (f"{_mib(r.get('cgroup_peak', 0)):>8} " if charged else "")
              + f"{r['step_ms']:>8.1f} {_opt(vs, '.2f'):>6} "
              f"{r['tokens_per_s']:>8.0f} {_opt(r['bubble_measured'], '.3f'):>6} "
              f"{_opt(r['bubble_theory'], '.3f'):>6} {r['loss']:>8.5f}")
    lines = targets(rows)
    if lines:
        print("targets (issue 23):")
        for line in lines:
            print(f"  {line}")
