"""Sample data: seeded synthetic phantoms and the MNI152 brain template with tissue labels.

Imports only numpy at start-up (scipy, nilearn and nibabel load inside the
functions), so napari's sample-data menu never pulls in torch.

* :func:`make_phantom` - a 2D or 3D body with organ-like blobs of distinct mean
  intensity and texture, partial-volume edges, a smooth bias field, Gaussian
  noise and a smooth deformation shared by image and labels. Bit-identical for
  the same arguments.
* :func:`load_mni152` - nilearn's bundled MNI152 2009 T1 template with
  background / grey matter / white matter labels (no download).
* :func:`make_shifted_scan` - a domain-shifted copy of a scan (gamma, scale,
  bias field, other voxel size) for generalisation checks.
* :data:`SAMPLES` and :func:`write_sample` - the named samples of napari's
  menu and of ``napari-selfreg sample NAME -o DIR``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .modelfile import DEFAULT_COLORS

MNI152_CLASSES = ["background", "grey matter", "white matter"]
MNI152_COLORS = ["#000000", "#f58231", "#4363d8"]
_MIN_CLASS_VOXELS = 4


# --------------------------------------------------------------------------- phantoms


def _curve(rng: np.random.Generator, n: int) -> np.ndarray:
    """A smooth random 1D function on ``n`` points with max |value| = 1 (float32)."""
    x = np.linspace(0.0, 1.0, n)
    f = np.zeros(n)
    for k in (1, 2, 3):
        f += rng.normal() / k * np.sin(np.pi * k * x + rng.uniform(0, 2 * np.pi))
    return (f / max(float(np.abs(f).max()), 1e-6)).astype(np.float32)


def _separable(rng: np.random.Generator, shape: tuple[int, ...]) -> list[np.ndarray]:
    """Per-axis smooth curves shaped to broadcast: their product is a smooth field."""
    nd = len(shape)
    return [
        _curve(rng, n).reshape([-1 if a == i else 1 for a in range(nd)])
        for i, n in enumerate(shape)
    ]


def _product_into(out: np.ndarray, factors: list[np.ndarray]) -> None:
    """``out[...] = prod(factors)`` with one full-size write (factors broadcast)."""
    rest = functools.reduce(np.multiply, factors[1:])
    np.multiply(factors[0], rest, out=out)


def _rotation(rng: np.random.Generator, nd: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(nd, nd)))
    return q * np.sign(np.diag(r))


def _ball(rng: np.random.Generator, nd: int) -> np.ndarray:
    g = rng.normal(size=nd)
    return g / np.linalg.norm(g) * rng.uniform() ** (1.0 / nd)


@dataclass
class _Organ:
    centre: np.ndarray
    radii: np.ndarray
    rot: np.ndarray
    lump: float
    freq: np.ndarray
    phase: np.ndarray


def _draw_organs(rng, k: int, nd: int, body_c, body_r, min_r) -> list[_Organ]:
    """K-1 organ blobs: #2 nested in #1, #3 touching #1, the others random (some nested)."""
    organs: list[_Organ] = []
    for i in range(k - 1):
        rot = _rotation(rng, nd)
        lump, freq, phase = rng.uniform(0, 0.25), rng.uniform(1.5, 3.5, 2), rng.uniform(0, 6.3, 2)
        nested = i == 1 or (i >= 3 and rng.uniform() < 0.3)
        if nested:
            parent = organs[0] if i == 1 else organs[int(rng.integers(len(organs)))]
            radii = parent.radii * rng.uniform(0.45, 0.65, nd)
            centre = parent.centre + parent.rot.T @ (0.25 * parent.radii * _ball(rng, nd))
            rot = parent.rot
        else:
            radii = rng.uniform(0.28, 0.48, nd)
            if i == 2:  # adjacent to organ 1
                d = rng.normal(size=nd)
                d /= np.linalg.norm(d)
                centre = organs[0].centre + d * (organs[0].radii.mean() + 0.8 * radii.mean())
            else:
                centre = body_c + body_r * 0.5 * _ball(rng, nd)
        organs.append(_Organ(centre, np.maximum(radii, min_r), rot, lump, freq, phase))
    return organs


