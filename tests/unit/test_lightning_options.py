"""MPIStrategy's options and reduce-op names, serially (no Lightning import, no mpiexec)."""

from __future__ import annotations

import signal

import pytest

from mpitrain.errors import ConfigError
from mpitrain.lightning.options import MPIOptions


def test_defaults_are_replicas_with_usr1_and_term() -> None:
    opts = MPIOptions()
    assert opts.stage == 0
    assert opts.signals() == [signal.SIGUSR1, signal.SIGTERM]
    assert MPIOptions(preempt_signals="").signals() == []
    assert [MPIOptions(shard=s).stage for s in ("optimizer", "gradients", "parameters")] == [
        1, 2, 3]


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"shard": "all"}, ["shard='all'", "HINT: use one of 'none', 'optimizer'"]),
    ({"shard": "parameters", "compression": "fp16-ef"}, ["error feedback", "none, fp16, bf16"]),
    ({"compression": "int8"}, ["compression='int8'", "fp16-ef"]),
    ({"allreduce": "ring"}, ["allreduce='ring'", "auto, flat, hierarchical"]),
    ({"cuda_aware": "maybe"}, ["cuda_aware='maybe'"]),
    ({"bucket_mb": 0}, ["bucket_mb=0", "positive"]),
    ({"bucket_mb": True}, ["bucket_mb=True"]),
    ({"preempt_signals": "USR1,KILL"}, ["preempt_signals", "'KILL'"]),
])
def test_bad_options_are_one_line_with_a_hint(kwargs: dict[str, object],
                                              words: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        MPIOptions(**kwargs)  # type: ignore[arg-type]
    text = str(exc.value)
    assert "\n" not in text and "HINT:" in text
    assert all(w in text for w in words), text


def test_reduce_op_names_follow_lightning() -> None:
    import torch.distributed as dist

    from mpitrain.lightning.collectives import op_name

    assert [op_name(o) for o in ("mean", "avg", "sum", "max", "min", "product", None)] == [
        "mean", "mean", "sum", "max", "min", "product", "mean"]
    assert op_name(dist.ReduceOp.SUM) == "sum" and op_name(dist.ReduceOp.MAX) == "max"
    with pytest.raises(ConfigError, match="BAND"):
        op_name(dist.ReduceOp.BAND)


def test_one_rank_collectives_are_identities() -> None:
    import torch
    from mpi4py import MPI

    from mpitrain.lightning.collectives import all_gather, reduce_

    t = torch.tensor([1.5, 2.0])
    assert reduce_(t, MPI.COMM_SELF, "mean") is t and t.tolist() == [1.5, 2.0]
    assert all_gather(t, MPI.COMM_SELF).tolist() == [[1.5, 2.0]]
