"""An emulated cluster on one machine: network namespaces as nodes (docs/cluster.md).

``python -m mpitrain cluster up|mpiexec|exec|status|down``. Each node is a network namespace
(``mpt-node1``...) entered with its own UTS namespace (its own hostname), joined by a veth
pair to a bridge that lives in a head namespace (``mpt-head``, where ``mpiexec`` runs), each
link rate-limited with ``tbf`` in both directions. The machine's own network namespace is
never changed. Everything the tool creates is recorded in a state file, so ``down`` removes
exactly that, even after a crash, and no command touches a name it did not create.

Importing this package runs no command.
"""

from __future__ import annotations

from mpitrain.errors import MpitrainError

#: every namespace, link and hosts entry the tool creates starts with this
PREFIX = "mpt-"
#: the namespace holding the bridge; mpiexec runs here (the "login node")
HEAD = f"{PREFIX}head"
#: interface name of the cluster network on every host (the bridge on the head, the veth on
#: a node), so that one ``-iface`` works everywhere
IFACE = "mpt0"
#: the most nodes one cluster may have (host numbers 1..MAX_NODES; the head is .254)
MAX_NODES = 64


class ClusterError(MpitrainError):
    """The emulated cluster cannot be created, used or removed as asked."""


def node_name(index: int) -> str:
    """Return the namespace and host name of node ``index`` (1-based)."""
    return f"{PREFIX}node{index}"
