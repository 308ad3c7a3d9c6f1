"""Test inputs without a dataset: a random-init tagger with non-trivial batch-norm statistics and
jet-like images (a few dozen hot pixels near the centre, the rest zero), for tests and benchmarks."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.models import resnet50


def randomize_bn(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every batch-norm non-trivial statistics, so that folding is really exercised; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                mod.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                mod.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                mod.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def random_tagger(channels: int = 3, seed: int = 0) -> torch.nn.Module:
    """resnet50(num_classes=2), optionally with a 1-channel stem, random weights, eval mode."""
    torch.manual_seed(seed)
    model = resnet50(num_classes=2)
    if channels != 3:
        model.conv1 = torch.nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return randomize_bn(model, seed + 1)


def jet_images(n: int, size: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """float32 [n, channels, size, size] jet-like images; each channel sums to 1."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, channels, size, size), np.float32)
    for i in range(n):
        k = rng.integers(15, 60)
        y = np.clip(rng.normal(size / 2, size / 8, k), 0, size - 1).astype(int)
        x = np.clip(rng.normal(size / 2, size / 8, k), 0, size - 1).astype(int)
        pt = rng.exponential(1.0, k)
        for c in range(channels):
            np.add.at(out[i, c], (y, x), pt / pt.sum())
    return out


def random_images(n: int, size: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """float32 standard-normal images."""
    return np.random.default_rng(seed).normal(size=(n, channels, size, size)).astype(np.float32)
