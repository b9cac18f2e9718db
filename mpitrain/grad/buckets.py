"""Group parameters into flat per-dtype buckets whose slices are the parameters' ``.grad``.

Parameters are taken in reverse registration order (roughly the order autograd finishes their
gradients), one dtype (and device) per bucket, closing a bucket once it holds ``bucket_bytes``.
Each (dtype, device) gets ONE flat buffer allocated here and never again; a bucket's ``buffer``
is a contiguous slice of it and each parameter's gradient is a view of that slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

#: default bucket size in MiB (measured: docs/engine.md, "Bucket size")
DEFAULT_BUCKET_MB = 4.0


@dataclass(eq=False)
class Bucket:
    """One unit of communication: a flat slice holding some parameters' gradients."""

    index: int
    dtype: torch.dtype
    buffer: torch.Tensor
    params: list[int] = field(default_factory=list)  # indices into the engine's parameter list
    names: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Size of the bucket's buffer in bytes."""
        return self.buffer.numel() * self.buffer.element_size()


@dataclass(eq=False)
class BucketPlan:
    """The result of :func:`build_buckets`."""

    buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor]
    buckets: list[Bucket]
    views: list[torch.Tensor]  # views[i] is parameter i's gradient storage
    bucket_of: list[int]  # bucket index of parameter i


def build_buckets(
    names: Sequence[str], params: Sequence[torch.Tensor], bucket_bytes: int
) -> BucketPlan:
    """Lay out ``params`` (registration order) into buckets; allocates the flat buffers."""
    order = list(range(len(params)))[::-1]
    # pass 1: assign bucket membership and offsets per (dtype, device)
    open_bucket: dict[tuple[torch.dtype, torch.device], int] = {}
    members: list[list[int]] = []
    keys: list[tuple[torch.dtype, torch.device]] = []
    sizes: list[int] = []
    for i in order:
        p = params[i]
        key = (p.dtype, p.device)
        nbytes = p.numel() * p.element_size()
        b = open_bucket.get(key)
        if b is None or (sizes[b] > 0 and sizes[b] + nbytes > bucket_bytes):
            b = len(members)
            members.append([])
            keys.append(key)
            sizes.append(0)
            open_bucket[key] = b
        members[b].append(i)
        sizes[b] += nbytes
    totals: dict[tuple[torch.dtype, torch.device], int] = {}
    for b, key in enumerate(keys):
        totals[key] = totals.get(key, 0) + sum(params[i].numel() for i in members[b])
    buffers = {key: alloc_buffer(n, *key) for key, n in totals.items()}
    # pass 2: slice buffers
    cursor = dict.fromkeys(totals, 0)
    views: list[torch.Tensor | None] = [None] * len(params)
    bucket_of = [0] * len(params)
    buckets: list[Bucket] = []
    for b, key in enumerate(keys):
        start = cursor[key]
        n = sum(params[i].numel() for i in members[b])
        flat = buffers[key][start : start + n]
        cursor[key] = start + n
        bucket = Bucket(index=b, dtype=key[0], buffer=flat)
        offset = 0
        for i in members[b]:
            k = params[i].numel()
            views[i] = flat[offset : offset + k].view(params[i].shape)
            offset += k
            bucket.params.append(i)
            bucket.names.append(names[i])
            bucket_of[i] = b
        buckets.append(bucket)
    return BucketPlan(buffers, buckets, [v for v in views if v is not None], bucket_of)


def alloc_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Return a zeroed flat buffer; host buffers come from numpy's allocator.

    numpy advises transparent huge pages for large arrays (torch's allocator does not unless
    THP_MEM_ALLOC_ENABLE=1); MPI's shared-memory copies of huge-page buffers were measured
    up to ~30% faster at 8-32 MB here (docs/engine.md).
    """
    if device.type != "cpu":
        return torch.zeros(numel, dtype=dtype, device=device)
    import numpy as np

    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = torch.from_numpy(np.zeros(max(numel, 1) * itemsize, dtype=np.uint8))
    return raw.view(dtype)[:numel]


def bucket_bytes_from_mb(bucket_mb: float | None) -> int:
    """Return the bucket cap in bytes (``None`` -> :data:`DEFAULT_BUCKET_MB`)."""
    mb = DEFAULT_BUCKET_MB if bucket_mb is None else bucket_mb
    if mb <= 0:
        raise ValueError(f"bucket_mb must be positive, got {mb}")
    return int(mb * 1024 * 1024)