def _paint(cls, body, coords, organ: _Organ, value: int, dmax: float) -> None:
    """Set ``cls`` to ``value`` inside the (deformed, lumpy) organ, within the body."""
    shape = cls.shape
    ext = organ.radii.max() / np.sqrt(1.0 - organ.lump) + dmax
    lo = [
        max(0, int(np.floor((c - ext + 1) * (n - 1) / 2)))
        for c, n in zip(organ.centre, shape, strict=True)
    ]
    hi = [
        min(n, int(np.ceil((c + ext + 1) * (n - 1) / 2)) + 1)
        for c, n in zip(organ.centre, shape, strict=True)
    ]
    if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
        return
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    # python floats keep the arithmetic in float32 (numpy scalars would promote to float64)
    rot, radii = organ.rot.tolist(), organ.radii.tolist()
    u = [x[box] - float(c) for x, c in zip(coords, organ.centre, strict=True)]
    v = []
    for j in range(len(u)):
        vj = u[0] * (rot[j][0] / radii[j])
        for b in range(1, len(u)):
            vj += u[b] * (rot[j][b] / radii[j])
        v.append(vj)
    q = v[0] * v[0]
    for vj in v[1:]:
        q += vj * vj
    (f0, f1), (p0, p1) = organ.freq.tolist(), organ.phase.tolist()
    bumps = np.sin(v[0] * f0 + p0)
    bumps *= np.sin(v[1] * f1 + p1)
    bumps *= float(organ.lump)
    bumps += 1.0
    q *= bumps
    inside = (q < 1.0) & body[box]
    cls[box][inside] = value


