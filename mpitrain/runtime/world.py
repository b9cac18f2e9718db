"""Rank and node layout of a communicator: who am I, which node, who are my neighbours."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from mpitrain.errors import ConfigError, with_hint
from mpitrain.runtime import env
from mpitrain.runtime.ulfm import derived

if TYPE_CHECKING:
    from mpi4py import MPI


@dataclass(frozen=True)
class World:
    """The facts of one communicator; build with :meth:`create` (collective)."""

    comm: MPI.Intracomm
    node_comm: MPI.Intracomm
    cross_comm: MPI.Intracomm
    rank: int
    size: int
    local_rank: int
    local_size: int
    node_index: int
    num_nodes: int
    hostname: str

    @classmethod
    def create(cls, comm: MPI.Intracomm, *, ranks_per_node: int | None = None) -> World:
        """Collective: duplicate ``comm`` and split it into node and cross-node communicators.

        Nodes come from ``COMM_TYPE_SHARED``; ``ranks_per_node`` (or MPITRAIN_RANKS_PER_NODE)
        instead groups consecutive ranks into pretend nodes, for testing on one machine.
        """
        from mpi4py import MPI

        own = derived(comm.Dup())
        if ranks_per_node is None:
            ranks_per_node = env.get_int("ranks_per_node")
        if ranks_per_node is not None:
            if ranks_per_node < 1:
                raise ConfigError(
                    with_hint(
                        f"MPITRAIN_RANKS_PER_NODE={ranks_per_node} is not positive",
                        "unset it or give an integer >= 1",
                    )
                )
            node_comm = cast("MPI.Intracomm", derived(own.Split(own.rank // ranks_per_node,
                                                                   own.rank)))
        else:
            node_comm = cast("MPI.Intracomm",
                             derived(own.Split_type(MPI.COMM_TYPE_SHARED, key=own.rank)))
        local_rank = node_comm.rank
        cross_comm = cast("MPI.Intracomm", derived(own.Split(local_rank, own.rank)))
        # node index: rank of this node's leader among leaders (same on all ranks of the node)
        node_index = node_comm.bcast(cross_comm.rank if local_rank == 0 else None, root=0)
        num_nodes = node_comm.bcast(cross_comm.size if local_rank == 0 else None, root=0)
        return cls(
            comm=own,
            node_comm=node_comm,
            cross_comm=cross_comm,
            rank=own.rank,
            size=own.size,
            local_rank=local_rank,
            local_size=node_comm.size,
            node_index=int(node_index),
            num_nodes=int(num_nodes),
            hostname=socket.gethostname(),
        )

    def free(self) -> None:
        """Collective: free the communicators this world owns."""
        for c in (self.cross_comm, self.node_comm, self.comm):
            c.Free()

    def describe(self) -> str:
        """One line for logs: rank/size, node and host."""
        return (
            f"rank {self.rank}/{self.size} local {self.local_rank}/{self.local_size} "
            f"node {self.node_index}/{self.num_nodes} on {self.hostname}"
        )
