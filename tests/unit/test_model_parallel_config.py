"""Model-parallel options through ``resolve()``: each combination that cannot run is one
ConfigError naming the option with a HINT; a good grid resolves; the environment is read."""

from __future__ import annotations

from typing import Any

import pytest

from mpitrain.config import resolve
from mpitrain.errors import ConfigError

GPT = {"model": "gpt"}

# (case, CLI options as argparse gives them, texts the message must hold)
REFUSED: list[tuple[str, dict[str, Any], list[str]]] = [
    ("tensor without gpt", {"tensor_parallel": "2"},
     ["--tensor-parallel", "--model gpt"]),
    ("pipeline without gpt", {"model": "mlp", "pipeline_stages": "2"},
     ["--pipeline-stages", "--model gpt"]),
    ("micro-batches without gpt", {"micro_batches": "2"}, ["--micro-batches", "--model gpt"]),
    ("gpt shape with mlp", {"layers": "3", "heads": "8"},
     ["--heads, --layers shape the built-in GPT", "--model mlp does not use them"]),
    ("schedule with cnn", {"model": "cnn", "pipeline_schedule": "gpipe"},
     ["--pipeline-schedule", "--model cnn"]),
    ("gpt with double-buffer", {**GPT, "exchange": "double-buffer"},
     ["--exchange double-buffer", "--model gpt", "local-sgd"]),
    ("heads do not divide hidden", {**GPT, "heads": "3", "hidden": "64"},
     ["--hidden 64", "--heads 3"]),
    ("tensor does not divide heads", {**GPT, "tensor_parallel": "3"},
     ["--tensor-parallel 3", "--heads 4"]),
    ("more stages than layers", {**GPT, "layers": "2", "pipeline_stages": "3"},
     ["--pipeline-stages 3", "2 layers", "--layers"]),
    ("batch does not divide", {**GPT, "batch_size": "10", "micro_batches": "4"},
     ["--batch-size 10", "--micro-batches 4"]),
    ("sequence parallel without tensor", {**GPT, "sequence_parallel": True},
     ["--sequence-parallel", "--tensor-parallel"]),
    ("sequence parallel, odd context", {**GPT, "sequence_parallel": True, "context": "33",
                                        "tensor_parallel": "2"},
     ["--sequence-parallel", "--context 33"]),
    ("unknown schedule", {**GPT, "pipeline_schedule": "bad"},
     ["pipeline_schedule", "'bad'", "1f1b", "gpipe", "interleaved"]),
    ("virtual stages without interleaved", {**GPT, "pipeline_stages": "2", "virtual_stages": "2"},
     ["--virtual-stages 2", "--pipeline-schedule interleaved"]),
    ("virtual stages with mlp", {"model": "mlp", "virtual_stages": "2"},
     ["--virtual-stages", "--model mlp"]),
    ("interleaved without a pipeline", {**GPT, "pipeline_schedule": "interleaved",
                                        "virtual_stages": "2"},
     ["--pipeline-schedule interleaved", "--pipeline-stages > 1"]),
    ("interleaved with one virtual stage", {**GPT, "pipeline_stages": "2",
                                            "pipeline_schedule": "interleaved"},
     ["--virtual-stages 1 is 1f1b", "--virtual-stages 2"]),
    ("interleaved micro-batches", {**GPT, "pipeline_stages": "2", "virtual_stages": "2",
                                   "pipeline_schedule": "interleaved", "micro_batches": "3",
                                   "batch_size": "6"},
     ["--micro-batches (3)", "--pipeline-stages (2)", "use --micro-batches 4"]),
    ("activation checkpointing with mlp", {"model": "mlp", "activation_checkpointing": "full"},
     ["--activation-checkpointing full", "--model mlp has no blocks",
      "activation_checkpoint_units"]),
    ("activation checkpointing with compile", {"model": "mlp", "compile": "regions",
                                               "activation_checkpointing": "selective"},
     ["--compile regions", "--activation-checkpointing selective"]),
    ("more chunks than layers", {**GPT, "layers": "4", "pipeline_stages": "2",
                                 "pipeline_schedule": "interleaved", "virtual_stages": "3",
                                 "micro_batches": "2", "batch_size": "8"},
     ["--virtual-stages 3", "6 chunks", "4 layers", "--layers at least 6"]),
]


