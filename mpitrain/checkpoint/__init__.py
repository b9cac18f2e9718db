"""Checkpoints: one run identity, one resume policy, one prune, one layout for every kind.

- :mod:`~mpitrain.checkpoint.files`: the loop's checkpoint files (run id, checksummed
  ``step-N.pt`` with a sidecar, ``latest``, ``--resume auto`` falling back past damage, prune);
- :mod:`~mpitrain.checkpoint.payload`: the model/optimizer state the exchange hands over
  (:class:`~mpitrain.checkpoint.payload.StateIO`: replicated, ZeRO-sharded or a grid's);
- :mod:`~mpitrain.checkpoint.shards`: directories of per-rank files with a manifest written
  last, consolidation, and ``python -m mpitrain checkpoint consolidate``;
- :mod:`~mpitrain.checkpoint.grid` and :mod:`~mpitrain.checkpoint.reshard`: a tensor x
  pipeline grid's slices, joined and re-cut for another grid;
- :mod:`~mpitrain.checkpoint.compat` and :mod:`~mpitrain.checkpoint.manifest`: what a
  checkpoint holds compared with the run before anything loads; manifests checked field by
  field.
"""
