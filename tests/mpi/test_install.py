"""`pip install` of the built wheel into a fresh virtual environment works outside the checkout.

One test, because building is the cost: the sdist is built from a copy of the sources, the
wheel from the unpacked sdist (so the sdist is complete), the wheel (with the ``plot`` and
``lightning`` extras) goes into a new venv, and the commands run from another directory. The
new venv gets its dependencies (torch 2.13.0, mpi4py, MPICH, ...) from this one through a
``.pth`` file and links instead of a download: every entry of this venv's site-packages but
mpitrain's own (its editable install must not be seen), and MPICH's library beside the venv's
``lib/``, where the ``mpich`` wheel puts it and mpi4py looks for it.
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import mpitrain
from mpitrain.runtime.launch import launch_env, mpiexec_command

pytestmark = pytest.mark.mpi

ROOT = Path(__file__).resolve().parents[2]
#: what the wheel's metadata must declare for each extra (pyproject.toml)
EXTRAS = {
    "plot": {"matplotlib>=3.7"},
    "hf": {"transformers>=4.40", "tokenizers>=0.15"},
    "lightning": {"lightning<2.7,>=2.6"},
    "dev": {"pytest>=8", "pytest-timeout>=2.2", "mypy>=1.10", "ruff>=0.5", "matplotlib>=3.7"},
}
#: the README's demo line: 2 ranks end at this test accuracy
DEMO_ACCURACY = "test accuracy 96.67%"


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 240) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _build(tmp: Path) -> tuple[Path, Path]:
    """Build the sdist from a copy of the sources, then the wheel from the sdist."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for pkg in ("mpitrain", "data_tools"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=skip)
    dist = tmp / "dist"
    hook = "import setuptools.build_meta as b, sys; print(b.build_{}(sys.argv[1]))"
    sdist = dist / _run([sys.executable, "-c", hook.format("sdist"), str(dist)],
                        src).stdout.split()[-1]
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    (unpacked,) = (tmp / "unpacked").iterdir()
    wheel = dist / _run([sys.executable, "-c", hook.format("wheel"), str(dist)],
                        unpacked).stdout.split()[-1]
    return sdist, wheel


def _check_wheel(wheel: Path) -> None:
    """Every file the packages carry is in the wheel; the metadata has the version and extras."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = email.message_from_bytes(
            zf.read(f"mpitrain-{mpitrain.__version__}.dist-info/METADATA"))
        entry_points = zf.read(f"mpitrain-{mpitrain.__version__}.dist-info/entry_points.txt")
    carried = {
        p.relative_to(ROOT).as_posix()
        for pkg in ("mpitrain", "data_tools") for p in (ROOT / pkg).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    assert carried - names == set(), "files of the packages missing from the wheel"
    assert {"mpitrain/slurm/templates/train-cpu.sbatch", "mpitrain/py.typed"} <= names
    assert meta["Version"] == mpitrain.__version__  # one source: mpitrain.__version__
    assert set(meta.get_all("Provides-Extra") or []) == set(EXTRAS)
    requires = meta.get_all("Requires-Dist") or []
    for extra, wanted in EXTRAS.items():
        got = {r.split(";")[0].strip() for r in requires if f'extra == "{extra}"' in r}
        assert got == wanted, extra
    assert b"mpitrain = mpitrain.cli:main" in entry_points
    assert b"data-tools = data_tools.cli:main" in entry_points


def _fresh_venv(tmp: Path) -> Path:
    """A venv without pip whose dependencies are this venv's, minus mpitrain itself."""
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    python = venv / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; "
                         "print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip())
    deps = tmp / "deps"
    deps.mkdir()
    mine = ("mpitrain", "__editable__", "data_tools", "horovod")
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(mine):
            (deps / entry.name).symlink_to(entry)
    (purelib / "_test_deps.pth").write_text(f"{deps}\n")
    for entry in (Path(sys.prefix) / "lib").iterdir():  # libmpi of the mpich wheel
        if not entry.name.startswith("python"):
            (venv / "lib" / entry.name).symlink_to(entry)
    return venv


def test_wheel_installs_and_runs_outside_the_checkout(
    tmp_path: Path, mpiexec: str, digits_cache: Path
) -> None:
    sdist, wheel = _build(tmp_path)
    assert sdist.name == f"mpitrain-{mpitrain.__version__}.tar.gz"
    _check_wheel(wheel)
    venv = _fresh_venv(tmp_path)
    bin_ = venv / "bin"
    # the extras resolve against what is installed (torch 2.13.0 stays the only torch)
    _run([sys.executable, "-m", "pip", "--python", str(bin_ / "python"), "install", "-q",
          "--no-index", f"{wheel}[plot,lightning]"], tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in launch_env().items()
           if k != "PYTHONPATH" and not k.startswith("MPITRAIN_")}
    env["MPITRAIN_CACHE"] = str(digits_cache)
    env["PATH"] = f"{bin_}{os.pathsep}{env.get('PATH', '')}"

    def run(*cmd: str | Path) -> str:
        return _run([str(c) for c in cmd], elsewhere, env).stdout

    version = f"mpitrain {mpitrain.__version__}"
    assert run(bin_ / "mpitrain", "--version").strip() == version
    assert run(bin_ / "python", "-m", "mpitrain", "--version").strip() == version
    where = run(bin_ / "python", "-c", "import mpitrain, data_tools, matplotlib, "
                "lightning.pytorch; print(mpitrain.__file__); print(data_tools.__file__)")
    assert all(Path(p).is_relative_to(venv) for p in where.split()), where
    assert "convert" in run(bin_ / "python", "-m", "data_tools", "--help")
    assert "convert" in run(bin_ / "data-tools", "--help")
    sbatch = run(bin_ / "mpitrain", "slurm", "render", "train-cpu", "--nodes", "4",
                 "--min-nodes", "2", "--", "--global-batch", "96")
    assert "#SBATCH --nodes=2-4" in sbatch and "TRAIN_ARGS=(--global-batch 96)" in sbatch
    # the demo (`make demo`: mpiexec -n 2 python -m mpitrain) ends where the README says
    demo = run(*mpiexec_command(2, mpiexec), bin_ / "mpitrain", "--no-progress")
    assert "mpitrain: done: 2 ranks, 12 epochs, 264 steps" in demo, demo
    assert DEMO_ACCURACY in demo, demo
    assert DEMO_ACCURACY in (ROOT / "README.md").read_text()
