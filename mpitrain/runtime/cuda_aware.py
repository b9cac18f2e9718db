"""Is the MPI library CUDA-aware? Decided at run time, verified, and agreed by all ranks.

Three kinds of evidence, gathered per rank:

1. the library's own query, through ctypes on the loaded libmpi: ``MPIX_GPU_query_support``
   (MPICH >= 4.1, type ``MPIX_GPU_SUPPORT_CUDA`` = 0), else ``MPIX_Query_cuda_support``
   (Open MPI >= 2, also exported by MPICH); and through mpi4py the MPI-4.1 info key
   ``mpi_memory_alloc_kinds`` of the communicator (a ``cuda`` kind there means yes);
2. vendor hints in the environment (``OMPI_MCA_opal_cuda_support``, ``MPICH_GPU_SUPPORT_ENABLED``,
   ``MPIR_CVAR_ENABLE_GPU``, ``MV2_USE_CUDA``, ``UCX_TLS``);
3. a probe: an all-reduce of a known pattern on device buffers, checked on every rank. It is
   run only when nothing says "no" and something says "yes" (or the user forced ``yes``),
   because a device pointer handed to a host-only MPI can crash the process.

:func:`decide` is the pure rule; :func:`decide_cuda_aware` is the collective wrapper.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from mpitrain.errors import CommError, ConfigError, with_hint
from mpitrain.runtime import env

if TYPE_CHECKING:
    import torch
    from mpi4py import MPI

CUDA_AWARE_MODES = ("auto", "yes", "no")
ProbeOutcome = Literal["ok", "wrong", "error", "skipped"]
#: probe(comm, device) -> "ok" | "wrong" | "error"; collective
Probe = Callable[["MPI.Intracomm", "torch.device"], ProbeOutcome]

_TRUE = {"1", "true", "yes", "on", "enabled"}
_FALSE = {"0", "false", "no", "off", "disabled"}


@dataclass(frozen=True)
class QueryResult:
    """The MPI library's answer: True/False, or None when it offers no query."""

    supported: bool | None
    source: str


@dataclass(frozen=True)
class Hint:
    """One environment variable and what it says (True yes, False no, None nothing)."""

    name: str
    value: str
    says: bool | None


@dataclass(frozen=True)
class Decision:
    """Whether to hand device buffers to MPI directly, and why."""

    use_cuda_aware: bool
    reasons: list[str] = field(default_factory=list)
    probe: ProbeOutcome = "skipped"
    host_device: bool = False

    def describe(self) -> str:
        """One line for the start-up log and ``doctor``."""
        if self.use_cuda_aware:
            path = "CUDA-aware (device buffers straight to MPI)"
        elif self.host_device:
            path = "not used (host tensors)"
        else:
            path = "staged (through pinned host buffers)"
        return f"cuda-aware MPI: {path}; " + "; ".join(self.reasons)


# ---------------------------------------------------------------------------- facts


def _loaded_libmpi() -> list[ctypes.CDLL]:
    """Handles on the MPI library already loaded by mpi4py (global namespace, then by path)."""
    handles: list[ctypes.CDLL] = [ctypes.CDLL(None)]
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if ".so" in line}
    except OSError:
        paths = set()
    noload = getattr(os, "RTLD_NOLOAD", 0)
    for path in sorted(paths):
        base = os.path.basename(path)
        if base.startswith(("libmpi.", "libmpi_", "libmpich.", "libmpi_ibm.")):
            try:
                handles.append(ctypes.CDLL(path, mode=noload | os.RTLD_LOCAL))
            except OSError:
                continue
    return handles


def query_library(handles: list[ctypes.CDLL] | None = None) -> QueryResult:
    """Ask the loaded libmpi through ctypes (MPI must be initialised; no communication)."""
    for lib in _loaded_libmpi() if handles is None else handles:
        gpu_query = getattr(lib, "MPIX_GPU_query_support", None)
        if gpu_query is not None:
            gpu_query.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
            gpu_query.restype = ctypes.c_int
            out = ctypes.c_int(0)
            if gpu_query(0, ctypes.byref(out)) == 0:  # MPIX_GPU_SUPPORT_CUDA
                return QueryResult(bool(out.value), f"MPIX_GPU_query_support(CUDA)={out.value}")
        cuda_query = getattr(lib, "MPIX_Query_cuda_support", None)
        if cuda_query is not None:
            cuda_query.argtypes = []
            cuda_query.restype = ctypes.c_int
            value = int(cuda_query())
            return QueryResult(bool(value), f"MPIX_Query_cuda_support()={value}")
    return QueryResult(None, "no MPIX_GPU_query_support / MPIX_Query_cuda_support in libmpi")


