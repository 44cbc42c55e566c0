"""TIFF stacks through tifffile, with the voxel size from ImageJ or resolution tags."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .volume import ChannelsError, Volume, VolumeReadError, _f32, _make_volume

log = logging.getLogger(__name__)

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
            alike = all((s.shape, s.dtype, s.axes) == (series.shape, series.dtype, series.axes) for s in tif.series)  # fmt: skip
            notes = []
            if len(tif.series) > 1 and alike and "Z" not in axes:  # pages written one by one
                data = np.stack([s.asarray() for s in tif.series])
                axes = "Z" + axes
            else:
                data = series.asarray()
                if len(tif.series) > 1:
                    notes.append(f"the TIFF holds {len(tif.series)} series of different shapes; the first, {series.shape}, was read")  # fmt: skip
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
            raise ChannelsError(f"{p} is 4D with {n} images along its {axes[other[0]]} axis (channels or time points); pass channel=0..{n - 1} (--channel on the command line) to pick one.", n)  # fmt: skip
        if not 0 <= channel < n:
            raise VolumeReadError(f"channel {channel} is out of range for {p}, which has {n} images along its {axes[other[0]]} axis (0..{n - 1}).")  # fmt: skip
        data = np.take(data, channel, axis=other[0])
        axes = axes.replace(axes[other[0]], "")
    elif channel not in (None, 0):
        raise VolumeReadError(f"{p} has no channel axis, so channel={channel} cannot be picked.")
    names = "".join("Z" if ax in "QIZ" else ax for ax in axes)
    warnings = list(notes)
    spacing_known = all(ax in spacing_mm for ax in names)
    if not spacing_known:
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
        spacing_known=spacing_known, spacing_origin=origin if spacing_known else None, channel=channel,
    )  # fmt: skip
