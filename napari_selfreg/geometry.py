"""Voxel geometry: spacing from affines and reorientation of arrays (numpy + nibabel).

A model trained on volumes in one axis order (its card's ``orientation``, e.g.
``"RAS"``) sees a scan stored in another order (a sagittal acquisition stored
P, S, L, a radiological L-flipped volume...) as a different image. The predictor,
fine-tuning and the feature inspector bring such a volume to the model's order by
transposes and flips (no resampling: the nearest axis-aligned order of an oblique
affine) and bring the results back, so the same scan gives the same labels in any
stored order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def spacing_from_affine(affine: np.ndarray, ndim: int = 3) -> tuple[float, ...]:
    """Voxel size per array axis: the norms of the affine's first ``ndim`` columns."""
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((a[:-1, :ndim] ** 2).sum(axis=0)))


def axis_codes(affine: np.ndarray) -> str:
    """nibabel's axis codes of an affine's array axes, e.g. ``"RAS"`` or ``"PSL"``."""
    from nibabel.orientations import aff2axcodes

    return "".join(aff2axcodes(np.asarray(affine, dtype=np.float64)))


def _axes_of_codes(codes: str) -> np.ndarray:
    """nibabel's ``(world axis, direction)`` per array axis of ``codes`` (``"SPL"``), or
    ValueError unless they name each of R/L, A/P, S/I once."""
    from nibabel.orientations import axcodes2ornt

    try:
        ornt = axcodes2ornt(tuple(codes))
    except ValueError:
        ornt = None
    if ornt is None or len(codes) != 3 or sorted(ornt[:, 0]) != [0, 1, 2]:
        raise ValueError(f"orientation {codes!r} must name each of R/L, A/P, S/I once, e.g. SPL or RAS")  # fmt: skip
    return ornt


def orientation_codes(codes: str) -> str:
    """``codes`` in capitals when they name each of R/L, A/P, S/I once (``"SPL"``), else
    ValueError (argparse then says the option is invalid)."""
    codes = str(codes).upper()
    _axes_of_codes(codes)
    return codes


def affine_from_codes(codes: str, spacing) -> np.ndarray:
    """The affine of a stack whose array axes point to ``codes`` (:func:`orientation_codes`)
    at ``spacing`` mm: what a user states for a TIFF stack."""
    affine = np.diag([0.0, 0.0, 0.0, 1.0])
    for axis, (world, direction) in enumerate(_axes_of_codes(str(codes).upper())):
        affine[int(world), axis] = direction * float(spacing[axis])
    return affine


@dataclass(frozen=True)
class Reorientation:
    """How the three spatial axes of an array map to a target orientation.

    Attributes:
        source: axis codes of the stored array.
        target: axis codes of the model.
        order: ``order[i]`` is the stored axis that becomes target axis ``i``.
        flip: per target axis, whether it runs against the stored axis.
    """

    source: str
    target: str
    order: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @property
    def identity(self) -> bool:
        return self.order == (0, 1, 2) and not any(self.flip)

    def apply(self, array, lead: int = 0):
        """Stored -> target order for an array ``(*lead axes, X, Y, Z)`` (a view for numpy)."""
        array = _transpose(array, (*range(lead), *(lead + o for o in self.order)))
        for axis, f in enumerate(self.flip):
            if f:
                array = _flip(array, lead + axis)
        return array

    def undo(self, array, lead: int = 0):
        """Target -> stored order (the inverse of :meth:`apply`)."""
        for axis, f in enumerate(self.flip):
            if f:
                array = _flip(array, lead + axis)
        inverse = np.argsort(self.order)
        return _transpose(array, (*range(lead), *(lead + int(o) for o in inverse)))

    def spacing(self, spacing) -> tuple[float, ...]:
        """Stored per-axis spacing in target order."""
        return tuple(float(spacing[o]) for o in self.order)


