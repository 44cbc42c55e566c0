"""Where to correct next: slices ranked by the model's uncertainty.

After Segment (and after each fine-tuning round) the predictor's normalised
entropy, summed per slice along each axis, ranks the slices where the model is
least sure, the way MONAI Label's active-learning strategies rank images; the
Fine-tune widget lists the top slices and jumps to one, ``napari-selfreg segment
--rank-slices`` writes the ranking.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_SLAB = 16  # planes read at once (zarr results stream through)


def slice_scores(uncertainty) -> list[np.ndarray]:
    """Per-slice sums of a 3D uncertainty map ``(X, Y, Z)``: one float64 array per axis.

    Works slab by slab, so a zarr array is never loaded whole.
    """
    shape = tuple(int(s) for s in uncertainty.shape)
    if len(shape) != 3:
        raise ValueError(f"slice scores need a 3D uncertainty map, got shape {shape}")
    scores = [np.zeros(n) for n in shape]
    for lo in range(0, shape[0], _SLAB):
        block = np.asarray(uncertainty[lo : lo + _SLAB], dtype=np.float64)
        scores[0][lo : lo + block.shape[0]] = block.sum(axis=(1, 2))
        scores[1] += block.sum(axis=(0, 2))
        scores[2] += block.sum(axis=(0, 1))
    return scores


def rank_slices(
    scores: Sequence[float] | np.ndarray,
    exclude: Sequence[int] = (),
    top: int = 10,
    spacing: int = 0,
) -> list[tuple[int, float]]:
    """The ``top`` slices by score, highest first, as ``(index, score / best score)``;
    slices in ``exclude`` (already reviewed) and slices scoring 0 are left out, and so is
    a slice closer than ``spacing`` to one listed before it or to an excluded one
    (neighbouring slices look alike: the list then points at other places)."""
    values = np.asarray(scores, dtype=np.float64)
    taken = [int(i) for i in exclude]
    skip = set(taken)
    order: list[int] = []
    for i in np.argsort(-values, kind="stable"):
        i = int(i)
        if len(order) >= max(0, int(top)) or not values[i] > 0:  # NaN sorts last: out too
            break
        if i in skip or any(abs(i - j) < spacing for j in taken):
            continue
        order.append(i)
        taken.append(i)
    best = float(values[order[0]]) if order else 1.0
    return [(i, float(values[i]) / best) for i in order]


def suggestion_spacing(n_slices: int) -> int:
    """Spacing of suggested slices: a twentieth of the stack (at least 1)."""
    return max(1, int(n_slices) // 20)


def reviewed_slices(reviewed: np.ndarray | None, axis: int) -> list[int]:
    """Indices of the slices along ``axis`` that hold reviewed voxels."""
    if reviewed is None:
        return []
    other = tuple(a for a in range(np.ndim(reviewed)) if a != axis)
    return [int(i) for i in np.flatnonzero(np.asarray(reviewed).any(axis=other))]
