"""Sampler math: exact coverage, disjoint equal parts, order independent of N, resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mpitrain.data.sampler import DistributedSampler
from mpitrain.data.sharding import epoch_order
from mpitrain.errors import DataError


def epoch(n: int, world: int, *, drop_last: bool, shuffle: str = "global", b: int = 5):
    """Simulate every rank for one epoch: per rank a list of (indices, mask) batches."""
    out = []
    for r in range(world):
        s = DistributedSampler(n, r, world, seed=3, shuffle=shuffle, drop_last=drop_last)
        s.set_epoch(2)
        out.append(list(s.batches(b)))
    return out


@pytest.mark.parametrize(("n", "world"), list(itertools.product([1, 10, 37, 100], [1, 2, 3, 4, 7])))
@pytest.mark.parametrize("drop_last", [False, True])
def test_each_sample_once_and_equal_lengths(n: int, world: int, drop_last: bool) -> None:
    if drop_last and n < world:
        with pytest.raises(DataError):
            DistributedSampler(n, 0, world, drop_last=True)
        return
    parts = epoch(n, world, drop_last=drop_last)
    if drop_last and n < world * 5:  # no full batch of 5 per rank: nothing to yield
        assert all(batches == [] for batches in parts)
        return
    lengths = {sum(len(i) for i, _ in batches) for batches in parts}
    counts = {len(batches) for batches in parts}
    assert len(lengths) == 1 and len(counts) == 1  # every rank: same samples, same batches
    real = np.concatenate([i[m] for batches in parts for i, m in batches])
    assert len(real) == len(set(real.tolist()))  # disjoint
    expected = n - n % (world * 5) if drop_last else n  # drop_last: only full batches (b=5)
    assert len(real) == expected
    if not drop_last:
        assert sorted(real.tolist()) == list(range(n))
    else:  # the kept samples are exactly the first full global batches of the order
        order = epoch_order(n, 3, 2, "global")
        assert sorted(real.tolist()) == sorted(order[:expected].tolist())
        assert all(m.all() and len(i) == 5 for batches in parts for i, m in batches)


def test_drop_last_with_fewer_samples_than_ranks_times_batch_fails_clearly() -> None:
    s = DistributedSampler(30, 1, 4, drop_last=True)
    assert s.num_batches(8) == 0
    with pytest.raises(DataError, match=r"30 samples are fewer than ranks x batch \(4 x 8\)"):
        s.check_batch(8)
    s.check_batch(7)  # 28 <= 30: one full batch per rank
    assert s.num_batches(7) == 1


@pytest.mark.parametrize("shuffle", ["global", "chunk", "none"])
def test_global_order_independent_of_rank_count(shuffle: str) -> None:
    n, b = 103, 4
    orders = []
    for world in (1, 2, 4):
        parts = epoch(n, world, drop_last=False, shuffle=shuffle, b=b)
        seq = []  # global order: batch k of rank 0, 1, ... interleaved by stride
        for k in range(len(parts[0])):
            stacked = [parts[r][k] for r in range(world)]
            for j in range(len(stacked[0][0])):
                seq += [int(i[j]) for i, m in stacked if m[j]]
        orders.append(seq)
    assert orders[0] == orders[1] == orders[2]
    assert sorted(orders[0]) == list(range(n))


def test_chunk_mode_is_a_permutation_that_keeps_chunks_together() -> None:
    order = epoch_order(10_000, seed=1, epoch=0, shuffle="chunk", chunk=100, window=4)
    assert sorted(order.tolist()) == list(range(10_000))
    windows = order.reshape(-1, 400) // 100  # each window of 4 runs reads exactly 4 chunks
    assert all(len(set(w.tolist())) == 4 for w in windows)
    assert not np.array_equal(order, np.arange(10_000))


def consume(sampler: DistributedSampler, batches: int, b: int) -> list[int]:
    seen = []
    for idx, mask in itertools.islice(sampler.batches(b), batches):
        seen += idx[mask].tolist()
        sampler.advance(len(idx))
    return seen


@pytest.mark.parametrize(("before", "after"), [(4, 2), (2, 3), (3, 3), (1, 7)])
@pytest.mark.parametrize("stop_after", [0, 1, 3])
def test_resume_with_other_rank_count_covers_rest_once(
    before: int, after: int, stop_after: int
) -> None:
    n, b = 97, 4
    first = [DistributedSampler(n, r, before, seed=5) for r in range(before)]
    seen: list[int] = []
    for s in first:
        s.set_epoch(1)
        seen += consume(s, stop_after, b)
    state = first[0].state_dict()
    assert all(s.state_dict() == state for s in first)  # every rank agrees on the position
    second = [DistributedSampler(n, r, after, seed=0) for r in range(after)]
    for s in second:
        s.load_state_dict(state)
        seen += consume(s, 10**6, b)
    assert sorted(seen) == list(range(n))


def test_epochs_differ_and_repeat_with_seed() -> None:
    a = epoch_order(50, 1, 0, "global")
    assert not np.array_equal(a, epoch_order(50, 1, 1, "global"))
    assert np.array_equal(a, epoch_order(50, 1, 0, "global"))


def test_load_state_for_other_dataset_is_refused() -> None:
    s = DistributedSampler(10, 0, 1)
    with pytest.raises(DataError, match="10"):
        DistributedSampler(11, 0, 1).load_state_dict(s.state_dict())
