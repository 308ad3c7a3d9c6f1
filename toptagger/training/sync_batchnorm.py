"""Batch normalisation over the whole global batch under DDP, so that the world size does not change the model.

With plain DDP each rank normalises by the statistics of its own part of the batch, and 1 rank
and 8 ranks train different models from the same seed and jets. :func:`synchronize` makes every
``BatchNorm2d`` use the statistics of the global batch: on CUDA with torch's
``nn.SyncBatchNorm`` (nccl), elsewhere (gloo, CPU) with :class:`GlobalBatchNorm2d`, which torch
does not provide: per layer, the forward pass all-reduces the channel sums, sums of squares and
the count (2C + 1 numbers), the backward pass the sums of dy and dy * x-hat (2C). The gradients
of the weight and bias stay each rank's own, for DDP to average, as in torch's.

Without a process group (one rank) and in evaluation both are plain batch normalisation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

_DIMS = (0, 2, 3)  # N, H, W: the statistics are per channel


class _GlobalBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> Any:
        channels = x.shape[1]
        count = torch.tensor([x.numel() // max(channels, 1)], dtype=torch.float64, device=x.device)
        # float64 sums: the mean and variance of the global batch do not depend on how it is split
        # beyond the last bits.
        stats = torch.cat([x.sum(_DIMS, dtype=torch.float64), (x * x).sum(_DIMS, dtype=torch.float64), count])
        dist.all_reduce(stats)
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels : 2 * channels] / n - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        shape = (1, channels, 1, 1)
        xhat = (x - mean.to(x.dtype).view(shape)) * invstd.to(x.dtype).view(shape)
        ctx.save_for_backward(x, weight, mean.to(x.dtype), invstd.to(x.dtype), n)
        ctx.mark_non_differentiable(mean, var, n)
        return xhat * weight.view(shape) + bias.view(shape), mean, var, n

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, *_: Any) -> Any:
        x, weight, mean, invstd, n = ctx.saved_tensors
        channels = x.shape[1]
        shape = (1, channels, 1, 1)
        xhat = (x - mean.view(shape)) * invstd.view(shape)
        local = torch.cat([dy.sum(_DIMS, dtype=torch.float64), (dy * xhat).sum(_DIMS, dtype=torch.float64)])
        # This rank's own (copies: the all-reduce below works in place).
        grad_bias, grad_weight = local[:channels].to(x.dtype, copy=True), local[channels:].to(x.dtype, copy=True)
        dist.all_reduce(local)
        mean_dy = (local[:channels] / n).to(x.dtype).view(shape)
        mean_dy_xhat = (local[channels:] / n).to(x.dtype).view(shape)
        grad_x = (dy - mean_dy - xhat * mean_dy_xhat) * (weight.view(shape) * invstd.view(shape))
        return grad_x, grad_weight, grad_bias, None


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are those of the global batch (any device, any backend)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        if not (self.affine and self.track_running_stats):
            raise NotImplementedError("GlobalBatchNorm2d needs affine=True and track_running_stats=True")
        self._check_input_dim(input)
        out, mean, var, n = _GlobalBatchNorm.apply(input, self.weight, self.bias, self.eps)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = var * (n / (n - 1).clamp_min(1))
            self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        return out


def synchronize(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every ``BatchNorm2d`` normalising over the global batch (weights and buffers kept)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine)
            replacement.load_state_dict(child.state_dict())
            replacement.to(device=child.weight.device, dtype=child.weight.dtype)
            setattr(model, name, replacement)
        else:
            synchronize(child, device)
    return model