@pytest.mark.parametrize(("case", "cli", "texts"), REFUSED, ids=[c[0] for c in REFUSED])
def test_refused(case: str, cli: dict[str, Any], texts: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(cli, environ={})
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert "HINT:" in msg, msg
    for text in texts:
        assert text in msg, (case, text, msg)


def test_grid_takes_the_loops_options() -> None:
    """Options the one loop owns are no longer refused with --model gpt."""
    cfg = resolve({**GPT, "accumulate": "2", "clip_grad_norm": "1.0", "global_batch": "32",
                   "timeline": "t.json", "sample_log": "s.log", "tensorboard": "tb"},
                  environ={})
    assert (cfg.accumulate, cfg.clip_grad_norm, cfg.global_batch) == (2, 1.0, 32)
    zero = resolve({**GPT, "tensor_parallel": "2", "pipeline_stages": "2", "shard": "parameters",
                    "clip_grad_norm": "1", "sequence_parallel": True, "context": "32"},
                   environ={})
    assert zero.shard == "parameters"


def test_good_grid_resolves() -> None:
    cfg = resolve({**GPT, "tensor_parallel": "2", "pipeline_stages": "2",
                   "micro_batches": "4", "batch_size": "8"}, environ={})
    assert (cfg.model, cfg.tensor_parallel, cfg.pipeline_stages) == ("gpt", 2, 2)
    assert (cfg.micro_batches, cfg.batch_size) == (4, 8)
    assert cfg.pipeline_schedule == "1f1b" and cfg.sequence_parallel is False
    assert (cfg.context, cfg.layers, cfg.heads) == (128, 4, 4)


def test_good_interleaved_resolves() -> None:
    cfg = resolve({**GPT, "pipeline_stages": "2", "pipeline_schedule": "interleaved",
                   "virtual_stages": "2", "micro_batches": "4", "batch_size": "8"}, environ={})
    assert (cfg.pipeline_schedule, cfg.virtual_stages, cfg.pipeline_stages) == (
        "interleaved", 2, 2)


def test_good_sequence_parallel_and_gpipe() -> None:
    cfg = resolve({**GPT, "tensor_parallel": "4", "sequence_parallel": True,
                   "pipeline_schedule": "gpipe", "context": "64"}, environ={})
    assert cfg.sequence_parallel is True and cfg.pipeline_schedule == "gpipe"


def test_defaults_leave_other_models_alone() -> None:
    cfg = resolve({}, environ={})
    assert (cfg.tensor_parallel, cfg.pipeline_stages, cfg.micro_batches) == (1, 1, 1)
    assert cfg.model != "gpt"


def test_environment_is_read() -> None:
    cfg = resolve(GPT, environ={"MPITRAIN_TENSOR_PARALLEL": "2"})
    assert cfg.tensor_parallel == 2
    # the command line wins over the environment
    cfg = resolve({**GPT, "tensor_parallel": "4"}, environ={"MPITRAIN_TENSOR_PARALLEL": "2"})
    assert cfg.tensor_parallel == 4
    with pytest.raises(ConfigError) as info:  # and is checked like a flag
        resolve({}, environ={"MPITRAIN_TENSOR_PARALLEL": "2"})
    assert "--tensor-parallel" in str(info.value) and "HINT:" in str(info.value)


def test_checks_use_the_gpt_defaults_that_will_apply() -> None:
    """An unset --hidden is the GPT's 64 (applied later by the train command), not 128."""
    with pytest.raises(ConfigError, match="--hidden 64 does not divide into --heads 3"):
        resolve({"model": "gpt", "heads": "3"}, environ={})
    with pytest.raises(ConfigError, match="--hidden 128 does not divide into --heads 3"):
        resolve({"model": "gpt", "heads": "3", "mode_defaults": False}, environ={})
    # the default context is 64 for the GPT: sequence parallel over 4 ranks fits it
    resolve({"model": "gpt", "tensor_parallel": "4", "sequence_parallel": True}, environ={})
