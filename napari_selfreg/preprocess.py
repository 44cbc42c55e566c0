"""Intensity normalisation and resampling of volumes (numpy + scipy, no torch).

Normalisation is split in two so a streaming predictor can work block by block
with global statistics: :func:`normalization_stats` measures the whole image
(on a strided subsample for big arrays) and :func:`apply_normalization` maps
any block with those statistics; :func:`normalize` does both.

Every method ends as ``out = (clip(x, low, high) - shift) / scale`` in float32,
with non-finite voxels (NaN, +-Inf) first replaced by the foreground minimum.

Resampling uses one grid convention everywhere: the centres of the input and
output grids coincide, and one output voxel step is ``ratio`` input steps.
:func:`resample` (to a spacing) and :func:`resample_to_shape` (to a shape) are
both instances of it, so going to a model's spacing and back with
``resample(..., shape=original_shape)`` is the exact inverse grid mapping, and
:func:`resampled_affine` gives the matching voxel-to-world affine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

METHODS = ("zscore", "ct_window", "percentile", "none")
FOREGROUNDS = ("nonzero", "otsu", "all")
MAX_STAT_SAMPLES = 4_000_000  # voxels used for statistics of big images
_SLAB_VOXELS = 4_000_000  # voxels converted at once in apply_normalization


@dataclass(frozen=True)
class NormStats:
    """Global statistics of one image: ``out = (clip(x, low, high) - shift) / scale``.

    Attributes:
        method: the normalisation method.
        shift: value subtracted after clipping.
        scale: divisor after shifting (never 0).
        low: lower clip in input units (None: no clip).
        high: upper clip in input units (None: no clip).
        fill: replacement for NaN/Inf voxels, in input units.
        nonfinite: number of NaN/Inf voxels in the whole image.
        foreground_fraction: fraction of voxels used as foreground.
        warnings: sentences for the user (a constant image, many NaN voxels, outliers).
    """

    method: str
    shift: float
    scale: float
    low: float | None = None
    high: float | None = None
    fill: float = 0.0
    nonfinite: int = 0
    foreground_fraction: float = 1.0
    warnings: tuple[str, ...] = ()


def _check_spec(spec: dict) -> str:
    method = spec.get("method", "zscore")
    if method not in METHODS:
        raise ValueError(
            f"unknown normalisation method {method!r}; valid methods: {', '.join(METHODS)}"
        )
    return method


def _subsample(image: np.ndarray, max_samples: int = MAX_STAT_SAMPLES) -> np.ndarray:
    """A strided view of ``image`` with at most about ``max_samples`` voxels."""
    if image.size <= max_samples:
        return image
    step = int(np.ceil((image.size / max_samples) ** (1.0 / image.ndim)))
    return image[(slice(None, None, step),) * image.ndim]


def count_nonfinite(image: np.ndarray) -> int:
    """Number of NaN/Inf voxels (0 for integer and bool arrays), counted slab by slab."""
    if not np.issubdtype(image.dtype, np.inexact):
        return 0
    if image.ndim == 0:
        return int(not np.isfinite(image))
    step = max(1, _SLAB_VOXELS // max(1, image[0].size))
    return sum(
        int(image[i : i + step].size - np.count_nonzero(np.isfinite(image[i : i + step])))
        for i in range(0, image.shape[0], step)
    )


def finite_range(image: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float] | None:
    """Smallest and largest finite value (inside ``mask``), read slab by slab; None when
    there is none."""
    if image.ndim == 0 or image.size == 0:
        return None
    step = max(1, _SLAB_VOXELS // max(1, image[0].size))
    lo, hi = np.inf, -np.inf
    for i in range(0, image.shape[0], step):
        slab = image[i : i + step]
        if mask is not None:
            slab = slab[mask[i : i + step]]
        if np.issubdtype(slab.dtype, np.inexact):
            slab = slab[np.isfinite(slab)]
        if slab.size:
            lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
    return (lo, hi) if lo <= hi else None


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample (maximises the between-class variance)."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def _foreground(sample: np.ndarray, kind: str) -> np.ndarray:
    """Foreground values of a finite 1D sample according to ``kind``."""
    if kind not in FOREGROUNDS:
        raise ValueError(f"unknown foreground {kind!r}; valid: {', '.join(FOREGROUNDS)}")
    if kind == "nonzero":
        fg = sample[sample != 0]
    elif kind == "otsu":
        fg = sample[sample > otsu_threshold(sample)] if sample.size else sample
    else:
        fg = sample
    return fg if fg.size else sample


def normalization_stats(
    image: np.ndarray,
    spec: dict,
    mask: np.ndarray | None = None,
    value_range: tuple[float, float] | None = None,
) -> NormStats:
    """Measure the statistics that :func:`apply_normalization` needs.

    Args:
        image: array of any numeric dtype (bool, ints, floats), any shape.
        spec: ``{"method": "zscore", "foreground": "nonzero"|"otsu"|"all"}``,
            ``{"method": "ct_window", "low": -160, "high": 240}`` (optionally
            ``"mean"`` and ``"std"`` to z-score after clipping, else scaled to
            [-1, 1]), ``{"method": "percentile", "low": 0.5, "high": 99.5}``
            (``p_low``/``p_high`` also accepted) or ``{"method": "none"}``.
        mask: optional boolean foreground mask of the image's shape; it replaces
            ``spec["foreground"]``.
        value_range: the finite range of the whole image when ``image`` is already a
            subsample of it (streaming), so a lone absurd voxel is still found.

    Returns:
        NormStats. Statistics of big images come from a strided subsample.

    Raises:
        ValueError: unknown method or foreground, or a bad window.
    """
    method = _check_spec(spec)
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.view(np.uint8)
    nonfinite = count_nonfinite(image)
    sub = _subsample(image)
    subsampled = sub is not image
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != image.shape:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape}")
        sub = sub[_subsample(mask)]
    sample = np.asarray(sub, dtype=np.float64).ravel()
    if nonfinite:
        sample = sample[np.isfinite(sample)]
    notes = []
    if nonfinite > 0.01 * image.size:
        notes.append(f"{100 * nonfinite / image.size:.0f} % of the voxels are NaN or infinite; they count as the darkest tissue")  # fmt: skip
    if sample.size == 0:  # all NaN, or an empty mask
        sample = np.zeros(1)
    if sample.min() == sample.max():
        notes.append(
            f"the image is constant (every voxel {sample.min():g}): the labels mean nothing"
        )
    outliers = None
    if method in ("zscore", "percentile") and sample.size > 100:
        # a few absurd voxels (3e38 in a scan) must not decide the scale of all others
        lo, hi = np.percentile(sample, [0.01, 99.99])
        span = max(hi - lo, 1e-12)
        least, most = float(sample.min()), float(sample.max())
        if value_range is not None:  # measured on the whole image by the caller
            least, most = value_range
        elif subsampled:  # the subsample may miss a lone absurd voxel: look at them all
            least, most = finite_range(image, mask) or (least, most)
        if most > hi + 10 * span or least < lo - 10 * span:
            outliers = (float(lo), float(hi))
            sample = np.clip(sample, lo, hi)
            notes.append(f"extreme values outside {lo:g}..{hi:g} were clipped")
    if mask is not None or method in ("ct_window", "none"):
        kind = "all"
    else:
        kind = spec.get("foreground", "nonzero")
    fg = _foreground(sample, kind)
    fill = float(fg.min())
    frac = fg.size / sample.size
    if nonfinite:
        log.warning("replacing %d NaN/Inf voxels by the foreground minimum %g", nonfinite, fill)
    common = {
        "fill": fill,
        "nonfinite": nonfinite,
        "foreground_fraction": frac,
        "warnings": tuple(notes),
    }

    if method == "none":
        return NormStats(method, 0.0, 1.0, **common)
    if method == "ct_window":
        if "low" not in spec or "high" not in spec:
            raise ValueError("ct_window normalisation needs 'low' and 'high' in its spec")
        low, high = float(spec["low"]), float(spec["high"])
        if not high > low:
            raise ValueError(f"ct_window needs high > low, got low={low} and high={high}")
        if "mean" in spec and "std" in spec:
            shift, scale = float(spec["mean"]), float(spec["std"])
        else:
            shift, scale = (low + high) / 2, (high - low) / 2
        return NormStats(method, shift, scale if scale > 0 else 1.0, low, high, **common)
    low, high = outliers if outliers else (None, None)
    if method == "percentile":
        p_low = float(spec.get("p_low", spec.get("low", 0.5)))
        p_high = float(spec.get("p_high", spec.get("high", 99.5)))
        if not 0 <= p_low < p_high <= 100:
            raise ValueError(
                f"percentiles must satisfy 0 <= low < high <= 100, got {p_low}, {p_high}"
            )
        low, high = (float(v) for v in np.percentile(fg, [p_low, p_high]))
        fg = np.clip(fg, low, high)
    if fg.min() == fg.max():  # constant foreground: shift by the exact value, no scaling
        return NormStats(method, float(fg.min()), 1.0, low, high, **common)
    return NormStats(method, float(fg.mean()), float(fg.std()), low, high, **common)


def apply_normalization(block: np.ndarray, stats: NormStats) -> np.ndarray:
    """Normalise any block of an image with that image's global statistics.

    Args:
        block: array (any shape, any numeric dtype).
        stats: from :func:`normalization_stats` of the whole image.

    Returns:
        float32 array of the block's shape. Works slab by slab, so the only big
        allocation is the output.
    """
    block = np.asarray(block)
    if block.dtype == bool:
        block = block.view(np.uint8)
    out = np.empty(block.shape, dtype=np.float32)
    if block.ndim == 0:
        block, out_view = block[None], out[None]
    else:
        out_view = out
    step = max(1, _SLAB_VOXELS // max(1, block[0].size))
    for i in range(0, block.shape[0], step):
        x = block[i : i + step].astype(np.float64)
        if stats.nonfinite or np.issubdtype(block.dtype, np.inexact):
            x[~np.isfinite(x)] = stats.fill
        if stats.low is not None or stats.high is not None:
            np.clip(x, stats.low, stats.high, out=x)
        x -= stats.shift
        x /= stats.scale
        out_view[i : i + step] = x
    return out


def normalize(
    image: np.ndarray, spec: dict, mask: np.ndarray | None = None, return_stats: bool = False
) -> np.ndarray | tuple[np.ndarray, NormStats]:
    """Normalise intensities: :func:`normalization_stats` then :func:`apply_normalization`.

    A constant image gives zeros; NaN/Inf voxels are replaced by the foreground
    minimum and counted (``NormStats.nonfinite``, also logged as a warning).

    Returns:
        float32 array of the image's shape, and the NormStats when ``return_stats``.
    """
    stats = normalization_stats(image, spec, mask)
    out = apply_normalization(image, stats)
    return (out, stats) if return_stats else out


# --------------------------------------------------------------------------- resampling


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float] | float
) -> tuple[int, ...]:
    """Output shape of :func:`resample`: ``round(n * spacing / target)``, at least 1."""
    target = np.broadcast_to(np.asarray(target_spacing, dtype=float), (len(shape),))
    return tuple(
        max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target, strict=True)
    )


def _grid_map(in_shape, out_shape, ratio) -> tuple[np.ndarray, np.ndarray]:
    """Diagonal and offset of ``in_index = ratio * out_index + offset`` (centres aligned)."""
    n = np.asarray(in_shape, dtype=float)
    m = np.asarray(out_shape, dtype=float)
    r = n / m if ratio is None else np.asarray(ratio, dtype=float)
    return r, (n - 1) / 2 - r * (m - 1) / 2


def _resample(array: np.ndarray, out_shape, ratio, order: int) -> np.ndarray:
    from scipy import ndimage

    array = np.asarray(array)
    out_shape = tuple(int(s) for s in out_shape)
    if len(out_shape) != array.ndim:
        raise ValueError(f"shape {out_shape} has {len(out_shape)} axes, array has {array.ndim}")
    if order not in (0, 1, 2, 3):
        raise ValueError(f"interpolation order must be 0..3, got {order}")
    diag, offset = _grid_map(array.shape, out_shape, ratio)
    if out_shape == array.shape and np.all(diag == 1) and np.all(offset == 0):  # same grid
        return array.astype(np.float32) if order > 0 else array.copy()
    if order == 0:
        src = array if array.dtype != bool else array.view(np.uint8)
        out = np.empty(out_shape, dtype=src.dtype)
        ndimage.affine_transform(src, diag, offset, output=out, order=0, mode="nearest")
        return out.view(bool) if array.dtype == bool else out
    exact = array.dtype.kind in "iu" or array.dtype in (np.float32, np.float64)
    src = array if exact else array.astype(np.float32)
    out = np.empty(out_shape, dtype=np.float32)
    ndimage.affine_transform(src, diag, offset, output=out, order=order, mode="nearest")
    return out


def resample(
    array: np.ndarray,
    spacing: Sequence[float],
    target_spacing: Sequence[float] | float,
    order: int = 1,
    shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Resample an array to another voxel spacing, grid centres aligned.

    Output voxel ``j`` samples input position ``(j - (m-1)/2) * t/s + (n-1)/2``
    per axis, so the output spacing is exactly ``target_spacing``.

    Args:
        array: ``(*spatial)`` image or label array.
        spacing: current spacing per axis.
        target_spacing: wanted spacing per axis (or one number for all).
        order: 0 nearest (labels; keeps dtype), 1 linear (default), up to 3.
        shape: output shape; default :func:`resampled_shape`. To go back after
            a model ran, call ``resample(out, target, spacing, shape=original)``.

    Returns:
        float32 for order >= 1, the input dtype for order 0.
    """
    target = np.broadcast_to(np.asarray(target_spacing, dtype=float), (array.ndim,))
    spacing = np.asarray(spacing, dtype=float)
    if spacing.shape != (array.ndim,):
        raise ValueError(f"spacing {tuple(spacing)} does not match an array of {array.ndim} axes")
    if np.any(spacing <= 0) or np.any(target <= 0):
        raise ValueError("voxel spacings must be positive")
    out_shape = resampled_shape(array.shape, spacing, target) if shape is None else shape
    return _resample(array, out_shape, target / spacing, order)


