"""Horovod's basics (``horovod.common.basics``): ranks, sizes and what was built in.

Each reads the context made by ``hvd.init()`` and communicates nothing.
"""

from __future__ import annotations

from mpitrain.horovod.context import context as _context
from mpitrain.horovod.context import current as _current


def is_initialized() -> bool:
    """Return whether :func:`init` has been called (and not shut down)."""
    return _current() is not None


def rank() -> int:
    """Return this process's rank."""
    return _context().world.rank


def size() -> int:
    """Return the number of processes."""
    return _context().world.size


def local_rank() -> int:
    """Return the rank within this node."""
    return _context().world.local_rank


def local_size() -> int:
    """Return the number of processes on this node."""
    return _context().world.local_size


def cross_rank() -> int:
    """Return this node's index among nodes (rank in the cross-node communicator)."""
    return _context().world.cross_comm.rank


def cross_size() -> int:
    """Return the number of nodes holding a process with this local rank."""
    return _context().world.cross_comm.size


def is_homogeneous() -> bool:
    """Return whether every node runs the same number of processes (collective-free)."""
    w = _context().world
    return w.size == w.local_size * w.num_nodes


def mpi_threads_supported() -> bool:
    """Return whether MPI was initialized with MPI_THREAD_MULTIPLE."""
    from mpi4py import MPI

    _context()
    return bool(MPI.Query_thread() == MPI.THREAD_MULTIPLE)


def mpi_enabled() -> bool:
    """Return True: collectives run over MPI."""
    return True


def mpi_built(verbose: bool = False) -> bool:
    """Return True: built on MPI (mpi4py)."""
    return True


def gloo_enabled() -> bool:
    """Return False: there is no Gloo controller."""
    return False


def gloo_built(verbose: bool = False) -> bool:
    """Return False: no Gloo."""
    return False


def nccl_built(verbose: bool = False) -> int:
    """Return 0: NCCL is not used (device tensors go through MPI, staged or CUDA-aware)."""
    return 0


def ddl_built(verbose: bool = False) -> bool:
    """Return False: no IBM DDL."""
    return False


def ccl_built(verbose: bool = False) -> bool:
    """Return False: no oneCCL."""
    return False


def cuda_built(verbose: bool = False) -> bool:
    """Return False: no CUDA kernels of its own (CUDA tensors are staged or CUDA-aware MPI)."""
    return False


def rocm_built(verbose: bool = False) -> bool:
    """Return False: no ROCm kernels."""
    return False
