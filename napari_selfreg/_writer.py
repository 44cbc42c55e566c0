"""npe2 writers: Labels and Image layers to NIfTI with the source affine.

The voxel-to-world affine written is the layer's own placement in napari (its
affine after scale, rotate, shear and translate, taken back from the display
frame to RAS), which is the source file's affine for layers opened by this
plugin's reader or sample data and for labels made by Segment. When that placement still equals the affine kept in
``layer.metadata`` by the reader, the source file's header is handed to
``io`` as the reference so it is carried over too. This module imports neither
torch nor Qt.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._reader import META_KEY
from .geometry import ras_from_frame

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write one Labels layer to ``path`` (``.nii.gz`` / ``.nii``); return ``[path]``."""
    from .io import write_labels as io_write_labels

    path, array, affine, reference = _prepare(path, data, meta)
    if array.min(initial=0) < 0:
        raise ValueError("labels with negative values cannot be written as NIfTI labels")
    written = io_write_labels(path, array, reference, affine=affine)
    return [str(written or path)]


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write one Image layer to ``path`` (``.nii.gz`` / ``.nii``); return ``[path]``."""
    from .io import write_volume

    path, array, affine, reference = _prepare(path, data, meta)
    written = write_volume(path, array, reference, affine=affine)
    return [str(written or path)]


def layer_affine(meta: dict[str, Any], ndim: int) -> np.ndarray:
    """The ``(4, 4)`` voxel-to-world matrix of a layer from its state dict ``meta``
    (:func:`geometry.world_matrix`; a 2D layer gets an identity third axis)."""
    from .geometry import volume_affine, world_matrix

    matrix = world_matrix(
        meta.get("scale", np.ones(ndim)), meta.get("translate"), meta.get("rotate"),
        meta.get("shear"), meta.get("affine"),
    )  # fmt: skip
    return volume_affine(matrix, ndim)


def _prepare(path: str, data: Any, meta: dict[str, Any]):
    if not str(path).lower().endswith(NIFTI_SUFFIXES):
        path = f"{path}.nii.gz"
    if isinstance(data, list):  # multiscale: the full-resolution level
        data = data[0]
    array = np.asarray(data)
    if meta.get("rgb"):
        raise ValueError("RGB images cannot be written as NIfTI volumes by napari-selfreg")
    source = (meta.get("metadata") or {}).get(META_KEY) or {}
    affine = ras_from_frame(layer_affine(meta, array.ndim), source.get("frame"))
    axes = tuple(source.get("axes") or range(array.ndim))
    file_shape = tuple(source.get("shape", ()))
    if (
        len(axes) == array.ndim
        and axes != tuple(range(array.ndim))
        and len(file_shape) == array.ndim
        and array.shape == tuple(file_shape[a] for a in axes)
    ):
        # the reader showed the file transposed to world order: restore the file's order
        inverse = np.argsort(axes)
        array = np.transpose(array, inverse)
        file_affine = affine.copy()
        file_affine[:, list(axes)] = affine[:, : len(axes)]
        affine = file_affine
    reference = None
    stored = source.get("affine")
    if stored is not None and array.ndim == 2 and file_shape == array.shape:
        # a single slice is shown with its in-plane placement only (_reader.place): when
        # the layer still sits where the reader put it, the file's 3D affine is the truth
        from .geometry import layer_kwargs

        placed = layer_kwargs(np.asarray(stored, dtype=float), 2)
        if np.allclose(layer_affine(placed, 2), layer_affine(meta, 2), atol=1e-5):
            affine = np.asarray(stored, dtype=float)
            shape = tuple((source.get("metadata") or {}).get("original_shape") or ())[:3]
            if len(shape) == 3 and shape[:2] == array.shape and shape[2] == 1:
                array = array[..., None]  # the file's (x, y, 1)
                file_shape = shape
    if (
        stored is not None
        and file_shape == array.shape
        and np.allclose(np.asarray(stored, dtype=float), affine, atol=1e-5)
    ):
        from .io import Volume

        affine = np.asarray(stored, dtype=float)  # bit-exact source affine
        reference = Volume(  # carries the source header; no voxel data is needed
            np.broadcast_to(np.zeros((), np.uint8), array.shape),
            affine,
            tuple(source.get("spacing", ())),
            dict(source.get("metadata") or {}),
        )
    return str(path), np.ascontiguousarray(array), affine, reference
