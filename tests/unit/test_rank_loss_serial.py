"""--on-rank-loss shrink, serially: refusals, what survivors can use, sample-log generations,
fault injection specs, recognising a lost peer in a chain of exceptions."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpitrain.config import TrainConfig
from mpitrain.errors import ConfigError
from mpitrain.runtime import inject, ulfm
from mpitrain.train.recover import usable_ranks
from mpitrain.train.sample_log import kept_rows, read_sample_log


@pytest.mark.parametrize(("changes", "match"), [
    ({"min_ranks": 2}, "--min-ranks applies to --on-rank-loss shrink"),
    ({"on_rank_loss": "shrink", "shard": "gradients"}, "split across ranks .* needs "
     "--checkpoint-dir"),
    ({"on_rank_loss": "shrink", "tensor_parallel": 2, "model": "gpt"}, "needs --checkpoint-dir"),
    ({"on_rank_loss": "shrink", "exchange": "local-sgd"}, "--exchange local-sgd .* needs "
     "--checkpoint-dir"),
    ({"on_rank_loss": "drop"}, "choose one of abort, shrink"),
])
def test_refused_with_one_line(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        TrainConfig().replace(**changes)
    assert "\n" not in str(info.value) and "HINT" in str(info.value)


def test_accepted_where_state_can_be_found() -> None:
    TrainConfig().replace(on_rank_loss="shrink", min_ranks=3)
    TrainConfig().replace(on_rank_loss="shrink", shard="gradients", checkpoint_dir="ck")


def test_this_launch_cannot_shrink_and_says_how_to() -> None:
    """The tests run under MPICH (or a plain launch): refused, naming the launch line."""
    with pytest.raises(ConfigError, match=r"--on-rank-loss shrink: .*mpirun --with-ft ulfm"):
        ulfm.check_shrink_available()


@pytest.mark.parametrize(("tp", "pp", "gb", "survivors", "usable"), [
    (1, 1, 0, 3, 3), (2, 1, 0, 3, 2), (2, 2, 0, 3, 0), (2, 2, 0, 7, 4),
    (1, 1, 48, 5, 4), (1, 1, 48, 3, 3), (2, 1, 48, 7, 6), (1, 1, 7, 3, 1),
])
def test_usable_ranks(tp: int, pp: int, gb: int, survivors: int, usable: int) -> None:
    cfg = TrainConfig(tensor_parallel=tp, pipeline_stages=pp, global_batch=gb)
    assert usable_ranks(cfg, survivors) == usable


def test_kept_rows_drop_steps_trained_again(tmp_path: Path) -> None:
    """Generation 1 (4 ranks) trained steps 0-11; generation 2 went back to the step-10
    checkpoint on 3 ranks: its steps 10, 11 replace the first ones."""
    log = tmp_path / "s"
    for rank in range(4):
        lines = ["# generation 100.0"] + [f"0 {s} 4 {s * 10 + rank}" for s in range(12)]
        if rank < 3:
            lines += ["# generation 200.0"] + [f"0 {s} 3 {1000 + s * 10 + rank}"
                                               for s in range(10, 14)]
        Path(f"{log}.rank{rank}").write_text("\n".join(lines) + "\n")
    kept = kept_rows(log)
    assert sorted({(s, w) for _, s, w, _ in kept}) == [
        *[(s, 4) for s in range(10)], *[(s, 3) for s in range(10, 14)]]
    assert len(read_sample_log(log)) == 4 * 12 + 3 * 4  # every line, generations aside
    assert len(kept) == 4 * 10 + 3 * 4


def test_kill_specs() -> None:
    assert inject._targets("2:15") == [({2}, 15, "step")]
    assert inject._targets("2+3:12, 1:30:checkpoint") == [({2, 3}, 12, "step"),
                                                          ({1}, 30, "checkpoint")]
    with pytest.raises(ValueError, match="phase must be one of"):
        inject._targets("1:3:backward")


def test_a_lost_peer_is_recognised_through_wrapping() -> None:
    from mpi4py import MPI

    def chained(code: int) -> BaseException:
        try:
            try:
                raise MPI.Exception(code)
            except MPI.Exception as inner:
                raise RuntimeError("in the communication thread") from inner
        except RuntimeError as outer:
            return outer

    assert ulfm.is_rank_loss(chained(MPI.ERR_REVOKED))
    assert ulfm.is_rank_loss(ulfm.RankLost("x", agreed=True)) is False  # not an MPI error
    assert not ulfm.is_rank_loss(chained(MPI.ERR_TRUNCATE))
    assert not ulfm.recoverable(chained(MPI.ERR_REVOKED))  # no active domain: abort
    # Open MPI's libnbc reports a dead peer in a schedule as MPI_ERR_OTHER: suspected
    assert ulfm.suspected_loss(chained(MPI.ERR_OTHER))
    assert not ulfm.suspected_loss(RuntimeError("not MPI"))
