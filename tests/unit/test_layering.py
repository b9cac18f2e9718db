"""Imports point one way (docs/design.md): a module never imports a layer above its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# module prefix -> layer; the longest matching prefix wins
LAYERS = {
    "mpitrain.errors": 0,
    "mpitrain.config": 0,
    "mpitrain.runtime.env": 0,
    "mpitrain.runtime": 1,
    "mpitrain.checkpoint": 1,
    "mpitrain.checkpoint.shards": 1,
    "mpitrain.checkpoint.reshard": 1,
    "mpitrain.checkpoint.compat": 1,
    "mpitrain.checkpoint.manifest": 1,
    "mpitrain.preempt": 1,
    "mpitrain.data": 1,
    "mpitrain.timeline": 1,  # recorded by grad (buckets) and train (phases)
    "mpitrain.comm": 2,
    "mpitrain.grad": 3,
    "mpitrain.horovod": 3,
    "mpitrain.parallel": 3,
    "mpitrain.train": 4,
    "mpitrain.lightning": 4,  # a Lightning strategy over grad/ (exchange) and runtime/
    "mpitrain.slurm": 4,
    "mpitrain.cluster": 4,
    "mpitrain.doctor": 4,
    "mpitrain.cli": 5,
    "mpitrain.__main__": 5,
    "mpitrain.bench": 5,
    "mpitrain": 0,  # the package __init__ (lazy names only)
}


def layer_of(module: str) -> int | None:
    best = None
    for prefix, layer in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (
            best is None or len(prefix) > len(best[0])
        ):
            best = (prefix, layer)
    return None if best is None else best[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [f"{node.module}.{a.name}" for a in node.names]
    return [m for m in found if m.split(".")[0] in ("mpitrain", "data_tools")]


def test_no_upward_imports() -> None:
    bad = []
    for path in sorted((ROOT / "mpitrain").rglob("*.py")):
        me = module_name(path)
        mine = layer_of(me)
        assert mine is not None, me
        for target in imports(path):
            theirs = layer_of(target)
            if not me.startswith("mpitrain.bench") and target.startswith("data_tools"):
                bad.append(f"{me} imports {target} (data_tools depends on mpitrain, not back)")
            elif theirs is not None and theirs > mine:
                bad.append(f"{me} (layer {mine}) imports {target} (layer {theirs})")
    assert not bad, "\n".join(bad)


def test_import_does_no_mpi_work() -> None:
    code = (
        "import sys, mpitrain, mpitrain.config, mpitrain.errors\n"
        "mods = [m for m in sys.modules if m.startswith(('mpi4py.MPI', 'torch'))]\n"
        "assert not mods, mods\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_modules_stay_small() -> None:
    big = [
        f"{p.relative_to(ROOT)}: {n} lines"
        for p in sorted((ROOT / "mpitrain").rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > 450
    ]
    assert not big, big
