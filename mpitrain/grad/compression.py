"""Horovod-style compressors; their ``name`` selects the engine's bucket hook.

``DistributedOptimizer(compression=Compression.fp16)`` reduces gradient buckets with the
``fp16`` hook (mpitrain.grad.hooks); ``compress``/``decompress`` are used for single-tensor
calls such as ``hvd.allreduce(t, compression=...)``.
"""

from __future__ import annotations

from typing import Any

import torch


class Compressor:
    """Horovod-style compressor: ``name`` selects the engine hook (none, fp16)."""

    name = "none"

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Return (tensor to send, context for decompress)."""
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Undo :meth:`compress`."""
        return tensor


class NoneCompressor(Compressor):
    """No compression."""


class FP16Compressor(Compressor):
    """Send floating-point tensors as float16."""

    name = "fp16"

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Cast floating tensors to float16; remember the dtype."""
        if tensor.is_floating_point():
            return tensor.to(torch.float16), tensor.dtype
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Cast back to the original dtype."""
        return tensor.to(ctx) if ctx is not None else tensor


class BF16Compressor(FP16Compressor):
    """Send floating-point tensors as bfloat16 (mpitrain extension)."""

    name = "bf16"

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Cast floating tensors to bfloat16; remember the dtype."""
        if tensor.is_floating_point():
            return tensor.to(torch.bfloat16), tensor.dtype
        return tensor, None


class Compression:
    """Horovod's compression namespace: ``Compression.none`` / ``.fp16`` (and ``.bf16``)."""

    none = NoneCompressor
    fp16 = FP16Compressor
    bf16 = BF16Compressor
