"""Reading and writing volumes with their voxel-to-world affine (no torch).

* :func:`read_volume` - NIfTI-1/2, Analyze, MGH/MGZ, MINC (nibabel), DICOM
  series folders and multi-frame files (pydicom), TIFF stacks (tifffile).
* :func:`write_volume`, :func:`write_labels` - atomic NIfTI writing that keeps
  the source affine (and, for NIfTI sources, a copy of the source header).
* :func:`napari_transform` - layer keyword arguments that put a volume in world space.

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

import contextlib
import errno
import gzip
import logging
import os
import tempfile
import zlib
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
    from .geometry import spacing_from_affine

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
    with open(path, "rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


def _make_volume(data, affine, path, fmt, header, **extra) -> Volume:
    from .preprocess import count_nonfinite

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
            raise VolumeReadError(f"{path} is 4D with {n} volumes along its 4th axis (time points or channels); pass channel=0..{n - 1} to pick one.")  # fmt: skip
        if not 0 <= channel < n:
            raise VolumeReadError(f"channel {channel} is out of range for {path}, which has {n} volumes (0..{n - 1}).")  # fmt: skip
        slicer[extra[0]] = channel
    elif channel not in (None, 0):
        raise VolumeReadError(f"{path} has no 4th axis, so channel={channel} cannot be picked.")
    if len(shape) >= 3 and shape[2] == 1:
        slicer[2] = 0
    kept = tuple(n for n, s in zip(shape, slicer, strict=True) if isinstance(s, slice))
    return tuple(slicer), kept


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
        from ._dicom import read_dicom

        return read_dicom(p, channel)
    if p.stat().st_size == 0:
        raise VolumeReadError(f"{p} is empty (0 bytes).")
    suffix = _suffix(p)
    if suffix in NIBABEL_SUFFIXES:
        return _read_nibabel(p, channel)
    if suffix in TIFF_SUFFIXES:
        return _read_tiff(p, channel)
    if suffix in DICOM_SUFFIXES or _is_dicom_file(p):
        from ._dicom import read_dicom

        return read_dicom(p, channel)
    raise VolumeReadError(f"{p} has an unsupported file type {suffix or '(no extension)'!r}; supported are {', '.join(READ_SUFFIXES)} and DICOM folders.")  # fmt: skip


# --------------------------------------------------------------------------- nibabel


def _read_nibabel(p: Path, channel: int | None) -> Volume:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError
    from nibabel.tripwire import TripWireError

    if p.name.lower().endswith((".gz", ".mgz")):
        with open(p, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                raise VolumeReadError(f"{p} is not a valid gzip-compressed image (another file type renamed, or corrupt).")  # fmt: skip
    try:
        img = nib.load(p, mmap=False)
        slicer, kept = _pick(tuple(int(n) for n in img.shape), channel, p)
        data = _read_proxy(img.dataobj, slicer, kept, p)
    except VolumeReadError:
        raise
    except (TripWireError, ImportError) as e:
        raise VolumeReadError(f"reading {p} needs an optional package that is not installed ({e}); for MINC2 files run 'pip install h5py'.") from e  # fmt: skip
    except gzip.BadGzipFile as e:
        raise VolumeReadError(f"{p} is not a valid gzip-compressed image (corrupt, or another file type renamed).") from e  # fmt: skip
    except (EOFError, zlib.error) as e:
        raise VolumeReadError(f"{p} is truncated or corrupt: its compressed data ends early or is damaged.") from e  # fmt: skip
    except (ImageFileError, HeaderDataError) as e:
        raise VolumeReadError(f"{p} is not a valid {_suffix(p)} image: its header cannot be read.") from e  # fmt: skip
    except FileNotFoundError as e:
        raise VolumeReadError(f"{p} needs its companion file {e.filename}, which does not exist.") from e  # fmt: skip
    except (OSError, ValueError) as e:
        raise VolumeReadError(f"{p} is truncated or corrupt: it cannot be read as a {_suffix(p)} image.") from e  # fmt: skip
    fmt = {"Nifti1Image": "nifti1", "Nifti1Pair": "nifti1", "Nifti2Image": "nifti2",
           "Nifti2Pair": "nifti2", "MGHImage": "mgh", "Minc1Image": "minc", "Minc2Image": "minc"}.get(
        type(img).__name__, "analyze")  # fmt: skip
    affine = np.asarray(img.affine, dtype=np.float64)
    extra = {"original_shape": tuple(int(n) for n in img.shape), "channel": channel}
    if fmt.startswith("nifti"):
        extra["sform_code"] = int(img.header["sform_code"])
        extra["qform_code"] = int(img.header["qform_code"])
    else:
        affine = _f32(affine)
    return _make_volume(data, affine, p, fmt, img.header, **extra)


def _read_gzip_checked(path: Path, dataobj) -> np.ndarray:
    """Whole unscaled array of a gzip file, read to the end so gzip checks its CRC.

    nibabel stops reading right after the voxels, before the gzip trailer, so a
    damaged stream of incompressible data would otherwise go unnoticed.
    """
    arr = np.empty(dataobj.shape, dtype=dataobj.dtype, order=dataobj.order)
    view = memoryview(arr.reshape(-1, order="A")).cast("B")
    with gzip.open(path, "rb") as f:
        f.seek(dataobj.offset)
        done = 0
        while done < arr.nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise EOFError("compressed data ends before the last voxel")
            done += n
        while f.read(1 << 20):  # the rest (e.g. MGH tags), up to the CRC check
            pass
    return arr


def _read_proxy(
    dataobj, slicer: tuple, kept: tuple[int, ...], path: Path | None = None
) -> np.ndarray:
    """Read a nibabel array proxy without float64 copies of whole volumes."""
    from nibabel.arrayproxy import ArrayProxy

    identity = getattr(dataobj, "slope", None) == 1 and getattr(dataobj, "inter", None) == 0
    whole = all(isinstance(s, slice) for s in slicer)
    gz = path is not None and path.name.lower().endswith((".gz", ".mgz"))
    if whole and gz and type(dataobj) is ArrayProxy:
        arr = _read_gzip_checked(path, dataobj)
        if not identity:
            arr = arr.astype(np.float32)
            arr *= np.float32(dataobj.slope)
            arr += np.float32(dataobj.inter)
    elif identity or not hasattr(dataobj, "slope"):
        arr = np.asarray(dataobj) if whole else np.asarray(dataobj[slicer])
    else:
        arr = np.asarray(dataobj, dtype=np.float32) if whole else np.asarray(dataobj[slicer])
    arr = arr.reshape(kept, order="F") if whole else arr
    if arr.dtype.kind == "c" or arr.dtype.fields is not None:
        raise VolumeReadError(f"{path} holds {arr.dtype} voxels (complex or RGB), which are not supported.")  # fmt: skip
    if arr.dtype.kind == "f" and arr.dtype != np.float32:
        out = np.empty(arr.shape, np.float32, order="F")
        step = max(1, _SLAB // max(1, arr[..., 0].size))
        for k in range(0, arr.shape[-1], step):
            out[..., k : k + step] = arr[..., k : k + step]
        arr = out
    if not arr.dtype.isnative:  # torch and most tools need native byte order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr.astype(np.uint8) if arr.dtype == bool else arr


# --------------------------------------------------------------------------- TIFF

_UNIT_MM = {"mm": 1.0, "millimeter": 1.0, "cm": 10.0, "centimeter": 10.0, "m": 1000.0,
            "meter": 1000.0, "um": 1e-3, "µm": 1e-3, "\u03bcm": 1e-3, "micron": 1e-3,
            "micrometer": 1e-3, "nm": 1e-6, "nanometer": 1e-6, "inch": 25.4, "in": 25.4}  # fmt: skip


def _tiff_spacing(tif) -> tuple[dict[str, float], str]:
    """Voxel size in mm for the axes 'X', 'Y', 'Z' that the TIFF metadata gives, and its origin."""
    if tif.is_ome and tif.ome_metadata:
        import xml.etree.ElementTree as ET

        pixels = next((e for e in ET.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels")), None)  # fmt: skip
        if pixels is not None:
            found = {}
            for ax in "XYZ":
                size = pixels.get(f"PhysicalSize{ax}")
                unit = _UNIT_MM.get(pixels.get(f"PhysicalSize{ax}Unit", "µm"))
                if size and unit:
                    found[ax] = float(size) * unit
            if found:
                return found, "OME PhysicalSize"
    page = tif.pages.first
    ij = tif.imagej_metadata or {}
    unit = _UNIT_MM.get(str(ij.get("unit", "")).replace("\\u00B5", "µ").lower())
    res_unit = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 1
    if unit is None:
        unit = {2: 25.4, 3: 10.0, 4: 1.0, 5: 1e-3}.get(res_unit)
    found = {}
    if unit is not None:
        for ax, tag in (("X", "XResolution"), ("Y", "YResolution")):
            if tag in page.tags:
                num, den = page.tags[tag].value
                if num > 0 and den > 0:
                    found[ax] = den / num * unit
        if "spacing" in ij:
            found["Z"] = float(ij["spacing"]) * unit
    return found, ("ImageJ metadata" if ij else "TIFF resolution tags")


def _read_tiff(p: Path, channel: int | None) -> Volume:
    import tifffile

    try:
        with tifffile.TiffFile(p) as tif:
            series = tif.series[0]
            axes = series.axes.upper()
            data = series.asarray()
            spacing_mm, origin = _tiff_spacing(tif)
            header = {"axes": axes, "imagej": tif.imagej_metadata, "ome": tif.ome_metadata,
                      "n_series": len(tif.series)}  # fmt: skip
    except (tifffile.TiffFileError, ValueError, OSError, EOFError, KeyError, IndexError) as e:
        raise VolumeReadError(f"{p} is not a readable TIFF file ({e}).") from e
    # drop singleton axes except Y/X, then find at most one non-spatial axis
    keep = [i for i, ax in enumerate(axes) if data.shape[i] > 1 or ax in "YX"]
    data = data.reshape([data.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    spatial = "ZYX" if "Z" in axes else "QIZYX"
    other = [i for i, ax in enumerate(axes) if ax not in spatial]
    if len(other) > 1 or (data.ndim - len(other)) > 3:
        raise VolumeReadError(f"{p} has axes {axes} with shape {data.shape}; only 2D, 3D and one extra channel/time axis are supported.")  # fmt: skip
    if other:
        n = data.shape[other[0]]
        if channel is None:
            raise VolumeReadError(f"{p} is 4D with {n} images along its {axes[other[0]]} axis (channels or time points); pass channel=0..{n - 1} to pick one.")  # fmt: skip
        if not 0 <= channel < n:
            raise VolumeReadError(f"channel {channel} is out of range for {p}, which has {n} images along its {axes[other[0]]} axis (0..{n - 1}).")  # fmt: skip
        data = np.take(data, channel, axis=other[0])
        axes = axes.replace(axes[other[0]], "")
    elif channel not in (None, 0):
        raise VolumeReadError(f"{p} has no channel axis, so channel={channel} cannot be picked.")
    names = "".join("Z" if ax in "QIZ" else ax for ax in axes)
    warnings = []
    if not all(ax in spacing_mm for ax in names):
        warnings.append("the TIFF gives no physical voxel size for some axes; 1.0 mm used")
    if data.dtype.kind == "f" and data.dtype != np.float32:
        data = data.astype(np.float32)
    elif data.dtype == bool:
        data = data.astype(np.uint8)
    sp = [spacing_mm.get(ax, 1.0) for ax in names]
    affine = np.eye(4)
    affine[np.arange(len(sp)), np.arange(len(sp))] = sp
    return _make_volume(
        data, _f32(affine), p, "tiff", header, warnings=warnings, axes=names,
        spacing_known=not warnings, spacing_origin=origin if not warnings else None, channel=channel,
    )  # fmt: skip


# --------------------------------------------------------------------------- writing


def _nifti_header(reference: Volume | None, affine: np.ndarray):
    """A copy of the reference's NIfTI header when it still describes ``affine``, else None."""
    import nibabel as nib

    if reference is None:
        return None
    hdr = reference.metadata.get("header")
    if isinstance(hdr, nib.Nifti1Header) and np.array_equal(affine, reference.affine):
        return hdr.copy()
    return None


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, reference, labels: bool) -> Path:
    import nibabel as nib

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
        img.header.set_qform(affine, code=code)
        img.header.set_xyzt_units("mm")
    hdr = img.header
    if labels:
        hdr.set_intent("label")
        hdr["cal_min"], hdr["cal_max"] = 0, float(data.max()) if data.size else 0
    else:
        hdr.set_intent("none")
        hdr["cal_min"], hdr["cal_max"] = 0, 0
    hdr["descrip"] = b"napari-selfreg"
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent
        )
        os.close(fd)
        img.to_filename(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
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
) -> Path:
    """Write an image (or probabilities, ``(*spatial, C)``) as NIfTI, atomically.

    Args:
        path: ``.nii`` or ``.nii.gz`` target (replaced atomically if it exists).
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
    return _save_nifti(Path(path), data, target, reference, labels=False)


def write_labels(
    path: str | os.PathLike,
    labels: np.ndarray,
    reference: Volume | None = None,
    affine: np.ndarray | None = None,
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
        Path(path), labels.astype(dtype, copy=False), target, reference, labels=True
    )


# --------------------------------------------------------------------------- napari


def napari_transform(volume_or_affine: Volume | np.ndarray, ndim: int | None = None) -> dict:
    """Layer keyword arguments that place a volume (or a ``(4, 4)`` affine, ``ndim``
    spatial axes, default 3) in world millimetres: :func:`geometry.layer_kwargs`."""
    from .geometry import layer_kwargs

    if isinstance(volume_or_affine, Volume):
        return layer_kwargs(volume_or_affine.affine, volume_or_affine.ndim)
    return layer_kwargs(volume_or_affine, ndim or 3)
