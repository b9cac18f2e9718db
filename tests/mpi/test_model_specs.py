"""Model specs through the command line: Hugging Face Llama and GPT-2 (unchanged) and a user's
own model split by tensor, pipeline, data and ZeRO-3 == one process; bad plans refused."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from mpitrain.checkpoint.shards import load_full
from tests.conftest import MpiRun, job_runner
from tests.mpi.test_model_parallel import _final, _grid_dir, _in_one_job, _max_rel

SMALL = ["-m", "mpitrain", "--context", "16", "--hidden", "32", "--heads", "4", "--layers", "2",
         "--optimizer", "sgd", "--lr", "0.03", "--no-scale-lr", "--warmup-epochs", "0",
         "--prefetch", "1", "--no-progress", "--max-steps", "20"]
#: float32 after 20 steps: measured 2.7e-7 for llama tensor 2 (sums in another order); at
#: --lr 0.1 training amplifies them to 1.5e-4 (and a pipeline's micro-batches to 1.4e-5)
REL_TOL = 1e-5


def _run(mpirun: MpiRun, n: int, out: Path, model: str, args: list[str],
         check: bool = True) -> subprocess.CompletedProcess[str]:
    return mpirun(n, [*SMALL, *_argv(out, model, args)], timeout=300, check=check)


def _argv(out: Path, model: str, args: list[str]) -> list[str]:
    return ["--model", model, "--checkpoint-dir", str(out / "ckpt"),
            "--summary-json", str(out / "summary.json"), *args]


def _job_run(tmp: Path, name: str, ranks: range | list[int], model: str,
             args: list[str]) -> dict[str, Any]:
    """A run of an _in_one_job phase: ``name`` on ``ranks``, into ``tmp / name``."""
    return {"name": name, "ranks": list(ranks), "argv": [*SMALL[2:], *_argv(tmp / name, model,
                                                                             args)]}


def _same(ref: Path, got: Path) -> None:
    (rp, rs), (gp, gs) = _final(ref), _final(got)
    assert gs["steps"] == rs["steps"] == 20
    assert _max_rel(rp, gp) < REL_TOL, _max_rel(rp, gp)
    for key in ("final_loss", "test_loss"):
        assert abs(float(gs[key]) - float(rs[key])) <= REL_TOL * abs(float(rs[key])), key  # type: ignore[arg-type]


#: (ranks, batch per replica, grid options) for each model; the reference: 1 rank, batch 16
GRIDS = {
    # the attention reads its input's length: sequence-norm gathers it (Megatron SP)
    # activation checkpointing recomputes the same numbers: composed with each
    "llama": [(2, 16, ["--tensor-parallel", "2", "--sequence-parallel",
                       "--activation-checkpointing", "selective"]),
              (2, 8, ["--shard", "parameters", "--activation-checkpointing", "full"]),
              (8, 8, ["--tensor-parallel", "2", "--pipeline-stages", "2",
                      "--micro-batches", "2"])],
    # the tied head across stages, Conv1D layers split, sequence parallel, ZeRO-3 over the
    # replicas
    "gpt2": [(8, 8, ["--tensor-parallel", "2", "--pipeline-stages", "2", "--micro-batches",
                     "2", "--sequence-parallel", "--shard", "parameters",
                     "--activation-checkpointing", "full"])],
}


@pytest.fixture(scope="module")
def hf_runs(mpiexec: str, digits_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GRIDS' runs and each model's one-process reference in one job of 8 ranks (transformers
    and torch load once per rank, some 9 s of CPU each): the references and the 2-rank grids
    side by side, then each 8-rank grid. ``tmp / MODEL-ref``, ``tmp / MODEL-I``."""
    tmp = tmp_path_factory.mktemp("hf")
    side, alone, first = [], [], 2  # ranks 0, 1: the references
    for model, grids in sorted(GRIDS.items()):
        side.append(_job_run(tmp, f"{model}-ref", [len(side)], model, ["--batch-size", "16"]))
        for i, (n, batch, grid) in enumerate(grids):
            args = ["--batch-size", str(batch), *grid]
            if n == 8:
                alone.append({"runs": [_job_run(tmp, f"{model}-{i}", range(8), model, args)]})
            else:
                side.append(_job_run(tmp, f"{model}-{i}", range(first, first + n), model,
                                     args))
                first += n
    assert first <= 8, "the grids of the first phase need more than 8 ranks"
    _in_one_job(job_runner(mpiexec, digits_cache), 8, tmp, [{"runs": side}, *alone],
                timeout=840)
    return tmp


