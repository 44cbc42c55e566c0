"""DICOM reading for :func:`napari_selfreg.io.read_volume` (pydicom, imported lazily).

A folder must hold exactly one series; a single-slice file reads the images of
its series (same size and orientation) from its folder; a multi-frame file
(enhanced MR/CT with per-frame functional groups, or classic multi-frame with
``GridFrameOffsetVector``) is one volume. Images are sorted along the slice
normal (``ImagePositionPatient`` projected on ``row x column`` of
``ImageOrientationPatient``); several images at one position make a 4D series
(time points or echoes) from which ``channel`` picks one. Rescale slope and
intercept are applied. The array is ``(column, row, slice)`` and the affine maps
it to RAS+ mm (DICOM's LPS with x and y negated).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .volume import (
    LPS_TO_RAS,
    ChannelsError,
    Volume,
    VolumeReadError,
    _f32,
    _is_dicom_file,
    _make_volume,
)


@dataclass
class _Slice:
    position: np.ndarray  # (3,) LPS mm
    orientation: np.ndarray  # (6,) row and column direction cosines
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    thickness: float | None
    slope: float
    inter: float
    order_key: tuple
    file: Path
    frame: int | None = None


def _num(ds, name: str, default=None):
    v = ds.get(name) if ds is not None else None
    return default if v is None or v == "" else v


def _int(ds, name: str) -> int:
    """An integer attribute (first value of a multi-valued one), 0 when absent or odd."""
    v = _num(ds, name, 0)
    v = v[0] if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else v
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return 0


def _item(ds, seq: str):
    s = ds.get(seq) if ds is not None else None
    return s[0] if s else None


def _slice_from(ds, file: Path, frame: int | None, fg=None, shared=None, warn=None) -> _Slice:
    """Geometry and rescale of one image (a file, or one frame of an enhanced file)."""

    def get(seq: str, name: str, default=None):
        for group in (fg, shared):
            v = _num(_item(group, seq), name)
            if v is not None:
                return v
        return _num(ds, name, default)

    ori = get("PlaneOrientationSequence", "ImageOrientationPatient")
    pos = get("PlanePositionSequence", "ImagePositionPatient")
    ps = get("PixelMeasuresSequence", "PixelSpacing")
    thick = get("PixelMeasuresSequence", "SpacingBetweenSlices") or get("PixelMeasuresSequence", "SliceThickness")  # fmt: skip
    slope = float(get("PixelValueTransformationSequence", "RescaleSlope", 1.0))
    inter = float(get("PixelValueTransformationSequence", "RescaleIntercept", 0.0))
    if _num(ds, "Modality") == "RTDOSE" and _num(ds, "DoseGridScaling") is not None:
        slope *= float(ds.DoseGridScaling)
    if warn is not None:
        if ori is None:
            warn.add("no ImageOrientationPatient; assuming axial slices")
        if ps is None:
            warn.add("no PixelSpacing; assuming 1 mm pixels")
    content = _item(fg, "FrameContentSequence")
    key = tuple(_int(d, n) for d, n in [(content, "TemporalPositionIndex"), (ds, "TriggerTime"),
                (ds, "EchoNumbers"), (ds, "AcquisitionNumber"), (ds, "InstanceNumber")])  # fmt: skip
    key += (frame or 0,)
    return _Slice(
        position=np.array([float(v) for v in pos]) if pos is not None else None,
        orientation=np.array([float(v) for v in (ori or (1, 0, 0, 0, 1, 0))]),
        pixel_spacing=(float(ps[0]), float(ps[1])) if ps is not None else (1.0, 1.0),
        thickness=float(thick) if thick else None,
        slope=slope,
        inter=inter,
        order_key=key,
        file=file,
        frame=frame,
    )


def _read_dataset(pydicom, f: Path, **kw):
    """``pydicom.dcmread``, forced for a file without the preamble that starts like DICOM,
    with the transfer syntax its elements were found in."""
    try:
        return pydicom.dcmread(f, **kw)
    except pydicom.errors.InvalidDicomError:
        if not _is_dicom_file(f):
            raise
    ds = pydicom.dcmread(f, force=True, **kw)
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        uid = pydicom.uid
        syntax = uid.ImplicitVRLittleEndian if implicit else uid.ExplicitVRLittleEndian
        ds.file_meta.TransferSyntaxUID = syntax if little else uid.ExplicitVRBigEndian
    return ds


def _dcmread(pydicom, f: Path, **kw):
    try:
        return _read_dataset(pydicom, f, **kw)
    except (pydicom.errors.InvalidDicomError, EOFError, OSError, ValueError) as e:
        raise VolumeReadError(f"{f} is not a readable DICOM file.") from e


def _scan(pydicom, files) -> list[tuple[Path, Any]]:
    """Headers of the DICOM image files among ``files``; other files are skipped."""
    found = []
    for f in files:
        if f.name.startswith(".") or f.name.upper() == "DICOMDIR" or not f.is_file():
            continue
        try:
            with warnings.catch_warnings():  # other files' quirks are not the user's business
                warnings.simplefilter("ignore")
                ds = _read_dataset(pydicom, f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - any unreadable file in a folder is skipped
            continue
        if "Rows" in ds and "Columns" in ds:
            found.append((f, ds))
    return found


def _series_label(headers) -> str:
    ds = headers[0][1]
    desc = str(ds.get("SeriesDescription", "") or "no description")
    return f"'{desc}' (SeriesInstanceUID {ds.get('SeriesInstanceUID', '?')}, {len(headers)} images, first file {headers[0][0].name})"  # fmt: skip


ORIENTATION_ATOL = 1e-4  # direction cosines this close belong to one stack


def _same_orientation(a, b) -> bool:
    """Whether two headers' ImageOrientationPatient agree (within ``ORIENTATION_ATOL``)."""
    oa, ob = a.get("ImageOrientationPatient"), b.get("ImageOrientationPatient")
    if oa is None or ob is None:
        return oa is ob
    try:
        return bool(
            np.allclose([float(v) for v in oa], [float(v) for v in ob], atol=ORIENTATION_ATOL)
        )
    except (TypeError, ValueError):
        return False


