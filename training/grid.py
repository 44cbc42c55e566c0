"""The voxel grid a model works in: one orientation and one spacing for all of its data.

A model learns anatomy in the array order and voxel size it was trained in, and the
predictor brings every scan to the card's ``orientation`` and ``spacing``. Training
therefore brings its cases there too: by default the most common orientation of the
cases and their median spacing in it (as nnU-Net does), recorded in the card.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from types import SimpleNamespace
from typing import Any

import numpy as np

from .datasets import Case


def to_model_grid(card, affine: np.ndarray | None, arrays: dict[str, tuple[np.ndarray, int]]):
    """Arrays in the stored order -> the model's orientation and spacing.

    ``arrays`` maps a name to ``(array, interpolation order)`` (1 for the image, 0 for
    labels and masks). Without an affine, or for a card without orientation and
    spacing, the arrays are returned as they are.
    """
    from napari_selfreg import geometry, preprocess

    out = {k: np.asarray(a) for k, (a, _) in arrays.items()}
    spatial = next(iter(out.values())).shape
    if affine is None or len(spatial) != 3:
        return out, {}
    spacing = geometry.spacing_from_affine(affine)
    info: dict[str, Any] = {}
    if getattr(card, "orientation", None):
        turn = geometry.reorientation(affine, card.orientation)
        if not turn.identity:
            out = {k: np.ascontiguousarray(turn.apply(a)) for k, a in out.items()}
            spacing = turn.spacing(spacing)
            info["reoriented"] = {"stored": turn.source, "model": turn.target}
    target = [float(v) for v in card.spacing] if getattr(card, "spacing", None) else None
    if target and len(target) == 3 and not np.allclose(spacing, target, rtol=1e-3):
        out = {
            k: preprocess.resample(a, spacing, target, order=arrays[k][1]) for k, a in out.items()
        }
        info["resampled"] = {"from": list(spacing), "to": target}
    return out, info


def data_grid(affines: list[np.ndarray | None]) -> tuple[str | None, list[float] | None]:
    """``(orientation, spacing)`` of 3D cases with these affines: the most common axis
    codes, and the median spacing per axis in them; ``(None, None)`` if any is unknown."""
    from napari_selfreg import geometry

    if not affines or any(a is None or np.shape(a) != (4, 4) for a in affines):
        return None, None
    codes = [geometry.axis_codes(a) for a in affines]
    orientation = Counter(codes).most_common(1)[0][0]
    spacings = [
        geometry.reorientation(a, orientation).spacing(geometry.spacing_from_affine(a))
        for a in affines
    ]
    return orientation, [round(float(v), 5) for v in np.median(spacings, axis=0)]


def case_to_grid(case: Case, orientation: str | None, spacing: list[float] | None) -> Case:
    """``case`` reoriented and resampled to the grid (image and raw intensities linearly,
    labels and weights by nearest voxel); as it is without an affine, in 2D, or with
    corrections to focus on (fine-tuning works in its parent's grid already)."""
    if case.affine is None or case.labels.ndim != 3 or case.focus is not None:
        return case
    arrays: dict[str, tuple[np.ndarray, int]] = {"labels": (case.labels, 0)}
    arrays.update({f"image{c}": (plane, 1) for c, plane in enumerate(case.image)})
    if case.weight is not None:
        arrays["weight"] = (case.weight, 0)
    raw = case.raw
    if raw is not None:
        arrays.update({"raw": (raw, 1)} if raw.ndim == 3 else {f"raw{c}": (r, 1) for c, r in enumerate(raw)})  # fmt: skip
    target = SimpleNamespace(orientation=orientation, spacing=spacing)
    out, info = to_model_grid(target, case.affine, arrays)
    if not info:
        return case
    image = np.stack([out[f"image{c}"] for c in range(case.image.shape[0])]).astype(np.float32)
    if raw is not None:
        raw = out["raw"] if raw.ndim == 3 else np.stack([out[f"raw{c}"] for c in range(len(raw))])  # fmt: skip
    weight = None if case.weight is None else out["weight"].astype(np.float32)
    return dataclasses.replace(
        case, image=np.ascontiguousarray(image), labels=out["labels"].astype(np.int64),
        weight=weight, raw=raw, affine=None, _class_index={}, _pad=None,
    )  # fmt: skip
