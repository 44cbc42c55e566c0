"""Brain MRI synthesised from label maps: the training data of the default model.

SynthSeg (Billot et al., Medical Image Analysis 2023) trains a network only on
images rendered from label maps with random contrast, resolution and artefacts,
and it segments real scans of any contrast and resolution, skull on or off. This
is our equivalent for one anatomy (the MNI152 template brain, wrapped in the
procedural heads of :mod:`.heads`):

* :func:`draw_subject` draws a random subject: a head from a pool, a random affine
  (rotation, scaling, shear, shift) and elastic deformation, a field of view (neck
  in or out, or a skull-stripped brain), a contrast (T1-, T2- or PD-like priors or
  a fully random Gaussian mixture per tissue; the brain rendered from the template's
  tissue maps or from its real T1 remapped, so real texture is seen too), gamma,
  bias field, blur and resolution (1-5 mm, isotropic or thick slices along any
  axis), Rician noise and a left-right flip.
* :func:`render` renders any box of a subject's voxel grid (1 mm, RAS axes up to
  the subject's rotation) in torch: intensities and labels (0 background and every
  tissue but the brain's, 1 grey matter, 2 white matter: the template maps' argmax
  inside its brain mask, deformed with the image).
* :class:`SyntheticPatches` is a patch source of the training loop: every patch
  comes from a new subject, normalised with statistics of that subject's whole
  field of view (a coarse render), as the predictor normalises a whole volume.
* :func:`render_volume` renders a whole subject (validation, benchmarks).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import heads as H

# Contrast priors on a [0, 1] scale: (T1, T2, PD) ranges per tissue; brain tissue by name.
PRIORS: dict[str, tuple[tuple[float, float], ...]] = {
    "air": ((0.0, 0.03), (0.0, 0.03), (0.0, 0.03)),
    "csf": ((0.04, 0.25), (0.75, 1.0), (0.65, 0.9)),
    "gm": ((0.35, 0.55), (0.45, 0.65), (0.55, 0.75)),
    "wm": ((0.6, 0.85), (0.25, 0.42), (0.42, 0.6)),
    "bone": ((0.0, 0.12), (0.0, 0.12), (0.0, 0.15)),
    "marrow": ((0.35, 0.95), (0.25, 0.65), (0.4, 0.8)),
    "fat": ((0.6, 1.0), (0.45, 0.95), (0.55, 0.95)),
    "skin": ((0.3, 0.65), (0.3, 0.65), (0.45, 0.75)),
    "muscle": ((0.22, 0.55), (0.12, 0.35), (0.35, 0.62)),
    "eye": ((0.04, 0.25), (0.75, 1.0), (0.65, 0.9)),
    "dura": ((0.0, 0.8), (0.0, 0.8), (0.0, 0.8)),
    "mucosa": ((0.3, 0.6), (0.6, 1.0), (0.5, 0.85)),
    "cord": ((0.55, 0.85), (0.25, 0.45), (0.42, 0.62)),
    "soft tissue": ((0.3, 0.6), (0.3, 0.7), (0.45, 0.75)),
}
_CODE_PRIOR = ["air", None, "csf", "bone", "marrow", "fat", "skin", "muscle", "eye", "dura",
               "mucosa", "cord", "soft tissue"]  # fmt: skip
CONTRASTS = ("t1", "t2", "pd", "random")


@dataclass(frozen=True)
class SynthSettings:
    """Probabilities and ranges of a synthetic subject (the defaults train the model)."""

    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.88, 1.12)
    shear: float = 0.03
    shift_mm: float = 12.0
    elastic_mm: tuple[float, float] = (0.0, 3.0)  # std of a coarse (5^3) displacement grid
    fine_elastic_mm: tuple[float, float] = (0.0, 1.2)  # std of a finer (11^3) one
    contrast: tuple[float, float, float, float] = (0.55, 0.15, 0.1, 0.2)  # t1, t2, pd, random
    real_t1: float = 0.5  # brain intensities from the template T1, remapped to the contrast
    tissue_std: tuple[float, float] = (0.0, 0.05)
    skull_stripped: float = 0.25
    stripped_rim: float = 0.3  # share of skull-stripped subjects that keep a CSF rim
    neck: float = 0.6  # probability that the field of view reaches into the neck
    thick_slices: float = 0.2  # thick slices (2-5 mm) along a random axis
    low_resolution: float = 0.3  # isotropic 1.2-3 mm
    partial_volume_sigma: float = 0.5  # max blur (voxels) of 1 mm scans
    noise: tuple[float, float] = (0.0, 0.05)
    bias: tuple[float, float] = (0.0, 0.35)
    gamma_std: float = 0.25
    flip: float = 0.5
    template: float = 0.04  # the template T1 itself, no deformation, no artefacts


@dataclass
class Subject:
    """One synthetic subject: where its voxels come from and how they look."""

    head: int
    matrix: np.ndarray  # (3, 3) subject mm -> template mm, about heads.HEAD_CENTRE
    shift: np.ndarray  # (3,) mm
    elastic: torch.Tensor  # (1, 3, g, g, g) displacement (mm) over the field of view
    fov_origin: np.ndarray  # (3,) subject mm of voxel (0, 0, 0)
    fov_shape: tuple[int, int, int]
    means: np.ndarray  # (13,) mean intensity per head code (BRAIN unused)
    stds: np.ndarray  # (13,)
    brain_means: np.ndarray  # (3,) CSF, grey matter, white matter
    brain_stds: np.ndarray  # (3,)
    real_t1: bool
    stripped: bool = False
    keep_rim: bool = False
    gamma: float = 1.0
    bias: torch.Tensor | None = None  # (1, 1, 4, 4, 4) log-field over the field of view
    resolution: tuple[float, float, float] = (1.0, 1.0, 1.0)
    blur: tuple[float, float, float] = (0.0, 0.0, 0.0)
    noise: float = 0.0
    flip: bool = False
    contrast: str = "t1"
    notes: dict[str, Any] = field(default_factory=dict)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    out = np.eye(3)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        a = math.radians(rng.uniform(-max_deg, max_deg))
        r = np.eye(3)
        r[i, i] = r[j, j] = math.cos(a)
        r[i, j], r[j, i] = -math.sin(a), math.sin(a)
        out = r @ out
    return out


def draw_contrast(rng: np.random.Generator, kind: str, settings: SynthSettings):
    """``(means (13,), stds (13,), brain_means (3,), brain_stds (3,))`` for a contrast kind."""
    if kind == "random":
        while True:
            brain = rng.uniform(0, 1, 3)
            if abs(brain[1] - brain[2]) >= 0.12 and abs(brain[0] - brain[1]) >= 0.08:
                break
        means = rng.uniform(0, 1, 13)
        means[H.CORD] = brain[2] * rng.uniform(0.85, 1.1)
        stds = rng.uniform(0, 1.6 * settings.tissue_std[1], 13)
    else:
        k = CONTRASTS.index(kind)
        brain = np.array([rng.uniform(*PRIORS[t][k]) for t in ("csf", "gm", "wm")])
        order = {"t1": (0, 1, 2), "t2": (2, 1, 0), "pd": (2, 1, 0)}[kind]  # dark to bright
        for lo, hi in itertools.pairwise(order):  # keep the tissue order with a margin
            brain[hi] = max(brain[hi], brain[lo] + 0.08)
        means = np.array([rng.uniform(*PRIORS[p][k]) if p else 0.0 for p in _CODE_PRIOR])
        stds = rng.uniform(*settings.tissue_std, 13)
    means[H.AIR], stds[H.AIR] = rng.uniform(0, 0.03), 0.0
    means[H.CSF] = brain[0]
    brain_stds = rng.uniform(*settings.tissue_std, 3)
    return means, stds, brain, brain_stds


def draw_subject(
    rng: np.random.Generator, settings: SynthSettings | None = None, n_heads: int = 1
) -> Subject:
    """A random :class:`Subject` (see the module docstring)."""
    s = settings or SynthSettings()
    kind = CONTRASTS[int(rng.choice(4, p=np.asarray(s.contrast) / sum(s.contrast)))]
    means, stds, brain, brain_stds = draw_contrast(rng, kind, s)
    if rng.uniform() < s.template:  # the template T1 as it is (what the sample shows)
        return Subject(
            head=0, matrix=np.eye(3), shift=np.zeros(3), elastic=torch.zeros(1, 3, 2, 2, 2),
            fov_origin=np.array([-98.0, -134.0, -72.0]), fov_shape=(197, 233, 189),
            means=means, stds=stds * 0, brain_means=brain, brain_stds=np.zeros(3),
            real_t1=True, stripped=True, contrast="template",
        )  # fmt: skip
    rot = _rotation(rng, s.rotation_deg)
    scale = np.diag(rng.uniform(*s.scale, 3) * rng.uniform(0.97, 1.03))
    shear = np.eye(3) + np.triu(rng.uniform(-s.shear, s.shear, (3, 3)), 1)
    matrix = rot @ scale @ shear
    stripped = rng.uniform() < s.skull_stripped
    if stripped:  # a brain-sized field of view
        lo = np.array([-76.0, -110.0, -76.0]) - rng.uniform(0, 20, 3)
        hi = np.array([76.0, 76.0, 86.0]) + rng.uniform(0, 20, 3)
    else:
        bottom = rng.uniform(-190, -110) if rng.uniform() < s.neck else rng.uniform(-100, -60)
        lo = np.array([-rng.uniform(80, 100), -rng.uniform(112, 135), bottom])
        hi = np.array([rng.uniform(80, 100), rng.uniform(98, 125), rng.uniform(92, 115)])
    shape = tuple(int(v) for v in np.round(hi - lo))
    elastic = rng.normal(0, rng.uniform(*s.elastic_mm), (1, 3, 5, 5, 5))
    fine = rng.normal(0, rng.uniform(*s.fine_elastic_mm), (1, 3, 11, 11, 11))
    fine_t = torch.from_numpy(fine.astype(np.float32))
    disp = F.interpolate(torch.from_numpy(elastic.astype(np.float32)), size=(11, 11, 11),
                         mode="trilinear", align_corners=True) + fine_t  # fmt: skip
    u = rng.uniform()
    if u < s.thick_slices:
        res = np.full(3, rng.uniform(0.8, 1.2))
        res[rng.integers(3)] = rng.uniform(2.0, 5.0)
    elif u < s.thick_slices + s.low_resolution:
        res = np.full(3, rng.uniform(1.2, 3.0))
    else:
        res = np.ones(3)
    blur = np.where(res > 1.05, 0.42 * res, rng.uniform(0, s.partial_volume_sigma))
    return Subject(
        head=int(rng.integers(n_heads)),
        matrix=matrix,
        shift=rng.uniform(-s.shift_mm, s.shift_mm, 3),
        elastic=disp,
        fov_origin=lo,
        fov_shape=shape,  # type: ignore[arg-type]
        means=means,
        stds=stds,
        brain_means=brain,
        brain_stds=brain_stds,
        real_t1=bool(rng.uniform() < s.real_t1),
        stripped=bool(stripped),
        keep_rim=bool(stripped and rng.uniform() < s.stripped_rim),
        gamma=float(np.exp(rng.normal(0, s.gamma_std))),
        bias=torch.from_numpy(
            rng.normal(0, rng.uniform(*s.bias), (1, 1, 4, 4, 4)).astype(np.float32)
        ),  # fmt: skip
        resolution=tuple(float(r) for r in res),  # type: ignore[arg-type]
        blur=tuple(float(b) for b in blur),  # type: ignore[arg-type]
        noise=float(rng.uniform(*s.noise)),
        flip=bool(rng.uniform() < s.flip),
        contrast=kind,
    )


# ----------------------------------------------------------------------------- rendering


def _field_on_box(field_: torch.Tensor, subject: Subject, lo, shape, step: float) -> torch.Tensor:
    """A coarse field over the field of view ``(1, C, g, g, g)`` on a box's voxels ``(C, *shape)``.

    The field is sampled every ~8 mm and linearly upsampled (it is smooth on that scale).
    """
    span = np.maximum(np.asarray(subject.fov_shape, float) - 1, 1)
    coarse = [max(2, int(math.ceil(n * step / 8.0)) + 1) for n in shape]
    axes = []
    for lo_, n, m, sp in zip(lo, shape, coarse, span, strict=True):
        first, last = float(lo_), float(lo_) + (n - 1) * step
        axes.append(torch.linspace(first, last, m) * (2 / sp) - 1)
    grid = torch.stack(torch.meshgrid(*axes[::-1], indexing="ij"), dim=-1).permute(2, 1, 0, 3)
    out = F.grid_sample(field_, grid[None], mode="bilinear", padding_mode="border", align_corners=True)  # fmt: skip
    return F.interpolate(out, size=tuple(shape), mode="trilinear", align_corners=True)[0]


def template_points(subject: Subject, lo, shape, step: float = 1.0) -> torch.Tensor:
    """Template (head-frame world) mm of a box's voxels, ``(X, Y, Z, 3)`` in (z, y, x) order.

    Subject voxel ``v`` sits at subject mm ``fov_origin + v``; template mm =
    ``matrix (p - centre) + centre + shift + elastic(p)``.
    """
    m = np.ascontiguousarray(np.asarray(subject.matrix, dtype=np.float64)[::-1])  # (z, y, x) rows
    start = subject.fov_origin + np.asarray(lo, float)
    offset = m @ (start - H.HEAD_CENTRE) + (H.HEAD_CENTRE + subject.shift)[::-1]
    out = torch.tensor(offset, dtype=torch.float32).expand(*shape, 3).clone()
    for axis, n in enumerate(shape):
        ramp = torch.arange(n, dtype=torch.float32) * step
        col = torch.tensor(m[:, axis], dtype=torch.float32)
        view = [1, 1, 1, 3]
        view[axis] = n
        out += (ramp[:, None] * col).view(view)
    if subject.elastic.abs().max() > 0:
        disp = _field_on_box(subject.elastic, subject, lo, shape, step)  # (3, *shape) in x, y, z
        out += disp.flip(0).permute(1, 2, 3, 0)
    return out


def _tissue_at(anat: H.Anatomy, tissue: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Grey matter, white matter and T1 at template mm ``pts`` (trilinear) ``(3, X, Y, Z)``."""
    size = torch.tensor(anat.tissue.shape[1:][::-1], dtype=torch.float32)
    origin = torch.tensor(anat.tissue_origin[::-1].copy(), dtype=torch.float32)
    norm = (pts - origin) * (2 / (size - 1)) - 1
    return F.grid_sample(tissue, norm[None], mode="bilinear", padding_mode="zeros", align_corners=True)[0]  # fmt: skip