def read_dicom(p: Path, channel: int | None) -> Volume:
    """Read a DICOM folder (one series), a slice with its series, or a multi-frame file."""
    import pydicom

    warn: set[str] = set()
    if p.is_dir():
        headers = _scan(pydicom, sorted(p.rglob("*")))
        if not headers:
            raise VolumeReadError(f"folder {p} holds no DICOM images.")
        series: dict[str, list] = {}
        for f, ds in headers:
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
        if len(series) > 1:
            groups = list(series.values())
            listing = "; ".join(f"{i + 1}) {_series_label(h)}" for i, h in enumerate(groups[:8]))
            listing += f"; and {len(groups) - 8} more" if len(groups) > 8 else ""
            raise VolumeReadError(f"folder {p} holds {len(series)} DICOM series: {listing}; open one file of the series you want to read that series.")  # fmt: skip
        headers = next(iter(series.values()))
    else:
        ds = _dcmread(pydicom, p, stop_before_pixels=True)
        if "Rows" not in ds:
            raise VolumeReadError(f"{p} is a DICOM file without an image (such as a report or a DICOMDIR).")  # fmt: skip
        if int(_num(ds, "NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            return _read_multiframe(pydicom, p, channel)
        uid = ds.get("SeriesInstanceUID")
        headers = [(p, ds)]
        if uid and "ImagePositionPatient" in ds:  # a cross-section: gather its series
            siblings = _scan(pydicom, sorted(f for f in p.parent.iterdir() if f != p))
            headers += [
                (f, d) for f, d in siblings
                if d.get("SeriesInstanceUID") == uid and "ImagePositionPatient" in d
                and (d.Rows, d.Columns) == (ds.Rows, ds.Columns) and _same_orientation(d, ds)
            ]  # fmt: skip
    seen, unique = set(), []
    for f, ds in headers:  # the same instance may be stored twice (e.g. other transfer syntax)
        sop = ds.get("SOPInstanceUID") or str(f)
        if sop not in seen:
            seen.add(sop)
            unique.append((f, ds))
    slices = [_slice_from(ds, f, None, warn=warn) for f, ds in unique]
    return _stack(
        slices,
        lambda s: _pixels(pydicom, s.file),
        channel,
        p,
        unique[0][1],
        warn,
    )


def _pixels(pydicom, f: Path, ds=None) -> np.ndarray:
    ds = ds if ds is not None else _dcmread(pydicom, f)
    if int(_num(ds, "SamplesPerPixel", 1)) != 1:
        raise VolumeReadError(f"{f} is a colour (RGB) DICOM image; only greyscale images are supported.")  # fmt: skip
    try:
        return ds.pixel_array
    except (RuntimeError, NotImplementedError, ValueError, AttributeError) as e:
        ts = ds.file_meta.get("TransferSyntaxUID", "unknown")
        if not getattr(ts, "is_compressed", True):
            raise VolumeReadError(f"the pixel data of {f} is truncated or corrupt.") from e
        name = getattr(ts, "name", ts)
        raise VolumeReadError(f"cannot decode the pixels of {f} (transfer syntax {name}); install pylibjpeg or gdcm for compressed DICOM.") from e  # fmt: skip


def _read_multiframe(pydicom, p: Path, channel: int | None) -> Volume:
    ds = _dcmread(pydicom, p)
    warn: set[str] = set()
    pffg = ds.get("PerFrameFunctionalGroupsSequence")
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    frames = _pixels(pydicom, p, ds)
    frames = frames.reshape((-1, *frames.shape[-2:]))
    if pffg:
        if len(pffg) != len(frames):
            warn.add(f"{len(pffg)} per-frame descriptions for {len(frames)} frames; extra ones ignored")  # fmt: skip
        slices = [_slice_from(ds, p, i, fg, shared, warn) for i, fg in enumerate(pffg[: len(frames)])]  # fmt: skip
    else:  # classic multi-frame: one position + offsets along the slice normal
        base = _slice_from(ds, p, 0, warn=warn)
        normal = np.cross(base.orientation[:3], base.orientation[3:])
        offsets = _num(ds, "GridFrameOffsetVector")
        n = len(frames)
        if offsets is None or len(offsets) != n:
            step = base.thickness or 1.0
            offsets = [i * step for i in range(n)]
            warn.add(f"no per-frame positions; frames assumed {step:g} mm apart")
        pos0 = base.position if base.position is not None else np.zeros(3)
        slices = [
            _Slice(pos0 + float(o) * normal, base.orientation, base.pixel_spacing, base.thickness,
                   base.slope, base.inter, (i,), p, i)
            for i, o in enumerate(offsets)
        ]  # fmt: skip
    return _stack(slices, lambda s: frames[s.frame], channel, p, ds, warn)


def _stack(slices, pixels, channel, p: Path, header, warn: set[str]) -> Volume:
    """Sort images along the slice normal, pick the channel, stack and build the affine."""
    ori = slices[0].orientation
    if any(not np.allclose(s.orientation, ori, atol=ORIENTATION_ATOL) for s in slices):
        raise VolumeReadError(f"{p} mixes images of different orientations; open one of its files to read that series alone.")  # fmt: skip
    normal = np.cross(ori[:3], ori[3:])
    if any(s.position is None for s in slices):
        warn.add("no ImagePositionPatient; slices ordered by InstanceNumber")
        step = slices[0].thickness or 1.0
        for i, s in enumerate(sorted(slices, key=lambda s: s.order_key)):
            s.position = i * step * normal
    depth = np.array([s.position @ normal for s in slices])
    groups: list[list[_Slice]] = []
    for i in np.argsort(depth, kind="stable"):
        if groups and abs(depth[i] - groups[-1][0].position @ normal) < 1e-3:
            groups[-1].append(slices[i])
        else:
            groups.append([slices[i]])
    counts = sorted({len(g) for g in groups})
    if len(counts) > 1:
        raise VolumeReadError(f"{p} has {counts[0]} to {counts[-1]} images per slice position; the series is incomplete or mixes acquisitions.")  # fmt: skip
    n = counts[0]
    if n > 1 and channel is None:
        raise ChannelsError(f"{p} is 4D with {n} images per slice position (time points or echoes); pass channel=0..{n - 1} (--channel on the command line) to pick one.", n)  # fmt: skip
    if not 0 <= (channel or 0) < n:
        raise VolumeReadError(f"channel {channel} is out of range for {p}, which has {n} images per slice position (0..{n - 1}).")  # fmt: skip
    chosen = [sorted(g, key=lambda s: s.order_key)[channel or 0] for g in groups]

    first = pixels(chosen[0])
    if first.ndim != 2:
        raise VolumeReadError(f"{p} holds images of shape {first.shape}; only greyscale 2D slices can be stacked.")  # fmt: skip
    rows, cols = first.shape
    integer = first.dtype.kind in "iu" and all(
        s.slope == 1 and s.inter == round(s.inter) for s in chosen
    )
    out = np.empty((cols, rows, len(chosen)), first.dtype if integer else np.float32, order="F")
    for k, s in enumerate(chosen):
        px = first if k == 0 else pixels(s)
        if px.shape != (rows, cols):
            raise VolumeReadError(f"{p} mixes images of {rows}x{cols} and {px.shape[0]}x{px.shape[1]} pixels.")  # fmt: skip
        out[:, :, k] = px.T
        if not integer:
            out[:, :, k] *= np.float32(s.slope)
            out[:, :, k] += np.float32(s.inter)
    if integer and any(s.inter for s in chosen):
        out = _add_intercepts(out, [int(s.inter) for s in chosen])

    row_sp, col_sp = chosen[0].pixel_spacing
    a = np.eye(4)
    a[:3, 0] = ori[:3] * col_sp
    a[:3, 1] = ori[3:] * row_sp
    if len(chosen) > 1:
        a[:3, 2] = (chosen[-1].position - chosen[0].position) / (len(chosen) - 1)
        gaps = np.diff([s.position @ normal for s in chosen])
        if gaps.max() - gaps.min() > max(1e-3, 0.01 * gaps.mean()):
            warn.add(f"slice spacing varies from {gaps.min():.4g} to {gaps.max():.4g} mm; the affine assumes {gaps.mean():.4g} mm")  # fmt: skip
    else:
        a[:3, 2] = normal * (chosen[0].thickness or 1.0)
    a[:3, 3] = chosen[0].position
    data = out[:, :, 0] if len(chosen) == 1 else out
    return _make_volume(
        data, _f32(LPS_TO_RAS @ a), p, "dicom", header,
        warnings=sorted(warn),
        files=[str(s.file) for s in chosen],
        frames=[s.frame for s in chosen] if chosen[0].frame is not None else None,
        series_uid=str(header.get("SeriesInstanceUID", "")),
        series_description=str(header.get("SeriesDescription", "")),
        rescale=(chosen[0].slope, chosen[0].inter),
        channel=channel,
    )  # fmt: skip


def _add_intercepts(out: np.ndarray, inters: list[int]) -> np.ndarray:
    """Add integer intercepts per slice in the smallest integer dtype that holds the result."""
    lo = int(out.min()) + min(inters)
    hi = int(out.max()) + max(inters)
    # an unsigned type cannot hold a negative intercept, even where the sum fits
    stored = (out.dtype,) if min(inters) >= 0 or out.dtype.kind == "i" else ()
    for t in (*stored, np.dtype(np.int16), np.dtype(np.int32), np.dtype(np.int64)):
        if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
            break
    out = out if out.dtype == t else out.astype(t, order="F")
    for k, inter in enumerate(inters):
        out[:, :, k] += t.type(inter)
    return out
