"""Check, collectively, that every rank wraps the same model layout."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from mpitrain.errors import CommError, with_hint

if TYPE_CHECKING:
    from mpi4py import MPI

Entry = tuple[str, str, tuple[int, ...], str]  # kind, name, shape, dtype


def layout(
    named_params: Sequence[tuple[str, torch.Tensor]],
    named_buffers: Sequence[tuple[str, torch.Tensor]] = (),
) -> list[Entry]:
    """Return the (kind, name, shape, dtype) list that must agree across ranks."""
    out: list[Entry] = [
        ("parameter", n, tuple(p.shape), str(p.dtype).removeprefix("torch."))
        for n, p in named_params
    ]
    out += [
        ("buffer", n, tuple(b.shape), str(b.dtype).removeprefix("torch."))
        for n, b in named_buffers
    ]
    return out


def _describe(e: Entry | None, count: int) -> str:
    if e is None:
        return f"no such entry (it has {count})"
    kind, name, shape, dtype = e
    return f"{kind} {name!r} shape {shape} {dtype}"


def first_mismatch(mine: list[Entry], ref: list[Entry]) -> str | None:
    """Describe the first entry where ``mine`` differs from the root's ``ref`` (None if same)."""
    for i in range(max(len(mine), len(ref))):
        a = mine[i] if i < len(mine) else None
        b = ref[i] if i < len(ref) else None
        if a != b:
            return (
                f"entry #{i} is {_describe(a, len(mine))} but rank 0 has {_describe(b, len(ref))}"
            )
    return None


def check_same_layout(comm: MPI.Intracomm, entries: list[Entry], what: str = "model") -> None:
    """Collective: raise the same CommError on every rank unless all ranks' ``entries`` match.

    One small allgather of digests when all agree; otherwise rank 0's list is broadcast and the
    lowest mismatching rank's first difference is reported everywhere.
    """
    if comm.size == 1:
        return
    digest = hashlib.sha256(repr(entries).encode()).hexdigest()
    digests = comm.allgather(digest)
    if all(d == digests[0] for d in digests):
        return
    ref = comm.bcast(entries if comm.rank == 0 else None, root=0)
    reports = comm.allgather(first_mismatch(entries, ref))
    for rank, report in enumerate(reports):
        if report is not None:
            raise CommError(
                with_hint(
                    f"rank {rank}: {what} layout differs across ranks: {report}",
                    "build the same model (code, config, parameter order) on every rank "
                    "before wrapping it",
                )
            )
    raise CommError(f"{what} layout differs across ranks (digests {sorted(set(digests))})")
