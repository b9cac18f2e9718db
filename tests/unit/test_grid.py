"""Serial tests of the process grid: the pure placement table and a one-rank Grid."""

from __future__ import annotations

import pytest
from mpi4py import MPI

from mpitrain.errors import ConfigError
from mpitrain.parallel import Grid
from mpitrain.parallel.grid import Coords, placement


def groups(table: list[Coords], axis: str) -> list[list[int]]:
    """The ranks of each group along ``axis`` ('tp', 'pp' or 'dp'), ordered by that axis."""
    others = [a for a in ("tp", "pp", "dp") if a != axis]
    out: dict[tuple[int, ...], list[int]] = {}
    for rank, c in sorted(enumerate(table), key=lambda rc: getattr(rc[1], axis)):
        out.setdefault(tuple(getattr(c, a) for a in others), []).append(rank)
    return sorted(out.values())


def test_two_nodes_of_four_keep_tensor_groups_inside_a_node() -> None:
    nodes = [0, 0, 0, 0, 1, 1, 1, 1]
    table = placement(nodes, 2, 2)
    assert table == [
        Coords(0, 0, 0), Coords(1, 0, 0), Coords(0, 1, 0), Coords(1, 1, 0),
        Coords(0, 0, 1), Coords(1, 0, 1), Coords(0, 1, 1), Coords(1, 1, 1),
    ]
    assert groups(table, "tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups(table, "pp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups(table, "dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    for g in groups(table, "tp") + groups(table, "pp"):
        assert len({nodes[r] for r in g}) == 1, g


def test_interleaved_ranks_still_put_tensor_groups_on_one_node() -> None:
    nodes = [0, 1, 0, 1, 0, 1, 0, 1]  # round-robin launch
    table = placement(nodes, 2, 2)
    assert groups(table, "tp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    for g in groups(table, "tp") + groups(table, "pp"):
        assert len({nodes[r] for r in g}) == 1, g
    # the data-parallel groups are what crosses the nodes
    assert all(len({nodes[r] for r in g}) == 2 for g in groups(table, "dp"))


@pytest.mark.parametrize(("nodes", "tensor", "pipeline"), [
    ([0] * 8, 2, 2), ([0, 1] * 6, 3, 2), ([0] * 4 + [1] * 4, 8, 1), ([0] * 6, 1, 1),
])
def test_every_coordinate_once(nodes: list[int], tensor: int, pipeline: int) -> None:
    table = placement(nodes, tensor, pipeline)
    data = len(nodes) // (tensor * pipeline)
    assert sorted(table) == sorted(
        Coords(t, p, d) for t in range(tensor) for p in range(pipeline) for d in range(data)
    )


@pytest.mark.parametrize(("size", "tensor", "pipeline"), [(6, 4, 1), (8, 3, 1), (4, 2, 3)])
def test_grid_that_does_not_divide_the_ranks_names_the_numbers(
    size: int, tensor: int, pipeline: int
) -> None:
    with pytest.raises(ConfigError) as info:
        placement([0] * size, tensor, pipeline)
    text = str(info.value)
    assert f"{size} ranks" in text, text
    assert f"tensor {tensor} x pipeline {pipeline}" in text, text
    assert f"multiple of {tensor * pipeline}" in text and "HINT" in text, text


@pytest.mark.parametrize(("tensor", "pipeline"), [(0, 1), (1, 0), (-2, 1)])
def test_sizes_below_one_raise(tensor: int, pipeline: int) -> None:
    with pytest.raises(ConfigError):
        placement([0] * 4, tensor, pipeline)


def test_one_rank_grid() -> None:
    grid = Grid.create(MPI.COMM_SELF)
    try:
        assert (grid.tensor, grid.pipeline, grid.data) == (1, 1, 1)
        assert (grid.tp_rank, grid.pp_rank, grid.dp_rank) == (0, 0, 0)
        assert (grid.tp_comm.size, grid.pp_comm.size, grid.dp_comm.size) == (1, 1, 1)
        assert grid.tied_comm is None
        assert grid.first_stage and grid.last_stage
        assert grid.tensor_inside_nodes and grid.num_nodes == 1
        assert grid.describe() == (
            "grid tensor 1 x pipeline 1 x data 1 on 1 node(s); tensor groups inside nodes"
        )
    finally:
        grid.free()


def test_one_rank_cannot_hold_two_tensor_ranks() -> None:
    with pytest.raises(ConfigError, match="1 ranks do not fill a grid of tensor 2"):
        Grid.create(MPI.COMM_SELF, tensor=2)
