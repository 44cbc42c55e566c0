"""Atomic NIfTI writing that keeps the source affine (and header)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path

import numpy as np

from .volume import WRITE_SUFFIXES, Volume, VolumeWriteError

log = logging.getLogger(__name__)


def _nifti_header(reference: Volume | None, affine: np.ndarray):
    """A copy of the reference's NIfTI header when it still describes ``affine``, else None."""
    import nibabel as nib

    if reference is None:
        return None
    hdr = reference.metadata.get("header")
    if isinstance(hdr, nib.Nifti1Header) and np.array_equal(affine, reference.affine):
        hdr = hdr.copy()
        if reference.metadata.get("spatial_unit"):  # read in metres or microns: written in mm
            hdr.set_xyzt_units("mm", hdr.get_xyzt_units()[1])
        del hdr.extensions[:]  # AFNI / comment extensions describe the source's voxels
        hdr["aux_file"] = b""
        return hdr
    return None


def _save_nifti(
    path: Path, data: np.ndarray, affine: np.ndarray, reference, labels: bool, overwrite: bool
) -> Path:
    import nibabel as nib

    from ..files import follow_umask, publish, temporary_path

    path = Path(path).expanduser()
    if not path.name.lower().endswith(WRITE_SUFFIXES):
        raise VolumeWriteError(
            f"cannot write {path}: volumes are written as .nii or .nii.gz files."
        )
    if not path.parent.is_dir():
        raise VolumeWriteError(f"cannot write {path}: the folder {path.parent} does not exist.")
    hdr = _nifti_header(reference, affine)
    if hdr is not None:
        cls = nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
        img = cls(data, affine, header=hdr)  # keeps the header's sform/qform: same affine
        img.header.set_data_dtype(data.dtype)
        img.header.set_slope_inter(None, None)
    else:
        img = nib.Nifti1Image(data, affine, dtype=data.dtype)
        code = 1 if reference is not None and reference.metadata.get("format") != "tiff" else 2
        img.header.set_sform(affine, code=code)
        # a qform holds no shear (a gantry-tilted CT): then only the sform is valid
        columns = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
        rigid = np.allclose(columns.T @ columns, np.eye(3), atol=1e-4)
        img.header.set_qform(affine, code=code if rigid else 0)
        img.header.set_xyzt_units("mm")
    hdr = img.header
    if labels:
        hdr.set_intent("label")
        hdr["cal_min"], hdr["cal_max"] = 0, float(data.max()) if data.size else 0
    else:
        hdr.set_intent("none")
        hdr["cal_min"], hdr["cal_max"] = 0, 0
    hdr["descrip"] = b"napari-selfreg"
    tmp = temporary_path(path)
    try:
        img.to_filename(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        follow_umask(tmp)
        publish(tmp, path, overwrite)
        tmp = None
    except FileExistsError as e:
        raise VolumeWriteError(f"{path} exists (another run wrote it meanwhile); it is not replaced - pass --overwrite to replace it") from e  # fmt: skip
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise VolumeWriteError(f"cannot write {path}: the disk is full.") from e
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise VolumeWriteError(f"cannot write {path}: the folder {path.parent} is not writable.") from e  # fmt: skip
        raise VolumeWriteError(f"cannot write {path}: {e.strerror or e}.") from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def _target_affine(data: np.ndarray, reference: Volume | None, affine) -> np.ndarray:
    if affine is None and reference is None:
        raise ValueError("writing a volume needs a reference Volume or an affine")
    if reference is not None and affine is None:
        if tuple(data.shape[: reference.ndim]) != reference.shape:
            raise ValueError(f"data shape {data.shape} does not match the reference shape {reference.shape}")  # fmt: skip
        return reference.affine
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    return affine


def write_volume(
    path: str | os.PathLike,
    data: np.ndarray,
    reference: Volume | None = None,
    affine: np.ndarray | None = None,
    overwrite: bool = True,
) -> Path:
    """Write an image (or probabilities, ``(*spatial, C)``) as NIfTI, atomically.

    Args:
        path: ``.nii`` or ``.nii.gz`` target (replaced atomically if it exists and
            ``overwrite``; else a file that exists is never replaced).
        data: array; bool is written as uint8, int64 as int32 when it fits.
        reference: the source volume; its affine (and, for NIfTI sources, a
            copy of its header with qform/sform codes) is written.
        affine: ``(4, 4)`` voxel-to-world affine; overrides the reference's.

    Returns:
        The written path.

    Raises:
        VolumeWriteError: bad extension, missing or unwritable folder, disk full
            (no partial file is left behind).
        ValueError: no affine, or data whose shape does not match the reference.
    """
    data = np.asarray(data)
    target = _target_affine(data, reference, affine)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    elif data.dtype.kind in "iu" and data.dtype.itemsize == 8:
        lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
        if np.iinfo(np.int32).min <= lo and hi <= np.iinfo(np.int32).max:
            data = data.astype(np.int32)
    return _save_nifti(Path(path), data, target, reference, False, overwrite)


def write_labels(
    path: str | os.PathLike,
    labels: np.ndarray,
    reference: Volume | None = None,
    affine: np.ndarray | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a label map as NIfTI (uint8, or uint16/uint32 for more labels), atomically.

    Same arguments and errors as :func:`write_volume`; the NIfTI intent is set
    to ``label`` and scaling is reset.

    Raises:
        ValueError: negative or non-integer labels.
    """
    labels = np.asarray(labels)
    target = _target_affine(labels, reference, affine)
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise ValueError("labels must be whole numbers")
    lo, hi = (float(labels.min()), float(labels.max())) if labels.size else (0.0, 0.0)
    if lo < 0:
        raise ValueError(f"labels must be >= 0, got a minimum of {lo:g}")
    dtype = np.uint8 if hi < 2**8 else np.uint16 if hi < 2**16 else np.uint32
    return _save_nifti(
        Path(path), labels.astype(dtype, copy=False), target, reference, True, overwrite
    )
