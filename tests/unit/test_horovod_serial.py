"""The Horovod layer on one rank: agreement messages, splits, scaling, handles, errors."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import mpitrain.horovod as hvd
from mpitrain.horovod import negotiate as N
from mpitrain.horovod import ops as O


@pytest.fixture()
def single() -> Iterator[None]:
    hvd.init()
    try:
        yield
    finally:
        hvd.shutdown()


def test_not_initialized_raises_horovods_error() -> None:
    with pytest.raises(ValueError, match="has not been initialized"):
        hvd.rank()
    with pytest.raises(ValueError, match="has not been initialized"):
        hvd.allreduce(torch.ones(1))


def test_describe_names_the_first_difference() -> None:
    a = N.Request("allreduce", "g", ("torch.float32",), ((2,),), "sum")
    b = N.Request("allreduce", "g", ("torch.float32",), ((3,),), "sum")
    msg = N.describe([(a, None), (b, None)])
    assert msg == "Allreduce 'g': Mismatched allreduce tensor shapes: rank 0: [2]; rank 1: [3]"
    c = N.Request("allgather", None, ("torch.float32",), ((2, 1),))
    d = N.Request("allgather", None, ("torch.float32",), ((5, 2),))
    assert c.key() != d.key()
    assert N.Request("allgather", None, ("torch.float32",), ((9, 1),)).key() == c.key()
    assert "[*, 1]" in N.describe([(c, None), (d, None)])
    assert N.describe([(a, None), (None, None), (a, "bad splits")]) == "rank 2: bad splits"


def test_rows_decide_the_path() -> None:
    def rows(*rs: np.ndarray) -> np.ndarray:
        return np.stack(rs)

    ok = N.decide(rows(N.row(N.OK, 0, 1, [7]), N.row(N.OK, 0, 1, [7])))
    assert ok.consumed == 1 and not ok.failed and ok.entries == (7,)
    assert N.decide(rows(N.row(N.OK, 0, 1, [7]), N.row(N.OK, 0, 1, [8]))).failed
    assert N.decide(rows(N.row(N.BAD, 0, 1, [7]), N.row(N.OK, 0, 1, [7]))).failed
    joined = N.decide(rows(N.row(N.JOINED, 3, 1), N.row(N.OK, 0, 1, [7, 9])))
    assert joined.joined == (0,) and joined.consumed == 1 and not joined.failed
    assert N.decide(rows(N.row(N.JOINED, 3, 1), N.row(N.JOINED, 5, 1))).done
    notice = N.row(N.SHUTDOWN, 2, -1)
    assert N.decide(rows(notice, N.row(N.OK, 0, 1, [7]))).shutdown == 2


def test_a_round_settles_the_common_prefix_of_batches() -> None:
    """Ranks offer what they have queued; the shortest offer settles, the first operation
    that differs fails (naming the cache slots it involved), the rest is offered again."""
    slot = N.CACHED | 4
    r0 = N.row(N.OK, 0, 1, [slot, 11, 12])
    r1 = N.row(N.OK, 0, 1, [slot, 11])
    rnd = N.decide(np.stack([r0, r1]))
    assert (rnd.consumed, rnd.failed, rnd.entries) == (2, False, (slot, 11))
    r1 = N.row(N.OK, 0, 1, [slot, N.CACHED | 5, 12])
    rnd = N.decide(np.stack([r0, r1]))
    assert (rnd.consumed, rnd.failed, rnd.entries, rnd.stale) == (2, True, (slot,), (5,))
    assert N.Request("allreduce", "g").key() < N.CACHED  # digests never look like slots


def test_response_cache_is_the_same_sequence_on_every_rank() -> None:
    from mpitrain.horovod.cache import ResponseCache

    reqs = [N.Request("allreduce", f"t{i}", ("torch.float32",), ((i + 1,),), "sum")
            for i in range(4)]
    caches = [ResponseCache(capacity=3) for _ in range(2)]
    for c in caches:  # every rank applies the same agreed sequence
        for q in reqs[:3]:
            assert c.entry(q) == q.key()
            c.agreed(q, q.key())
        c.agreed(reqs[0], c.entry(reqs[0]))  # a hit: t0 becomes the most recent
        c.agreed(reqs[3], reqs[3].key())  # full: t1 (least recently agreed) goes
    assert caches[0].signatures() == caches[1].signatures()
    assert [s[0] for s in caches[0].signatures()] == [2, 0, 3]
    assert caches[0].entry(reqs[1]) == reqs[1].key()
    assert caches[0].entry(reqs[0]) == N.CACHED | 0 and caches[0].request(0) == reqs[0]
    assert (caches[0].hits, caches[0].misses) == (1, 4)
    caches[0].evict((0,))
    assert caches[0].entry(reqs[0]) == reqs[0].key() and len(caches[0]) == 2
    off = ResponseCache(capacity=0)
    off.agreed(reqs[0], reqs[0].key())
    assert off.entry(reqs[0]) == reqs[0].key()


def test_splits_and_scaling_follow_horovod() -> None:
    assert O.even_splits(7, 3) == [3, 2, 2]
    assert O._splits_error(None, 6, 3) == ([2, 2, 2], None)
    assert O._splits_error(None, 7, 3)[1] is not None
    assert O._splits_error([1, 2], 3, 2) == ([1, 2], None)
    assert O._splits_error([1, 1], 3, 2)[1] is not None
    t = torch.tensor([-3, 3, 5], dtype=torch.int32)
    O.finish_reduce_(t, "average", 2, 1.0)
    assert t.tolist() == [-1, 1, 2]  # truncated toward zero, like Horovod's ScaleBuffer
    f = torch.tensor([3.0])
    O.finish_reduce_(f, "average", 2, 4.0)
    assert f.tolist() == [6.0]
    with pytest.raises(ValueError, match="supersedes"):
        O.op_of(hvd.Sum, True)
    assert O.op_of(None, False) == hvd.Sum and O.op_of(None, None) == hvd.Average


def test_single_rank_collectives_and_handles(single: None) -> None:
    t = torch.arange(4.0)
    h = hvd.allreduce_async(t, name="x")
    assert isinstance(h, int) and int(h) >= 0
    with pytest.raises(ValueError, match="same name"):
        hvd.allreduce_async(t, name="x")
    while not hvd.poll(h):  # queued: done once the communication thread ran it
        pass
    assert torch.equal(hvd.synchronize(int(h)), t)  # plain ints work too
    assert hvd.synchronize(h) is not None  # the handle object still owns its op
    assert hvd.synchronize(10**9) is None
    out, splits = hvd.alltoall(torch.ones(3, 2), splits=[3])
    assert out.shape == (3, 2) and splits.tolist() == [3]
    assert hvd.reducescatter(torch.ones(5)).shape == (5,)
    assert hvd.join() == 0
    with pytest.raises(ValueError, match=r"not a member|registered"):
        hvd.allreduce(t, process_set=hvd.ProcessSet([0]))
    with pytest.raises(ValueError, match="Tensor type"):
        hvd.allreduce(torch.ones(2, dtype=torch.complex64))


def test_process_sets_on_one_rank(single: None) -> None:
    from mpi4py import MPI

    ps = hvd.add_process_set(hvd.ProcessSet(MPI.COMM_WORLD))  # from a communicator
    assert ps.ranks == [0] and ps.included() and ps.rank() == 0 and ps.size() == 1
    assert hvd.allreduce(torch.ones(2), op=hvd.Sum, process_set=ps).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="already registered"):
        hvd.add_process_set([0])
    assert hvd.remove_process_set(ps) and not hvd.remove_process_set(ps)
    assert not hvd.remove_process_set(hvd.global_process_set)
    with pytest.raises(ValueError, match="must be non-empty"):
        hvd.add_process_set([5])


def test_init_on_a_list_of_ranks_and_reinit() -> None:
    hvd.init(comm=[0])
    try:
        assert hvd.size() == 1 and hvd.rank() == 0 and hvd.is_initialized()
        assert hvd.global_process_set.ranks == [0]
    finally:
        hvd.shutdown()
    assert not hvd.is_initialized() and hvd.global_process_set.process_set_id is None


def test_init_makes_exceptions_abort_and_shutdown_puts_the_hooks_back() -> None:
    import threading

    before = (sys.excepthook, threading.excepthook)
    hvd.init()
    try:
        assert sys.excepthook is not before[0] and threading.excepthook is not before[1]
        assert sys.excepthook.__module__ == "mpitrain.runtime.abort"
    finally:
        hvd.shutdown()  # alone: its notice completes at once
    assert (sys.excepthook, threading.excepthook) == before


def test_later_calls_raise_once_a_rank_shut_down(single: None) -> None:
    from mpitrain.horovod.context import context

    ctx = context()
    ctx.down = 3  # as if rank 3's notice had arrived
    for fn in (lambda: hvd.allreduce(torch.ones(1)), hvd.barrier, hvd.join,
               lambda: hvd.add_process_set([0]), lambda: hvd.start_timeline("x.json"),
               lambda: hvd.DistributedOptimizer(torch.optim.SGD([torch.ones(1)], lr=1))):
        with pytest.raises(hvd.HorovodInternalError, match="Horovod has been shut down: rank 3"):
            fn()


def test_elastic_sampler_splits_what_is_left(monkeypatch: pytest.MonkeyPatch) -> None:
    from mpitrain.horovod.elastic import sampler as S

    def split(n: int, processed: int) -> list[list[int]]:
        parts = []
        for r in range(n):
            monkeypatch.setattr(S, "size", lambda n=n: n)
            monkeypatch.setattr(S, "rank", lambda r=r: r)
            s = S.ElasticSampler(list(range(10)), shuffle=True, seed=1)
            s.load_state_dict({"epoch": 2, "processed_num": processed})
            parts.append(list(s))
            assert len(s) == len(parts[-1])
        return parts

    whole = split(1, 0)[0]
    assert sorted(whole) == list(range(10)) and whole != list(range(10))  # shuffled
    parts = split(3, 4)  # 6 left: 2 each, nothing repeated or lost
    assert sorted(i for p in parts for i in p) == sorted(whole[4:])
    parts = split(4, 3)  # 7 left: padded to 8 with the first one left
    assert [len(p) for p in parts] == [2] * 4
    assert sorted(i for p in parts for i in p) == sorted([*whole[3:], whole[3]])


# Horovod 0.28.1's public names, by module (its source: horovod/torch/mpi_ops.py, functions.py,
# compression.py, __init__.py); helpers it imports from horovod.common.util and the modules
# torch, warnings, mpi_lib, cloudpickle are left out.
HOROVOD_MPI_OPS = """
Adasum Average Compression HorovodAllgather HorovodAllreduce HorovodAlltoall HorovodBroadcast
HorovodGroupedAllgather HorovodGroupedAllreduce HorovodGroupedReducescatter HorovodInternalError
HorovodReducescatter Max Min ProcessSet Product Sum add_process_set allgather allgather_async
allreduce allreduce_ allreduce_async allreduce_async_ alltoall alltoall_async barrier broadcast
broadcast_ broadcast_async broadcast_async_ ccl_built cross_rank cross_size cuda_built ddl_built
global_process_set gloo_built gloo_enabled grouped_allgather grouped_allgather_async
grouped_allreduce grouped_allreduce_ grouped_allreduce_async grouped_allreduce_async_
grouped_reducescatter grouped_reducescatter_async handle_average_backwards_compatibility init
is_homogeneous is_initialized join local_rank local_size mpi_built mpi_enabled
mpi_threads_supported nccl_built poll rank reducescatter reducescatter_async remove_process_set
rocm_built shutdown size sparse_allreduce_async start_timeline stop_timeline synchronize
""".split()
HOROVOD_FUNCTIONS = """
ProcessSet allgather allgather_object broadcast_ broadcast_async_ broadcast_object
broadcast_optimizer_state broadcast_parameters global_process_set rank size synchronize
""".split()
HOROVOD_COMPRESSION = "Compression Compressor FP16Compressor NoneCompressor".split()
HOROVOD_TORCH = sorted({
    *HOROVOD_MPI_OPS, "elastic", "allgather_object", "broadcast_object",
    "broadcast_optimizer_state", "broadcast_parameters", "DistributedOptimizer",
    "SyncBatchNorm"} - {"handle_average_backwards_compatibility", "is_homogeneous",
                        "HorovodAllgather", "HorovodAllreduce", "HorovodAlltoall",
                        "HorovodBroadcast", "HorovodGroupedAllgather", "HorovodGroupedAllreduce",
                        "HorovodGroupedReducescatter", "HorovodReducescatter"})


@pytest.fixture()
def alias_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The alias installed in a temporary directory at the front of sys.path."""
    from mpitrain.horovod import alias

    alias.install(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield tmp_path
    finally:
        for name in [m for m in sys.modules if m == "horovod" or m.startswith("horovod.")]:
            del sys.modules[name]


def test_alias_resolves_horovods_modules_to_mpitrain(alias_on_path: Path) -> None:
    import horovod
    import horovod.common.elastic
    import horovod.torch
    import horovod.torch.elastic.state
    from horovod.common.exceptions import (
        HorovodInternalError,
        HostsUpdatedInterrupt,
    )
    from horovod.torch import compression, functions, mpi_ops

    import mpitrain.horovod

    assert horovod.torch is mpitrain.horovod and horovod.__version__ == "0.28.1+mpitrain"
    assert str(alias_on_path) in horovod.__file__
    for module, names in ((mpi_ops, HOROVOD_MPI_OPS), (functions, HOROVOD_FUNCTIONS),
                          (compression, HOROVOD_COMPRESSION), (horovod.torch, HOROVOD_TORCH)):
        missing = [n for n in names if not hasattr(module, n)]
        assert not missing, (module.__name__, missing)
    assert mpi_ops.allreduce is hvd.allreduce and functions.broadcast_object is hvd.broadcast_object
    assert HorovodInternalError is hvd.HorovodInternalError
    assert HostsUpdatedInterrupt(True).skip_sync is True
    assert horovod.torch.elastic.state.TorchState is hvd.elastic.TorchState
    assert horovod.common.elastic.ObjectState is hvd.elastic.ObjectState
    assert sys.modules["horovod.torch.mpi_ops"] is mpitrain.horovod.mpi_ops  # no second copy
    assert mpi_ops.handle_average_backwards_compatibility(None, False) == hvd.Sum
    with pytest.raises(AttributeError, match="mpiexec"):
        horovod.run  # noqa: B018 - horovodrun's API is not provided


def test_horovods_autograd_signatures(single: None) -> None:
    from mpitrain.horovod import mpi_ops as M

    t = torch.ones(2, requires_grad=True)
    # Horovod's forward arguments: (tensor, average, name, op, prescale, postscale, set)
    out = M.HorovodAllreduce.apply(t, None, "a", hvd.Sum, 2.0, 1.0, hvd.global_process_set)
    out.sum().backward()
    assert out.tolist() == [2.0, 2.0] and t.grad is not None and t.grad.tolist() == [2.0, 2.0]
    g = M.HorovodGroupedAllreduce.apply(False, None, None, 1.0, 3.0, hvd.global_process_set, t)
    assert g[0].tolist() == [3.0, 3.0]
    # (tensor, name, op, process_set, prescale, postscale)
    rs = M.HorovodReducescatter.apply(t, None, hvd.Sum, hvd.global_process_set, 1.0, 5.0)
    assert rs.tolist() == [5.0, 5.0]
    grs = M.HorovodGroupedReducescatter.apply(None, hvd.Sum, hvd.global_process_set, 1.0, 1.0, t)
    assert grs[0].tolist() == [1.0, 1.0]


def test_alias_install_refuses_a_real_horovod_and_uninstalls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mpitrain.errors import ConfigError
    from mpitrain.horovod import alias
    from mpitrain.horovod.__main__ import main

    real = tmp_path / "real"
    (real / "horovod").mkdir(parents=True)
    (real / "horovod" / "__init__.py").write_text("__version__ = '0.28.1'\n")
    with pytest.raises(ConfigError, match=r"real Horovod is installed at .*real/horovod"):
        alias.install(real)  # never overwritten
    with pytest.raises(ConfigError, match="real Horovod"):
        alias.uninstall(real)  # never removed
    assert (real / "horovod" / "__init__.py").read_text() == "__version__ = '0.28.1'\n"
    assert sorted(p.name for p in real.iterdir()) == ["horovod"]

    monkeypatch.syspath_prepend(str(real))  # importable from elsewhere: never shadowed
    other = tmp_path / "other"
    assert main(["install-alias", "--target", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HINT" in err and not other.exists()

    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(real)])
    target = tmp_path / "site"
    assert main(["install-alias", "--target", str(target)]) == 0
    assert main(["install-alias", "--target", str(target)]) == 0  # again: replaced in place
    meta = (target / alias.DIST_INFO / "RECORD").read_text().splitlines()
    assert sorted(r.split(",")[0] for r in meta) == sorted(
        [*alias.files(), *(f"{alias.DIST_INFO}/{n}" for n in
                           ("METADATA", "INSTALLER", "top_level.txt", "RECORD"))])
    (target / "horovod" / "__pycache__").mkdir()  # as after an import
    (target / "horovod" / "__pycache__" / "torch.cpython-311.pyc").write_bytes(b"x")
    assert main(["install-alias", "--target", str(target), "--uninstall"]) == 0
    assert list(target.iterdir()) == []
    assert not alias.uninstall(target)  # nothing left to remove
    assert "removed the horovod alias" in capsys.readouterr().out


def test_pip_uninstall_removes_the_alias(tmp_path: Path) -> None:
    import subprocess
    import sysconfig

    from mpitrain.horovod import alias

    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    site = Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    assert site != Path(sysconfig.get_paths()["purelib"])
    alias.install(site)
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "uninstall",
                           "-y", "horovod"], capture_output=True, text=True)
    assert proc.returncode == 0 and "Successfully uninstalled horovod-0.28.1+mpitrain" in \
        proc.stdout, proc.stdout + proc.stderr
    assert not any(p.name.startswith("horovod") for p in site.iterdir())


def test_progress_needs_thread_multiple(monkeypatch: pytest.MonkeyPatch) -> None:
    """``thread`` is refused with a hint where MPI gave less than MPI_THREAD_MULTIPLE;
    ``auto`` falls back to ``poll`` with a warning."""
    from mpi4py import MPI

    from mpitrain.horovod.engine import resolve_progress

    assert resolve_progress("auto") == "auto" and resolve_progress("poll") == "poll"
    monkeypatch.setattr(MPI, "Query_thread", lambda: MPI.THREAD_SERIALIZED)
    with pytest.raises(ValueError, match=r"MPI_THREAD_MULTIPLE.*HINT: use progress='poll'"):
        resolve_progress("thread")
    with pytest.warns(UserWarning, match="progress='poll'"):
        assert resolve_progress("auto") == "poll"
    with pytest.raises(ValueError, match="progress must be"):
        resolve_progress("threads")