def make_phantom(
    shape: Sequence[int],
    num_classes: int = 4,
    seed: int | np.random.SeedSequence = 0,
    noise: float = 0.04,
    bias: float = 0.25,
    deform: float = 0.07,
    texture: float = 1.0,
    pv_sigma: float = 0.6,
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded synthetic scan with exact labels, 2D or 3D, any size.

    A body-like ellipsoid (label 0, like the air around it) holds ``num_classes
    - 1`` organ-like blobs (labels 1..K-1; blob 2 nested in blob 1, blob 3
    touching it). Each class has its own mean intensity and texture amplitude
    (fine and coarse correlated noise); the class image is blurred by
    ``pv_sigma`` voxels (partial volume; labels stay exact), multiplied by a
    smooth bias field and Gaussian noise is added. One smooth random
    deformation moves every shape, so image and labels stay consistent.

    Args:
        shape: ``(H, W)`` or ``(D, H, W)``, each side >= 8.
        num_classes: K >= 2 (background included), at most 255.
        seed: same seed and arguments give bit-identical arrays.
        noise: Gaussian noise std (intensities span about 0..1).
        bias: strength of the multiplicative bias field (0: none).
        deform: deformation amplitude as a fraction of the half-extent.
        texture: multiplier of the class texture amplitudes (0: flat classes).
        pv_sigma: partial-volume blur in voxels (0: none).

    Returns:
        ``(image float32, labels uint8)`` of ``shape``; every class is present.
    """
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    if nd not in (2, 3) or min(shape) < 8:
        raise ValueError(f"phantom shape must have 2 or 3 sides of at least 8 voxels, got {shape}")
    if not 2 <= num_classes <= 255:
        raise ValueError(f"num_classes must be in 2..255, got {num_classes}")
    rng = np.random.default_rng(seed)
    work = np.empty(shape, np.float32)
    coords = _deformed_coordinates(rng, shape, deform, work)
    body, body_c, body_r = _body(rng, shape, coords, work)
    cls = _organs(rng, shape, coords, body, body_c, body_r, num_classes, 2.0 * deform)
    del coords
    labels = np.maximum(cls, 1) - 1
    image = _render(rng, cls, num_classes, noise, bias, texture, pv_sigma, work)
    return image, labels.astype(np.uint8, copy=False)


def _deformed_coordinates(rng, shape, deform: float, work: np.ndarray) -> list[np.ndarray]:
    """Normalised coordinates in [-1, 1] per axis plus one smooth random displacement."""
    nd = len(shape)
    axes = [np.linspace(-1, 1, n, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(nd)]) for i, n in enumerate(shape)]  # fmt: skip
    coords = []
    for a in range(nd):
        x = np.empty(shape, np.float32)
        _product_into(x, _separable(rng, shape))
        _product_into(work, _separable(rng, shape))
        x += work
        x *= deform
        x += axes[a]
        coords.append(x)
    return coords


def _body(rng, shape, coords, work: np.ndarray):
    """The body: a lumpy axis-aligned ellipsoid; ``(mask, centre, radii)``."""
    nd = len(shape)
    body_c = rng.uniform(-0.05, 0.05, nd)
    body_r = rng.uniform(0.78, 0.92, nd)
    q = np.zeros(shape, np.float32)
    for a in range(nd):
        np.subtract(coords[a], float(body_c[a]), out=work)
        work *= 1.0 / float(body_r[a])
        np.square(work, out=work)
        q += work
    _product_into(work, _separable(rng, shape))
    work *= 0.12
    work += 1.0
    q *= work
    return q < 1.0, body_c, body_r


def _organs(rng, shape, coords, body, body_c, body_r, num_classes: int, dmax: float):
    """Class map: 0 air, 1 body, ``i + 2`` organ ``i``; every organ gets enough voxels."""
    nd = len(shape)
    min_r = np.array([3.0 / (n - 1) for n in shape])
    for _attempt in range(20):
        organs = _draw_organs(rng, num_classes, nd, body_c, body_r, min_r)
        cls = body.astype(np.uint8)
        for i, organ in enumerate(organs):
            _paint(cls, body, coords, organ, i + 2, dmax)
        counts = np.bincount(cls.ravel(), minlength=num_classes + 1)
        if counts[2:].size == 0 or counts[2:].min() >= _MIN_CLASS_VOXELS:
            return cls
    raise ValueError(f"could not fit {num_classes} classes into a {shape} phantom; use a larger shape or fewer classes")  # fmt: skip


def _render(rng, cls, k: int, noise, bias, texture, pv_sigma, work: np.ndarray) -> np.ndarray:
    """Intensities of a class map: class means and textures, partial volume, bias, noise."""
    from scipy import ndimage

    from .preprocess import resample_to_shape

    shape, nd = cls.shape, cls.ndim
    levels = np.linspace(0.15, 1.0, k)
    levels += rng.uniform(-0.2, 0.2, k) * (0.85 / max(k - 1, 1))
    means = np.concatenate([[0.0], rng.permutation(levels)]).astype(np.float32)
    amp_fine = np.concatenate([[0.0], rng.permutation(np.linspace(0.005, 0.06, k))])
    amp_coarse = np.concatenate([[0.0], rng.permutation(np.linspace(0.0, 0.08, k))])
    image = means[cls]
    # fine texture: white noise of class amplitude, correlated by the partial-volume blur
    # below (its amplitude is pre-compensated for the blur's noise reduction)
    blur_gain = 1.0
    if pv_sigma > 0:
        x = np.arange(-int(3 * pv_sigma + 0.5), int(3 * pv_sigma + 0.5) + 1)
        kernel = np.exp(-0.5 * (x / pv_sigma) ** 2)
        blur_gain = float(np.sqrt((kernel**2).sum()) / kernel.sum()) ** nd
    rng.standard_normal(out=work, dtype=np.float32)
    work *= (amp_fine * (texture / blur_gain)).astype(np.float32)[cls]
    image += work
    small = rng.standard_normal([(n + 1) // 2 for n in shape], dtype=np.float32)
    small = ndimage.gaussian_filter(small, 1.5, truncate=3.0)
    small *= texture / max(float(small.std()), 1e-6)
    coarse = resample_to_shape(small, shape, order=1)
    coarse *= amp_coarse.astype(np.float32)[cls]
    image += coarse
    del coarse, small
    if pv_sigma > 0:
        ndimage.gaussian_filter(image, pv_sigma, output=work, truncate=3.0)
        image, work = work, image
    if bias > 0:
        image *= np.exp(bias * functools.reduce(np.multiply, _separable(rng, shape))).astype(np.float32)  # fmt: skip
    if noise > 0:
        rng.standard_normal(out=work, dtype=np.float32)
        work *= noise
        image += work
    return image


def make_phantom_set(
    n: int, shape: Sequence[int], num_classes: int = 4, seed: int = 0, **kwargs
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` phantoms whose seeds are spawned from ``seed`` (independent, reproducible).

    Extra keyword arguments go to :func:`make_phantom`.
    """
    children = np.random.SeedSequence(seed).spawn(n)
    return [make_phantom(shape, num_classes, seed=child, **kwargs) for child in children]


# --------------------------------------------------------------------------- MNI152


@functools.lru_cache(maxsize=2)
def _mni152(resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=resolution)
    gm = datasets.load_mni152_gm_template(resolution).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution).get_fdata(dtype=np.float32)
    bg = np.clip(1.0 - gm - wm, 0.0, 1.0)
    labels = np.argmax(np.stack([bg, gm, wm]), axis=0).astype(np.uint8)
    image = t1.get_fdata(dtype=np.float32)
    affine = np.asarray(t1.affine, dtype=np.float64)
    for a in (image, labels, affine):
        a.flags.writeable = False
    return image, labels, affine


