"""State a resumed run needs to continue bitwise: loop position and every RNG."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class LoopState:
    """Where the loop is; saved in checkpoints so a resumed run continues bitwise."""

    step: int = 0
    epoch: int = 0
    mid_epoch: bool = False
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    train_seconds: float = 0.0
    samples_total: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)
    last_train_loss: float = float("nan")


def rng_state() -> dict[str, Any]:
    """Return this rank's torch, numpy and python RNG states in weights_only-loadable form."""
    np_state: tuple[Any, ...] = np.random.get_state()  # type: ignore[assignment]
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [
            str(np_state[0]),
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def restore_loop_state(state: dict[str, Any], rank: int, size: int, seed: int, *,
                       replica: int | None = None, copies: int = 1) -> LoopState:
    """Return the loop state of checkpoint ``state`` for ``rank`` of ``size``; set the RNGs.

    ``copies`` ranks hold each data-parallel replica's running sums (tensor x pipeline of a
    grid, 1 otherwise) and ``replica`` is this rank's data-parallel index. On the layout that
    saved it, each rank gets its own sums and RNG states back; on another, the epoch's sums
    (each replica's counted once) go to the ranks of replica 0 and the RNGs are reseeded.
    """
    loop = LoopState(**dict(state["loop"]))
    ranks = state["ranks"]
    saved_copies = int(state.get("copies", 1))
    if state["world_size"] == size and len(ranks) == size and saved_copies == copies:
        mine = ranks[rank]
        set_rng_state(mine["rng"])
        loop.loss_sum, loop.correct, loop.seen = mine["loss_sum"], mine["correct"], mine["seen"]
        return loop
    if (rank if replica is None else replica) == 0:
        loop.loss_sum = sum(r["loss_sum"] for r in ranks) / saved_copies
        loop.correct = round(sum(r["correct"] for r in ranks) / saved_copies)
        loop.seen = round(sum(r["seen"] for r in ranks) / saved_copies)
    torch.manual_seed(seed + 1000 * rank + loop.step)
    return loop