def query_alloc_kinds(comm: MPI.Intracomm) -> QueryResult:
    """Read the MPI-4.1 ``mpi_memory_alloc_kinds`` info key (a ``cuda`` kind means yes)."""
    try:
        info = comm.Get_info()
        kinds = info.Get("mpi_memory_alloc_kinds")
        info.Free()
    except Exception:  # old MPI without the key or Get_info
        return QueryResult(None, "no mpi_memory_alloc_kinds")
    if kinds is None:
        return QueryResult(None, "no mpi_memory_alloc_kinds")
    if any(k.strip().startswith("cuda") for k in kinds.split(",")):
        return QueryResult(True, f"mpi_memory_alloc_kinds={kinds}")
    return QueryResult(None, f"mpi_memory_alloc_kinds={kinds} (no cuda kind)")


def combine_queries(library: QueryResult, kinds: QueryResult) -> QueryResult:
    """The library's yes/no wins; the info key can only add a yes."""
    if library.supported is not None:
        return library
    if kinds.supported:
        return kinds
    return QueryResult(None, f"{library.source}; {kinds.source}")


def _flag(value: str) -> bool | None:
    low = value.strip().lower()
    return True if low in _TRUE else False if low in _FALSE else None


def _ucx_says(value: str) -> bool | None:
    tls = [t.strip().lower() for t in value.split(",") if t.strip()]
    if not tls or "all" in tls:
        return None
    if tls[0].startswith("^"):  # exclusion list
        return False if any("cuda" in t for t in tls) else None
    return any(t.startswith(("cuda", "gdr")) for t in tls)


#: table key -> parser of its value
HINT_KEYS: dict[str, Callable[[str], bool | None]] = {
    "ompi_cuda_support": _flag,
    "mpich_gpu_support": _flag,
    "mpich_enable_gpu": _flag,
    "mv2_use_cuda": _flag,
    "ucx_tls": _ucx_says,
}


def read_hints(environ: Mapping[str, str] | None = None) -> list[Hint]:
    """Return the vendor hints that are set, each with what it says."""
    hints: list[Hint] = []
    for key, parse in HINT_KEYS.items():
        value = env.get(key, environ=environ)
        if value is not None:
            hints.append(Hint(env.TABLE[key][0], value, parse(value)))
    return hints


def facts_lines(comm: MPI.Intracomm, environ: Mapping[str, str] | None = None) -> list[str]:
    """Lines for ``doctor``: the library, its query answers and the hints (no communication)."""
    from mpi4py import MPI

    lib = query_library()
    kinds = query_alloc_kinds(comm)
    lines = [
        f"MPI library: {MPI.Get_library_version().splitlines()[0].strip()}",
        f"CUDA query (ctypes on libmpi): {lib.source} -> {_word(lib.supported)}",
        f"CUDA query (mpi4py, MPI-4.1 info): {kinds.source} -> {_word(kinds.supported)}",
    ]
    hints = read_hints(environ)
    lines += [f"env {h.name}={h.value} -> {_word(h.says)}" for h in hints] or ["env: no hints"]
    return lines


# ---------------------------------------------------------------------------- the rule


def should_probe(mode: str, query: QueryResult, hints: list[Hint]) -> tuple[bool, list[str]]:
    """Whether the (crash-prone) probe may run, and the reasons so far."""
    if mode not in CUDA_AWARE_MODES:
        raise ConfigError(with_hint(f"--cuda-aware {mode!r} is unknown", "use auto, yes or no"))
    reasons: list[str] = []
    if query.supported is not None or query.source:
        reasons.append(f"query: {query.source}")
    reasons += [f"env {h.name}={h.value} says {_word(h.says)}" for h in hints]
    if mode == "no":
        return False, ["forced by --cuda-aware no", *reasons]
    if mode == "yes":
        return True, ["forced by --cuda-aware yes", *reasons]
    if query.supported is False:
        return False, [*reasons, "the library says no: probe skipped"]
    against = [h for h in hints if h.says is False]
    if against:
        return False, [*reasons, f"{against[0].name} disables it: probe skipped"]
    if query.supported or any(h.says for h in hints):
        return True, reasons
    return False, [*reasons, "no evidence of CUDA support: probe skipped (it could crash)"]


