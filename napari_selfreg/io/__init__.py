"""Reading and writing volumes with their voxel-to-world affine (no torch).

Modules: :mod:`.volume` (``Volume``, errors), :mod:`.reading` (``read_volume``),
:mod:`.nifti`, :mod:`.tiff`, :mod:`.dicom` (the formats), :mod:`.writing`.

* :func:`read_volume` - NIfTI-1/2, Analyze, MGH/MGZ, MINC (nibabel), DICOM
  series folders and multi-frame files (pydicom), TIFF stacks (tifffile).
* :func:`write_volume`, :func:`write_labels` - atomic NIfTI writing that keeps
  the source affine (and, for NIfTI sources, a copy of the source header).

Conventions: ``Volume.data`` keeps the file's voxel order (nibabel's ``(i, j,
k)``; DICOM: ``(column, row, slice)``; TIFF: tifffile's ``(Z, Y, X)``) and
``Volume.affine`` maps ``(i, j, k, 1)`` to world millimetres, RAS+ like nibabel
(DICOM's LPS is converted). A file holding one slice gives a 2D volume (two
spatial axes; the affine stays 4x4 with a unit third column). Affines of
non-NIfTI sources are rounded to float32 so that a NIfTI-1 round trip keeps
them bit for bit. User errors raise :class:`VolumeReadError` /
:class:`VolumeWriteError` (both ``ValueError``) with one-sentence messages.
"""

from __future__ import annotations

from .reading import read_volume
from .volume import (
    DICOM_SUFFIXES,
    LPS_TO_RAS,
    NIBABEL_SUFFIXES,
    READ_SUFFIXES,
    TIFF_SUFFIXES,
    WRITE_SUFFIXES,
    ChannelsError,
    Volume,
    VolumeError,
    VolumeReadError,
    VolumeWriteError,
)
from .writing import write_labels, write_volume

__all__ = [
    "DICOM_SUFFIXES", "LPS_TO_RAS", "NIBABEL_SUFFIXES", "READ_SUFFIXES", "TIFF_SUFFIXES",
    "WRITE_SUFFIXES", "ChannelsError", "Volume", "VolumeError", "VolumeReadError", "VolumeWriteError",
    "read_volume", "write_labels", "write_volume",
]  # fmt: skip
