"""The opt-in ``horovod`` alias: ``import horovod.torch as hvd`` gives ``mpitrain.horovod``.

``python -m mpitrain.horovod install-alias`` writes a small ``horovod`` package into the
active environment's site-packages (or ``--target DIR``), with a
``horovod-0.28.1+mpitrain.dist-info`` so that pip and ``importlib.metadata`` see it as what
it is; ``--uninstall`` (or ``pip uninstall horovod``) removes it. Scripts and libraries that
import ``horovod`` themselves then run unchanged. A real Horovod installation is never
overwritten or shadowed: the command refuses.

The package holds no logic: ``horovod/torch.py`` and ``horovod/common.py`` call
:func:`bind`, which puts mpitrain's modules into ``sys.modules`` under Horovod's names
(:data:`MODULES`), so ``horovod.torch`` *is* ``mpitrain.horovod`` (no second copy of any
module or class).
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.util
import shutil
import sys
import sysconfig
import types
from pathlib import Path

from mpitrain.errors import ConfigError, with_hint
from mpitrain.runtime.files import write_atomic

HOROVOD_VERSION = "0.28.1"
VERSION = f"{HOROVOD_VERSION}+mpitrain"
MARKER = "MPITRAIN_HOROVOD_ALIAS"
DIST_INFO = f"horovod-{VERSION}.dist-info"

#: Horovod's module -> mpitrain's module (None: a namespace holding only submodules)
MODULES: dict[str, str | None] = {
    "horovod.torch": "mpitrain.horovod",
    "horovod.torch.mpi_ops": "mpitrain.horovod.mpi_ops",
    "horovod.torch.compression": "mpitrain.horovod.compression",
    "horovod.torch.functions": "mpitrain.horovod.functions",
    "horovod.torch.optimizer": "mpitrain.horovod.optimizer",
    "horovod.torch.sync_batch_norm": "mpitrain.horovod.sync_batch_norm",
    "horovod.torch.elastic": "mpitrain.horovod.elastic",
    "horovod.torch.elastic.state": "mpitrain.horovod.elastic.state",
    "horovod.torch.elastic.sampler": "mpitrain.horovod.elastic.sampler",
    "horovod.common": None,
    "horovod.common.basics": "mpitrain.horovod.basics",
    "horovod.common.elastic": "mpitrain.horovod.elastic.common",
    "horovod.common.exceptions": "mpitrain.horovod.exceptions",
    "horovod.common.process_sets": "mpitrain.horovod.context",
}

_BIND = "from mpitrain.horovod.alias import bind\n\nbind(__name__)\n"
_TOP = '''

def __getattr__(name):
    if name == "run":
        raise AttributeError(
            "horovod.run (horovodrun's Python API) is not provided by mpitrain's alias. "
            "HINT: launch the script with `mpiexec -n N python train.py` (or srun)")
    raise AttributeError(f"module 'horovod' has no attribute {name!r}")
'''
_HEADER = (
    '"""{name}: an alias of mpitrain\'s Horovod API ({marker}).\n\n'
    "Written by `python -m mpitrain.horovod install-alias`; remove it with\n"
    "`python -m mpitrain.horovod install-alias --uninstall` or `pip uninstall horovod`.\n"
    '"""\n\n'
)


def bind(name: str) -> None:
    """Register ``name`` and its submodules from :data:`MODULES` in ``sys.modules``."""
    for alias in sorted(a for a in MODULES if a == name or a.startswith(name + ".")):
        target = MODULES[alias]
        module = (importlib.import_module(target) if target is not None
                  else types.ModuleType(alias, f"Horovod's {alias} namespace (mpitrain alias)"))
        sys.modules[alias] = module
        parent, _, child = alias.rpartition(".")
        if alias != name:
            setattr(sys.modules[parent], child, module)


def files() -> dict[str, str]:
    """Return the alias package's files: path relative to site-packages -> text."""
    top = _HEADER.format(name="horovod", marker=MARKER) + f'__version__ = "{VERSION}"\n' + _TOP
    out = {"horovod/__init__.py": top}
    for name in sorted({a.split(".")[1] for a in MODULES}):
        out[f"horovod/{name}.py"] = _HEADER.format(name=f"horovod.{name}", marker=MARKER) + _BIND
    return out


