"""The input side of the predictor: the volume in work order, normalised, resampled, streamed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .predictor import Predictor


def _is_lazy(array) -> bool:
    """zarr / dask arrays are read slab by slab (streaming)."""
    root = type(array).__module__.split(".")[0]
    return not isinstance(array, np.ndarray) and root in ("zarr", "dask")


class _Work:
    """The input in work order ``(C, D, H, W)``: normalised, resampled, slice axis first."""

    def __init__(self, pred: Predictor, image, spacing, mask, streaming: bool):
        from .. import preprocess

        data = image if _is_lazy(image) else np.asarray(image)
        if data.dtype != bool and data.dtype.kind not in "iuf":
            raise ValueError(f"image dtype {data.dtype} is not a real number type")
        nc = self.channels = pred.in_channels
        spatial = tuple(int(s) for s in (data.shape[1:] if nc > 1 else data.shape))
        if nc > 1 and data.shape[0] != nc:
            raise ValueError(f"the model takes {nc} channels first; the image has {data.shape}")
        nd = len(spatial)
        several = (
            "segment one volume of it (one time point, echo or channel): open the file with "
            "napari-selfreg's reader, which adds one layer per volume, or run segment --channel K"
        )
        if pred.spatial_dims == 3 and (nd != 3 or min(spatial) == 1):
            what = f"a {nd}D image" if nd != 3 else "a single slice"
            fix = several if nd > 3 else "use a 2D model or a volume of several slices"
            raise ValueError(f"a 3D model needs a 3D volume; got {what} of shape {spatial}: {fix}")
        if pred.spatial_dims == 2 and nd not in (2, 3):
            fix = f": {several}" if nd > 3 else ""
            raise ValueError(
                f"a 2D model needs a 2D image or a 3D volume; got shape {spatial}{fix}"
            )
        if min(spatial) < 1:
            raise ValueError(f"the image is empty (shape {spatial})")
        if mask is not None and tuple(mask.shape) != spatial:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from image shape {spatial}")
        if spacing is not None:
            spacing = tuple(float(s) for s in spacing)
            if len(spacing) != nd or min(spacing) <= 0:
                raise ValueError(f"spacing {list(spacing)} does not fit a {nd}D image")
        self.streaming, self.input_shape, self.input_mask = streaming, spatial, mask
        self.axis = pred.axis if (pred.spatial_dims == 2 and nd == 3) else 0
        card = pred.card
        self.spec = dict(card.normalization) if card is not None else {"method": "zscore"}
        self.spacing, self.target = spacing, target_spacing(card, spacing, self.axis)
        if streaming and self.target is not None:
            raise ValueError(
                "streaming does not resample: resample the volume to the model spacing "
                f"{list(card.spacing)} mm first, or segment it in memory"
            )
        box = None  # the nonzero voxels' box, input grid
        if streaming:
            self.data, self.mask = data, mask
            self.stats = [self._stats(c, preprocess) for c in range(nc)]
        else:
            if pred.crop_to_nonzero:
                box = nonzero_box(data, nc)
            m = None if mask is None else np.asarray(mask).astype(bool)
            self.stats = [preprocess.normalization_stats(ch, self.spec, mask=m) for ch in _channels(data, nc)]  # fmt: skip
            arrays = [preprocess.apply_normalization(ch, st) for ch, st in zip(_channels(data, nc), self.stats, strict=True)]  # fmt: skip
            if self.target is not None:
                arrays = [preprocess.resample(a, spacing, self.target, order=1) for a in arrays]
                if m is not None:
                    m = preprocess.resample(m, spacing, self.target, order=0)
            stacked = arrays[0][None] if nc == 1 else np.stack(arrays)  # no copy for 1 channel
            self.data, self.mask = stacked.astype(np.float32, copy=False), m
        shape = self.model_shape = tuple(self.data.shape[-nd:])
        if self.axis:
            shape = (shape[self.axis], *(s for i, s in enumerate(shape) if i != self.axis))
        self.shape = shape if len(shape) == 3 else (1, *shape)
        self.content = self._content_box(box)
        self.info = {
            "input_shape": list(spatial),
            "model_shape": list(self.model_shape),
            "resampled_to": list(self.target) if self.target else None,
            "streaming": streaming,
            "warnings": sorted({w for st in self.stats for w in st.warnings}),
            "nonzero_box": None if self.content is None else [list(b) for b in self.content],
        }

    def _content_box(self, box) -> list[tuple[int, int]] | None:
        """The input-grid box in work voxels (one voxel of margin after resampling), or
        None when it holds nearly the whole volume (cropping would save no tile)."""
        if box is None:
            return None
        shape = self.model_shape
        scale = [1.0] * len(shape)
        if self.target is not None:
            scale = [s / t for s, t in zip(self.spacing, self.target, strict=True)]
        margin = 0 if self.target is None else 1
        out = [
            (max(0, int(np.floor(lo * k)) - margin), min(n, int(np.ceil(hi * k)) + margin))
            for (lo, hi), k, n in zip(box, scale, shape, strict=True)
        ]
        if np.prod([hi - lo for lo, hi in out]) > CROP_SHARE * np.prod(shape):
            return None
        if self.axis:
            out = [out[self.axis], *(b for i, b in enumerate(out) if i != self.axis)]
        return out if len(out) == 3 else [(0, 1), *out]

    def _stats(self, c: int, preprocess):
        """Global statistics from the same strided subsample ``preprocess.normalize`` uses,
        so streaming and in-memory results agree exactly."""
        size, nd = int(np.prod(self.input_shape)), len(self.input_shape)
        step = 1
        if size > preprocess.MAX_STAT_SAMPLES:
            step = int(np.ceil((size / preprocess.MAX_STAT_SAMPLES) ** (1.0 / nd)))
        index = (slice(None, None, step),) * nd
        sample = np.asarray(self.data[(c, *index)] if self.channels > 1 else self.data[index])
        m = None if self.mask is None else np.asarray(self.mask[index]).astype(bool)
        value_range = None
        if step > 1:  # the subsample may miss a lone absurd voxel: read them all, by slabs
            channel = self.data[c] if self.channels > 1 else self.data
            value_range = preprocess.finite_range(channel, self.mask)
        return preprocess.normalization_stats(sample, self.spec, mask=m, value_range=value_range)

    def _index(self, lo: int, hi: int) -> tuple:
        if len(self.input_shape) == 2:  # a 2D image is a single slice
            return ()
        return (slice(None),) * self.axis + (slice(lo, hi),)

    def _to_work(self, block: np.ndarray, lead: int) -> np.ndarray:
        """Model order -> work order (slice axis first, depth 1 for a 2D image)."""
        block = np.moveaxis(block, lead + self.axis, lead) if self.axis else block
        return block if block.ndim == lead + 3 else np.expand_dims(block, lead)

    def read(self, lo: int, hi: int) -> torch.Tensor:
        """Planes ``lo:hi`` of the work volume, ``(C, hi - lo, H, W)`` float32, normalised."""
        from .. import preprocess

        if not self.streaming:
            return torch.from_numpy(
                self._to_work(self.data[(slice(None), *self._index(lo, hi))], 1)
            )
        blocks = []
        for c, stats in enumerate(self.stats):
            index = self._index(lo, hi)
            block = self.data[(c, *index)] if self.channels > 1 else self.data[index]
            blocks.append(preprocess.apply_normalization(np.asarray(block), stats))
        return torch.from_numpy(self._to_work(np.stack(blocks), 1))

    def read_mask(self, lo: int, hi: int) -> np.ndarray | None:
        """Mask planes ``lo:hi`` in work order, or None."""
        if self.mask is None:
            return None
        return self._to_work(np.asarray(self.mask[self._index(lo, hi)]).astype(bool), 0)

    def tile_has_mask(self, pos, tile) -> bool:
        m = self.read_mask(pos[0], pos[0] + tile[0])
        return bool(m[:, pos[1] : pos[1] + tile[1], pos[2] : pos[2] + tile[2]].any())


CROP_SHARE = 0.9  # crop to the nonzero voxels' box when it holds at most this share


def nonzero_box(data: np.ndarray, channels: int) -> list[tuple[int, int]] | None:
    """``(lo, hi)`` per spatial axis of the box holding every nonzero voxel (any channel),
    as nnU-Net crops; None for an image without a nonzero voxel."""
    nonzero = (data != 0).any(axis=0) if channels > 1 else data != 0
    box = []
    for axis in range(nonzero.ndim):
        other = tuple(a for a in range(nonzero.ndim) if a != axis)
        index = np.flatnonzero(nonzero.any(axis=other))
        if index.size == 0:
            return None
        box.append((int(index[0]), int(index[-1]) + 1))
    return box


def _channels(data, nc: int) -> list:
    return [data[c] for c in range(nc)] if nc > 1 else [data]


def target_spacing(card, spacing, axis: int):
    """Spacing to resample to, or None when the input has the model's spacing already."""
    if card is None or not card.spacing or spacing is None:
        return None
    target = [float(s) for s in card.spacing]
    if len(spacing) == 3 and len(target) == 2:  # 2D model: slices keep their thickness
        target.insert(axis, spacing[axis])
    if len(spacing) == 2 and len(target) == 3:  # a 2D model trained on volumes, one image:
        del target[axis]  # the in-plane spacing of the slices it learnt from
    if len(target) != len(spacing):
        raise ValueError(f"model spacing {card.spacing} does not fit a {len(spacing)}D image")
    if all(abs(s - t) <= 1e-3 * t for s, t in zip(spacing, target, strict=True)):
        return None
    return tuple(target)
