"""A tensor x pipeline grid's state in the trainer's checkpoints (kind ``grid``).

The slices are a directory ``ckpt-step-S-RUN.grid`` (:mod:`mpitrain.checkpoint.grid`: one
file per (stage, tensor rank), written by data-parallel index 0; ZeRO's shards joined first,
so a grid checkpoint is the same with and without ``--shard``); the loop's checkpoint file
names it. Loading re-cuts a state written on another grid for this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpitrain.checkpoint import compat
from mpitrain.checkpoint.grid import load_parallel, save_parallel
from mpitrain.checkpoint.payload import dir_name
from mpitrain.runtime.collective import agree

if TYPE_CHECKING:
    import torch

    from mpitrain.train.grid import GridExchange


class GridState:
    """``grid``: each (stage, tensor slice) saved once; compared rank by rank when loaded."""

    kind = "grid"

    def __init__(self, model: GridExchange, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def _virtual(self) -> int:
        names = self.model.dense_names
        return 1 if names is None else len(self.model.module)  # type: ignore[arg-type]

    def _dense(self, named: dict[str, Any]) -> dict[str, Any]:
        """``named`` under the dense model's names (interleaved chunks' ``"{c}."`` dropped)."""
        names = self.model.dense_names
        return named if names is None else {names.get(k, k): v for k, v in named.items()}

    def holds(self) -> dict[str, list[int]]:
        """Nothing up front: each rank's part is compared when it is loaded."""
        return {}

    def save(self, directory: Path | None, step: int, run_id: str | None) -> tuple[Any, Any]:
        """Collective: write the grid's slices; the file's ``model`` entry references them."""
        assert directory is not None and run_id is not None
        model, g = self.model, self.model.grid
        name = dir_name(step, run_id, self.kind)
        payload = model.checkpoint_payload(self.optimizer)  # ZeRO: joined over the replicas
        if payload:
            payload = {**payload, "model": self._dense(payload["model"])}
        save_parallel(g, Path(directory) / name, step, payload, self._dense(model.rules),
                      model.meta, run_id=run_id, virtual=self._virtual())
        return {"grid_dir": name, "meta": model.meta,
                "grid": {"tensor": g.tensor, "pipeline": g.pipeline, "data": g.data}}, None

    def load(self, state: dict[str, Any], origin: Path | None) -> None:
        """Collective: load this rank's (stage, tensor slice), re-cut from another grid's
        state where needed; its tensors and optimizer are compared before anything loads."""
        assert origin is not None
        model, optimizer = self.model, self.optimizer
        path = Path(origin) / str(state["model"]["grid_dir"])
        mine, doc = load_parallel(model.grid, path, model.meta, rules=self._dense(model.rules),
                                  tied=self._dense(model.stage.tied_names()),
                                  virtual=self._virtual())
        names = {v: k for k, v in (model.dense_names or {}).items()}
        mine = {**mine, "model": {names.get(k, k): v for k, v in mine["model"].items()}}

        def check() -> None:
            _kind, groups, _keys = compat.of_optimizer(optimizer)
            if model.sharded is not None:  # the optimizer steps shards: count the parameters
                groups = tuple((keys, len(model.rules)) for keys, _n in groups)
            compat.check(
                str(path),
                compat.Holds(tensors=compat.tensor_shapes(mine["model"].items()),
                             groups=compat.optimizer_holds(mine["optim"])[0]),
                compat.Holds(tensors=compat.tensor_shapes(model.module.state_dict().items()),
                             groups=groups),
                saved_config=doc.get("meta"), now_config=model.meta)

        agree(model.grid.comm, check)
        model.load_payload(optimizer, mine)
