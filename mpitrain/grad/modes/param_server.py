"""Parameter server with bounded staleness over MPI point-to-point messages.

The last ``S`` ranks are servers; each holds a contiguous shard of the flattened parameters
(split evenly by element count) and an optimizer for it. Workers run the ordinary trainer on
a workers-only communicator; their wrapper
(:class:`~mpitrain.grad.modes.param_server_worker.ParamServerWorker`) replaces the optimizer
step with

1. push: one ``Isend`` per server of (lr, local gradient shard) — round ``k`` is a worker's
   k-th push (MPI keeps messages from one sender in order, so no round number travels);
2. pull: the worker may compute round ``k`` with parameters of version ``u >= k - τ``
   (``--max-staleness τ``); it blocks in ``Recv`` only when it is more than τ versions behind
   and otherwise takes whatever newer versions have already arrived (``Iprobe``).

A server applies round ``k`` once it holds all W workers' round-``k`` gradients: their
average (summed in worker order) through its optimizer with the lr the workers sent, giving
version ``k + 1``, which it ``Isend``s to every worker. With τ = 0 every round is computed on
the newest parameters: exactly synchronous SGD (same data order, float rounding aside).
With τ > 0 fast workers run up to τ rounds ahead, overlapping the push/pull round trip with
compute and absorbing jitter; a rank that is slow on EVERY step still paces the servers.

Why point-to-point and not RMA: rounds must be aggregated deterministically for τ = 0 to be
synchronous SGD, and passive-target ``Accumulate`` on MPICH's shared-memory path still
needs the target to enter MPI to progress — the server loop polls either way, and ordered
two-sided messages make round accounting free (docs/async.md).

Shutdown: a worker that finishes (done, stopped early or preempted) drains to the newest
version, whatever the trainer did last, and sends DONE (with its exit code); a server returns
once every worker is done. Preemption: a server that receives a stop signal puts it in the
header of every version it sends, so the workers stop, with a checkpoint, within τ + 1 rounds;
the server's exit code is then the workers' (99). A worker that raises aborts the whole
job (``MPI_Abort`` on the world communicator), so servers never wait forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from mpitrain.errors import ConfigError, with_hint
from mpitrain.runtime import ulfm
from mpitrain.runtime.ulfm import derived

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.config import TrainConfig
    from mpitrain.preempt import PreemptFlag
    from mpitrain.runtime.world import World

TAG_INIT, TAG_PUSH, TAG_PARAMS, TAG_STATE = 71, 72, 73, 74
GRAD, DONE, SAVE, LOAD = 0.0, 1.0, 2.0, 3.0
HEAD = 4  # push header (float32 slots): lr as float64 in [0:2], kind [2], exit code [3]
VHEAD = 4  # params header: version as float64 in [0:2], server's stop signal [2], spare [3]


def shard_bounds(total: int, shards: int) -> list[tuple[int, int]]:
    """Split ``total`` elements into ``shards`` contiguous ranges of (almost) equal size."""
    cuts = [total * s // shards for s in range(shards + 1)]
    return [(cuts[s], cuts[s + 1]) for s in range(shards)]


@dataclass
class ServerLink:
    """A worker's view of the servers: the world communicator and the servers' ranks."""

    comm: MPI.Intracomm
    servers: list[int]
    workers: int
    preempt: PreemptFlag | None = None
    drain: Callable[[], None] | None = None  # set by the worker's wrapper: finish all traffic


def run_param_server(
    cfg: TrainConfig,
    world: World,
    worker_main: Callable[[MPI.Intracomm, ServerLink], int],
    make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    preempt: PreemptFlag | None = None,
) -> int:
    """Collective: serve on the last ``cfg.servers`` ranks, train on the others.

    Args:
        cfg: the run's config (servers, max_staleness).
        world: all ranks.
        worker_main: ``worker_main(worker_comm, link) -> exit code`` runs the trainer.
        make_optimizer: builds a server's optimizer for its shard (lr is set every round).
        preempt: this process's stop-signal flag (servers forward a signal to the workers).

    Returns:
        The exit code: a worker's own; a server's is the largest its workers reported.
    """
    from mpitrain.runtime.abort import abort

    n_servers, size = cfg.servers, world.size
    if n_servers >= size:
        raise ConfigError(
            with_hint(
                f"--servers {n_servers} leaves no workers among {size} ranks",
                "launch more ranks than --servers",
            )
        )
    is_server = world.rank >= size - n_servers
    sub = cast("MPI.Intracomm", derived(world.comm.Split(1 if is_server else 0, world.rank)))
    comm = derived(world.comm.Dup())
    servers = list(range(size - n_servers, size))
    if is_server:
        server = Server(comm, servers.index(world.rank), n_servers, size - n_servers)
        server.preempt = preempt
        code = server.serve(make_optimizer)
        sub.Free()
        comm.Free()
        return code
    link = ServerLink(comm, servers, size - n_servers, preempt)
    try:
        code = worker_main(sub, link)
        if link.drain is not None:  # servers may still be sending versions to this worker
            link.drain()
        for s in servers:  # tell the servers this worker is done (after its last drain)
            msg = np.zeros(HEAD, dtype=np.float32)
            msg[2], msg[3] = DONE, float(code)
            comm.Send(msg, dest=s, tag=TAG_PUSH)
    except BaseException as exc:  # never leave servers waiting: take the job down
        if isinstance(exc, SystemExit) or ulfm.recoverable(exc):
            raise  # (--on-rank-loss shrink: the survivors recover together)
        abort(world.comm, exc)
        raise
    sub.Free()
    comm.Free()
    return code


class Server:
    """One server rank: aggregate rounds, step the shard, send versions (see module doc)."""

    def __init__(self, comm: MPI.Intracomm, index: int, n_servers: int, workers: int) -> None:
        self.comm = comm
        self.index = index
        self.n_servers = n_servers
        self.workers = workers
        self.version = 0
        self.max_queue = 0
        self.preempt: PreemptFlag | None = None

    def serve(
        self, make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
    ) -> int:
        """Run until every worker sent DONE; return the largest worker exit code."""
        from mpi4py import MPI

        comm, w_count = self.comm, self.workers
        init = comm.recv(source=0, tag=TAG_INIT)
        shard = torch.nn.Parameter(torch.from_numpy(np.array(init)))
        opt = make_optimizer([shard])
        n = shard.numel()
        bufs = [np.empty(HEAD + n, dtype=np.float32) for _ in range(w_count)]
        reqs = [comm.Irecv(bufs[w], source=w, tag=TAG_PUSH) for w in range(w_count)]
        next_round = [0] * w_count
        rounds: dict[int, list[torch.Tensor | None]] = {}
        lrs: dict[int, float] = {}
        sends: list[tuple[Any, np.ndarray]] = []
        done: set[int] = set()
        code = 0
        idle = 0
        while len(done) < w_count:
            w, flag = MPI.Request.Testany(reqs)
            if not flag or w == MPI.UNDEFINED:
                sends = [(r, b) for r, b in sends if not r.Test()]
                idle += 1
                if idle > 50:
                    time.sleep(5e-5)  # leave the core to the workers (2-core machines)
                continue
            idle = 0
            buf = bufs[w]
            kind = float(buf[2])
            if kind == GRAD:
                r = next_round[w]
                next_round[w] += 1
                slot = rounds.setdefault(r, [None] * w_count)
                slot[w] = torch.from_numpy(buf[HEAD:].copy())
                lrs.setdefault(r, float(buf[0:2].view(np.float64)[0]))
                self.max_queue = max(self.max_queue, len(rounds))
                while self.version in rounds and all(g is not None for g in rounds[self.version]):
                    grads = rounds.pop(self.version)
                    total = grads[0]
                    assert total is not None
                    for g in grads[1:]:
                        assert g is not None
                        total += g
                    total /= w_count
                    shard.grad = total
                    for group in opt.param_groups:
                        group["lr"] = lrs.pop(self.version)
                        break
                    opt.step()
                    self.version += 1
                    out = np.empty(VHEAD + n, dtype=np.float32)
                    out[0:2].view(np.float64)[0] = float(self.version)
                    got = self.preempt.received if self.preempt is not None else None
                    out[2], out[3] = (float(got) if got is not None else 0.0), 0.0
                    out[VHEAD:] = shard.detach().numpy()
                    for dest in range(w_count):
                        if dest not in done:
                            sends.append((comm.Isend(out, dest=dest, tag=TAG_PARAMS), out))
            elif kind == DONE:
                done.add(w)
                code = max(code, int(buf[3]))
                reqs[w] = MPI.REQUEST_NULL
                continue
            elif kind == SAVE:
                state = {
                    "version": self.version,
                    "param": shard.detach().clone(),
                    "optimizer": opt.state_dict(),
                    "max_queue": self.max_queue,
                }
                comm.send(state, dest=w, tag=TAG_STATE)
            elif kind == LOAD:
                state = comm.recv(source=w, tag=TAG_STATE)
                with torch.no_grad():
                    shard.copy_(state["param"])
                opt.load_state_dict(state["optimizer"])
                self.version = int(state["version"])
                next_round = [self.version] * w_count
                rounds.clear()
                lrs.clear()
                comm.send(True, dest=w, tag=TAG_STATE)
            reqs[w] = comm.Irecv(buf, source=w, tag=TAG_PUSH)
        for r, _ in sends:
            r.Wait()
        return code
