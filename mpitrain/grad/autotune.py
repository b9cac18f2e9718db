"""Pick the gradient bucket size by measurement: candidates tried in lockstep on every rank.

The training loop drives a :class:`BucketAutotuner`: ``start(model)`` rebuilds the model's
engine with the first candidate, ``after_step(model, seconds)`` after every step. Each
candidate runs ``warmup`` untimed steps, then ``trial_steps`` timed ones; its score is the
median step time, agreed across ranks as the slowest rank's median (one allreduce, so every
rank scores, picks and rebuilds identically). When the last candidate is scored the fastest
is kept; :meth:`AutotuneResult.table` is the readable line to log, and
:meth:`AutotuneResult.state_dict` goes into the checkpoint so a resumed run skips the search.
With ``tune_overlap`` (the trainer sets it when the MPI library is not one whose
non-blocking all-reduce was measured, :func:`mpitrain.comm.reducer.overlap_measured`), one
more trial runs the chosen size with overlap flipped, and the faster setting is kept.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mpitrain.grad.engine import GradEngine

if TYPE_CHECKING:
    from mpi4py import MPI

#: bucket sizes tried by default (MiB)
DEFAULT_CANDIDATES = (1.0, 4.0, 16.0)


class HasEngine(Protocol):
    """A wrapper whose gradient engine can be replaced between steps (DataParallel)."""

    engine: GradEngine


def rebucket(model: HasEngine, bucket_mb: float, overlap: bool | None = None) -> None:
    """Rebuild ``model.engine`` with buckets of ``bucket_mb`` (between steps, not collective).

    ``overlap`` (default: the engine's) starts reductions during backward or at synchronize.

    Every rank must call it at the same step with the same size (the layout decides the
    collectives). Gradients are carried over; hooks' per-bucket scratch and error-feedback
    residuals are dropped (they are sized per bucket).
    """
    old = model.engine
    old.remove_hooks()
    old.state.scratch.clear()
    old.state.residual.clear()
    new = GradEngine(list(zip(old.names, old.params, strict=True)), hook=old.hook,
                     state=old.state, bucket_mb=bucket_mb,
                     overlap=old.overlap if overlap is None else overlap,
                     passes_per_step=old.passes_per_step)
    new.timeline = old.timeline
    new.enabled = old.enabled
    model.engine = new


def _mib(mb: float) -> str:
    return f"{mb:g} MiB"


@dataclass(frozen=True)
class AutotuneResult:
    """The scores (ms/step, agreed across ranks) and the chosen size."""

    chosen_mb: float
    trials: tuple[tuple[float, float], ...]  # (bucket MiB, ms per step)
    #: None: overlap was not searched (the engine's default kept)
    chosen_overlap: bool | None = None
    overlap_trials: tuple[tuple[bool, float], ...] = ()  # (overlap, ms per step)

    def table(self) -> str:
        """``bucket 1 MiB: 13.9 ms/step, 4 MiB: 12.6, 16 MiB: 12.9 -> 4 MiB``
        (then ``; overlap on: 12.6, off: 11.9 -> off`` when overlap was searched)."""
        parts = [f"{_mib(mb)}: {ms:.1f}" + (" ms/step" if i == 0 else "")
                 for i, (mb, ms) in enumerate(self.trials)]
        text = f"bucket {', '.join(parts)} -> {_mib(self.chosen_mb)}"
        if self.overlap_trials:
            ov = ", ".join(f"{_onoff(o)}: {ms:.1f}" for o, ms in self.overlap_trials)
            text += f"; overlap {ov} -> {_onoff(bool(self.chosen_overlap))}"
        return text

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint keeps."""
        return {"chosen_mb": self.chosen_mb, "trials": [list(t) for t in self.trials],
                "chosen_overlap": self.chosen_overlap,
                "overlap_trials": [list(t) for t in self.overlap_trials]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> AutotuneResult:
        """Inverse of :meth:`state_dict` (checkpoints without the overlap keys load too)."""
        chosen = state.get("chosen_overlap")
        return cls(float(state["chosen_mb"]),
                   tuple((float(mb), float(ms)) for mb, ms in state["trials"]),
                   None if chosen is None else bool(chosen),
                   tuple((bool(o), float(ms)) for o, ms in state.get("overlap_trials", [])))


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


@dataclass
class BucketAutotuner:
    """Try ``candidates`` one after another during training; keep the fastest.

    Args:
        comm: the training communicator (scores are agreed on it).
        candidates: bucket sizes in MiB, tried in this order.
        warmup: untimed steps after each rebuild.
        trial_steps: timed steps per candidate (the score is their median).
        tune_overlap: after the sizes, also time the chosen size with overlap flipped.
    """

    comm: MPI.Intracomm
    candidates: tuple[float, ...] = DEFAULT_CANDIDATES
    warmup: int = 2
    trial_steps: int = 5
    tune_overlap: bool = False
    result: AutotuneResult | None = None
    _index: int = 0
    _seen: int = 0
    _times: list[float] = field(default_factory=list)
    _scores: list[tuple[float, float]] = field(default_factory=list)
    _base_overlap: bool | None = None

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ValueError("bucket autotune needs at least one candidate size")
        if self.trial_steps < 1 or self.warmup < 0:
            raise ValueError("bucket autotune needs trial_steps >= 1 and warmup >= 0")

    @property
    def done(self) -> bool:
        """Whether a size has been chosen (searched, or restored from a checkpoint)."""
        return self.result is not None

    def start(self, model: HasEngine) -> None:
        """Rebuild with the first candidate (or the restored choice); call before the steps."""
        if self.result is not None:
            rebucket(model, self.result.chosen_mb, self.result.chosen_overlap)
        else:
            self._base_overlap = model.engine.overlap
            rebucket(model, self.candidates[0])

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore a finished search (from :meth:`AutotuneResult.state_dict`)."""
        if state is not None:
            self.result = AutotuneResult.from_state_dict(state)

    def after_step(self, model: HasEngine, seconds: float) -> AutotuneResult | None:
        """Count one step of ``seconds``; collective when a candidate's trial ends.

        Returns the result once, on the step the search finishes (else None).
        """
        if self.result is not None:
            return None
        self._seen += 1
        if self._seen <= self.warmup:
            return None
        self._times.append(seconds)
        if len(self._times) < self.trial_steps:
            return None
        from mpi4py import MPI

        mine = statistics.median(self._times)
        agreed = 1e3 * float(self.comm.allreduce(mine, op=MPI.MAX))
        self._seen = 0
        self._times = []
        if self._index < len(self.candidates):
            self._scores.append((self.candidates[self._index], agreed))
            self._index += 1
            if self._index < len(self.candidates):
                rebucket(model, self.candidates[self._index])
                return None
            best = min(self._scores, key=lambda t: t[1])  # first of equals: the earlier one
            if self.tune_overlap:  # one more trial: the best size with overlap flipped
                self._index += 1
                rebucket(model, best[0], not self._base_overlap)
                return None
            self.result = AutotuneResult(best[0], tuple(self._scores))
            if best[0] != self.candidates[-1]:
                rebucket(model, best[0])
            return self.result
        # the overlap trial ended
        best = min(self._scores, key=lambda t: t[1])
        base = bool(self._base_overlap)
        trials = ((base, best[1]), (not base, agreed))
        chosen = base if best[1] <= agreed else not base
        self.result = AutotuneResult(best[0], tuple(self._scores), chosen, trials)
        if chosen == base:
            rebucket(model, best[0], base)
        return self.result
