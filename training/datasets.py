"""Training data: cases from NIfTI folders or arrays, a saved train/val split, patch sampling.

A :class:`Case` holds one normalised image ``(C, *S)``, its integer labels ``(*S)``
and optional voxel weights and focus voxels (the voxels a user corrected). The
split is drawn once from the seed, written into the model card and reused on
resume or when passed back in (``TrainConfig.split``), so validation never leaks
into training across runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import LabelError, TrainingError

_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh", ".mnc", ".tif", ".tiff", ".img", ".hdr")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # nnU-Net style image_0000


@dataclass
class Case:
    """One training volume (or 2D image).

    Attributes:
        name: case name (file stem); crops carry ``name[axis:start-stop]``.
        image: normalised intensities ``(C, *S)`` float32.
        labels: class indices ``(*S)`` int64.
        weight: voxel loss weights ``(*S)`` float32 (None: all 1; 0 ignores a voxel).
        focus: flat indices of voxels to centre patches on (corrected voxels).
        raw: the image as read (for whole-volume validation through the predictor).
        affine: voxel-to-world matrix of the volume, if known.
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    weight: np.ndarray | None = None
    focus: np.ndarray | None = None
    raw: np.ndarray | None = None
    affine: np.ndarray | None = None
    _class_index: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _pad: np.ndarray | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.labels.shape)

    def pad_values(self) -> np.ndarray:
        """Per-channel minimum ``(C,)``: the intensity of voxels outside the volume."""
        if self._pad is None:
            self._pad = self.image.reshape(self.image.shape[0], -1).min(axis=1)
        return self._pad

    def class_index(self, rng: np.random.Generator, cap: int = 100_000) -> dict[int, np.ndarray]:
        """Flat voxel indices of every class present among the voxels the loss sees
        (weight > 0), at most ``cap`` each; background only when the case has weights
        (then unweighted voxels are unknown, and background must be seen where known)."""
        if not self._class_index:
            flat = self.labels.ravel()
            known = None if self.weight is None else self.weight.ravel() > 0
            for c in np.unique(flat if known is None else flat[known]):
                if c == 0 and known is None:
                    continue
                idx = np.flatnonzero(flat == c if known is None else (flat == c) & known)
                if idx.size > cap:
                    idx = np.sort(rng.choice(idx, cap, replace=False))
                self._class_index[int(c)] = idx
        return self._class_index


