"""``hvd.SyncBatchNorm``: batch statistics over every rank of a process set.

Training-mode statistics are sums all-reduced with the differentiable ``hvd.allreduce``
(op Sum), so autograd gives the synchronized gradient (Sum is its own backward) without
CUDA-only kernels; evaluation uses the running statistics like ``nn.BatchNorm``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from mpitrain.horovod import api as _api
from mpitrain.horovod import context as _c


class SyncBatchNorm(_BatchNorm):
    """Batch normalization whose batch statistics span all ranks of ``process_set``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_set: _c.ProcessSet = _c.global_process_set) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_set = process_set

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _factor(self) -> float:
        if self.momentum is not None:
            return float(self.momentum)
        assert self.num_batches_tracked is not None
        return 1.0 / float(self.num_batches_tracked)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalize with statistics over every rank (collective when training)."""
        self._check_input_dim(input)
        if not self.training and self.track_running_stats:
            return super().forward(input)
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        c = x.shape[1]
        local_n = torch.tensor([x.numel() / max(c, 1)], dtype=x.dtype)
        stats = torch.cat([x.sum(dims), local_n])
        total = _sum(stats, self.process_set)
        n = total[-1]
        mean = total[:-1] / n
        sq = _sum(((x - mean.view(shape)) ** 2).sum(dims), self.process_set)
        var = sq / n
        if self.training and self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            m = self._factor()
            with torch.no_grad():
                unbiased = var * (n / (n - 1)) if float(n) > 1 else var
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def _sum(t: torch.Tensor, ps: Any) -> torch.Tensor:
    out: torch.Tensor = _api.allreduce(t, op=_api.Sum, process_set=ps)
    return out

