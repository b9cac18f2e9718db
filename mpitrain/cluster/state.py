"""The state file: exactly what the cluster tool created, so `down` removes that and only that.

Every object is recorded *before* it is created (after checking that its name is free, under
the tool's lock), and the record is written atomically each time. A crash therefore leaves a
state file that names everything that may exist; ``down`` removes what is still there and
skips what is already gone. A namespace is also identified by its inode (the nsfs inode of
``/run/netns/NAME``), so one that was deleted and re-created by someone else is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mpitrain.cluster import MAX_NODES, ClusterError, node_name
from mpitrain.errors import with_hint
from mpitrain.runtime.tool_io import Fields, read_json

#: where the state file, the launcher agent and the lock live (tmpfs: gone at reboot, as are
#: the namespaces)
STATE_DIR = Path("/run/mpitrain-cluster")
VERSION = 1
KINDS = ("netns", "link", "hosts", "file")


@dataclass
class Item:
    """One object the tool created.

    ``kind`` is ``netns`` (``name``; ``inode`` once it exists), ``link`` (``name`` inside
    namespace ``netns``; a veth's ``peer`` is ``NETNS/NAME``), ``hosts`` (the marked block in
    the file ``name``) or ``file`` (a file the tool wrote, ``name`` is its path).
    """

    kind: str
    name: str
    netns: str = ""
    peer: str = ""
    inode: int = 0


@dataclass
class State:
    """The recorded cluster: its layout and the objects created, in creation order."""

    path: Path
    nodes: list[str] = field(default_factory=list)
    subnet: str = ""
    link: str = "none"
    items: list[Item] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> State | None:
        """Read the state file; None when there is none.

        Raises:
            ClusterError: the file exists but cannot be read as a state file (one line naming
                it and the field).
        """
        if not os.path.lexists(path):
            return None
        hint = ("inspect it; remove the mpt-* namespaces it names with `ip netns del` and "
                "then the file itself")
        raw = read_json(path, "state file", hint=hint, error=ClusterError)
        f = Fields(path, "state file", hint=hint, error=ClusterError)
        doc = f.as_obj(raw)
        if doc.get("version") != VERSION:
            f.fail("version", f"is {doc.get('version')!r}, expected {VERSION}")
        nodes = [f.as_str(n, f"nodes[{i}]")
                 for i, n in enumerate(f.as_list(f.need(doc, "nodes"), "nodes"))]
        if nodes != [node_name(i) for i in range(1, len(nodes) + 1)] or len(nodes) > MAX_NODES:
            f.fail("nodes", f"must be {node_name(1)} ... {node_name(len(nodes))} (at most "
                            f"{MAX_NODES}), got {nodes[:4]}")
        subnet = f.as_str(f.need(doc, "subnet"), "subnet")
        if nodes:
            try:
                if ipaddress.IPv4Network(subnet).prefixlen != 24:
                    raise ValueError("not a /24")
            except ValueError as exc:
                f.fail("subnet", f"{subnet!r} is not an IPv4 /24 ({exc})")
        link = f.as_str(f.need(doc, "link"), "link")
        items = []
        for i, raw_item in enumerate(f.as_list(f.need(doc, "items"), "items")):
            key = f"items[{i}]"
            it = f.as_obj(raw_item, key)
            unknown = sorted(set(it) - set(Item.__dataclass_fields__))
            if unknown:
                f.fail(f"{key}.{unknown[0]}", "is not a field of an item")
            kind = f.as_str(f.need(it, "kind", key), f"{key}.kind")
            if kind not in KINDS:
                f.fail(f"{key}.kind", f"{kind!r} is not one of {', '.join(KINDS)}")
            items.append(Item(kind, f.as_str(f.need(it, "name", key), f"{key}.name"),
                              netns=f.as_str(it.get("netns", ""), f"{key}.netns"),
                              peer=f.as_str(it.get("peer", ""), f"{key}.peer"),
                              inode=f.as_int(it.get("inode", 0), f"{key}.inode")))
        return cls(path, nodes, subnet, link, items)

    def save(self) -> None:
        """Write the state atomically (temporary file, fsync, rename)."""
        body = {
            "version": VERSION,
            "nodes": self.nodes,
            "subnet": self.subnet,
            "link": self.link,
            "items": [asdict(it) for it in self.items],
        }
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            fh.write(json.dumps(body, indent=1) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def find(self, kind: str, name: str, netns: str = "") -> Item | None:
        """Return the recorded item, or None when the tool did not create it."""
        for it in self.items:
            if it.kind == kind and it.name == name and it.netns == netns:
                return it
        return None

    def record(self, item: Item) -> Item:
        """Record ``item`` (before creating it) and save."""
        self.items.append(item)
        self.save()
        return item

    def forget(self, item: Item) -> None:
        """Drop ``item`` (it was removed, or its creation failed) and save."""
        self.items = [it for it in self.items if it is not item]
        self.save()

    def namespaces(self) -> list[str]:
        """Names of the recorded namespaces, in creation order."""
        return [it.name for it in self.items if it.kind == "netns"]

    def remove(self) -> None:
        """Delete the state file (the cluster is gone)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def state_path(state_dir: Path = STATE_DIR) -> Path:
    """Return the path of the state file."""
    return state_dir / "state.json"


@contextlib.contextmanager
def locked(state_dir: Path = STATE_DIR, timeout: float = 120.0) -> Iterator[None]:
    """Hold the tool's exclusive lock (one up/down at a time) for the ``with`` block.

    Raises:
        ClusterError: another cluster command held the lock for ``timeout`` seconds.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ClusterError(
                        with_hint(
                            f"another `cluster` command has held '{state_dir}/lock' for "
                            f"{timeout:g} s",
                            "wait for it to finish (see `ps aux | grep 'mpitrain cluster'`)",
                        )
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)
