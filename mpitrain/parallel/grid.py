"""``Grid``: ranks placed on a tensor x pipeline x data grid, tensor groups inside a node.

Placement: ranks are ordered by (node, rank); consecutive positions form a tensor group,
consecutive tensor groups form a pipeline, and what is left is data parallel. With at least
``tensor`` ranks per node the tensor all-reduces (two per transformer block, forward and
backward) never leave a node; pipeline sends come next; data-parallel all-reduces, once per
step, cross nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, cast

from mpitrain.errors import ConfigError, with_hint
from mpitrain.runtime.ulfm import derived

if TYPE_CHECKING:
    from mpi4py import MPI


class Coords(NamedTuple):
    """A rank's place on the grid."""

    tp: int
    pp: int
    dp: int


def coords(position: int, tensor: int, pipeline: int) -> Coords:
    """Return the grid coordinates of ``position`` (in node-major order)."""
    block = tensor * pipeline
    return Coords(position % tensor, (position // tensor) % pipeline, position // block)


def placement(nodes: Sequence[int], tensor: int, pipeline: int) -> list[Coords]:
    """Return each rank's coordinates, given each rank's node index (pure; the tests use it)."""
    size = len(nodes)
    if tensor < 1 or pipeline < 1 or size % (tensor * pipeline):
        raise ConfigError(
            with_hint(
                f"{size} ranks do not fill a grid of tensor {tensor} x pipeline {pipeline}",
                f"launch a multiple of {tensor * pipeline} ranks",
            )
        )
    order = sorted(range(size), key=lambda r: (nodes[r], r))
    out = [Coords(0, 0, 0)] * size
    for position, rank in enumerate(order):
        out[rank] = coords(position, tensor, pipeline)
    return out


@dataclass(frozen=True)
class Grid:
    """This rank's place on the grid and the communicators of its groups.

    Build with :meth:`create` (collective). ``tied_comm`` joins the first and the last
    pipeline stage of one (tensor, data) coordinate, for parameters both hold (tied
    embeddings); it is None on the other stages and when ``pipeline == 1``.
    """

    comm: MPI.Intracomm
    tensor: int
    pipeline: int
    data: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_comm: MPI.Intracomm
    pp_comm: MPI.Intracomm
    dp_comm: MPI.Intracomm
    tied_comm: MPI.Intracomm | None
    tensor_inside_nodes: bool
    num_nodes: int

    @classmethod
    def create(
        cls, comm: MPI.Intracomm, *, tensor: int = 1, pipeline: int = 1,
        node_index: int | None = None,
    ) -> Grid:
        """Collective: place the ranks of ``comm`` and split it into the group communicators.

        ``node_index`` is this rank's node (default: from ``COMM_TYPE_SHARED`` through
        :class:`mpitrain.runtime.world.World`, which honours MPITRAIN_RANKS_PER_NODE).
        """
        from mpi4py import MPI

        own = derived(comm.Dup())
        if node_index is None:
            from mpitrain.runtime.world import World

            world = World.create(own)
            node_index = world.node_index
            world.free()
        nodes = [int(n) for n in own.allgather(node_index)]
        try:
            table = placement(nodes, tensor, pipeline)  # same ConfigError on every rank
        except ConfigError:
            own.Free()
            raise
        me = table[own.rank]
        data = own.size // (tensor * pipeline)

        def split(color: int, key: int) -> MPI.Intracomm:
            return cast("MPI.Intracomm", derived(own.Split(color, key)))

        tp_comm = split(me.pp + pipeline * me.dp, me.tp)
        pp_comm = split(me.tp + tensor * me.dp, me.pp)
        dp_comm = split(me.tp + tensor * me.pp, me.dp)
        ends = pipeline > 1 and me.pp in (0, pipeline - 1)
        tied = derived(own.Split(me.tp + tensor * me.dp if ends else MPI.UNDEFINED, me.pp))
        tied_comm = None if tied == MPI.COMM_NULL else cast("MPI.Intracomm", tied)
        inside = all(
            len({nodes[r] for r in range(own.size) if table[r][1:] == c[1:]}) == 1
            for c in table
        )
        return cls(
            comm=own, tensor=tensor, pipeline=pipeline, data=data,
            tp_rank=me.tp, pp_rank=me.pp, dp_rank=me.dp,
            tp_comm=tp_comm, pp_comm=pp_comm, dp_comm=dp_comm, tied_comm=tied_comm,
            tensor_inside_nodes=inside, num_nodes=len(set(nodes)),
        )

    @property
    def first_stage(self) -> bool:
        """Whether this rank runs the first pipeline stage."""
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        """Whether this rank runs the last pipeline stage (the loss)."""
        return self.pp_rank == self.pipeline - 1

    def describe(self) -> str:
        """One line: the grid's shape and where the tensor groups sit."""
        where = "inside nodes" if self.tensor_inside_nodes else "ACROSS nodes"
        return (
            f"grid tensor {self.tensor} x pipeline {self.pipeline} x data {self.data} "
            f"on {self.num_nodes} node(s); tensor groups {where}"
        )

    def free(self) -> None:
        """Collective: free the communicators this grid owns."""
        for c in (self.tied_comm, self.dp_comm, self.pp_comm, self.tp_comm, self.comm):
            if c is not None:
                c.Free()