def load_mni152(resolution: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The MNI152 2009 T1 template with tissue labels, from nilearn's bundled files.

    Labels are the argmax of (clip(1 - gm - wm, 0, 1), gm, wm) of nilearn's grey-
    and white-matter probability maps: 0 background, 1 grey matter, 2 white
    matter (:data:`MNI152_CLASSES`). Loaded once per process; copies are returned.

    Args:
        resolution: 1 (197x233x189 voxels at 1 mm) or 2 (2 mm).

    Returns:
        ``(image float32 in [0, 1], labels uint8, affine (4, 4) float64 RAS mm)``.
    """
    image, labels, affine = _mni152(int(resolution))
    return image.copy(), labels.copy(), affine.copy()


def make_shifted_scan(
    image: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    spacing: float = 1.3,
    gamma: float = 1.5,
    scale: float = 850.0,
    bias_strength: float = 0.3,
    noise: float = 0.01,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A domain-shifted copy of a scan: other contrast, units, bias field and voxel size.

    Intensities are rescaled to [0, 1] (min..max), raised to ``gamma``,
    multiplied by ``scale`` and by a smooth bias field ``exp(bias_strength *
    field)``, plus Gaussian noise of ``noise * scale``; then image (linear) and
    labels (nearest) are resampled to isotropic ``spacing`` mm with
    :func:`~napari_selfreg.preprocess.resample` (grid centres kept).

    Returns:
        ``(image float32, labels, affine)``; the affine is exact for the new grid.
    """
    from .preprocess import resample, resampled_affine

    rng = np.random.default_rng(seed)
    image = np.asarray(image, dtype=np.float32)
    lo, hi = float(image.min()), float(image.max())
    x = np.clip((image - lo) / max(hi - lo, 1e-12), 0.0, 1.0) ** gamma
    x *= scale * np.exp(
        bias_strength * functools.reduce(np.multiply, _separable(rng, image.shape))
    )
    if noise > 0:
        x += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(noise * scale)
    affine = np.asarray(affine, dtype=np.float64)
    nd = image.ndim
    old = np.sqrt((affine[:3, :nd] ** 2).sum(axis=0))
    new_image = resample(x.astype(np.float32), old, spacing, order=1)
    new_labels = resample(np.asarray(labels), old, spacing, order=0)
    new_affine = resampled_affine(affine, image.shape, new_image.shape, ratio=spacing / old)
    return new_image, new_labels, new_affine


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Sample:
    """A named sample volume: ``load() -> (image, labels, affine)`` plus its classes."""

    name: str
    display_name: str
    load: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]
    class_names: list[str]
    class_colors: list[str]


def _phantom_sample() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shape = (96, 112, 96)
    image, labels = make_phantom(shape, num_classes=4, seed=0)
    affine = np.eye(4)
    affine[:3, 3] = -(np.array(shape) - 1) / 2  # 1 mm voxels, world origin at the centre
    return image, labels, affine


SAMPLES: dict[str, Sample] = {
    "mni152": Sample(
        "mni152", "MNI152 brain (T1 + tissue labels)", load_mni152, MNI152_CLASSES, MNI152_COLORS
    ),
    "phantom": Sample(
        "phantom",
        "Synthetic phantom (4 classes)",
        _phantom_sample,
        ["background", "organ 1", "organ 2", "organ 3"],
        DEFAULT_COLORS[:4],
    ),
}


def write_sample(name: str, out_dir: str | Path) -> tuple[Path, Path]:
    """Write a sample as ``NAME_image.nii.gz`` and ``NAME_labels.nii.gz`` in ``out_dir``;
    a file of that name already there is kept (it may be the user's, edited).

    Raises:
        ValueError: unknown sample name (the message lists the valid ones).
    """
    from . import io

    if name not in SAMPLES:
        raise ValueError(f"unknown sample {name!r}; choose one of: {', '.join(SAMPLES)}")
    image, labels, affine = SAMPLES[name].load()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_path, labels_path = out / f"{name}_image.nii.gz", out / f"{name}_labels.nii.gz"
    if not image_path.exists():
        io.write_volume(image_path, image, affine=affine, overwrite=False)
    if not labels_path.exists():
        io.write_labels(labels_path, labels, affine=affine, overwrite=False)
    return image_path, labels_path
