"""A parameter-server worker's model wrapper: push gradient shards, pull parameter versions.

The protocol (rounds, staleness, shutdown, preemption) is described in
:mod:`mpitrain.grad.modes.param_server`, which also runs the servers and the role split.
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mpitrain.errors import CommError, ConfigError, with_hint
from mpitrain.grad.broadcast import broadcast_parameters
from mpitrain.grad.modes.base import (
    ModeWrapper,
    check_one_dtype,
    flat_grads,
    flat_params,
    numel,
    set_params,
)
from mpitrain.grad.modes.param_server import (
    GRAD,
    HEAD,
    LOAD,
    SAVE,
    TAG_INIT,
    TAG_PARAMS,
    TAG_PUSH,
    TAG_STATE,
    VHEAD,
    ServerLink,
    shard_bounds,
)
from mpitrain.timeline.recorder import NULL, Timeline

if TYPE_CHECKING:
    from mpi4py import MPI


class ParamServerWorker(ModeWrapper):
    """A worker's model wrapper: push gradients, pull parameter versions (collective init).

    Args:
        module: the model (identical on all workers after the broadcast here).
        comm: the workers-only communicator.
        link: the servers (from :func:`run_param_server`).
        max_staleness: τ, the most versions a worker's parameters may lag its round.
        warmup_steps: the first rounds are synchronous (τ = 0), as local SGD's warm-up.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        comm: MPI.Intracomm,
        link: ServerLink,
        *,
        max_staleness: int,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(module)
        self.comm = comm
        self.link = link
        self.tau = max_staleness
        self.warmup_steps = warmup_steps
        self.dtype = check_one_dtype(self.params, "param-server")
        if self.dtype != torch.float32:
            raise ConfigError(
                with_hint("--exchange param-server sends float32", "use a float32 model")
            )
        broadcast_parameters(module, comm, root=0)
        self.n = numel(self.params)
        self.bounds = shard_bounds(self.n, len(link.servers))
        self._flat = torch.zeros(self.n, dtype=self.dtype)
        self._grad = torch.zeros(self.n, dtype=self.dtype)
        flat_params(self.params, self._flat)
        if comm.rank == 0:
            for s, (a, b) in zip(link.servers, self.bounds, strict=True):
                link.comm.send(self._flat[a:b].numpy().copy(), dest=s, tag=TAG_INIT)
        self.versions = [0] * len(link.servers)  # newest version held, per server
        self.pushed = 0  # rounds pushed
        self.staleness_hist: dict[int, int] = {}
        self._last_staleness = 0
        self._sends: list[tuple[Any, np.ndarray, int]] = []  # (request, message, flight)
        self.timeline: Timeline = NULL
        self._rbufs = [np.empty(VHEAD + b - a, dtype=np.float32) for a, b in self.bounds]
        self.wait_seconds = 0.0
        self._last_wait = 0.0
        link.drain = self.drain

    def set_timeline(self, recorder: Timeline) -> None:
        """Record each push (send to observed completion) and pull (each receive) into
        ``recorder``; the servers' side is not in this trace, which ``recorder`` is told."""
        self.timeline = recorder
        first = self.link.servers[0]
        recorder.note(f"param-server: the server ranks ({first}..{self.link.servers[-1]}) run "
                      "no steps and record nothing; their aggregation and optimizer time shows "
                      "only in the workers' 'pull' waits")

    def _sent(self, wait: bool) -> None:
        """Keep the pushes still in flight (``wait``: none; every completion recorded)."""
        kept = []
        for r, msg, key in self._sends:
            if wait:
                t0 = self.timeline.now()
                r.Wait()
                self.timeline.comm_waited(key, t0)
            elif r.Test():
                self.timeline.comm_done(key)
            else:
                kept.append((r, msg, key))
        self._sends = kept

    @property
    def version(self) -> int:
        """The oldest shard version this worker's parameters hold."""
        return min(self.versions)

    def step(self, opt: torch.optim.Optimizer) -> None:
        """Collective: push this round's gradient and lr to the servers; pull to within τ."""
        staleness = self.pushed - self.version
        if staleness > self.tau:
            raise CommError(f"param-server: round {self.pushed} on version {self.version}")
        self._last_staleness = staleness
        self.staleness_hist[staleness] = self.staleness_hist.get(staleness, 0) + 1
        lr = float(opt.param_groups[0]["lr"])
        flat_grads(self.params, self._grad)
        self._sent(wait=False)
        tl = self.timeline
        for i, (s, (a, b)) in enumerate(zip(self.link.servers, self.bounds, strict=True)):
            msg = np.empty(HEAD + b - a, dtype=np.float32)
            msg[0:2].view(np.float64)[0] = lr
            msg[2], msg[3] = GRAD, 0.0
            msg[HEAD:] = self._grad[a:b].numpy()
            t0 = tl.now()
            req = self.link.comm.Isend(msg, dest=s, tag=TAG_PUSH)
            self._sends.append((req, msg, tl.comm_started(f"push s{i}", msg.nbytes, t0, "send")))
        tau = 0 if self.pushed < self.warmup_steps else self.tau
        self.pushed += 1
        self.pull(self.pushed - tau)

    def pull(self, need: int) -> None:
        """Collective: receive versions until every shard is at least ``need`` (and newer ones).

        Point-to-point with the servers, like :meth:`step`.
        """
        t0 = time.perf_counter()
        comm, got = self.link.comm, False
        for i, (s, (a, b)) in enumerate(zip(self.link.servers, self.bounds, strict=True)):
            buf = self._rbufs[i]
            while self.versions[i] < need or comm.Iprobe(source=s, tag=TAG_PARAMS):
                t_recv = self.timeline.now()
                comm.Recv(buf, source=s, tag=TAG_PARAMS)
                self.timeline.comm_blocking(f"pull s{i}", buf.nbytes, t_recv, "recv")
                self.versions[i] = int(buf[0:2].view(np.float64)[0])
                if buf[2] != 0.0 and self.link.preempt is not None:
                    self.link.preempt.note(signal.Signals(int(buf[2])))
                self._flat[a:b] = torch.from_numpy(buf[VHEAD:])
                got = True
        if got:
            set_params(self.params, self._flat)
        self._last_wait = time.perf_counter() - t0
        self.wait_seconds += self._last_wait

    def drain(self) -> None:
        """Collective: pull the newest version (every pushed round applied), finish sends.

        Point-to-point with the servers only; every worker calls it at the same step.
        """
        self.pull(self.pushed)
        self._sent(wait=True)

    def metrics(self) -> dict[str, float]:
        """This step's staleness (rounds ahead of the parameters used), max so far, wait."""
        return {
            "staleness": float(self._last_staleness),
            "staleness_max": float(max(self.staleness_hist, default=0)),
            "version": float(self.version),
            "exchange_wait_s": self._last_wait,
        }

    def exchange_state_dict(self) -> dict[str, Any] | None:
        """Collective over workers: drain; worker 0 fetches every server's shard state."""
        self.drain()
        hists = self.comm.gather(self.staleness_hist, root=0)
        if self.comm.rank != 0 or hists is None:
            return None
        shards = []
        for s in self.link.servers:
            msg = np.zeros(HEAD, dtype=np.float32)
            msg[2] = SAVE
            self.link.comm.Send(msg, dest=s, tag=TAG_PUSH)
            shards.append(self.link.comm.recv(source=s, tag=TAG_STATE))
        return {
            "mode": "param-server",
            "version": self.pushed,
            "bounds": [list(b) for b in self.bounds],
            "servers": shards,
            "staleness_hist": [[[k, v] for k, v in sorted(h.items())] for h in hists],
        }

    def load_exchange_state_dict(self, state: dict[str, Any]) -> None:
        """Collective over workers: restore server shards (same --servers), versions, histograms."""
        if [list(b) for b in self.bounds] != [list(b) for b in state["bounds"]]:
            raise ConfigError(
                with_hint(
                    f"checkpoint has {len(state['bounds'])} server shards, "
                    f"this run {len(self.bounds)}",
                    "resume with the same --servers",
                )
            )
        if self.comm.rank == 0:
            for s, shard in zip(self.link.servers, state["servers"], strict=True):
                msg = np.zeros(HEAD, dtype=np.float32)
                msg[2] = LOAD
                self.link.comm.Send(msg, dest=s, tag=TAG_PUSH)
                self.link.comm.send(shard, dest=s, tag=TAG_STATE)
                self.link.comm.recv(source=s, tag=TAG_STATE)  # loaded: no push overtakes it
        self.comm.Barrier()
        self.pushed = int(state["version"])
        self.versions = [self.pushed] * len(self.bounds)
        hists = state["staleness_hist"]
        if len(hists) == self.comm.size:
            self.staleness_hist = {int(k): int(v) for k, v in hists[self.comm.rank]}

