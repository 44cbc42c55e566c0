"""Voxel geometry: spacing from affines and reorientation of arrays (numpy + nibabel).

A model trained on volumes in one axis order (its card's ``orientation``, e.g.
``"RAS"``) sees a scan stored in another order (a sagittal acquisition stored
P, S, L, a radiological L-flipped volume...) as a different image. The predictor,
fine-tuning and the feature inspector bring such a volume to the model's order by
transposes and flips (no resampling: the nearest axis-aligned order of an oblique
affine) and bring the results back, so the same scan gives the same labels in any
stored order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def spacing_from_affine(affine: np.ndarray, ndim: int = 3) -> tuple[float, ...]:
    """Voxel size per array axis: the norms of the affine's first ``ndim`` columns."""
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((a[:ndim, :ndim] ** 2).sum(axis=0)))


def axis_codes(affine: np.ndarray) -> str:
    """nibabel's axis codes of an affine's array axes, e.g. ``"RAS"`` or ``"PSL"``."""
    from nibabel.orientations import aff2axcodes

    return "".join(aff2axcodes(np.asarray(affine, dtype=np.float64)))


@dataclass(frozen=True)
class Reorientation:
    """How the three spatial axes of an array map to a target orientation.

    Attributes:
        source: axis codes of the stored array.
        target: axis codes of the model.
        order: ``order[i]`` is the stored axis that becomes target axis ``i``.
        flip: per target axis, whether it runs against the stored axis.
    """

    source: str
    target: str
    order: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @property
    def identity(self) -> bool:
        return self.order == (0, 1, 2) and not any(self.flip)

    def apply(self, array, lead: int = 0):
        """Stored -> target order for an array ``(*lead axes, X, Y, Z)`` (a view for numpy)."""
        array = _transpose(array, (*range(lead), *(lead + o for o in self.order)))
        for axis, f in enumerate(self.flip):
            if f:
                array = _flip(array, lead + axis)
        return array

    def undo(self, array, lead: int = 0):
        """Target -> stored order (the inverse of :meth:`apply`)."""
        for axis, f in enumerate(self.flip):
            if f:
                array = _flip(array, lead + axis)
        inverse = np.argsort(self.order)
        return _transpose(array, (*range(lead), *(lead + int(o) for o in inverse)))

    def spacing(self, spacing) -> tuple[float, ...]:
        """Stored per-axis spacing in target order."""
        return tuple(float(spacing[o]) for o in self.order)


def reorientation(affine: np.ndarray, target: str) -> Reorientation:
    """The :class:`Reorientation` from an array with ``affine`` to ``target`` axis codes."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError("the volume's affine must be a finite 4 x 4 matrix")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError("the volume's affine is singular; its orientation is unknown")
    source = io_orientation(affine)
    wanted = axcodes2ornt(tuple(target))
    move = ornt_transform(source, wanted)  # row i: stored axis i -> (target axis, flip)
    order = [0, 0, 0]
    flip = [False, False, False]
    for stored, (axis, direction) in enumerate(move):
        order[int(axis)] = stored
        flip[int(axis)] = bool(direction < 0)
    return Reorientation(axis_codes(affine), str(target), tuple(order), tuple(flip))  # type: ignore[arg-type]


def _transpose(array, axes):
    if tuple(axes) == tuple(range(len(axes))):
        return array
    if hasattr(array, "permute"):  # torch
        return array.permute(*axes)
    if isinstance(array, np.ndarray):
        return array.transpose(axes)
    import dask.array as da

    return da.transpose(_as_dask(array), axes)


def _flip(array, axis: int):
    if hasattr(array, "permute"):  # torch
        return array.flip(axis)
    if isinstance(array, np.ndarray):
        return np.flip(array, axis)
    import dask.array as da

    return da.flip(_as_dask(array), axis)


def _as_dask(array):
    import dask.array as da

    return array if isinstance(array, da.Array) else da.from_array(array, chunks="auto")
