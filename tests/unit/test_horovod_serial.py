"""The Horovod layer on one rank: agreement messages, splits, scaling, handles, errors."""

from __future__ import annotations

from collections.abc import Iterator

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
    ok = np.array([[N.OK, 7, 1], [N.OK, 7, 1]])
    assert not N.disagree(ok)
    assert N.disagree(np.array([[N.OK, 7, 1], [N.OK, 8, 1]]))
    assert N.disagree(np.array([[N.BAD, 7, 1], [N.OK, 7, 1]]))
    assert not N.disagree(np.array([[N.JOINED, 3, 1], [N.OK, 7, 1]]))


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
    assert hvd.poll(h) and torch.equal(hvd.synchronize(int(h)), t)  # plain ints work too
    assert hvd.synchronize(h) is not None  # the handle object still owns its op
    assert hvd.synchronize(10**9) is None
    out, splits = hvd.alltoall(torch.ones(3, 2), splits=[3])
    assert out.shape == (3, 2) and splits.tolist() == [3]
    assert hvd.reducescatter(torch.ones(5)).shape == (5,)
    assert hvd.join() == 0
    with pytest.raises(ValueError, match=r"not a member|registered"):
        hvd.allreduce(t, process_set=hvd.ProcessSet([0]))
    with pytest.raises(NotImplementedError, match="checkpoint-and-requeue"):
        hvd.elastic.run  # noqa: B018
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
