"""Regions of an image the inspector looks at, and where a block's map sits in image space."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class InspectError(ValueError):
    """The image, region or model cannot be inspected (one clear sentence)."""


def block_placement(origin, reduction, scale=None, translate=None, linear=None):
    """World ``(scale, translate)`` of a block map with the given reduction.

    Args:
        origin: region start in image voxels, per axis.
        reduction: int or per-axis down-sampling factor of the block.
        scale, translate: the image layer's; default 1 and 0.
        linear: the image's data-to-physical linear matrix (rotate @ shear @
            diag(scale)) when it is not just ``diag(scale)``.
    """
    origin = np.asarray(origin, dtype=float)
    r = np.broadcast_to(np.asarray(reduction, dtype=float), origin.shape)
    scale = np.ones_like(origin) if scale is None else np.asarray(scale, dtype=float)
    translate = np.zeros_like(origin) if translate is None else np.asarray(translate, float)
    lin = np.diag(scale) if linear is None else np.asarray(linear, dtype=float)
    return scale * r, translate + lin @ (origin + (r - 1) / 2)


def centred_region(shape: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    """A box of ``size`` (clipped to ``shape``) in the centre of ``shape``."""
    out = []
    for n, s in zip(shape, size, strict=True):
        s = max(1, min(int(s), int(n)))
        start = (int(n) - s) // 2
        out.append(slice(start, start + s))
    return tuple(out)


def box_region(lo, hi, shape: Sequence[int], thickness: Sequence[int]) -> tuple[slice, ...]:
    """Voxels of a box given in continuous data coordinates (voxel centres at integers).

    Axes where the box is thinner than ``thickness`` are widened around the
    box centre (e.g. a rectangle drawn on one slice gets a slab for a 3D model).

    Raises:
        InspectError: the box lies outside the image.
    """
    out = []
    for ax, n in enumerate(shape):
        a, b = sorted((float(lo[ax]), float(hi[ax])))
        start, stop = int(np.floor(a + 0.5)), int(np.floor(b + 0.5)) + 1
        want = min(int(thickness[ax]), int(n))
        if stop - start < want:
            start = (start + stop) // 2 - want // 2
            stop = start + want
            start, stop = max(0, min(start, n - want)), max(want, min(stop, n))
        start, stop = max(0, start), min(int(n), stop)
        if stop <= start:
            raise InspectError("the chosen box lies outside the image")
        out.append(slice(start, stop))
    return tuple(out)


def limit_region(region: Sequence[slice], max_voxels: int) -> tuple[slice, ...]:
    """Shrink ``region`` around its centre (same aspect) to at most ``max_voxels``."""
    sizes = np.array([s.stop - s.start for s in region], dtype=float)
    if sizes.prod() <= max_voxels:
        return tuple(region)
    big = sizes > 1
    f = (max_voxels / sizes.prod()) ** (1 / max(1, big.sum()))
    out = []
    for s, n, b in zip(region, sizes, big, strict=True):
        keep = max(1, int(n * f)) if b else int(n)
        start = s.start + (int(n) - keep) // 2
        out.append(slice(start, start + keep))
    return tuple(out)


def _as_region(region, shape: Sequence[int]) -> tuple[slice, ...]:
    """Normalise slices or a ``(2, ndim)`` ``[start, stop]`` box; clip; reject empty."""
    if region is None:
        raise InspectError("no region given")
    if not all(isinstance(s, slice) for s in region):
        start, stop = (np.asarray(v, dtype=int) for v in region)
        region = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
    if len(region) != len(shape):
        raise InspectError(f"the region has {len(region)} axes, the image {len(shape)}")
    out = []
    for s, n in zip(region, shape, strict=True):
        start, stop, _ = s.indices(int(n))
        if stop <= start:
            raise InspectError("the region is empty or outside the image")
        out.append(slice(start, stop))
    return tuple(out)