def _codes_at(head: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Values of a head-frame array at template mm ``pts`` (nearest; 0 outside the frame)."""
    idx = torch.round(pts - torch.tensor(H.FRAME_ORIGIN[::-1].copy(), dtype=torch.float32)).long()
    size = torch.tensor(H.FRAME_SHAPE[::-1])
    inside = ((idx >= 0) & (idx < size)).all(-1)
    idx = torch.minimum(idx.clamp_min(0), size - 1)
    flat = (idx[..., 2] * size[1] + idx[..., 1]) * size[0] + idx[..., 0]
    values = head.view(-1)[flat.view(-1)].view(flat.shape)
    return torch.where(inside, values, torch.zeros((), dtype=values.dtype))


def _brain_intensity(subject: Subject, anat: H.Anatomy, tissue: torch.Tensor) -> tuple:
    gm, wm, t1 = tissue
    csf = (1 - gm - wm).clamp_min(0)
    m, sd = subject.brain_means, subject.brain_stds
    std = csf * float(sd[0]) + gm * float(sd[1]) + wm * float(sd[2])
    if subject.contrast == "template":
        return t1, torch.zeros_like(t1)
    if not subject.real_t1:
        return csf * float(m[0]) + gm * float(m[1]) + wm * float(m[2]), std
    # the real template T1 through a piecewise-linear map of its CSF/GM/WM means
    (c, g, w), (mc, mg, mw) = anat.t1_means, (float(v) for v in m)
    low = mc + (t1 - c) * ((mg - mc) / (g - c))
    high = mg + (t1 - g) * ((mw - mg) / (w - g))
    return torch.where(t1 < g, low, high).clamp_min(0), std


def _gaussian_blur(x: torch.Tensor, sigma) -> torch.Tensor:
    """Separable Gaussian blur of ``(X, Y, Z)`` (edges replicated)."""
    out = x[None, None]
    for axis, s in enumerate(sigma):
        if s < 0.2:
            continue
        r = int(math.ceil(3 * s))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / s) ** 2)
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 2 * r + 1
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        out = F.conv3d(F.pad(out, pad, mode="replicate"), (k / k.sum()).view(shape))
    return out[0, 0]


def margin(subject: Subject) -> np.ndarray:
    """Voxels rendered around a box, per axis, so blur and resampling see beyond its edges."""
    return np.ceil(3 * np.asarray(subject.blur) + np.asarray(subject.resolution)).astype(int)


@torch.no_grad()
def render(
    subject: Subject,
    head: np.ndarray,
    lo,
    shape,
    generator: torch.Generator,
    step: float = 1.0,
    anatomy: H.Anatomy | None = None,
    with_codes: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Intensities and labels (and head tissue codes) of a box of a subject's voxel grid.

    Args:
        subject: from :func:`draw_subject`.
        head: its head label map (:func:`heads.make_head`).
        lo: first voxel of the box (subject grid index, may lie outside the field of view).
        shape: box size in voxels.
        generator: noise source.
        step: voxel step; above 1 a coarse render for statistics (no blur, no resampling).
        anatomy: the template (default :func:`heads.load_anatomy`).
        with_codes: also return the head tissue code of every voxel (uint8).

    Returns:
        ``(image float32 (X, Y, Z), labels uint8 (X, Y, Z)[, codes])`` before flipping
        and normalisation; labels 0 background, 1 grey matter, 2 white matter.
    """
    anat = anatomy or H.load_anatomy()
    tissue_t = _tissue_tensor(anat)
    pts = template_points(subject, lo, shape, step)
    codes = _codes_at(torch.from_numpy(head), pts).long()
    tissue_codes = codes.to(torch.uint8) if with_codes else None
    tissue = _tissue_at(anat, tissue_t, pts)
    brain = codes == H.BRAIN
    gm, wm = tissue[0], tissue[1]
    labels = torch.where(gm > (1 - gm - wm), 1, 0)
    labels = torch.where((wm > gm) & (wm > (1 - gm - wm)), 2, labels)
    labels = torch.where(brain, labels, 0).to(torch.uint8)
    means = torch.tensor(subject.means, dtype=torch.float32)
    stds = torch.tensor(subject.stds, dtype=torch.float32)
    if subject.stripped:
        keep = [H.BRAIN, H.CSF] if subject.keep_rim else [H.BRAIN]
        drop = torch.ones(len(H.TISSUES), dtype=torch.bool)
        drop[keep] = False
        means = torch.where(drop, means[H.AIR], means)
        stds = torch.where(drop, 0.0, stds)
        if subject.keep_rim:  # the rim only, not the spinal canal
            far = _codes_at(torch.from_numpy(anat.distance), pts) > 5
            codes = torch.where((codes == H.CSF) & far, 0, codes)
    mean, std = means[codes], stds[codes]
    b_mean, b_std = _brain_intensity(subject, anat, tissue)
    mean = torch.where(brain, b_mean, mean)
    std = torch.where(brain, b_std, std)
    del tissue, b_mean, b_std, codes, pts
    x = mean + std * torch.randn(mean.shape, generator=generator)
    ref = float(max(subject.means.max(), subject.brain_means.max(), 1e-3))
    if subject.gamma != 1.0:
        x = (x.clamp_min(0) / ref).pow(subject.gamma) * ref
    if subject.bias is not None:
        x = x * torch.exp(_field_on_box(subject.bias, subject, lo, shape, step)[0])
    if step == 1.0 and any(b > 0 for b in subject.blur):
        x = _gaussian_blur(x, subject.blur)
    low_shape = [max(2, round(n * step / r)) for n, r in zip(shape, subject.resolution, strict=True)]  # fmt: skip
    resampled = step == 1.0 and list(low_shape) != list(shape)
    if resampled:
        x = F.interpolate(x[None, None], size=low_shape, mode="trilinear", align_corners=False)[
            0, 0
        ]
    if subject.noise > 0:
        n1 = torch.randn(x.shape, generator=generator) * (subject.noise * ref)
        n2 = torch.randn(x.shape, generator=generator) * (subject.noise * ref)
        x = torch.sqrt((x + n1) ** 2 + n2**2)  # Rician magnitude
    if resampled:
        x = F.interpolate(x[None, None], size=tuple(shape), mode="trilinear", align_corners=False)[0, 0]  # fmt: skip
    if with_codes:
        return x.float(), labels, tissue_codes
    return x.float(), labels


_TISSUE_CACHE: dict[int, torch.Tensor] = {}


def _tissue_tensor(anat: H.Anatomy) -> torch.Tensor:
    key = id(anat)
    if key not in _TISSUE_CACHE:
        _TISSUE_CACHE[key] = torch.from_numpy(anat.tissue)[None]
    return _TISSUE_CACHE[key]


def normalization_stats(
    subject: Subject, head: np.ndarray, spec: dict, generator, step: float = 6.0
):
    """The predictor's normalisation statistics of the subject's whole field of view,
    from a coarse render (every ``step`` mm; at 6 mm shift and scale are within about
    1 % of a 2 mm render's; at 4 mm this render was 40 % of generating a 64^3 patch)."""
    from napari_selfreg.preprocess import normalization_stats as stats

    shape = [max(1, int(n // step)) for n in subject.fov_shape]
    image, _ = render(subject, head, (0, 0, 0), shape, generator, step=step)
    return stats(image.numpy(), spec)


def render_volume(
    subject: Subject,
    head: np.ndarray,
    generator: torch.Generator,
    scale: float = 1000.0,
    with_codes: bool = False,
) -> tuple[np.ndarray, ...]:
    """A whole subject: ``(image float32, labels uint8, affine[, codes])`` on its 1 mm RAS grid.

    ``scale`` multiplies intensities (scanner units); the affine maps voxels to the
    subject's mm (the flip is applied to the arrays, the affine stays RAS);
    ``with_codes`` adds the head tissue code of every voxel.
    """
    m = margin(subject)
    shape = [int(n + 2 * k) for n, k in zip(subject.fov_shape, m, strict=True)]
    rendered = render(subject, head, -m, shape, generator, with_codes=with_codes)
    crop = tuple(slice(k, k + n) for k, n in zip(m, subject.fov_shape, strict=True))
    arrays = [a[crop].flip(0) if subject.flip else a[crop] for a in rendered]
    arrays[0] = arrays[0] * scale
    affine = np.eye(4)
    affine[:3, 3] = subject.fov_origin
    out = [a.contiguous().numpy() for a in arrays]
    return (out[0], out[1], affine, *out[2:])


class SyntheticPatches:
    """The training loop's patch source: one newly drawn subject per patch.

    Args:
        patch_size: ``(X, Y, Z)`` voxels.
        rng: random source (heads, subjects, patch positions).
        normalization: the model card's normalisation spec (the predictor's).
        settings: subject ranges.
        head_settings: head geometry ranges.
        heads: size of the pool of heads (built on first use, a few seconds each), or
            the head label maps to use (then the pool is never refreshed).
        refresh_every: patches after which one head of the pool is replaced (a head
            takes about 9 s to make on one core, as long as some 75 patches).
    """

    def __init__(
        self,
        patch_size,
        rng: np.random.Generator,
        normalization: dict,
        settings: SynthSettings | None = None,
        head_settings: H.HeadSettings | None = None,
        heads: int | list[np.ndarray] = 6,
        refresh_every: int = 300,
    ):
        self.patch = tuple(int(p) for p in patch_size)
        self.rng = rng
        self.spec = dict(normalization)
        self.settings = settings or SynthSettings()
        self.head_settings = head_settings or H.HeadSettings()
        given = not isinstance(heads, int)
        self.heads: list[np.ndarray] = list(heads) if given else []  # type: ignore[arg-type]
        self.n_heads = len(self.heads) if given else int(heads)
        self.refresh_every = 0 if given else int(refresh_every)
        self.count = 0
        self.generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        self.anatomy = H.load_anatomy()
        self._near = np.flatnonzero(self.anatomy.distance.ravel() < 25.0)

    def _head(self, i: int) -> np.ndarray:
        if not self.heads:
            self.heads = [H.make_head(self.rng, self.head_settings, self.anatomy) for _ in range(self.n_heads)]  # fmt: skip
        elif self.refresh_every and self.count and self.count % self.refresh_every == 0:
            slot = (self.count // self.refresh_every) % self.n_heads
            self.heads[slot] = H.make_head(self.rng, self.head_settings, self.anatomy)
        return self.heads[i]

    def _start(self, subject: Subject) -> np.ndarray:
        """Patch corner: mostly around the brain and its surroundings, sometimes anywhere."""
        rng, p = self.rng, np.asarray(self.patch)
        size = np.asarray(subject.fov_shape)
        if rng.uniform() < 0.85:
            flat = self._near[rng.integers(self._near.size)]
            world = np.array(np.unravel_index(flat, H.FRAME_SHAPE)) + H.FRAME_ORIGIN
            centre = np.linalg.solve(subject.matrix, world - H.HEAD_CENTRE - subject.shift) + H.HEAD_CENTRE  # fmt: skip
            centre = centre - subject.fov_origin
        else:
            centre = rng.uniform(0, size)
        start = np.round(centre - p / 2 + rng.uniform(-p / 4, p / 4)).astype(int)
        return np.clip(start, np.minimum(0, size - p), np.maximum(0, size - p))

    def patch_from(self, subject: Subject, head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One normalised patch ``(1, *P)`` and its labels ``(*P)`` from ``subject``."""
        from napari_selfreg.preprocess import apply_normalization

        stats = normalization_stats(subject, head, self.spec, self.generator)
        m = margin(subject)
        start = self._start(subject)
        shape = [int(n + 2 * k) for n, k in zip(self.patch, m, strict=True)]
        image, labels = render(
            subject, head, start - m, shape, self.generator, anatomy=self.anatomy
        )
        crop = tuple(slice(k, k + n) for k, n in zip(m, self.patch, strict=True))
        image, labels = image[crop], labels[crop]
        if subject.flip:
            image, labels = image.flip(0), labels.flip(0)
        image = apply_normalization(image.contiguous().numpy(), stats)
        return image[None], labels.contiguous().numpy()

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image (B, 1, *P) float32, labels (B, *P) int64, weight (B, *P) float32)``."""
        images, labels = [], []
        for _ in range(batch_size):
            subject = draw_subject(self.rng, self.settings, self.n_heads)
            head = self._head(subject.head)
            self.count += 1
            image, lab = self.patch_from(subject, head)
            images.append(image)
            labels.append(lab.astype(np.int64))
        image = np.stack(images)
        return image, np.stack(labels), np.ones(image.shape[:1] + image.shape[2:], np.float32)


def replace(subject: Subject, **changes) -> Subject:
    """A copy of ``subject`` with some fields changed (test and benchmark subjects)."""
    return dataclasses.replace(subject, **changes)


# ----------------------------------------------------------------------------- held-out scans

# Contrasts of held-out scans (never drawn as such in training): brain CSF, GM, WM, then
# the head tissues; the brain is the template's real T1 remapped through CSF/GM/WM.
TEST_CONTRASTS: dict[str, dict[str, float]] = {
    "t1": {"csf": 0.18, "gm": 0.5, "wm": 0.78, "fat": 0.95, "muscle": 0.45, "marrow": 0.72,
           "skin": 0.55, "bone": 0.05, "eye": 0.12, "mucosa": 0.45, "dura": 0.3,
           "soft tissue": 0.5, "cord": 0.74},
    "t2": {"csf": 0.98, "gm": 0.62, "wm": 0.4, "fat": 0.78, "muscle": 0.27, "marrow": 0.5,
           "skin": 0.5, "bone": 0.05, "eye": 0.96, "mucosa": 0.86, "dura": 0.2,
           "soft tissue": 0.55, "cord": 0.42},
    "pd": {"csf": 0.84, "gm": 0.7, "wm": 0.57, "fat": 0.86, "muscle": 0.5, "marrow": 0.62,
           "skin": 0.62, "bone": 0.08, "eye": 0.8, "mucosa": 0.7, "dura": 0.3,
           "soft tissue": 0.6, "cord": 0.58},
}  # fmt: skip


def held_out_scan(
    contrast: str,
    seed: int,
    head_settings: H.HeadSettings | None = None,
    with_codes: bool = False,
    deform_mm: float = 0.0,
) -> tuple[np.ndarray, ...]:
    """The template brain in a held-out head: ``(image, labels, affine[, codes])`` at 1 mm, RAS.

    The head comes from ``head_settings`` (default :data:`heads.TEST_HEAD`, outside
    the training ranges), the contrast from :data:`TEST_CONTRASTS` (the brain is the
    template's real T1 remapped), with a small head rotation, mild bias field and
    noise, and a field of view from the vertex into the neck. Labels are the sample's
    tissue labels moved with the head; ``deform_mm`` folds it otherwise (13^3 grid)."""
    rng = np.random.default_rng([seed, 4242])
    head = H.make_head(rng, head_settings or H.TEST_HEAD)
    values = TEST_CONTRASTS[contrast]
    means = np.array([values.get(p, 0.0) if p else 0.0 for p in _CODE_PRIOR])
    means[H.CSF] = values["csf"]
    subject = Subject(
        head=0, matrix=_rotation(rng, 6.0), shift=rng.uniform(-5, 5, 3),
        elastic=torch.from_numpy(np.random.default_rng([seed, 77]).normal(0, deform_mm, (1, 3, 13, 13, 13)).astype(np.float32)),
        fov_origin=np.array([-92.0, -128.0, -165.0]), fov_shape=(184, 248, 275),
        means=means, stds=np.full(13, 0.02), brain_means=np.array([values[t] for t in ("csf", "gm", "wm")]),
        brain_stds=np.full(3, 0.01), real_t1=True, bias=torch.from_numpy(rng.normal(0, 0.15, (1, 1, 4, 4, 4)).astype(np.float32)),
        noise=0.015, contrast=contrast,
    )  # fmt: skip
    return render_volume(subject, head, torch.Generator().manual_seed(seed), with_codes=with_codes)


def degrade_resolution(
    image: np.ndarray, labels: np.ndarray, affine: np.ndarray, spacing
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 1 mm scan as a scanner would acquire it at ``spacing`` mm: blurred (FWHM = the
    voxel size), resampled linearly; labels resampled to the same grid (nearest)."""
    from scipy import ndimage

    from napari_selfreg.preprocess import resample, resampled_affine

    spacing = np.asarray(spacing, float)
    old = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    blurred = ndimage.gaussian_filter(image, 0.42 * spacing / old * (spacing > old))
    low = resample(blurred.astype(np.float32), old, spacing, order=1)
    low_labels = resample(labels, old, spacing, order=0)
    return low, low_labels, resampled_affine(affine, image.shape, low.shape, ratio=spacing / old)
