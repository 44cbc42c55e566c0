"""Volumes, their errors and the helpers every reader shares."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


NIBABEL_SUFFIXES = (
    ".nii",
    ".nii.gz",
    ".hdr",
    ".img",
    ".hdr.gz",
    ".img.gz",
    ".mgh",
    ".mgz",
    ".mnc",
)
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
TIFF_SUFFIXES = (".tif", ".tiff")
READ_SUFFIXES = NIBABEL_SUFFIXES + DICOM_SUFFIXES + TIFF_SUFFIXES
WRITE_SUFFIXES = (".nii.gz", ".nii")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SLAB = 8_000_000  # voxels read or converted at once


class VolumeError(ValueError):
    """Base class of volume I/O errors a user can cause."""


class VolumeReadError(VolumeError):
    """A volume cannot be read (missing, empty, corrupt, ambiguous or unsupported)."""


class ChannelsError(VolumeReadError):
    """A 4D file holds ``count`` volumes and no channel was picked."""

    def __init__(self, message: str, count: int):
        super().__init__(message)
        self.count = count


class VolumeWriteError(VolumeError):
    """A volume cannot be written (bad path, folder not writable, disk full)."""


@dataclass
class Volume:
    """A volume in its file's voxel order with its voxel-to-world transform.

    Attributes:
        data: ``(*spatial)`` array, 2 or 3 spatial axes in the file's voxel order.
        affine: ``(4, 4)`` float64 voxel index -> world mm (RAS+).
        spacing: voxel size in mm per array axis (column norms of the affine).
        metadata: ``source`` (path), ``format``, ``header`` (nibabel header,
            pydicom Dataset or TIFF metadata), ``nonfinite`` (NaN/Inf count),
            ``warnings`` (list of str) and format-specific entries.
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return self.data.ndim


def _spacing(affine: np.ndarray, nd: int) -> tuple[float, ...]:
    from ..geometry import spacing_from_affine

    return spacing_from_affine(affine, nd)


def _f32(affine: np.ndarray) -> np.ndarray:
    return np.asarray(affine, dtype=np.float32).astype(np.float64)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(READ_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _is_dicom_file(path: Path) -> bool:
    """The DICM marker at byte 128, or a file that starts with a DICOM element of group
    0002 / 0008 without the preamble (older exports; pydicom reads them forced)."""
    with open(path, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM":
        return True
    if len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    explicit_vr = head[4:6].isalpha() and head[4:6].isupper()
    return explicit_vr or int.from_bytes(head[4:8], "little") < 1024  # implicit: a length


def _make_volume(data, affine, path, fmt, header, **extra) -> Volume:
    from ..preprocess import count_nonfinite

    meta = {"source": str(path), "format": fmt, "header": header, "warnings": []}
    meta.update(extra)
    meta["nonfinite"] = count_nonfinite(data)
    if meta["nonfinite"]:
        meta["warnings"].append(f"{meta['nonfinite']} voxels are NaN or infinite")
    for w in meta["warnings"]:
        log.warning("%s: %s", path, w)
    affine = np.asarray(affine, dtype=np.float64)
    return Volume(data, affine, _spacing(affine, data.ndim), meta)


def _pick(
    shape: tuple[int, ...], channel: int | None, path: Path
) -> tuple[tuple, tuple[int, ...]]:
    """Index that drops singleton axes beyond the 2nd and picks ``channel`` on the 4th axis.

    Returns ``(slicer, kept_spatial_shape)``.
    """
    extra = [a for a in range(3, len(shape)) if shape[a] > 1]
    if len(extra) > 1:
        raise VolumeReadError(f"{path} has {len(shape)} dimensions {shape}; only 2D, 3D and 4D volumes are supported.")  # fmt: skip
    slicer: list = [slice(None)] * min(3, len(shape)) + [0] * max(0, len(shape) - 3)
    if extra:
        n = shape[extra[0]]
        if channel is None:
            raise ChannelsError(f"{path} is 4D with {n} volumes along its 4th axis (time points or channels); pass channel=0..{n - 1} (--channel on the command line) to pick one.", n)  # fmt: skip
        if not 0 <= channel < n:
            raise VolumeReadError(f"channel {channel} is out of range for {path}, which has {n} volumes (0..{n - 1}).")  # fmt: skip
        slicer[extra[0]] = channel
    elif channel not in (None, 0):
        raise VolumeReadError(f"{path} has no 4th axis, so channel={channel} cannot be picked.")
    if len(shape) >= 3 and shape[2] == 1:
        slicer[2] = 0
    kept = tuple(n for n, s in zip(shape, slicer, strict=True) if isinstance(s, slice))
    return tuple(slicer), kept
