"""npe2 reader: NIfTI and the other nibabel formats, DICOM series and TIFF stacks.

``napari_get_reader(path)`` returns a reader callable for paths it takes and None,
never an exception, for the rest. The reader returns one Image layer (or a Labels
layer for integer volumes whose file name says they are labels) placed in world
millimetres: medical volumes in the display frame (world axes superior, posterior,
left; napari then opens them on axial slices, anterior up, the patient's left on
the right, as radiology viewers show them: :func:`place`), TIFF stacks in their own
axes. The source affine, spacing, file shape, axis order, frame and the file's
metadata stay in ``layer.metadata[META_KEY]`` so the writer can put them back on
export, in the file's own order.

This module imports neither torch nor Qt: napari loads it at start-up.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .io.volume import READ_SUFFIXES as SUFFIXES  # numpy only: napari starts fast

# a word of the file name that says labels: seg, dseg, mask, labels, aseg, aparc, ...
# (whole words: brainmask.mgz and T1w_masked are skull-stripped intensities)
LABEL_WORD = re.compile(r"^(masks?|annot|annotations?|segmentations?|.*seg|.*parc|.*labels?|labelmaps?)$")  # fmt: skip
META_KEY = (
    "selfreg_volume"  # layer.metadata key with affine, spacing, source path, file metadata, frame
)

LayerData = tuple[Any, dict[str, Any], str]


def napari_get_reader(path: str | os.PathLike | list) -> Callable[[Any], list[LayerData]] | None:
    """Return :func:`read_layers` if ``path`` is a volume this plugin reads, else None."""
    try:
        if isinstance(path, list | tuple):
            if len(path) != 1:
                return None
            path = path[0]
        p = Path(path)
        if p.is_dir():
            return read_layers if _is_dicom_folder(p) else None
        if p.name.lower().endswith(SUFFIXES) and p.is_file():
            return read_layers
    except (OSError, TypeError, ValueError):
        return None
    return None


MAX_CHANNEL_LAYERS = 8  # a 4D file with more volumes (fMRI, DWI) opens its first one


def read_layers(path: str | os.PathLike | list) -> list[LayerData]:
    """Read a volume as napari layer data ``[(data, kwargs, "image" | "labels")]``.

    A 4D file (channels, echoes, time points) gives one layer per volume, named
    ``name [k]``, as napari splits channels; beyond ``MAX_CHANNEL_LAYERS`` volumes only
    the first opens, with a warning that says how to reach the others.
    """
    from .io import ChannelsError, read_volume

    if isinstance(path, list | tuple):
        path = path[0]
    name = _layer_name(Path(path))
    try:
        return _layer_data(read_volume(path), path, name)
    except ChannelsError as err:
        count = err.count
    if count > MAX_CHANNEL_LAYERS:
        import warnings  # napari shows a reader's warnings as notifications

        warnings.warn(f"{Path(path).name} holds {count} volumes; opened the first. Segment another with 'napari-selfreg segment {Path(path).name} --channel K'.", stacklevel=2)  # fmt: skip
        return _layer_data(read_volume(path, channel=0), path, f"{name} [0]")
    return [
        layer
        for k in range(count)
        for layer in _layer_data(read_volume(path, channel=k), path, f"{name} [{k}]")
    ]


def _layer_data(volume, path, name: str) -> list[LayerData]:
    medical = volume.metadata.get("format") != "tiff"
    data, transform, meta = place(volume.data, volume.affine, medical)
    meta.update(
        spacing=tuple(float(s) for s in volume.spacing), source=str(path), metadata=volume.metadata
    )
    kwargs: dict[str, Any] = {"name": name, "metadata": {META_KEY: meta}, **transform}
    if _looks_like_labels(data, name):
        return [(data, kwargs, "labels")]
    return [(data, kwargs, "image")]


def place(
    data, affine: np.ndarray, medical: bool = True
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """How a volume goes into napari: ``(data view, layer transform kwargs, metadata)``.

    A 3D medical volume (RAS affine) is shown in the display frame (world axes superior,
    posterior, left: napari opens it on axial slices, anterior up, the patient's left on
    the right); its array is transposed (a view) so the sliced axis is the one closest
    to superior. TIFF stacks and 2D images keep their own axes. The metadata keeps the
    file's affine, axis order, shape and the frame, so the writer restores the file.
    """
    from .geometry import DISPLAY_CODES, display_affine, display_axes, layer_kwargs

    affine = np.asarray(affine, dtype=float)
    ndim = np.ndim(data)
    display = medical and ndim == 3
    world = display_affine(affine) if display else affine
    axes = display_axes(world, ndim)
    view = np.transpose(data, axes) if axes != tuple(range(ndim)) else data
    layer_affine = world.copy()
    layer_affine[:, : len(axes)] = world[:, list(axes)]
    transform = layer_kwargs(layer_affine, ndim)
    if display:
        transform["axis_labels"] = tuple(DISPLAY_CODES)
    meta = {
        "affine": affine,
        "shape": tuple(np.shape(data)),
        "axes": axes,
        "frame": DISPLAY_CODES if display else "RAS",
    }
    return view, transform, meta


def _layer_name(path: Path) -> str:
    name = path.name
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def _looks_like_labels(data: Any, name: str) -> bool:
    """Integer volume with a word of its file name saying labels: a Labels layer."""
    dtype = np.dtype(getattr(data, "dtype", np.float32))
    words = (w.rstrip("0123456789") for w in re.split(r"[^a-z0-9]+", name.lower()))
    return np.issubdtype(dtype, np.integer) and any(LABEL_WORD.match(w) for w in words if w)


def _is_dicom_folder(folder: Path, probe: int = 16) -> bool:
    """True if the folder holds DICOM files (``*.dcm``, or files that start like DICOM)."""
    from .io.volume import _is_dicom_file

    checked = 0
    for entry in sorted(folder.iterdir()):
        if not entry.is_file():
            continue
        if entry.name.lower().endswith(".dcm"):
            return True
        try:
            if _is_dicom_file(entry):
                return True
        except OSError:
            pass
        checked += 1
        if checked >= probe:
            break
    return False
