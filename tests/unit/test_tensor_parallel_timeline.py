"""Serial: the tensor-parallel collectives record into the timeline of ``recording(tl)``, a
backward into the one its forward saw (even on another thread, as autograd's device threads
are), and nothing outside it or while the recorder is off."""

from __future__ import annotations

import threading
from typing import Any

import torch

from mpitrain.parallel.functional import copy_to_tp, current_timeline, recording, reduce_from_tp
from mpitrain.timeline import NULL, Recorder


class TwoRanks:
    """A stand-in communicator of two ranks whose in-place all-reduce leaves the data as is."""

    size, rank = 2, 0

    def Allreduce(self, send: Any, recv: Any, op: Any = None) -> None:  # as MPI names it
        del send, recv, op


def _comm(rec: Recorder) -> list[tuple[str, dict[str, Any] | None]]:
    return [(e.name, e.args) for e in rec.events if e.cat == "comm"]


def test_collectives_record_inside_recording_only() -> None:
    comm: Any = TwoRanks()
    rec = Recorder()
    x = torch.ones(2, 3, requires_grad=True)
    reduce_from_tp(x, comm)  # outside: nothing
    with recording(rec):
        assert current_timeline() is rec
        y = copy_to_tp(x, comm)  # forward: identity; backward: all-reduce
        z = reduce_from_tp(y * 2, comm)  # forward: all-reduce
    assert current_timeline() is NULL
    back = threading.Thread(target=lambda: z.sum().backward())  # a thread without the context
    back.start()
    back.join()
    want = {"bytes": 24, "op": "allreduce", "group": "tensor", "ranks": 2}
    assert _comm(rec) == [("tp all-reduce fwd", want), ("tp all-reduce bwd", want)]
    assert x.grad is not None and torch.equal(x.grad, torch.full((2, 3), 2.0))
    off = Recorder(steps=(5, 6))
    off.step_begin(0)  # outside its window: off
    with recording(off):
        reduce_from_tp(x, comm).sum().backward()
        copy_to_tp(x, comm).sum().backward()
    assert not off.events
