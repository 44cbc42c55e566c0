"""Whole-head label maps built around the MNI152 template brain (for synthetic training scans).

Offline we hold one anatomy: nilearn's MNI152 2009 template (a T1 and grey- and
white-matter probability maps of the brain only). Real scans show skull, face and
neck around the brain, and those are what the first default model labelled as
tissue. :func:`make_head` wraps the template brain in a procedural head: a CSF rim,
the skull's inner table, diploe and outer table, temporal muscle, fat and skin,
eyes with orbital fat and bony orbits, paranasal sinuses lined with mucosa, a nasal
cavity, a face and a neck with an airway, a spine (vertebral bodies, canal and
cord) and the jaw, each with random thickness, size, position and gaps.

Everything lives in one *head frame*: 1 mm voxels, RAS axes, the template's world
coordinates (mm), extended below and in front of the template box to hold face
and neck. Only numpy and scipy; one head takes a few seconds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

# Tissue codes of a head label map (index = code).
AIR, BRAIN, CSF, BONE, MARROW, FAT, SKIN, MUSCLE, EYE, DURA, MUCOSA, CORD, SOFT = range(13)
TISSUES = (
    "air", "brain", "csf", "bone", "marrow", "fat", "skin", "muscle", "eye", "dura",
    "mucosa", "cord", "soft tissue",
)  # fmt: skip

FRAME_ORIGIN = np.array([-100.0, -140.0, -190.0])  # world mm of head-frame voxel (0, 0, 0)
FRAME_SHAPE = (201, 266, 307)  # x -100..100, y -140..125, z -190..116 mm
HEAD_CENTRE = np.array([0.0, -20.0, -20.0])  # world mm; rotations and scaling pivot here


@dataclass(frozen=True)
class Anatomy:
    """The template brain in the head frame.

    Attributes:
        tissue: ``(3, X, Y, Z)`` float32 on the template's own grid: grey matter,
            white matter and T1 (T1 in [0, 1], 0 outside the brain).
        tissue_origin: world mm of the template grid's voxel (0, 0, 0).
        brain: bool head-frame mask of the brain.
        distance: float32 head-frame distance (mm) from the brain; 0 inside.
        t1_means: mean template T1 of CSF, grey and white matter inside the brain.
    """

    tissue: np.ndarray
    tissue_origin: np.ndarray
    brain: np.ndarray
    distance: np.ndarray
    t1_means: tuple[float, float, float]


@functools.lru_cache(maxsize=1)
def load_anatomy() -> Anatomy:
    """The MNI152 1 mm template as :class:`Anatomy` (loaded once per process)."""
    from nilearn import datasets
    from scipy import ndimage

    from napari_selfreg.data import load_mni152

    t1, labels, affine = load_mni152(1)
    gm = datasets.load_mni152_gm_template(1).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(1).get_fdata(dtype=np.float32)
    mask = datasets.load_mni152_brain_mask(1).get_fdata(dtype=np.float32) > 0
    # tissue only inside the brain mask, so the brain outline is the mask's
    gm, wm, t1 = (np.where(mask, a, 0).astype(np.float32) for a in (gm, wm, t1))
    origin = np.asarray(affine[:3, 3], dtype=np.float64)
    offset = np.round(origin - FRAME_ORIGIN).astype(int)
    brain = np.zeros(FRAME_SHAPE, dtype=bool)
    brain[tuple(slice(o, o + n) for o, n in zip(offset, mask.shape, strict=True))] = mask
    distance = ndimage.distance_transform_edt(~brain).astype(np.float32)
    csf = mask & (labels == 0)
    means = tuple(float(t1[m].mean()) for m in (csf, labels == 1, labels == 2))
    return Anatomy(np.stack([gm, wm, t1]), origin, brain, distance, means)  # type: ignore[arg-type]


@dataclass(frozen=True)
class HeadSettings:
    """Ranges (low, high) of the random head geometry, in mm.

    The defaults are the training ranges; :data:`TEST_HEAD` differs, so a
    benchmark head is one the training generator never made.
    """

    csf_rim: tuple[float, float] = (1.0, 4.0)
    dura: float = 0.5  # probability of a dura layer (0.5-1.5 mm) outside the CSF rim
    inner_table: tuple[float, float] = (1.0, 2.5)
    diploe: tuple[float, float] = (0.0, 5.0)
    outer_table: tuple[float, float] = (1.0, 2.5)
    temporal_muscle: tuple[float, float] = (3.0, 14.0)
    scalp_muscle: tuple[float, float] = (0.0, 1.5)
    fat: tuple[float, float] = (1.5, 9.0)
    skin: tuple[float, float] = (1.0, 3.0)
    variation: float = 0.5  # relative thickness variation over the head
    gaps: float = 0.3  # probability of holes in the diploe and fat layers
    neck_radius: tuple[float, float] = (48.0, 68.0)
    face_depth: tuple[float, float] = (95.0, 120.0)  # y of the face's front
    eye_radius: tuple[float, float] = (10.5, 13.0)
    sinus_radius: tuple[float, float] = (9.0, 16.0)


TEST_HEAD = HeadSettings(
    csf_rim=(3.5, 5.5), inner_table=(2.0, 3.5), diploe=(4.0, 7.0), outer_table=(2.0, 3.5),
    temporal_muscle=(12.0, 18.0), fat=(8.0, 13.0), skin=(2.5, 4.0), neck_radius=(66.0, 75.0),
    face_depth=(112.0, 125.0), eye_radius=(12.5, 14.0), sinus_radius=(15.0, 19.0),
)  # fmt: skip
"""A held-out head: thicker CSF rim, skull, fat and skin, bigger neck, eyes and sinuses
than any training head (most ranges outside the training ranges)."""


@dataclass
class _Frame:
    """World coordinates of the head frame as broadcastable axes, plus scratch helpers."""

    x: np.ndarray = field(init=False)
    y: np.ndarray = field(init=False)
    z: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        axes = [
            o + np.arange(n, dtype=np.float32)
            for o, n in zip(FRAME_ORIGIN, FRAME_SHAPE, strict=True)
        ]
        self.x = axes[0][:, None, None]
        self.y = axes[1][None, :, None]
        self.z = axes[2][None, None, :]

    def ellipsoid(self, centre, radii) -> np.ndarray:
        """Squared normalised radius of an axis-aligned ellipsoid (< 1 inside)."""
        cx, cy, cz = (float(v) for v in centre)
        rx, ry, rz = (float(v) for v in radii)
        return ((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2 + ((self.z - cz) / rz) ** 2


def smooth_field(rng: np.random.Generator, shape, cells: int = 6) -> np.ndarray:
    """A smooth random field of ``shape`` (std about 1): random cells, linearly upsampled."""
    import torch
    import torch.nn.functional as F

    coarse = torch.from_numpy(rng.standard_normal((1, 1, cells, cells, cells)).astype(np.float32))
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[
        0, 0
    ].numpy()


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds))


def _thickness(rng, bounds, variation: float, cells: int = 6) -> np.ndarray:
    """A thickness map (mm) over the head frame: a random base modulated smoothly."""
    base = _uniform(rng, bounds)
    field_ = smooth_field(rng, FRAME_SHAPE, cells)
    field_ *= variation * base
    field_ += base
    return np.maximum(field_, 0.0, out=field_)


def make_head(
    rng: np.random.Generator, settings: HeadSettings | None = None, anatomy: Anatomy | None = None
) -> np.ndarray:
    """A random whole-head label map in the head frame (codes of :data:`TISSUES`).

    Args:
        rng: the random source (the same state gives the same head).
        settings: geometry ranges (default: the training ranges).
        anatomy: the template (default :func:`load_anatomy`).

    Returns:
        uint8 array of :data:`FRAME_SHAPE`.
    """
    from scipy import ndimage

    s = settings or HeadSettings()
    anat = anatomy or load_anatomy()
    f = _Frame()
    d = anat.distance
    var = s.variation

    # cranial layers: cumulative thickness outward from the brain
    t_csf = _thickness(rng, s.csf_rim, var)
    t_in = t_csf + _thickness(rng, s.inner_table, var)
    t_dip = t_in + _thickness(rng, s.diploe, var) * (smooth_field(rng, FRAME_SHAPE, 8) > -1.2 + 2 * s.gaps * rng.uniform())  # fmt: skip
    t_out = t_dip + _thickness(rng, s.outer_table, var)
    # temporal muscle: thick over the sides of the head below the vertex
    side = np.clip((np.abs(f.x) - 35.0) / 30.0, 0, 1) * np.clip((40.0 - f.z) / 40.0, 0, 1)
    t_muscle = t_out + _thickness(rng, s.scalp_muscle, var) + side * _uniform(rng, s.temporal_muscle)  # fmt: skip
    t_soft = t_muscle + _thickness(rng, s.fat, var) + _thickness(rng, s.skin, var)
    hull = d <= t_soft

    # neck: an elliptic cylinder below the brain, wider further down
    r_neck = _uniform(rng, s.neck_radius)
    neck_c = (float(rng.uniform(-4, 4)), float(rng.uniform(-30, -15)))
    widen = 1.0 + 0.15 * np.clip((-100.0 - f.z) / 80.0, 0, 1)
    neck_q = ((f.x - neck_c[0]) / (r_neck * rng.uniform(0.95, 1.15) * widen)) ** 2 + (
        (f.y - neck_c[1]) / (r_neck * rng.uniform(0.85, 1.0) * widen)
    ) ** 2
    hull |= (neck_q < 1.0) & (f.z < -25.0)
    # face: a front-and-below superellipsoid plus a nose
    front = _uniform(rng, s.face_depth)
    face_c = np.array([0.0, front - rng.uniform(48, 58), rng.uniform(-75, -62)])
    face_r = np.array([rng.uniform(50, 62), front - face_c[1], rng.uniform(48, 60)])
    hull |= (f.ellipsoid(face_c, face_r) < 1.0) & (f.y > -10.0)
    eye_z = float(rng.uniform(-44, -34))
    nose_c = (0.0, front - 2.0, eye_z - rng.uniform(18, 26))
    hull |= (
        f.ellipsoid(nose_c, (rng.uniform(9, 14), rng.uniform(12, 18), rng.uniform(18, 26))) < 1.0
    )
    del neck_q

    # soft tissue by depth from the skin; bone layers around the brain
    head = np.where(hull, np.uint8(MUSCLE), np.uint8(AIR))
    depth = ndimage.distance_transform_edt(hull).astype(np.float32)
    skin = _thickness(rng, s.skin, var)
    fat = skin + _thickness(rng, s.fat, var) * (smooth_field(rng, FRAME_SHAPE, 8) > -1.5 + 2 * s.gaps * rng.uniform())  # fmt: skip
    head[hull & (depth <= fat)] = FAT
    head[hull & (depth <= skin)] = SKIN
    del depth, skin, fat
    # fat between the muscles and glands (random blobs in the muscle)
    interior = head == MUSCLE
    blobs = smooth_field(rng, FRAME_SHAPE, 14)
    head[interior & (blobs > rng.uniform(0.8, 1.8))] = FAT
    head[interior & (blobs < -rng.uniform(1.0, 2.0))] = SOFT
    del interior, blobs
    cranial = d <= t_out
    head[cranial] = BONE
    head[(d <= t_dip) & (d > t_in)] = MARROW
    head[d <= t_in] = BONE
    if rng.uniform() < s.dura:
        head[(d <= t_csf + rng.uniform(0.5, 1.5))] = DURA
    head[d <= t_csf] = CSF
    protected = d <= t_csf  # nothing from the face and neck reaches into the CSF rim
    del t_in, t_dip, t_out, t_muscle, t_soft

    def paint(mask: np.ndarray, code: int, keep_rim: bool = True) -> None:
        head[(mask & ~protected) if keep_rim else mask] = code

    # eyes in fat in bony orbits, below the frontal lobes
    r_eye = _uniform(rng, s.eye_radius)
    for sign in (-1.0, 1.0):
        c = np.array([sign * rng.uniform(28, 36), front - rng.uniform(38, 48), eye_z])
        for _ in range(20):  # move down until clear of the brain
            i = np.round(c - FRAME_ORIGIN).astype(int)
            if d[tuple(i)] > r_eye + 6:
                break
            c[2] -= 2.0
        q_orbit = f.ellipsoid(c, (r_eye + 7, r_eye + 9, r_eye + 7))
        paint(q_orbit < 1.0, BONE)
        paint(f.ellipsoid(c, (r_eye + 5.5, r_eye + 7.5, r_eye + 5.5)) < 1.0, FAT)
        paint(f.ellipsoid(c, (r_eye, r_eye, r_eye)) < 1.0, EYE)
        # maxillary sinus below the eye
        r_sin = _uniform(rng, s.sinus_radius)
        sc = (c[0] * rng.uniform(0.8, 1.0), c[1] - rng.uniform(0, 8), c[2] - r_eye - r_sin * 0.9)
        q = f.ellipsoid(sc, (r_sin * 0.8, r_sin, r_sin))
        paint(q < 1.0, BONE)
        paint(q < 0.8, MUCOSA)
        if rng.uniform() < 0.85:  # some sinuses are filled
            paint(q < rng.uniform(0.3, 0.7), AIR)
    # nasal cavity and sphenoid sinus
    nc = (0.0, front - rng.uniform(25, 35), eye_z - rng.uniform(10, 18))
    q = f.ellipsoid(nc, (rng.uniform(6, 10), rng.uniform(18, 24), rng.uniform(16, 24)))
    paint(q < 1.0, MUCOSA)
    paint(q < 0.6, AIR)
    if rng.uniform() < 0.8:
        sph = (0.0, rng.uniform(5, 20), rng.uniform(-45, -35))
        q = f.ellipsoid(sph, (rng.uniform(8, 14), rng.uniform(8, 12), rng.uniform(7, 11)))
        paint(q < 1.0, MUCOSA)
        paint(q < 0.6, AIR)
    # jaw: a bony U around the tongue
    jaw_z = face_c[2] - face_r[2] * rng.uniform(0.45, 0.65)
    q_jaw = f.ellipsoid((0.0, face_c[1] + 5, jaw_z), (face_r[0] * 0.8, face_r[1] * 0.85, 9.0))
    paint((q_jaw < 1.0) & (q_jaw > 0.55) & (f.y > face_c[1] - 25), BONE)
    paint((q_jaw < 0.55) & (f.y > face_c[1] - 25), SOFT)

    # spine: vertebral bodies, canal with cord, airway in front of it
    canal_y = -46.0 + rng.uniform(-3, 3) + 0.12 * np.clip(-72.0 - f.z, 0, None)
    r_canal, r_cord = rng.uniform(6.5, 8.5), rng.uniform(3.5, 4.8)
    below = f.z < -60.0
    radial = f.x**2 + (f.y - canal_y) ** 2
    paint(below & (radial < (r_canal + rng.uniform(3, 5)) ** 2) & (f.z < -75), BONE)
    body_y, body_r = canal_y + r_canal + 10, rng.uniform(8, 11)
    rb = np.sqrt(f.x**2 + (f.y - body_y) ** 2)
    low = f.z < -85.0
    disc = np.sin((f.z + rng.uniform(0, 15)) * (2 * np.pi / rng.uniform(14, 18))) > 0.75
    paint(low & (rb >= body_r) & (rb < body_r + 1.5), BONE)
    paint(low & (rb < body_r) & ~disc, MARROW)
    paint(low & (rb < body_r) & disc, SOFT)
    del rb
    canal = below & (radial < r_canal**2)
    head[canal & ~anat.brain] = CSF
    head[below & (radial < r_cord**2) & ~anat.brain] = CORD
    airway_y = canal_y + r_canal + rng.uniform(28, 36)
    r_air = rng.uniform(5, 10)
    paint((f.z < eye_z - 25) & (f.x**2 + (f.y - airway_y) ** 2 < r_air**2) & (f.z > -190), AIR)
    head[anat.brain] = BRAIN
    return head
