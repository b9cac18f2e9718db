"""HDF5 shards: schema, writer, rank-aware sampler and prefetching loader."""

from __future__ import annotations

from mpitrain.data.dataset import ShardedDataset
from mpitrain.data.loader import Batch, BatchLoader
from mpitrain.data.manifest import Manifest, load_manifest
from mpitrain.data.sampler import DistributedSampler

__all__ = [
    "Batch",
    "BatchLoader",
    "DistributedSampler",
    "Manifest",
    "ShardedDataset",
    "load_manifest",
]
