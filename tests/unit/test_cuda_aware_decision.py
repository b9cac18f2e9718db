"""CUDA-aware decision: every combination of query result, env hint and probe outcome."""

from __future__ import annotations

import ctypes
import itertools

import pytest
import torch

from mpitrain.errors import ConfigError
from mpitrain.runtime.cuda_aware import (
    Hint,
    QueryResult,
    combine_queries,
    decide,
    query_library,
    read_hints,
    should_probe,
)

QUERIES = [QueryResult(True, "q=1"), QueryResult(False, "q=0"), QueryResult(None, "none")]
HINTS = [[], [Hint("MPICH_GPU_SUPPORT_ENABLED", "1", True)], [Hint("MV2_USE_CUDA", "0", False)]]
PROBES = ["ok", "wrong", "error"]


def expected_auto(q: bool | None, h: bool | None, probe: str) -> bool:
    if q is False or h is False:
        return False  # a "no" anywhere: no probe, staged
    if q is None and h is None:
        return False  # no evidence: the crash-prone probe is not run
    return probe == "ok"


@pytest.mark.parametrize(
    ("query", "hints", "probe"), list(itertools.product(QUERIES, HINTS, PROBES))
)
def test_auto_combinations(query: QueryResult, hints: list[Hint], probe: str) -> None:
    h = hints[0].says if hints else None
    run, _ = should_probe("auto", query, hints)
    d = decide("auto", query, hints, probe if run else "skipped")  # type: ignore[arg-type]
    assert d.use_cuda_aware is expected_auto(query.supported, h, probe)
    assert run is (
        query.supported is not False and h is not False and (query.supported is True or h is True)
    )
    assert d.reasons and d.reasons[0] == f"query: {query.source}"
    if run and probe == "wrong":
        assert "wrong values" in d.reasons[-1]
    if not run:
        assert d.probe == "skipped" and "probe skipped" in d.reasons[-1]


@pytest.mark.parametrize(("query", "hints"), list(itertools.product(QUERIES, HINTS)))
def test_forced_modes(query: QueryResult, hints: list[Hint]) -> None:
    assert decide("no", query, hints, "ok").use_cuda_aware is False
    assert decide("no", query, hints, "ok").reasons[0] == "forced by --cuda-aware no"
    assert decide("yes", query, hints, "ok").use_cuda_aware is True
    # a probe that returns wrong values forces no, even when asked for yes
    assert decide("yes", query, hints, "wrong").use_cuda_aware is False


def test_unknown_mode() -> None:
    with pytest.raises(ConfigError, match="use auto, yes or no"):
        decide("maybe", QUERIES[0], [], "ok")


def test_env_hints_parse() -> None:
    environ = {
        "OMPI_MCA_opal_cuda_support": "true",
        "MPICH_GPU_SUPPORT_ENABLED": "0",
        "MV2_USE_CUDA": "1",
        "UCX_TLS": "rc,cuda_copy,cuda_ipc",
        "MPIR_CVAR_ENABLE_GPU": "weird",
    }
    says = {h.name: h.says for h in read_hints(environ)}
    assert says == {
        "OMPI_MCA_opal_cuda_support": True,
        "MPICH_GPU_SUPPORT_ENABLED": False,
        "MPIR_CVAR_ENABLE_GPU": None,
        "MV2_USE_CUDA": True,
        "UCX_TLS": True,
    }
    assert [h.says for h in read_hints({"UCX_TLS": "sm,self"})] == [False]
    assert [h.says for h in read_hints({"UCX_TLS": "^cuda_ipc"})] == [False]
    assert [h.says for h in read_hints({"UCX_TLS": "all"})] == [None]
    assert read_hints({}) == []


def test_combine_queries() -> None:
    lib_no, kinds_yes = QueryResult(False, "lib"), QueryResult(True, "kinds")
    assert combine_queries(lib_no, kinds_yes) is lib_no
    assert combine_queries(QueryResult(None, "a"), kinds_yes) is kinds_yes
    assert combine_queries(QueryResult(None, "a"), QueryResult(None, "b")).supported is None


def test_query_library_without_symbols() -> None:
    class Empty(ctypes.CDLL):
        def __init__(self) -> None:  # no library: every symbol is missing
            pass

        def __getattr__(self, name: str) -> object:
            raise AttributeError(name)

    assert query_library([Empty()]).supported is None


def test_query_library_resolves_here() -> None:
    from mpi4py import MPI

    assert MPI.Is_initialized()
    q = query_library()
    assert q.supported is not None, q  # MPICH >= 4.1 and Open MPI both export a query
    if "MPICH" in MPI.Get_library_version():
        assert q.source.startswith("MPIX_GPU_query_support(CUDA)="), q
        if not torch.cuda.is_available():
            assert q.supported is False, q


def test_facts_lines_for_doctor() -> None:
    from mpi4py import MPI

    from mpitrain.runtime.cuda_aware import facts_lines

    lines = facts_lines(MPI.COMM_SELF, {"MV2_USE_CUDA": "0"})
    assert lines[0].startswith("MPI library: ")
    assert lines[1].startswith("CUDA query (ctypes on libmpi): ")
    assert lines[2].startswith("CUDA query (mpi4py, MPI-4.1 info): mpi_memory_alloc_kinds")
    assert lines[3:] == ["env MV2_USE_CUDA=0 -> no"]


def test_describe_names_the_path() -> None:
    from mpitrain.runtime.cuda_aware import Decision

    assert (
        decide("auto", QUERIES[1], [], "skipped")
        .describe()
        .startswith("cuda-aware MPI: staged (through pinned host buffers); query: q=0; ")
    )
    assert "CUDA-aware (device buffers straight to MPI)" in Decision(True, ["x"]).describe()
    assert "not used (host tensors)" in Decision(False, [], host_device=True).describe()
