"""Communication hooks: ``hook(state, bucket) -> Handle`` reduces one bucket.

After the handle's ``wait()`` the bucket's buffer must hold the reduced gradient (averaged
when ``state.average``). Hooks reach the transport only through ``state.reducer`` (a
:class:`~mpitrain.comm.reducer.Reducer`), so staged, CUDA-aware or hierarchical reducers plug
in underneath unchanged.

Compression hooks pre-divide by the number of ranks in full precision, cast into a
half-precision scratch buffer allocated once per bucket, sum in half precision (a user-defined
``MPI.Op`` adding with torch: MPI has no bfloat16 sum and MPICH's float16 one is slow) and cast
back. Error-feedback variants
keep the rounding residual of each bucket and add it to the next step's gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mpitrain.comm.handle import ChainedHandle, Handle
from mpitrain.comm.reducer import Reducer
from mpitrain.errors import ConfigError, with_hint
from mpitrain.grad.buckets import Bucket


@dataclass(eq=False)
class HookState:
    """What hooks may use: the reducer, averaging flag and per-bucket scratch they own."""

    reducer: Reducer
    average: bool = True
    scratch: dict[int, torch.Tensor] = field(default_factory=dict)
    residual: dict[int, torch.Tensor] = field(default_factory=dict)
    _divisors: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False)

    def scratch_for(self, bucket: Bucket, dtype: torch.dtype) -> torch.Tensor:
        """Return this bucket's compression buffer of ``dtype`` (allocated on first use)."""
        buf = self.scratch.get(bucket.index)
        if buf is None or buf.dtype != dtype:
            buf = torch.empty(bucket.buffer.numel(), dtype=dtype, device=bucket.buffer.device)
            self.scratch[bucket.index] = buf
        return buf

    def divisor(self, like: torch.Tensor) -> torch.Tensor:
        """Return a cached 0-dim tensor holding the reducer size (no per-step allocation)."""
        d = self._divisors.get(like.dtype)
        if d is None:
            d = torch.tensor(self.reducer.size, dtype=like.dtype, device=like.device)
            self._divisors[like.dtype] = d
        return d

    def residual_for(self, bucket: Bucket) -> torch.Tensor:
        """Return this bucket's error-feedback residual (zeros on first use)."""
        res = self.residual.get(bucket.index)
        if res is None:
            res = torch.zeros_like(bucket.buffer)
            self.residual[bucket.index] = res
        return res


Hook = Callable[[HookState, Bucket], Handle]


def allreduce_hook(state: HookState, bucket: Bucket) -> Handle:
    """Collective: reduce the bucket as is (the default)."""
    return state.reducer.iallreduce_(bucket.buffer, average=state.average)


def _compressed(
    state: HookState, bucket: Bucket, dtype: torch.dtype, error_feedback: bool
) -> Handle:
    buf = bucket.buffer
    if not buf.is_floating_point() or buf.element_size() <= 2:
        return allreduce_hook(state, bucket)
    if state.average and state.reducer.size > 1:
        buf.div_(state.divisor(buf))
    half = state.scratch_for(bucket, dtype)
    if error_feedback:
        res = state.residual_for(bucket)
        buf.add_(res)
        half.copy_(buf)
        torch.sub(buf, half, out=res)
    else:
        half.copy_(buf)
    handle = state.reducer.iallreduce_(half, average=False)

    def decompress() -> None:
        buf.copy_(half)

    return ChainedHandle(handle, decompress)


def fp16_hook(state: HookState, bucket: Bucket) -> Handle:
    """Collective: reduce the bucket in float16 (half the bytes; range ±65504)."""
    return _compressed(state, bucket, torch.float16, False)


def bf16_hook(state: HookState, bucket: Bucket) -> Handle:
    """Collective: reduce the bucket in bfloat16 (half the bytes; float32 range, 8-bit mantissa)."""
    return _compressed(state, bucket, torch.bfloat16, False)


def fp16_ef_hook(state: HookState, bucket: Bucket) -> Handle:
    """Collective: float16 reduction with error feedback (residual carried to the next step)."""
    return _compressed(state, bucket, torch.float16, True)


def bf16_ef_hook(state: HookState, bucket: Bucket) -> Handle:
    """Collective: bfloat16 reduction with error feedback (residual carried to the next step)."""
    return _compressed(state, bucket, torch.bfloat16, True)


HOOKS: dict[str, Hook] = {
    "none": allreduce_hook,
    "fp16": fp16_hook,
    "bf16": bf16_hook,
    "fp16-ef": fp16_ef_hook,
    "bf16-ef": bf16_ef_hook,
}


def make_hook(name: str | None) -> Hook:
    """Return the hook registered as ``name`` (none|fp16|bf16|fp16-ef|bf16-ef)."""
    key = "none" if name in (None, "", "allreduce") else str(name).lower()
    hook = HOOKS.get(key)
    if hook is None:
        raise ConfigError(
            with_hint(f"unknown compression {name!r}", f"use one of {', '.join(HOOKS)}")
        )
    return hook
