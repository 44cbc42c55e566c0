"""Random data augmentation of training patches, 2D and 3D, in torch.

Spatial: flips, rot90 in planes of equal size, small rotations and isotropic
scaling (one resampling, bilinear for images, nearest for labels and weights;
voxels that come from outside the patch get weight 0). Intensity: scale and
shift, gamma, Gaussian noise, a smooth multiplicative bias field. Every random
draw comes from one seeded ``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentSettings:
    """Probabilities and ranges of each augmentation (per sample)."""

    flip: float = 0.5
    rot90: float = 0.3
    affine: float = 0.3
    max_angle_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    intensity: float = 0.5
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    noise: float = 0.15
    noise_std: float = 0.1
    bias: float = 0.2
    bias_strength: float = 0.3


def _rand(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g))


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * _rand(g)


def _rotation(spatial_dims: int, max_angle: float, g: torch.Generator) -> torch.Tensor:
    """A random rotation matrix ``(d, d)`` with angles up to ``max_angle`` radians."""
    if spatial_dims == 2:
        a = _uniform(g, -max_angle, max_angle)
        return torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    rot = torch.eye(3)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        a = _uniform(g, -max_angle, max_angle)
        r = torch.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
        rot = r @ rot
    return rot


class Augmenter:
    """Augment batches of patches.

    Args:
        spatial_dims: 2 or 3.
        generator: the random source.
        settings: probabilities and ranges.
    """

    def __init__(
        self,
        spatial_dims: int,
        generator: torch.Generator,
        settings: AugmentSettings | None = None,
    ):
        self.dims = spatial_dims
        self.g = generator
        self.s = settings or AugmentSettings()

    def __call__(
        self, image: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augment ``image (B, C, *S)``, ``labels (B, *S)``, ``weight (B, *S)``; same shapes out."""
        images, labs, weights = [], [], []
        for b in range(image.shape[0]):
            x, y, w = self.spatial(image[b], labels[b], weight[b])
            images.append(self.intensity(x))
            labs.append(y)
            weights.append(w)
        return torch.stack(images), torch.stack(labs), torch.stack(weights)

    # ------------------------------------------------------------ spatial

    def spatial(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor):
        """Flips, rot90 and a small rotation/scaling of one sample ``(C, *S)``, ``(*S)``."""
        s, g = self.s, self.g
        for axis in range(self.dims):
            if _rand(g) < s.flip:
                x, y, w = x.flip(axis + 1), y.flip(axis), w.flip(axis)
        shape = y.shape
        planes = [
            (i, j)
            for i in range(self.dims)
            for j in range(i + 1, self.dims)
            if shape[i] == shape[j]
        ]
        if planes and _rand(g) < s.rot90:
            i, j = planes[int(torch.randint(len(planes), (), generator=g))]
            k = int(torch.randint(1, 4, (), generator=g))
            x, y, w = x.rot90(k, (i + 1, j + 1)), y.rot90(k, (i, j)), w.rot90(k, (i, j))
        if _rand(g) < s.affine:
            x, y, w = self._affine(x, y, w)
        return x.contiguous(), y.contiguous(), w.contiguous()

    def _affine(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor):
        s, g = self.s, self.g
        rot = _rotation(self.dims, math.radians(s.max_angle_deg), g)
        scale = _uniform(g, *s.scale)
        # affine_grid works in normalised coordinates ordered (W, H[, D]); rotate in
        # voxel units so non-cubic patches are not sheared: theta = D^-1 (R / s) D.
        size = torch.tensor([float(n) for n in reversed(y.shape)])
        theta = torch.diag(1 / size) @ (rot / scale) @ torch.diag(size)
        theta = torch.cat([theta, torch.zeros(self.dims, 1)], dim=1)[None].to(x.device)
        grid = F.affine_grid(theta, [1, 1, *y.shape], align_corners=False)
        x = F.grid_sample(
            x[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False
        )[0]
        y = (
            F.grid_sample(
                y[None, None].float(),
                grid,
                mode="nearest",
                padding_mode="zeros",
                align_corners=False,
            )[0, 0]
            .round()
            .long()
        )
        w = F.grid_sample(
            w[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
        )[0, 0]
        return x, y, w

    # ---------------------------------------------------------- intensity

    def intensity(self, x: torch.Tensor) -> torch.Tensor:
        """Scale/shift, gamma, noise and bias field of one sample ``(C, *S)``."""
        s, g = self.s, self.g
        if _rand(g) < s.intensity:
            a = _uniform(g, 1 - s.intensity_scale, 1 + s.intensity_scale)
            b = _uniform(g, -s.intensity_shift, s.intensity_shift)
            x = x * a + b
        if _rand(g) < s.gamma:
            gamma = _uniform(g, *s.gamma_range)
            lo = x.amin(dim=tuple(range(1, x.ndim)), keepdim=True)
            hi = x.amax(dim=tuple(range(1, x.ndim)), keepdim=True)
            span = (hi - lo).clamp_min(1e-6)
            x = ((x - lo) / span).clamp(0, 1).pow(gamma) * span + lo
        if _rand(g) < s.noise:
            std = _uniform(g, 0, s.noise_std)
            x = x + std * torch.randn(x.shape, generator=g).to(x.device)
        if _rand(g) < s.bias:
            coarse = torch.randn((1, 1, *[3] * self.dims), generator=g).to(x.device)
            mode = "bilinear" if self.dims == 2 else "trilinear"
            field = F.interpolate(coarse, size=x.shape[1:], mode=mode, align_corners=True)[0]
            lo = x.amin(dim=tuple(range(1, x.ndim)), keepdim=True)
            x = (x - lo) * torch.exp(s.bias_strength * field) + lo
        return x
