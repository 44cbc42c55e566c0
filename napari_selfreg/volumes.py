"""Class volumes of a label map: the report of ``segment --statistics`` and of the
Segment widget (one computation, three renderings: printed, CSV/JSON file, clipboard)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ClassVolume:
    """One class of a label map."""

    name: str
    voxels: int
    amount: float  # ml (3D) or mm^2 (2D)
    fraction: float | None  # of the labelled (non-background) total; None for background


def class_volumes(labels, names, linear) -> tuple[list[ClassVolume], str]:
    """Per-class voxels and volume of ``labels``; returns ``(rows, unit)``.

    Args:
        labels: integer label map, 2D or 3D (label 0 is background).
        names: class names by label (labels beyond them are named ``class N``).
        linear: ``(ndim, ndim)`` voxel-to-millimetre matrix (its determinant is the
            voxel's volume or area).
    """
    labels = np.asarray(labels)
    counts = np.bincount(labels.ravel(), minlength=len(names))
    measure = abs(float(np.linalg.det(np.asarray(linear, float))))
    unit = "ml" if labels.ndim == 3 else "mm^2"
    if unit == "ml":
        measure /= 1000.0  # mm^3 -> ml
    names = list(names) + [f"class {i}" for i in range(len(names), len(counts))]
    labelled = float(counts[1:].sum()) or 1.0
    rows = [
        ClassVolume(names[i], int(c), float(c) * measure, float(c) / labelled if i else None)
        for i, c in enumerate(counts)
    ]
    return rows, unit


def as_table(rows: list[ClassVolume], unit: str) -> list[list[str]]:
    """Header and one line of text per class (widget table, clipboard, terminal)."""
    lines = [["class", "voxels", unit, "% of labelled"]]
    for r in rows:
        share = "" if r.fraction is None else f"{100 * r.fraction:.1f}"
        lines.append([r.name, str(r.voxels), f"{r.amount:.2f}", share])
    return lines


def as_text(rows: list[ClassVolume], unit: str) -> str:
    """The table with aligned columns (terminal)."""
    lines = as_table(rows, unit)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "".join(
        "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths, strict=True))).rstrip() + "\n"
        for line in lines
    )  # fmt: skip


def as_tsv(rows: list[ClassVolume], unit: str) -> str:
    """Tab-separated table (pastes into a spreadsheet as columns)."""
    return "".join("\t".join(line) + "\n" for line in as_table(rows, unit))


def as_record(rows: list[ClassVolume], unit: str, **about) -> dict:
    """One input's JSON record: ``about`` (file, labels...) plus ``unit`` and ``classes``."""
    classes = {
        r.name: {
            "voxels": r.voxels,
            unit: round(r.amount, 3),
            "fraction_of_labelled": None if r.fraction is None else round(r.fraction, 4),
        }
        for r in rows
    }
    return {**about, "unit": unit, "classes": classes}


def write_statistics(path: str | Path, records: list[dict], names: list[str]) -> Path:
    """Records of :func:`as_record` as ``.json`` (one object per file) or ``.csv`` (one
    row per file: voxels, volume and fraction of the labelled total per class)."""
    import csv
    import io

    from .files import write_json_atomic, write_text_atomic

    path = Path(path).expanduser()
    if path.suffix.lower() == ".json":
        return write_json_atomic(path, {"files": records})
    if path.suffix.lower() != ".csv":
        raise ValueError(f"--statistics needs a .csv or .json file name, not {path.name}")
    unit = records[0]["unit"]
    about = [k for k in records[0] if k not in ("unit", "classes")]
    header = list(about)
    for i, name in enumerate(names):
        header += [f"{name} voxels", f"{name} {unit}"] + ([f"{name} fraction"] if i else [])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    empty = {"voxels": 0, unit: 0.0, "fraction_of_labelled": 0.0}
    for record in records:
        line = [record[k] for k in about]
        for i, name in enumerate(names):
            c = record["classes"].get(name, empty)
            line += [c["voxels"], c[unit]] + ([c["fraction_of_labelled"]] if i else [])
        writer.writerow(line)
    return write_text_atomic(path, buffer.getvalue())
