"""fp16 loss scaling (Lightning's MixedPrecision) and bf16-mixed under MPIStrategy with ZeRO
(scenario tests/mpi/scenarios/lightning_precision.py, one 2-rank launch)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from mpitrain.runtime import env
from mpitrain.runtime.launch import launch_env, mpiexec_command
from tests.conftest import ROOT, SCENARIOS

pytestmark = pytest.mark.mpi

SHARDS = ("none", "optimizer", "gradients", "parameters")
POISON_STEP, SCALE = 4, 1024.0  # as in the scenario


@pytest.fixture(scope="module")
def results(mpiexec: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The scenario's results.json (one launch for the module's tests)."""
    try:
        import lightning.pytorch  # noqa: F401
    except ImportError:
        if env.get("require_mpi") == "1":
            pytest.fail("lightning is not installed but MPITRAIN_REQUIRE_MPI=1 (CI installs "
                        "mpitrain[lightning])")
        pytest.skip("lightning is not installed (pip install mpitrain[lightning])")
    out = tmp_path_factory.mktemp("lightning-precision")
    cmd = [*mpiexec_command(2, mpiexec), sys.executable,
           str(SCENARIOS / "lightning_precision.py"), str(out)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired as exc:
        text = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"timed out after 300s (hang): {' '.join(cmd)}\n{text[-4000:]}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    data: dict[str, Any] = json.loads((out / "results.json").read_text())
    return data


def test_fp16_overflow_in_one_shard_skips_every_ranks_step(results: dict[str, Any]) -> None:
    """An inf in rank 1's local gradient at step 4 lands in one rank's ZeRO shard only; every
    rank's GradScaler still skips that step (no shard changes) and backs off to 512, and the
    fit equals the replicas' (where the all-reduce spreads the inf): same losses and scales."""
    runs = results["runs"]
    ref = runs["fp16 none"]
    for shard in SHARDS:
        per_rank = runs[f"fp16 {shard}"]
        assert len(per_rank) == 2 and len(per_rank[0]) == 12, shard  # 192 / 2 ranks / 8
        for rank, rows in enumerate(per_rank):
            what = f"shard={shard} rank {rank}"
            scales = [r["scale"] for r in rows]
            assert scales == [SCALE] * POISON_STEP + [SCALE / 2] * (12 - POISON_STEP), what
            assert [r["changed"] for r in rows] == [i != POISON_STEP for i in range(12)], what
            np.testing.assert_allclose([r["loss"] for r in rows],
                                       [r["loss"] for r in ref[rank]], rtol=1e-5, err_msg=what)
            assert all(np.isfinite(r["loss"]) for r in rows), what


def test_fp16_scaler_state_is_in_the_sharded_checkpoint(results: dict[str, Any]) -> None:
    """The ZeRO-2 fit's end-of-epoch checkpoint holds the agreed scale (Lightning's entry)."""
    state = results["checkpoint scaler"]
    assert state is not None and state["scale"] == SCALE / 2, state


def test_bf16_mixed_trains_under_zero_like_replicas(results: dict[str, Any]) -> None:
    """precision="bf16-mixed" (no scaler) under ZeRO-2 takes every step, as replicas do."""
    runs = results["runs"]
    for rank in range(2):
        zero, ref = runs["bf16 gradients"][rank], runs["bf16 none"][rank]
        assert len(zero) == 12 and all(r["changed"] and r["scale"] is None for r in zero)
        np.testing.assert_allclose([r["loss"] for r in zero], [r["loss"] for r in ref],
                                   rtol=1e-5)


def test_plugin_with_its_own_step_is_refused_under_zero(results: dict[str, Any]) -> None:
    """A MixedPrecision subclass with its own optimizer_step cannot be routed: one line with a
    HINT, the same on both ranks."""
    refused = results["refused"]
    assert refused[0] == refused[1], refused
    msg = refused[0]
    assert msg.startswith("ConfigError: ") and "OwnStep" in msg and "HINT: " in msg, msg
    assert "\n" not in msg
