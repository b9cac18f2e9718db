"""doctor's pure parts: problem detection and report text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpitrain.doctor import problems, render, writable


def _facts(rank: int, **over: Any) -> dict[str, Any]:
    f: dict[str, Any] = {
        "rank": rank,
        "host": "n1",
        "node": 0,
        "local_rank": rank,
        "local_size": 2,
        "pid": 10 + rank,
        "python": "3.11.7",
        "torch": "2.13.0",
        "mpi4py": "4.1.2",
        "mpi_library": "MPICH Version: 5.0.2",
        "mpi_standard": "5.0",
        "thread_level": "MULTIPLE",
        "cuda_devices": [],
        "cuda_visible_devices": None,
        "h5py": "3.16.0",
        "h5py_mpi": "no",
        "slurm": {},
        "slurm_problem": None,
        "tmp_dir": "/tmp",
        "tmp_writable": "ok",
        "cache_dir": "/c",
        "cache_writable": "ok",
    }
    f.update(over)
    return f


def test_clean_world_has_no_problems() -> None:
    facts = [_facts(0), _facts(1)]
    assert problems(facts) == []
    text = render(facts, "no CUDA device", [])
    assert "world: 2 ranks on 1 node(s)" in text and "OK: no problems found" in text
    assert "     1  n1" in text


def test_version_mismatch_slurm_and_unwritable_cache_are_problems() -> None:
    facts = [
        _facts(0, slurm_problem="world 1 vs SLURM_NTASKS=2. HINT: srun --mpi=pmi2"),
        _facts(
            1,
            torch="2.12.0",
            cache_writable="NOT WRITABLE (Permission denied)",
            slurm_problem="world 1 vs SLURM_NTASKS=2. HINT: srun --mpi=pmi2",
        ),
    ]
    found = problems(facts)
    assert len(found) == 3
    assert found[0].startswith("ranks disagree on torch (rank 0: 2.13.0, rank 1: 2.12.0)")
    assert "srun --mpi=pmi2" in found[1]
    assert "rank 1 on n1: cache dir /c NOT WRITABLE" in found[2] and "MPITRAIN_CACHE" in found[2]
    assert "PROBLEMS:" in render(facts, "x", found)


def test_mpirun_inside_slurm_is_only_a_note() -> None:
    facts = [_facts(0, slurm={"SLURM_NTASKS": "4"}), _facts(1, slurm={"SLURM_NTASKS": "4"})]
    text = render(facts, "no CUDA device", problems(facts))
    assert "note: SLURM_NTASKS=4 differs from the MPI world size 2" in text
    assert "OK: no problems found" in text


def test_cuda_facts_are_listed_under_the_decision() -> None:
    from mpi4py import MPI

    from mpitrain.doctor import cuda_facts

    notes = cuda_facts(MPI.COMM_SELF)
    assert notes and not any(n.startswith("MPI library:") for n in notes)
    assert any(n.startswith("CUDA query") for n in notes), notes
    text = render([_facts(0)], "no CUDA device", [], notes)
    assert f"  cuda-aware MPI: no CUDA device\n    {notes[0]}\n" in text


def test_writable_reports_unusable_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert writable(tmp_path / "file" / "sub").startswith("NOT WRITABLE")  # fails as root too


def test_writable_creates_missing_dir(tmp_path: Path) -> None:
    assert writable(tmp_path / "a" / "b") == "ok"
    assert (tmp_path / "a" / "b").is_dir()
