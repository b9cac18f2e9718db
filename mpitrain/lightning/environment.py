"""Lightning's cluster environment, answered from an mpitrain :class:`World`.

Lightning's own ``MPIEnvironment`` discovers the node layout lazily, with collectives on
``COMM_WORLD`` inside getters (a rank that asks first waits for the others). Here the facts
come from ``World.create`` (collective, run once when the strategy is built, on every rank),
so every getter is a plain read: the node grouping is MPI's shared-memory split (or
``MPITRAIN_RANKS_PER_NODE`` pretend nodes), the same one the hierarchical all-reduce uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning.fabric.plugins.environments.cluster_environment import ClusterEnvironment

if TYPE_CHECKING:
    from mpitrain.runtime.world import World


class MPIClusterEnvironment(ClusterEnvironment):
    """Rank, world size, local rank and node rank of an mpiexec-launched job (no collectives).

    The ranks are MPI's: Lightning's attempts to set them (``set_global_rank``,
    ``set_world_size``) are ignored, as in Lightning's ``MPIEnvironment``.
    """

    def __init__(self, world: World) -> None:
        self.world = world

    @property
    def creates_processes_externally(self) -> bool:
        """mpiexec (or srun, or the emulated cluster's wrapper) started every rank."""
        return True

    @property
    def main_address(self) -> str:
        """The host of this rank (no torch.distributed rendezvous happens under MPI)."""
        return self.world.hostname

    @property
    def main_port(self) -> int:
        """Unused: MPI needs no rendezvous port."""
        return 0

    @staticmethod
    def detect() -> bool:
        """Never chosen automatically: :class:`MPIStrategy` brings its own instance."""
        return False

    def world_size(self) -> int:
        """Ranks in the job."""
        return self.world.size

    def set_world_size(self, size: int) -> None:
        """Ignored: MPI fixes the world size."""
        del size

    def global_rank(self) -> int:
        """This rank."""
        return self.world.rank

    def set_global_rank(self, rank: int) -> None:
        """Ignored: MPI fixes the rank."""
        del rank

    def local_rank(self) -> int:
        """This rank's index on its node."""
        return self.world.local_rank

    def node_rank(self) -> int:
        """This rank's node index (0 .. nodes - 1)."""
        return self.world.node_index

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        """Checked by the strategy, which knows every node's rank count."""
        del num_devices, num_nodes