def decide(mode: str, query: QueryResult, hints: list[Hint], probe: ProbeOutcome) -> Decision:
    """Combine query, hints and probe outcome into one rank's decision (pure).

    ``probe`` is "skipped" when :func:`should_probe` said no. A probe that ran and did not
    return "ok" always means no (``yes`` mode raises instead, see :func:`decide_cuda_aware`).
    """
    run, reasons = should_probe(mode, query, hints)
    if not run:
        return Decision(False, reasons, "skipped")
    if probe == "ok":
        return Decision(True, [*reasons, "probe all-reduce on device buffers verified"], probe)
    if probe == "skipped":
        return Decision(False, [*reasons, "probe not run"], probe)
    what = "returned wrong values" if probe == "wrong" else "failed"
    return Decision(False, [*reasons, f"probe all-reduce {what}: staged"], probe)


def _word(says: bool | None) -> str:
    return "yes" if says else "no" if says is False else "nothing"


# ---------------------------------------------------------------------------- probe


def _pattern(rank: int, n: int) -> torch.Tensor:
    """A non-trivial pattern exact in float32: no zeros, varies with index and rank."""
    import torch

    i = torch.arange(n, dtype=torch.int64)
    return (((i * 7 + rank * 13) % 251) + 1 + rank * 1000).to(torch.float32)


def probe_allreduce(comm: MPI.Intracomm, device: torch.device) -> ProbeOutcome:
    """Collective: all-reduce a known pattern on ``device`` buffers and check it on this rank.

    Two sizes (16 values and 1 MiB) cover the eager and rendezvous protocols; the sum is
    compared exactly with the one computed on the host.
    """
    import torch
    from mpi4py import MPI

    try:
        for n in (16, 1 << 18):
            t = _pattern(comm.rank, n).to(device)
            if device.type == "cuda":
                done = torch.cuda.Event()  # type: ignore[no-untyped-call]
                done.record(torch.cuda.current_stream(device))
                done.synchronize()
            comm.Allreduce(MPI.IN_PLACE, t, op=MPI.SUM)
            want = torch.stack([_pattern(r, n) for r in range(comm.size)]).sum(0)
            if not torch.equal(t.cpu(), want):
                return "wrong"
    except Exception:
        return "error"
    return "ok"


# ---------------------------------------------------------------------------- collective


def decide_cuda_aware(
    comm: MPI.Intracomm,
    device: torch.device,
    mode: str = "auto",
    *,
    probe: Probe | None = None,
    query: QueryResult | None = None,
    environ: Mapping[str, str] | None = None,
) -> Decision:
    """Collective: decide CUDA-aware or staged; every rank returns the same Decision.

    ``probe``/``query``/``environ`` are injectable for tests. A CPU device never uses the
    CUDA-aware path. Raises CommError when ``mode="yes"`` and the probe fails.
    """
    from mpi4py import MPI

    if mode not in CUDA_AWARE_MODES:
        raise ConfigError(with_hint(f"--cuda-aware {mode!r} is unknown", "use auto, yes or no"))
    if device.type != "cuda":
        return Decision(False, [f"device is {device.type}"], "skipped", host_device=True)
    q = query if query is not None else combine_queries(query_library(), query_alloc_kinds(comm))
    hints = read_hints(environ)
    run, _ = should_probe(mode, q, hints)
    run = bool(comm.allreduce(run, op=MPI.LAND))  # probe on all ranks or none
    outcome: ProbeOutcome = "skipped"
    if run:
        outcome = (probe or probe_allreduce)(comm, device)
    # the rank-local decision, but with the probe outcome agreed: anyone not ok -> not ok
    codes = comm.allgather(outcome)
    agreed: ProbeOutcome = "skipped" if not run else next((o for o in codes if o != "ok"), "ok")
    local = decide(mode, q, hints, agreed)
    votes = comm.allgather(local.use_cuda_aware)
    reasons = list(local.reasons)
    if run and agreed != "ok":
        bad = [r for r, o in enumerate(codes) if o != "ok"]
        reasons.append(f"probe not ok on rank(s) {bad}")
    if not all(votes) and local.use_cuda_aware:
        reasons.append(f"rank(s) {[r for r, v in enumerate(votes) if not v]} said no")
    use = all(votes)
    if mode == "yes" and not use:
        raise CommError(
            with_hint(
                f"rank {comm.rank}: --cuda-aware yes but the device all-reduce probe "
                f"{'returned wrong values' if agreed == 'wrong' else 'failed'} "
                f"on rank(s) {[r for r, o in enumerate(codes) if o != 'ok']}",
                "this MPI does not move GPU memory correctly; use --cuda-aware auto or no "
                "(staged through pinned host memory), or a CUDA-aware MPI build",
            )
        )
    return Decision(use, reasons, agreed)