def normalize_image(image: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Normalise one channel with the project's normaliser (the predictor uses the same)."""
    from napari_selfreg.preprocess import normalize

    return np.asarray(normalize(image, spec), dtype=np.float32)


def check_labels(
    labels: np.ndarray, name: str, label_map: dict[int, int] | None = None
) -> np.ndarray:
    """Integer class indices ``(*S)`` int64 from a label array; raise :class:`LabelError`.

    Rejects non-integer and negative values and applies ``label_map`` (old -> new).
    """
    labels = np.asarray(labels)
    if labels.dtype.kind == "b":
        labels = labels.astype(np.int64)
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise LabelError(
                f"labels of {name} are not whole numbers; a label map must hold class "
                "indices (0 = background, 1, 2, ...)"
            )
    elif labels.dtype.kind not in "iu":
        raise LabelError(f"labels of {name} have type {labels.dtype}; expected integers")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise LabelError(
            f"labels of {name} contain negative values ({int(labels.min())}); "
            "use 0 for background and 1, 2, ... for classes"
        )
    if label_map:
        lut_size = max(int(labels.max()) if labels.size else 0, *label_map) + 1
        lut = np.arange(lut_size, dtype=np.int64)
        for old, new in label_map.items():
            if old >= 0:
                lut[old] = new
        labels = lut[labels]
    return labels


def number_new_classes(
    labels: np.ndarray, known: int, names: list[str] | None = None
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Label values ``>= known`` become the classes ``known, known + 1, ...`` in ascending
    order (a painted 7 on a 3-class model is class 3, not class 7 after four empty ones).

    Returns the renumbered labels and ``(painted value, name)`` per new class; ``names``
    go to the new values in order (default ``class <value>``). More names than new
    values raise :class:`LabelError`; with no new value they are ignored (a widget
    keeps them for the next round).
    """
    if not labels.size or labels.max() < known:
        return labels, []
    values = [int(v) for v in np.unique(labels) if v >= known]
    names = list(names or [])
    if len(names) > len(values):
        raise LabelError(
            f"{len(names)} names for new classes ({', '.join(names)}) but the labels hold "
            f"{len(values)} value(s) the model does not know ({', '.join(map(str, values))})"
        )
    lut = np.arange(max(values) + 1, dtype=np.int64)
    lut[values] = np.arange(known, known + len(values))
    added = [(v, names[i] if i < len(names) else f"class {v}") for i, v in enumerate(values)]
    return lut[labels], added


def _as_channels_first(image: np.ndarray, spatial: tuple[int, ...], name: str) -> np.ndarray:
    if image.shape == spatial:
        return image[None]
    if image.ndim == len(spatial) + 1 and image.shape[1:] == spatial:
        return image
    if image.ndim == len(spatial) + 1 and image.shape[:-1] == spatial:
        return np.moveaxis(image, -1, 0)
    raise LabelError(
        f"image and labels of {name} differ in shape ({image.shape} vs {spatial}); "
        "resample the labels onto the image grid"
    )


def case_from_arrays(
    image: np.ndarray,
    labels: np.ndarray,
    changed: np.ndarray | None = None,
    *,
    name: str = "image",
    normalization: dict[str, Any] | None = None,
    label_map: dict[int, int] | None = None,
    affine: np.ndarray | None = None,
    weight: np.ndarray | None = None,
) -> Case:
    """A case from in-memory arrays (what the Fine-tune widget passes).

    Args:
        image: intensities ``(*S)`` or ``(C, *S)``.
        labels: class indices ``(*S)``.
        changed: bool ``(*S)``, the voxels the user corrected (patches are centred on them).
        name: case name for messages and the model card.
        normalization: the model card's normalisation spec.
        label_map: remap label values first.
        affine: voxel-to-world matrix (kept for the record).
        weight: voxel loss weights ``(*S)``.
    """
    labels = check_labels(labels, name, label_map)
    raw = np.asarray(image)
    chw = _as_channels_first(raw, labels.shape, name)
    spec = normalization or {"method": "zscore"}
    norm = np.stack([normalize_image(c.astype(np.float32), spec) for c in chw])
    focus = None
    if changed is not None:
        changed = np.asarray(changed, dtype=bool)
        if changed.shape != labels.shape:
            raise LabelError(
                f"the mask of changed voxels of {name} has shape {changed.shape}, "
                f"the labels {labels.shape}"
            )
        focus = np.flatnonzero(changed.ravel())
    if weight is not None:
        weight = np.asarray(weight, dtype=np.float32)
    return Case(name, norm, labels, weight, focus, raw, affine)


def case_name(path: Path) -> str:
    """File name without its image suffix (``a.nii.gz`` -> ``a``)."""
    name = path.name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _list_files(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise TrainingError(f"{what} folder {folder} does not exist")
    found = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())
    files = [p for p in found if p.name.lower().endswith(_SUFFIXES)]
    if not files:
        seen = ""
        if found:  # files of another type, e.g. .nrrd, which training does not read
            more = f" and {len(found) - 1} more" if len(found) > 1 else ""
            seen = f"; {found[0].name!r}{more} of another type - convert to NIfTI (.nii.gz)"
        raise TrainingError(
            f"{what} folder {folder} holds no image files ({', '.join(_SUFFIXES)}){seen}"
        )
    return files


def pair_files(images: Path, labels: Path) -> list[tuple[str, list[Path], Path]]:
    """Match image and label files by name: ``(case, [image channel files], label file)``.

    Image files ``<case>_0000``, ``<case>_0001`` ... are the channels of ``<case>``.
    """
    label_files = {case_name(p): p for p in _list_files(Path(labels), "labels")}
    image_files: dict[str, list[tuple[int, Path]]] = {}
    for p in _list_files(Path(images), "images"):
        stem = case_name(p)
        match = _CHANNEL.match(stem)
        if stem not in label_files and match and match["case"] in label_files:
            image_files.setdefault(match["case"], []).append((int(match["channel"]), p))
        else:
            image_files.setdefault(stem, []).append((0, p))
    missing = sorted(set(image_files) - set(label_files))
    orphans = sorted(set(label_files) - set(image_files))
    if missing:
        raise TrainingError(
            f"no labels for {len(missing)} image(s) (e.g. {missing[0]!r}); label files "
            "must have the same name as their image"
        )
    if orphans:
        raise TrainingError(f"no image for {len(orphans)} label file(s) (e.g. {orphans[0]!r})")
    return [
        (name, [p for _, p in sorted(image_files[name])], label_files[name])
        for name in sorted(image_files)
    ]


def load_folder(
    images: str | Path,
    labels: str | Path,
    normalization: dict[str, Any] | None = None,
    label_map: dict[int, int] | None = None,
) -> list[Case]:
    """Cases from a folder of images and a folder of labels matched by name.

    Raises:
        TrainingError: unmatched files; :class:`LabelError` for labels that do
            not fit their image (shape or affine) or are not class indices.
    """
    from napari_selfreg.io import VolumeReadError, read_volume

    cases = []
    for name, image_paths, label_path in pair_files(Path(images), Path(labels)):
        try:
            lab = read_volume(label_path)
            channels = [read_volume(p) for p in image_paths]
        except VolumeReadError as err:
            raise TrainingError(f"cannot read case {name}: {err}") from err
        lab_data = np.asarray(lab.data)
        for vol in channels:
            data = np.asarray(vol.data)
            if data.shape[: lab_data.ndim] != lab_data.shape and data.shape != lab_data.shape:
                raise LabelError(
                    f"image and labels of {name} differ in shape ({data.shape} vs "
                    f"{lab_data.shape}); resample the labels onto the image grid"
                )
            shift = float(np.max(np.abs(np.asarray(vol.affine) - np.asarray(lab.affine))))
            if shift > 1e-3:
                raise LabelError(
                    f"image and labels of {name} have different affines (up to {shift:.3g} "
                    "apart); they must share one voxel grid - resample the labels onto the image"
                )
        if len(channels) == 1:
            image = np.asarray(channels[0].data)
        else:
            image = np.stack([np.asarray(v.data) for v in channels])
        cases.append(
            case_from_arrays(
                image,
                lab_data,
                name=name,
                normalization=normalization,
                label_map=label_map,
                affine=np.asarray(lab.affine),
            )
        )
    return cases


# --------------------------------------------------------------------- split


def make_split(cases: list[Case], val_fraction: float, seed: int) -> dict[str, Any]:
    """Draw a train/validation split; one case is split into two slabs.

    Whole cases are held out when there are at least two (at least one in each
    part). A single case gives its last ``val_fraction`` along its longest axis.
    """
    names = sorted(c.name for c in cases)
    if val_fraction <= 0:
        return {"train": names, "val": [], "seed": seed}
    if len(cases) >= 2:
        n_val = min(len(names) - 1, max(1, round(val_fraction * len(names))))
        order = np.random.default_rng(seed).permutation(len(names))
        val = sorted(names[i] for i in order[:n_val])
        return {"train": [n for n in names if n not in val], "val": val, "seed": seed}
    case = cases[0]
    axis = int(np.argmax(case.shape))
    size = case.shape[axis]
    n_val = max(1, math.ceil(val_fraction * size))
    if size - n_val < 1:
        return {"train": names, "val": [], "seed": seed}
    cut = size - n_val
    return {
        "train": [{"case": case.name, "axis": axis, "start": 0, "stop": cut}],
        "val": [{"case": case.name, "axis": axis, "start": cut, "stop": size}],
        "seed": seed,
    }


def _crop(case: Case, axis: int, start: int, stop: int) -> Case:
    sl = [slice(None)] * len(case.shape)
    sl[axis] = slice(start, stop)
    sl_t = tuple(sl)
    focus = None
    if case.focus is not None:
        mask = np.zeros(case.labels.size, dtype=bool)
        mask[case.focus] = True
        focus = np.flatnonzero(mask.reshape(case.shape)[sl_t].ravel())
    raw = None
    if case.raw is not None:
        raw = case.raw[sl_t] if case.raw.shape == case.shape else case.raw[(slice(None), *sl_t)]
    return Case(
        f"{case.name}[{axis}:{start}-{stop}]",
        np.ascontiguousarray(case.image[(slice(None), *sl_t)]),
        np.ascontiguousarray(case.labels[sl_t]),
        None if case.weight is None else np.ascontiguousarray(case.weight[sl_t]),
        focus,
        raw,
        case.affine,
    )


def apply_split(cases: list[Case], split: dict[str, Any]) -> tuple[list[Case], list[Case]]:
    """Training and validation cases of a split from :func:`make_split`."""
    by_name = {c.name: c for c in cases}

    def pick(entry: Any) -> Case:
        name = entry["case"] if isinstance(entry, dict) else entry
        if name not in by_name:
            raise TrainingError(
                f"the saved train/val split names case {name!r}, which is not in the data; "
                "train on the same data or start a new run without the saved split"
            )
        if isinstance(entry, dict):
            return _crop(
                by_name[name], int(entry["axis"]), int(entry["start"]), int(entry["stop"])
            )
        return by_name[name]

    train = [pick(e) for e in split.get("train", [])]
    val = [pick(e) for e in split.get("val", [])]
    used = {e["case"] if isinstance(e, dict) else e for e in [*split["train"], *split["val"]]}
    train += [c for c in cases if c.name not in used]  # cases added since the split was drawn
    if not train:
        raise TrainingError("the split leaves no case for training")
    return train, val


def summarize(cases: list[Case], num_classes: int) -> dict[str, Any]:
    """A JSON-ready data summary for the model card: cases, shapes, voxels per class."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for case in cases:
        counts += np.bincount(case.labels.ravel(), minlength=num_classes)[:num_classes]
    return {
        "cases": len(cases),
        "names": [c.name for c in cases][:200],
        "shapes": [list(c.shape) for c in cases][:200],
        "channels": int(cases[0].image.shape[0]) if cases else 0,
        "voxels_per_class": counts.tolist(),
    }


# ------------------------------------------------------------------ patches


class PatchSampler:
    """Random patches with foreground, class and focus oversampling.

    Args:
        cases: training cases.
        patch_size: patch in array axis order (``spatial_dims`` values).
        spatial_dims: 2 or 3 (a 2D patch of a 3D case is taken from one slice).
        slice_axis: axis of 3D cases along which 2D patches are sliced.
        fg_fraction: share of patches centred on a labelled voxel, the class
            drawn uniformly among the classes the case holds.
        focus_fraction: share of patches centred on a focus (corrected) voxel.
        rng: random source.
    """

    def __init__(
        self,
        cases: list[Case],
        patch_size: tuple[int, ...],
        spatial_dims: int,
        *,
        slice_axis: int = 0,
        fg_fraction: float = 0.5,
        focus_fraction: float = 0.0,
        rng: np.random.Generator,
    ):
        if len(patch_size) != spatial_dims:
            raise TrainingError(
                f"patch size {tuple(patch_size)} has {len(patch_size)} axes; the model is "
                f"{spatial_dims}D"
            )
        for case in cases:
            if case.labels.ndim not in (spatial_dims, 3) or case.labels.ndim < spatial_dims:
                raise LabelError(
                    f"case {case.name} is {case.labels.ndim}D; a {spatial_dims}D model "
                    "trains on 2D images or 3D volumes"
                )
        self.cases = cases
        self.patch_size = tuple(patch_size)
        self.spatial_dims = spatial_dims
        self.slice_axis = slice_axis
        self.fg_fraction = fg_fraction
        self.focus_fraction = focus_fraction
        self.rng = rng

    def _centre(self, case: Case) -> np.ndarray:
        rng = self.rng
        u = rng.random()
        flat = None
        if case.focus is not None and case.focus.size and u < self.focus_fraction:
            flat = case.focus[rng.integers(case.focus.size)]
        elif u < self.focus_fraction + self.fg_fraction or case.weight is not None:
            # a case with weights is centred on voxels the loss sees, class by class
            index = case.class_index(rng)
            if index:
                voxels = index[list(index)[rng.integers(len(index))]]
                flat = voxels[rng.integers(voxels.size)]
        if flat is None:
            return np.array([rng.integers(s) for s in case.shape])
        return np.array(np.unravel_index(flat, case.shape))

    def _window(self, case: Case, centre: np.ndarray) -> list[tuple[int, int]]:
        """(start, size) per case axis; the slice axis of a 2D patch gets size 1."""
        axes = list(range(case.labels.ndim))
        if self.spatial_dims == 2 and case.labels.ndim == 3:
            patch_axes = [a for a in axes if a != self.slice_axis % 3]
        else:
            patch_axes = axes
        window = [(int(centre[a]), 1) for a in axes]
        for a, p in zip(patch_axes, self.patch_size, strict=True):
            s = case.shape[a]
            start = int(centre[a]) - int(self.rng.integers(p // 4, p - p // 4 + 1))
            lo, hi = min(0, s - p), max(0, s - p)
            if s < p:
                start = (s - p) // 2
            window[a] = (int(np.clip(start, lo, hi)), p)
        return window

    def centred(self, case: Case, centre) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The patch centred on voxel ``centre`` (moved inside the case, padded where the
        case is smaller): ``(image (C, *P), labels (*P), weight (*P))``, weight 0 outside."""
        window = []
        for c, p, s in zip(centre, self.patch_size, case.shape, strict=True):
            window.append((max(0, min(s - p, int(c) - p // 2)), p))
        return self._extract(case, window)

    def _extract(self, case: Case, window: list[tuple[int, int]]):
        size = [n for _, n in window]
        src, dst = [], []
        for (start, n), s in zip(window, case.shape, strict=True):
            a, b = max(start, 0), min(start + n, s)
            src.append(slice(a, b))
            dst.append(slice(a - start, b - start))
        src_t, dst_t = tuple(src), tuple(dst)
        channels = case.image.shape[0]
        image = np.empty((channels, *size), dtype=np.float32)
        image[:] = case.pad_values().reshape(-1, *[1] * len(size))
        image[(slice(None), *dst_t)] = case.image[(slice(None), *src_t)]
        labels = np.zeros(size, dtype=np.int64)
        labels[dst_t] = case.labels[src_t]
        weight = np.zeros(size, dtype=np.float32)
        weight[dst_t] = 1.0 if case.weight is None else case.weight[src_t]
        if self.spatial_dims == 2 and case.labels.ndim == 3:
            axis = self.slice_axis % 3
            image = np.take(image, 0, axis=axis + 1)
            labels = np.take(labels, 0, axis=axis)
            weight = np.take(weight, 0, axis=axis)
        return image, labels, weight

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image (B, C, *P) float32, labels (B, *P) int64, weight (B, *P) float32)``."""
        out = []
        for _ in range(batch_size):
            case = self.cases[self.rng.integers(len(self.cases))]
            out.append(self._extract(case, self._window(case, self._centre(case))))
        return tuple(np.stack(parts) for parts in zip(*out, strict=True))  # type: ignore[return-value]
