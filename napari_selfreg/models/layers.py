"""Layers and helpers shared by the networks: the guarded 3D convolution, padding to a
multiple of the down-sampling and cropping back."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` whose weight gradient stays right under CPU autocast when the
    input is shallower than the kernel.

    PyTorch's CPU bf16 weight gradient (oneDNN) reads uninitialised memory there
    (seen with torch 2.13: depth 2 under a 3^3 kernel, depths 3-4 under 5^3; forward
    and input gradient are right). A 5-level UNet on 32^3 patches has such a
    bottleneck: its weight gradients were garbage, NaN or silently wrong depending
    on what the memory held before. Those layers are tiny, so they train in float32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reach = (self.kernel_size[0] - 1) * self.dilation[0] + 1
        if (
            x.shape[2] < reach
            and x.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and self.weight.requires_grad
            and torch.is_grad_enabled()
        ):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def pad_to_multiple(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """Pad the spatial axes at their end (replicate) to a multiple of ``divisor``."""
    pads = []
    for s in reversed(x.shape[2:]):
        pads += [0, (-s) % divisor]
    if not any(pads):
        return x
    return F.pad(x, pads, mode="replicate")


def crop_to(x: torch.Tensor, size: Sequence[int], reduction: int) -> torch.Tensor:
    """Crop a feature of stride ``reduction`` to cover an input of ``size``."""
    target = [-(-s // reduction) for s in size]
    if list(x.shape[2:]) == target:
        return x
    return x[(..., *[slice(0, t) for t in target])]
