"""``horovod.torch.compression``: the compressors ``compression=`` takes (``Compression.fp16``)."""

from __future__ import annotations

from mpitrain.grad.compression import (
    BF16Compressor,
    Compression,
    Compressor,
    FP16Compressor,
    NoneCompressor,
)

__all__ = ["BF16Compressor", "Compression", "Compressor", "FP16Compressor", "NoneCompressor"]