def default_target() -> Path:
    """Return the running environment's site-packages (``purelib``)."""
    return Path(sysconfig.get_paths()["purelib"])


def _is_ours(target: Path) -> bool:
    init = target / "horovod" / "__init__.py"
    try:
        return MARKER in init.read_text(errors="replace")
    except OSError:
        return False


def _foreign(target: Path) -> str | None:
    """Return where a real Horovod lives (in ``target`` or importable), or None."""
    if (target / "horovod").exists() or (target / "horovod.py").exists():
        if not _is_ours(target):
            return str(target / "horovod")
    for meta in [*target.glob("horovod-*.dist-info"), *target.glob("horovod-*.egg-info")]:
        if meta.name != DIST_INFO:
            return str(meta)
    try:
        spec = importlib.util.find_spec("horovod")
    except (ImportError, ValueError):  # a broken or half-imported horovod: look no further
        spec = None
    if spec is not None and spec.origin is not None:
        found = Path(spec.origin).resolve().parent.parent
        if found != target.resolve() and not _is_ours(found):
            return spec.origin
    return None


def _record_line(rel: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{rel},sha256={digest},{len(data)}"


def install(target: Path | None = None) -> Path:
    """Write the alias into ``target`` (default: site-packages); returns the directory.

    Raises:
        ConfigError: a real Horovod is installed or importable, or ``target`` is unwritable.
    """
    target = default_target() if target is None else Path(target)
    foreign = _foreign(target)
    if foreign is not None:
        raise ConfigError(with_hint(
            f"install-alias: a real Horovod is installed at '{foreign}'; refusing to "
            "overwrite or shadow it",
            "use it as it is, or `pip uninstall horovod` first; `import mpitrain.horovod as "
            "hvd` works without the alias"))
    written = files()
    meta = {
        f"{DIST_INFO}/METADATA": (
            f"Metadata-Version: 2.1\nName: horovod\nVersion: {VERSION}\n"
            "Summary: Alias of mpitrain.horovod (Horovod's PyTorch API over MPI), written by "
            "python -m mpitrain.horovod install-alias\nRequires-Dist: mpitrain\n"),
        f"{DIST_INFO}/INSTALLER": "mpitrain\n",
        f"{DIST_INFO}/top_level.txt": "horovod\n",
    }
    written.update(meta)
    try:
        (target / "horovod").mkdir(parents=True, exist_ok=True)
        (target / DIST_INFO).mkdir(exist_ok=True)
        lines = []
        for rel, text in written.items():  # horovod/__init__.py (the marker) first
            data = text.encode()
            write_atomic(target / rel, data)
            lines.append(_record_line(rel, data))
        lines.append(f"{DIST_INFO}/RECORD,,")
        write_atomic(target / DIST_INFO / "RECORD", ("\n".join(lines) + "\n").encode())
    except OSError as exc:
        raise ConfigError(with_hint(
            f"install-alias: cannot write to '{target}': {exc.strerror or exc}",
            "activate the environment you mean (or pass --target DIR on PYTHONPATH)")) from exc
    importlib.invalidate_caches()
    return target


def uninstall(target: Path | None = None) -> bool:
    """Remove the alias from ``target``; returns False when it was not installed there.

    Raises:
        ConfigError: ``target`` holds a real Horovod (left alone).
    """
    target = default_target() if target is None else Path(target)
    if not (target / "horovod").exists() and not (target / DIST_INFO).exists():
        return False
    if (target / "horovod").exists() and not _is_ours(target):
        raise ConfigError(with_hint(
            f"install-alias --uninstall: '{target / 'horovod'}' is a real Horovod, not "
            "mpitrain's alias; leaving it", "remove it with `pip uninstall horovod`"))
    for rel in files():
        (target / rel).unlink(missing_ok=True)
    shutil.rmtree(target / "horovod" / "__pycache__", ignore_errors=True)
    shutil.rmtree(target / DIST_INFO, ignore_errors=True)
    try:
        (target / "horovod").rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(with_hint(
            f"install-alias --uninstall: removed the alias's files, but '{target / 'horovod'}' "
            f"still holds others: {exc.strerror or exc}", "look at them and remove them by "
            "hand")) from exc
    importlib.invalidate_caches()
    return True
