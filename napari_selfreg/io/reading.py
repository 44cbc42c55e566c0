"""One entry point for every format: :func:`read_volume`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .nifti import _read_nibabel
from .tiff import _read_tiff
from .volume import (
    DICOM_SUFFIXES,
    NIBABEL_SUFFIXES,
    READ_SUFFIXES,
    TIFF_SUFFIXES,
    Volume,
    VolumeReadError,
    _is_dicom_file,
    _suffix,
)

log = logging.getLogger(__name__)


def read_volume(path: str | os.PathLike, channel: int | None = None) -> Volume:
    """Read a volume file or a DICOM folder.

    Args:
        path: ``.nii``/``.nii.gz`` (NIfTI-1/2), ``.hdr``/``.img`` (Analyze or
            NIfTI pair), ``.mgh``/``.mgz``, ``.mnc``, ``.tif``/``.tiff``, a DICOM
            file (a multi-frame file is one volume; a single-slice file reads its
            whole series from the same folder) or a folder holding one DICOM series.
        channel: index on the 4th axis of a 4D file (time point, channel, echo).

    Returns:
        Volume. Integer data keeps its dtype when the file applies no scaling;
        scaled or floating data is float32.

    Raises:
        VolumeReadError: one sentence saying what is wrong and what to do.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise VolumeReadError(f"{p} does not exist.")
    if p.is_dir():
        from .dicom import read_dicom

        return read_dicom(p, channel)
    if p.stat().st_size == 0:
        raise VolumeReadError(f"{p} is empty (0 bytes).")
    suffix = _suffix(p)
    if suffix in NIBABEL_SUFFIXES:
        return _read_nibabel(p, channel)
    if suffix in TIFF_SUFFIXES:
        return _read_tiff(p, channel)
    if suffix in DICOM_SUFFIXES or _is_dicom_file(p):
        from .dicom import read_dicom

        return read_dicom(p, channel)
    raise VolumeReadError(f"{p} has an unsupported file type {suffix or '(no extension)'!r}; supported are {', '.join(READ_SUFFIXES)} and DICOM folders.")  # fmt: skip