def reorientation(affine: np.ndarray, target: str) -> Reorientation:
    """The :class:`Reorientation` from an array with ``affine`` to ``target`` axis codes."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError("the volume's affine must be a finite 4 x 4 matrix")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError("the volume's affine is singular; its orientation is unknown")
    source = io_orientation(affine)
    wanted = axcodes2ornt(tuple(target))
    move = ornt_transform(source, wanted)  # row i: stored axis i -> (target axis, flip)
    order = [0, 0, 0]
    flip = [False, False, False]
    for stored, (axis, direction) in enumerate(move):
        order[int(axis)] = stored
        flip[int(axis)] = bool(direction < 0)
    return Reorientation(axis_codes(affine), str(target), tuple(order), tuple(flip))  # type: ignore[arg-type]


def _transpose(array, axes):
    if tuple(axes) == tuple(range(len(axes))):
        return array
    if hasattr(array, "permute"):  # torch
        return array.permute(*axes)
    if isinstance(array, np.ndarray):
        return array.transpose(axes)
    import dask.array as da

    return da.transpose(_as_dask(array), axes)


def _flip(array, axis: int):
    if hasattr(array, "permute"):  # torch
        return array.flip(axis)
    if isinstance(array, np.ndarray):
        return np.flip(array, axis)
    import dask.array as da

    return da.flip(_as_dask(array), axis)


def _as_dask(array):
    import dask.array as da

    return array if isinstance(array, da.Array) else da.from_array(array, chunks="auto")


# ----------------------------------------------------------------------------- napari layers


def world_matrix(scale, translate=None, rotate=None, shear=None, affine=None) -> np.ndarray:
    """A napari layer's ``(n + 1, n + 1)`` data-to-world matrix, computed without napari.

    napari maps data to world as ``affine @ (translate + rotate @ shear @ diag(scale))``;
    ``rotate`` is a matrix (or a 2D angle in degrees), ``shear`` a matrix or the vector
    of its upper-triangular values, ``affine`` a matrix or an object with
    ``affine_matrix`` (napari's ``Affine``).
    """
    scale = np.asarray(scale, dtype=float)
    n = scale.size
    translate = np.zeros(n) if translate is None else np.asarray(translate, dtype=float)
    rot = np.eye(n)
    if rotate is not None:
        r = np.asarray(rotate, dtype=float)
        if r.ndim == 0 and n == 2:
            a = np.deg2rad(float(r))
            r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        if r.shape != (n, n):
            raise ValueError(f"rotate must be an {n} x {n} matrix here, got shape {r.shape}")
        rot = r
    shr = np.eye(n)
    if shear is not None:
        s = np.asarray(shear, dtype=float)
        if s.ndim == 1:
            upper = np.triu(np.ones((n, n), bool), 1)
            if s.size != upper.sum():
                raise ValueError(f"{s.size} shear values do not fit {n} dimensions")
            shr[upper] = s
        else:
            shr = s
    physical = np.eye(n + 1)
    physical[:n, :n] = rot @ shr @ np.diag(scale)
    physical[:n, n] = translate
    outer = np.eye(n + 1) if affine is None else np.asarray(getattr(affine, "affine_matrix", affine), dtype=float)  # fmt: skip
    return outer @ physical


def layer_world_matrix(layer) -> np.ndarray:
    """The data-to-world matrix of a napari layer (duck-typed: any object with napari's
    ``scale``, ``translate``, ``rotate``, ``shear`` and ``affine``)."""
    return world_matrix(layer.scale, layer.translate, layer.rotate, layer.shear, layer.affine)


def volume_affine(matrix: np.ndarray, ndim: int) -> np.ndarray:
    """A layer's data-to-world matrix as the ``(4, 4)`` affine of a volume file
    (a 2D layer gets an identity third axis)."""
    matrix = np.asarray(matrix, dtype=float)
    if ndim == 3:
        return matrix
    if ndim == 2:
        out = np.eye(4)
        out[:2, :2] = matrix[:2, :2]
        out[:2, 3] = matrix[:2, 2]
        return out
    raise ValueError(f"only 2D and 3D layers can be written as NIfTI, not {ndim}D")


def layer_kwargs(affine: np.ndarray, ndim: int = 3) -> dict:
    """Layer keyword arguments that place a volume in world millimetres in napari.

    napari's world axis ``d`` is then world axis ``d`` of the affine, i.e. for
    nibabel-style volumes the world axes are (x, y, z) = (R, A, S) in mm, and
    for TIFF stacks (Z, Y, X) in mm; layers of scans in one frame overlay.
    Axis-aligned affines without flips or permutations give ``scale`` and
    ``translate``; any other (flips, permutations, obliques, shears) gives the
    full ``affine`` ((ndim+1) x (ndim+1)), which napari applies on top of the
    (default) scale and translate. In napari's 2D view an oblique affine is
    drawn without its out-of-slice rotation (napari warns "Non-orthogonal
    slicing"); coordinates and the 3D view are exact, and labels given the same
    kwargs overlay the image voxel for voxel. For 2D volumes the in-plane part is used
    when the slice lies in the world x-y plane, otherwise only the pixel size
    (``scale``) is kept, in the slice's own plane.

    Returns:
        ``{"scale": tuple, "translate": tuple}`` or ``{"affine": list of lists}``.
    """
    affine, nd = np.asarray(affine, dtype=np.float64), ndim
    lin = affine[:nd, :nd]
    shift = affine[:nd, 3]
    if nd == 2 and (abs(np.linalg.det(lin)) < 1e-9 or np.abs(affine[2, :2]).max() > 1e-6):
        return {"scale": spacing_from_affine(affine, 2), "translate": (0.0, 0.0)}
    diag = np.diag(lin)
    if np.allclose(lin, np.diag(diag), rtol=0, atol=1e-9 * np.abs(diag).max()) and np.all(
        diag > 0
    ):
        return {
            "scale": tuple(float(v) for v in diag),
            "translate": tuple(float(v) for v in shift),
        }
    out = np.eye(nd + 1)
    out[:nd, :nd], out[:nd, nd] = lin, shift
    return {"affine": out.tolist()}


def display_axes(affine: np.ndarray, ndim: int) -> tuple[int, ...]:
    """File axes in the order of the world axes they are closest to (identity for 2D).

    napari slices a layer along its data axes and cannot display a 3D layer whose
    affine swaps the sliced axis with a displayed one (a singular 2D block), as
    sagittal or coronal acquisitions do; the reader therefore hands napari the
    array transposed to world order (a view), and the writer transposes it back.
    """
    identity = tuple(range(ndim))
    if ndim != 3:
        return identity
    lin = np.abs(np.asarray(affine, dtype=float)[:3, :3])
    order = tuple(int(i) for i in np.argmax(lin, axis=1))  # world axis d <- file axis order[d]
    return order if sorted(order) == list(identity) else identity


# ----------------------------------------------------------------------------- display frame

VOLUME_KEY = "selfreg_volume"  # layer.metadata: file affine (RAS), axes, shape, frame, source
DISPLAY_CODES = "SPL"
DISPLAY_FROM_RAS = np.array(
    [[0.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)
"""World frame of medical volumes in napari: (superior, posterior, left) in mm, so that
napari's default view (slider on world axis 0, axis 1 down, axis 2 right) shows axial
slices with anterior up and the patient's left on the right, as radiology viewers do."""


def display_affine(ras_affine: np.ndarray) -> np.ndarray:
    """A RAS voxel-to-world affine expressed in the display frame (:data:`DISPLAY_CODES`)."""
    return DISPLAY_FROM_RAS @ np.asarray(ras_affine, dtype=float)


def ras_from_frame(matrix: np.ndarray, frame: str | None) -> np.ndarray:
    """A layer's data-to-world matrix in RAS, given the layer's world frame (``"SPL"`` for
    volumes this plugin opened; anything else is taken as RAS already)."""
    matrix = np.asarray(matrix, dtype=float)
    if frame == DISPLAY_CODES and matrix.shape == (4, 4):
        return np.linalg.inv(DISPLAY_FROM_RAS) @ matrix
    return matrix


def layer_ras_affine(layer) -> np.ndarray:
    """The RAS voxel-to-world affine of a napari layer's data (the display frame undone)."""
    frame = (layer.metadata.get(VOLUME_KEY) or {}).get("frame")
    return ras_from_frame(layer_world_matrix(layer), frame)