@pytest.mark.mpi
@pytest.mark.timeout(900)  # the first one runs the module's job of 7 runs
@pytest.mark.parametrize("model", sorted(GRIDS))
def test_hugging_face_models_split_train_like_one_process(hf_runs: Path, model: str) -> None:
    for i in range(len(GRIDS[model])):
        _same(hf_runs / f"{model}-ref", hf_runs / f"{model}-{i}")


USER = "tests.mpi.scenarios.user_spec:spec"
#: the interleaved test's GPT: 4 blocks (4 chunks on 2 ranks), 30 steps (the lr's horizon)
FOUR = ["--layers", "4", "--batch-size", "16", "--max-steps", "30"]
PIPE = ["--pipeline-stages", "2", "--micro-batches", "2"]


@pytest.fixture(scope="module")
def spec_runs(mpiexec: str, digits_cache: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Path:
    """The runs of the two tests below in one job of 4 ranks: the user's model (``user-ref``
    on one rank, ``user-grid``) and the interleaved GPT (``gpt-ref``, ``v2`` and ``then``,
    v2's step 20 resumed under 1F1B); ``tmp / NAME``."""
    tmp = tmp_path_factory.mktemp("specs")
    _in_one_job(job_runner(mpiexec, digits_cache), 4, tmp, [
        {"runs": [_job_run(tmp, "user-ref", [0], USER, ["--batch-size", "16"]),
                  _job_run(tmp, "gpt-ref", [1], "gpt", [*FOUR, "--checkpoint-every", "20"]),
                  _job_run(tmp, "v2", [2, 3], "gpt", [
                      *FOUR, *PIPE, "--pipeline-schedule", "interleaved", "--virtual-stages",
                      "2", "--checkpoint-every", "20"])]},
        {"runs": [_job_run(tmp, "user-grid", range(4), USER, [
            "--batch-size", "16", "--tensor-parallel", "2", *PIPE])]},
        {"copy": [(tmp / "v2" / "ckpt", tmp / "then" / "ckpt", 20)],
         "runs": [_job_run(tmp, "then", [0, 1], "gpt", [*FOUR, *PIPE, "--resume", "auto"])]},
    ], timeout=600)
    return tmp


@pytest.mark.mpi
@pytest.mark.timeout(600)  # the first one runs the module's job of 5 runs
def test_a_users_own_model_splits_by_its_spec(
    mpirun: MpiRun, spec_runs: Path, tmp_path: Path
) -> None:
    _same(spec_runs / "user-ref", spec_runs / "user-grid")
    # a plan that names a layer the model lacks: one line on every rank, no traceback
    bad = _run(mpirun, 2, tmp_path / "bad", "tests.mpi.scenarios.user_spec:bad_spec",
               ["--tensor-parallel", "2"], check=False)
    assert bad.returncode != 0
    assert "'blocks.*.fc9', which matches no module" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr, bad.stderr


@pytest.mark.mpi
@pytest.mark.timeout(600)
def test_interleaved_schedule_from_the_command_line_trains_like_one_process(
    spec_runs: Path
) -> None:
    """--pipeline-schedule interleaved --virtual-stages 2 on 2 ranks (4 chunks of the GPT's 4
    blocks) == one process; its checkpoint holds the dense names and resumes under 1F1B."""
    for step in (20, 30):
        want = load_full(_grid_dir(spec_runs / "gpt-ref" / "ckpt", step))["model"]
        got = load_full(_grid_dir(spec_runs / "v2" / "ckpt", step))["model"]
        assert _max_rel(want, got) < REL_TOL, step  # the same (dense) names
    (rp, rs), (gp, gs) = _final(spec_runs / "gpt-ref"), _final(spec_runs / "then")
    assert _max_rel(rp, gp) < REL_TOL
    assert gs["final_loss"] == pytest.approx(rs["final_loss"], rel=REL_TOL)
