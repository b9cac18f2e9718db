"""Checkpoint files: atomic save, checksum sidecar, latest pointer, fallback, pruning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpitrain.checkpoint import files as ckpt
from mpitrain.errors import CheckpointError


def _state(v: float) -> dict[str, object]:
    return {"w": torch.full((4,), v), "step": int(v)}


def test_save_load_roundtrip(tmp_path: Path) -> None:
    path = ckpt.save(_state(1.0), tmp_path, 1, keep_last=3, run_id="r")
    assert ckpt.verify(path) is None
    assert (tmp_path / "latest").read_text().strip() == path.name
    loaded = ckpt.load(path)
    assert torch.equal(loaded["w"], torch.full((4,), 1.0))
    assert not list(tmp_path.glob("*.tmp"))


def test_keep_last_prunes_oldest(tmp_path: Path) -> None:
    for s in range(1, 6):
        ckpt.save(_state(float(s)), tmp_path, s, keep_last=2, run_id="r")
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step-000000005.pt", "step-000000004.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.sha256")) == [
        "step-000000004.pt.sha256", "step-000000005.pt.sha256"
    ]


def test_corrupt_latest_falls_back_with_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt.save(_state(1.0), tmp_path, 1, keep_last=3, run_id="r")
    newest = ckpt.save(_state(2.0), tmp_path, 2, keep_last=3, run_id="r")
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    chosen = ckpt.find_latest(tmp_path)
    assert chosen is not None and chosen.name == "step-000000001.pt"
    assert "checksum mismatch" in capsys.readouterr().err


def test_truncated_and_missing_sidecar(tmp_path: Path) -> None:
    p = ckpt.save(_state(1.0), tmp_path, 1, keep_last=3, run_id="r")
    p.write_bytes(p.read_bytes()[:10])
    assert ckpt.verify(p) == "checksum mismatch (truncated or modified)"
    p.with_name(p.name + ".sha256").unlink()
    assert "sidecar missing" in str(ckpt.verify(p))
    assert ckpt.find_latest(tmp_path, warn=False) is None


class Evil:
    """A pickled object that weights_only loading must refuse."""


def test_weights_only_rejects_arbitrary_objects(tmp_path: Path) -> None:
    p = tmp_path / "x.pt"
    torch.save({"obj": Evil()}, p)
    with pytest.raises(CheckpointError, match="cannot load"):
        ckpt.load(p)


def test_state_digest_changes_with_params() -> None:
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    d1 = ckpt.state_digest(m, opt)
    with torch.no_grad():
        m.weight[0, 0] += 1e-6
    assert ckpt.state_digest(m, opt) != d1
