"""NIfTI-1/2, Analyze, MGH/MGZ and MINC through nibabel, read slab by slab with checks."""

from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path

import numpy as np

from .volume import _SLAB, Volume, VolumeReadError, _f32, _make_volume, _pick, _suffix

log = logging.getLogger(__name__)

MM_PER_UNIT = {"meter": 1000.0, "micron": 1e-3}  # NIfTI xyz units other than mm (or unknown)


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
        _check_size(img, p)
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
        unit = img.header.get_xyzt_units()[0]
        if unit in MM_PER_UNIT:  # the affine is in the header's unit; ours is in mm
            affine = _f32(np.diag([MM_PER_UNIT[unit]] * 3 + [1.0]) @ affine)
            extra["spatial_unit"] = unit
    else:
        affine = _f32(affine)
    return _make_volume(data, affine, p, fmt, img.header, **extra)


def _check_size(img, path: Path) -> None:
    """An uncompressed file must hold the voxels its header promises (a damaged header
    claiming 30000^3 voxels is corrupt, not a reason to run out of memory)."""
    from nibabel.arrayproxy import ArrayProxy

    dataobj = img.dataobj
    data_file = img.file_map["image"].filename
    if type(dataobj) is not ArrayProxy or str(data_file).lower().endswith((".gz", ".mgz")):
        return
    need = int(dataobj.offset) + int(np.prod(dataobj.shape, dtype=np.float64)) * np.dtype(dataobj.dtype).itemsize  # fmt: skip
    size = Path(data_file).stat().st_size
    if size < need:
        raise VolumeReadError(f"{path} is truncated or corrupt: its header promises {' x '.join(map(str, dataobj.shape))} voxels ({need:,} bytes) but the file holds {size:,}.")  # fmt: skip


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
