"""Resuming on another number of ranks (elastic): exact data coverage, the batch/lr policy.

The Slurm version (4 -> 2 -> 3 emulated nodes, requeued) is tests/cluster/test_slurm_nodes.py;
this one runs the same trainer path with plain mpiexec, in seconds.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

import pytest

from mpitrain.train.sample_log import read_sample_log
from tests.conftest import MpiRun


@pytest.mark.mpi
def test_resume_on_4_then_2_then_3_ranks_covers_the_epoch_once(
    mpirun: MpiRun, tmp_path: Path
) -> None:
    """--global-batch 48 stopped by --max-steps inside epoch 1 on 4 ranks, resumed on 2, then
    on 3: every training sample of the epoch is trained on exactly once, each step has 48
    samples, and the lr is the same on every rank count."""
    log, ck = tmp_path / "samples", tmp_path / "ck"
    common = ["-m", "mpitrain", "--global-batch", "48", "--checkpoint-dir", str(ck),
              "--sample-log", str(log), "--no-progress", "--epochs", "2"]
    lrs = []
    for n, steps in ((4, 10), (2, 20), (3, 40)):
        extra = [] if n == 4 else ["--resume", "auto"]
        proc = mpirun(n, [*common, *extra, "--max-steps", str(steps)], timeout=150)
        m = re.search(r"global batch 48 = (\d+) ranks x (\d+) samples x 1 accumulated "
                      r"\(lr ([0-9.e-]+)\)", proc.stdout + proc.stderr)
        assert m is not None, proc.stderr[-3000:]
        assert (int(m[1]), int(m[2])) == (n, 48 // n)
        lrs.append(m[3])
    assert len(set(lrs)) == 1, lrs  # lr * 48 / --batch-size, whatever the rank count
    rows = read_sample_log(log)
    per_step: dict[int, int] = collections.Counter()
    seen: dict[int, int] = collections.Counter()
    worlds: dict[int, set[int]] = collections.defaultdict(set)
    for epoch, step, world, idx in rows:
        per_step[step] += len(idx)
        worlds[world].add(step)
        if epoch == 0:
            seen.update(idx)
    assert set(per_step.values()) == {48}, per_step
    assert worlds[4] == set(range(10)) and worlds[2] == set(range(10, 20)), worlds
    assert min(worlds[3]) == 20 and max(worlds[3]) == 39, worlds
    # the digits training split (1437 samples): 29 full global batches, the tail dropped
    assert set(seen.values()) == {1}, [i for i, c in seen.items() if c > 1][:10]
    assert len(seen) == 29 * 48