def resample_to_shape(array: np.ndarray, shape: Sequence[int], order: int = 1) -> np.ndarray:
    """Resample to an exact shape (voxel edges of the two grids aligned).

    Args:
        array: ``(*spatial)`` array.
        shape: output shape, one entry per axis.
        order: 0 nearest (labels, keeps dtype), 1 linear (float32 out), up to 3.
    """
    return _resample(array, shape, None, order)


def resampled_affine(
    affine: np.ndarray,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    ratio: Sequence[float] | None = None,
) -> np.ndarray:
    """Voxel-to-world affine of a resampled grid.

    Args:
        affine: ``(4, 4)`` affine of the input grid (its first ``len(in_shape)``
            columns are the spatial axes).
        in_shape: input spatial shape.
        out_shape: output spatial shape.
        ratio: input voxels per output voxel per axis, ``target / spacing`` for
            :func:`resample`; default ``in_shape / out_shape``
            (:func:`resample_to_shape`).

    Returns:
        ``(4, 4)`` float64 affine with ``new @ [j, 1] == affine @ [i(j), 1]``.
    """
    affine = np.asarray(affine, dtype=np.float64)
    nd = len(in_shape)
    diag, offset = _grid_map(in_shape, out_shape, ratio)
    grid = np.eye(4)
    grid[np.arange(nd), np.arange(nd)] = diag
    grid[:nd, 3] = offset
    return affine @ grid
