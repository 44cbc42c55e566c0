"""Sliding-window segmentation: the one predictor of the CLI, widgets and benchmarks.

``Predictor(model).iter_segment(image)`` is a generator: it yields :class:`Progress`
(one per batch of tiles) and returns a :class:`SegmentationResult`, so napari's
``thread_worker`` gets progress and cancel (``worker.quit()``) and the CLI drains it
under tqdm; ``segment()`` is the draining form.

1. A 3D model needs a 3D volume; a 2D model runs slice by slice along ``axis``
   (internally a 3D window of depth 1) or once on a 2D image.
2. Normalisation from the model card with global statistics; resampling to
   ``card.spacing`` when the input spacing differs, and back to the input grid.
3. Tiles in z-major order, batched, Gaussian weighted (sigma = tile / 8), run under
   ``inference_mode``, autocast (bf16 where it is fast), channels-last, BatchNorm
   folded into the convolutions; logits accumulated on the CPU in float32.
4. Slabs of whole tile rows along axis 0: once a slab is done, the planes no later
   tile touches are final (argmax -> labels) and are written out; only the overlap
   is carried on. Memory is bounded by the slab, and zarr / dask inputs or an ``out``
   zarr folder stream with the same tiles and sums as the in-memory path.
5. GPU out of memory: half the batch, then smaller tiles, then the CPU
   (``info["fallbacks"]`` and a ``"fallback"`` progress event each).
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import shutil
import time
import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from . import geometry
from .device import (
    autocast,
    precision_name,
    resolve_device,
    resolve_precision,
    reuse_freed_memory,
)
from .jobs import Progress, drain

DEFAULT_TILE = {3: (96, 96, 96), 2: (256, 256)}
_LOW_PRECISION_MODULES = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
SLAB_BYTES = 768 * 2**20  # per-slab budget: logits + weights + input, float32


@dataclass
class SegmentationResult:
    """A prediction in the input's exact spatial shape.

    Attributes:
        labels: uint8 (uint16 above 256 classes) ``(*spatial)``; a read-only zarr
            array when the prediction streamed into ``out``.
        probabilities: float32 softmax ``(K, *spatial)`` or None.
        uncertainty: float32 normalised entropy in [0, 1] ``(*spatial)`` or None.
        slice_scores: per axis, the summed uncertainty of each slice (3D volumes with
            ``slice_scores=True``), in the input's axis order; else None.
        info: device, precision, tile, tiles, seconds, GFLOP/s, fallbacks, ...
    """

    labels: Any
    probabilities: Any = None
    uncertainty: Any = None
    slice_scores: list | None = None
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- tiling


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Tile offsets covering ``size``: step at most ``tile * (1 - overlap)``, spread evenly
    from 0 to ``size - tile`` (nnU-Net's rule)."""
    if tile >= size:
        return [0]
    n = math.ceil((size - tile) / max(1.0, tile * (1.0 - overlap))) + 1
    step = (size - tile) / (n - 1)
    return [int(round(i * step)) for i in range(n)]


def tile_positions(shape: Sequence[int], tile: Sequence[int], overlap: float) -> list[tuple]:
    """All tile corners for ``shape`` in z-major (C) order."""
    return list(
        itertools.product(*(tile_starts(s, t, overlap) for s, t in zip(shape, tile, strict=True)))
    )


def gaussian_map(tile: Sequence[int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """Separable Gaussian importance map of shape ``tile``; max 1, all values > 0."""
    out = np.ones((), dtype=np.float64)
    for t in tile:
        g = np.exp(-0.5 * ((np.arange(t) - (t - 1) / 2) / max(t * sigma_scale, 1e-6)) ** 2)
        out = np.multiply.outer(out, g)
    return np.maximum(out / out.max(), 1e-6).astype(np.float32)


def next_fallback(batch: int, tile: Sequence[int], min_tile: Sequence[int], device, step=16):
    """``(batch, tile, device, message)`` to try after an out-of-memory error, or None.

    Order: half the batch; then tiles about 0.8x per axis (half the volume, multiples
    of ``step``, not below ``min_tile``); then the CPU.
    """
    tile = tuple(int(t) for t in tile)
    if batch > 1:
        return batch // 2, tile, device, f"out of memory: tile batch {batch} -> {batch // 2}"
    smaller = tuple(
        t if t <= m else max(m, min(t - step, int(t * 0.8) // step * step))
        for t, m in zip(tile, min_tile, strict=True)
    )
    if smaller != tile:
        return 1, smaller, device, f"out of memory: tile {list(tile)} -> {list(smaller)}"
    if torch.device(device).type != "cpu":
        return 1, tile, torch.device("cpu"), f"out of memory on {device}: going on on the CPU"
    return None


def auto_batch(tile: Sequence[int], device: torch.device) -> int:
    """Tiles per forward pass: about one 96^3 tile's voxels on a CPU (small tiles are
    batched to amortise per-call overhead), four on a GPU; at most 16 / 64."""
    ratio = 96**3 / max(1, int(np.prod(tile)))
    if torch.device(device).type == "cpu":
        return int(max(1, min(16, round(ratio))))
    return int(max(1, min(64, round(4 * ratio))))


def is_out_of_memory(err: BaseException) -> bool:
    """True for allocator out-of-memory errors (CUDA, MPS, CPU)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


# ----------------------------------------------------------------------------- network


def fold_batchnorm(net: nn.Module) -> int:
    """Fold eval BatchNorm that directly follows a conv (in ``nn.Sequential``) into the conv.

    Same function, one memory pass less per layer. Changes ``net`` in place;
    returns the number of folded layers.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for module in net.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for a, b in itertools.pairwise(list(module._modules)):
            conv, bn = module._modules[a], module._modules[b]
            if (
                isinstance(conv, (nn.Conv2d, nn.Conv3d))
                and isinstance(bn, (nn.BatchNorm2d, nn.BatchNorm3d))
                and bn.running_mean is not None
                and conv.out_channels == bn.num_features
            ):
                module._modules[a] = fuse_conv_bn_eval(conv.eval(), bn.eval())
                module._modules[b] = nn.Identity()
                folded += 1
    return folded


class _NoAutocastPool(nn.Module):
    """Max pooling outside autocast. CPU autocast runs ``max_pool3d`` in float32, i.e. it
    copies a bf16 input to fp32 and the next conv copies it back; the max of bf16
    values is exact in bf16, so skipping the casts gives the same numbers faster."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.pool(x)


def exact_max_pools(net: nn.Module) -> int:
    """Wrap every ``nn.MaxPoolNd`` of ``net`` in :class:`_NoAutocastPool` (in place)."""
    pools = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
    found = [
        (parent, name, child)
        for parent in net.modules()
        for name, child in parent.named_children()
        if isinstance(child, pools)
    ]
    for parent, name, child in found:
        setattr(parent, name, _NoAutocastPool(child))
    return len(found)


def count_flops(net: nn.Module, input_shape: Sequence[int]) -> float:
    """FLOPs of one forward pass at ``input_shape``, counted on the meta device (no compute;
    the fused Transformer fast path is off so attention is counted). 0.0 if it cannot count."""
    from torch.utils.flop_counter import FlopCounterMode

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        meta = copy.deepcopy(net).to("meta")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            meta(torch.empty(tuple(input_shape), device="meta"))
        return float(counter.get_total_flops())
    except (RuntimeError, NotImplementedError, TypeError):  # an op without a meta kernel
        return 0.0
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def _is_lazy(array) -> bool:
    """zarr / dask arrays are read slab by slab (streaming)."""
    root = type(array).__module__.split(".")[0]
    return not isinstance(array, np.ndarray) and root in ("zarr", "dask")


class Predictor:
    """Sliding-window predictor, configured once and called per volume.

    Args:
        model: a ``ModelBundle``, a model folder or name (``load_model``), None for the
            bundled default, or a network with ``spatial_dims`` and ``num_classes``.
        tile: window in array axes, or one size for all (default ``card.patch_size``,
            else 96^3 or 256^2).
        overlap: fraction of a tile shared with the next one, in [0, 1). 0.25 (MONAI's
            default) gives labels 99.7% equal (Dice) to nnU-Net's 0.5 with the bundled
            model on MNI152 at 2.5x fewer tiles (``benchmarks/inference.py``).
        batch_size: tiles per forward pass (default :func:`auto_batch`).
        device: ``auto``, ``cuda``, ``cuda:N``, ``mps`` or ``cpu``.
        precision: ``auto``, ``bf16``, ``fp16`` or ``fp32``.
        gaussian: Gaussian importance weighting (else uniform).
        axis: slice axis for a 2D model on a 3D volume.
        probabilities: also return the softmax ``(K, *spatial)``.
        uncertainty: also return the normalised entropy.
        slice_scores: also return per-slice sums of the normalised entropy along each
            axis of a 3D volume (``review.slice_scores``: where to correct next).
        slab_size: most planes along axis 0 held at once (default from a memory budget).
        fold_bn: fold BatchNorm into the convolutions.
        channels_last: channels-last memory format.
    """

    def __init__(
        self,
        model=None,
        tile: int | Sequence[int] | None = None,
        overlap: float = 0.25,
        batch_size: int | None = None,
        device: str | torch.device = "auto",
        precision: str | None = "auto",
        gaussian: bool = True,
        axis: int = 0,
        probabilities: bool = False,
        uncertainty: bool = False,
        slice_scores: bool = False,
        slab_size: int | None = None,
        fold_bn: bool = True,
        channels_last: bool = True,
    ):
        from .modelfile import ModelBundle, load_model

        if isinstance(model, nn.Module):
            model = ModelBundle(network=model, card=None)
        self.bundle = model if isinstance(model, ModelBundle) else load_model(model)
        self.card, self.network = self.bundle.card, self.bundle.network
        net = self.network
        self.spatial_dims = int(getattr(net, "spatial_dims", 3))
        self.num_classes = int(
            getattr(net, "num_classes", 0) or getattr(self.card, "num_classes", 0)
        )
        if self.num_classes < 1:
            raise ValueError("the network has no num_classes and no model card says how many")
        self.in_channels = int(getattr(net, "in_channels", 1))
        if not 0 <= float(overlap) < 1:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if axis not in (0, 1, 2, -1, -2, -3):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
        self.device = resolve_device(device)
        self.precision = precision
        self.dtype = resolve_precision(precision, self.device)
        self.tile = self._check_tile(tile)
        self.overlap, self.gaussian, self.axis = float(overlap), bool(gaussian), axis % 3
        self.batch_size = int(batch_size) if batch_size else None
        self.probabilities, self.keep_uncertainty = bool(probabilities), bool(uncertainty)
        self.slice_scores = bool(slice_scores)
        self.uncertainty = self.keep_uncertainty or self.slice_scores  # computed by the sink
        self.slab_size = int(slab_size) if slab_size else None
        self.fold_bn, self.channels_last = bool(fold_bn), bool(channels_last)
        self._nets: dict[str, tuple[nn.Module, int]] = {}
        self._flops: dict[tuple, float] = {}

    def _check_tile(self, tile) -> tuple[int, ...]:
        nd = self.spatial_dims
        if tile is None:
            patch = getattr(self.card, "patch_size", None)
            tile = patch if patch and len(patch) == nd else DEFAULT_TILE[nd]
        tile = (tile,) if isinstance(tile, (int, np.integer)) else tuple(tile)
        tile = tuple(int(t) for t in (tile * nd if len(tile) == 1 else tile))
        if len(tile) != nd or min(tile) < 1:
            raise ValueError(
                f"a {nd}D model needs a tile of {nd} positive sizes, got {list(tile)}"
            )
        return tile if nd == 3 else (1, *tile)

    def inference_network(
        self, device: torch.device, dtype: torch.dtype | None = None
    ) -> tuple[nn.Module, int]:
        """The inference copy of the network: BN folded, channels-last, and the weights of
        convolutions / linear layers stored in the autocast dtype (autocast would cast them
        again on every call; norm layers keep float32)."""
        key = f"{device}/{dtype}"
        if key not in self._nets:
            net = copy.deepcopy(self.network).eval()
            folded = fold_batchnorm(net) if self.fold_bn else 0
            net = net.to(device)
            if dtype is not None:
                for module in net.modules():
                    if isinstance(module, _LOW_PRECISION_MODULES):
                        module.to(dtype)
                exact_max_pools(net)
            if self.channels_last:
                fmt = torch.channels_last_3d if self.spatial_dims == 3 else torch.channels_last
                net = net.to(memory_format=fmt)
            if device.type == "cuda":
                torch.backends.cudnn.benchmark = True  # fixed tile shapes
            self._nets[key] = (net, folded)
        return self._nets[key]

    def tile_flops(self, tile: Sequence[int]) -> float:
        """FLOPs of the network on one work-order tile (depth 1 for 2D models)."""
        key = tuple(tile)
        if key not in self._flops:
            spatial = key if self.spatial_dims == 3 else key[1:]
            self._flops[key] = count_flops(self.network, (1, self.in_channels, *spatial))
        return self._flops[key]

    # ------------------------------------------------------------------ public API
    def segment(self, image, spacing=None, mask=None, out=None, affine=None) -> SegmentationResult:
        """Run :meth:`iter_segment` to the end and return its result."""
        return drain(self.iter_segment(image, spacing=spacing, mask=mask, out=out, affine=affine))

    def iter_segment(
        self, image, spacing: Sequence[float] | None = None, mask=None, out=None, affine=None
    ) -> Generator[Progress, None, SegmentationResult]:
        """Segment ``image``, yielding :class:`Progress`; returns a :class:`SegmentationResult`.

        Args:
            image: ``(*spatial)`` (``(C, *spatial)`` for multi-channel models), any real
                or bool dtype; numpy in memory, zarr / dask streamed slab by slab.
            spacing: voxel size per spatial axis (mm); with ``card.spacing`` it decides
                resampling. None: use the data as it is.
            mask: optional foreground mask: statistics come from inside it, tiles
                without mask voxels are skipped, labels outside it are background.
            out: optional zarr folder for the labels (+ probabilities / uncertainty);
                it is written under a temporary name and appears only when complete.
            affine: voxel-to-world matrix ``(4, 4)`` of a 3D volume. It gives the spacing
                (unless ``spacing`` is passed) and, when the card names an
                ``orientation``, the volume is brought to it (transposes and flips)
                and the results back to the stored order.
        """
        t0 = time.perf_counter()
        yield Progress(0, 0, "prepare", "checking and normalising the input")
        turn = self._reorientation(image, affine, out)
        if affine is not None and spacing is None:
            spacing = geometry.spacing_from_affine(affine)
        if turn is not None:
            lead = self.in_channels > 1
            image = turn.apply(image, lead=int(lead))
            mask = None if mask is None else turn.apply(mask)
            spacing = None if spacing is None else turn.spacing(spacing)
        streaming = out is not None or _is_lazy(image)
        with reuse_freed_memory():
            work = _Work(self, image, spacing, mask, streaming)
            sink = _Sink(self, work, out)
            try:
                info = yield from self._run(work, sink)
                yield Progress(info["tiles"], info["tiles"], "finish", "writing the result")
                result = sink.finish()
            except BaseException:  # cancel (GeneratorExit) included: leave nothing behind
                sink.abort()
                raise
        result.info = {**work.info, **info, "seconds": round(time.perf_counter() - t0, 3)}
        if turn is not None:
            result = self._restore_order(result, turn)
        if (
            self.slice_scores
            and result.uncertainty is not None
            and np.ndim(result.uncertainty) == 3
        ):
            from .review import slice_scores

            result.slice_scores = slice_scores(result.uncertainty)
        if not self.keep_uncertainty:  # computed for the scores only
            result.uncertainty = None
        return result

    def _reorientation(self, image, affine, out) -> geometry.Reorientation | None:
        """How to bring ``image`` to the card's orientation, or None (already there / unknown)."""
        target = getattr(self.card, "orientation", None)
        spatial = np.ndim(image) - (1 if self.in_channels > 1 else 0)
        if affine is None or not target or spatial != 3:
            return None
        turn = geometry.reorientation(affine, target)
        if turn.identity:
            return None
        if out is not None:
            raise ValueError(
                f"the volume is stored {turn.source} and the model works in {turn.target}; "
                "streaming into a zarr folder keeps the stored order: reorient the volume "
                "first, or segment it in memory"
            )
        return turn

    @staticmethod
    def _restore_order(result: SegmentationResult, turn: geometry.Reorientation):
        """Results in the model's order -> the stored order (contiguous copies)."""

        def back(a, lead=0):
            return None if a is None else np.ascontiguousarray(turn.undo(np.asarray(a), lead))

        result.labels = back(result.labels)
        result.probabilities = back(result.probabilities, lead=1)
        result.uncertainty = back(result.uncertainty)
        result.info["orientation"] = {"stored": turn.source, "model": turn.target}
        return result

    # ------------------------------------------------------------------ the sliding window
    def _run(self, work: _Work, sink: _Sink):
        """All tiles, slab by slab; after an OOM at batch 1, start over with smaller tiles."""
        state = {"device": self.device, "dtype": self.dtype, "fallbacks": []}
        state["tile"] = tuple(min(t, s) for t, s in zip(self.tile, work.shape, strict=True))
        state["batch"] = self.batch_size or auto_batch(state["tile"], self.device)
        while True:
            done = yield from self._pass(work, sink, state)
            if done is not None:
                break
        tile, device = state["tile"], state["device"]
        flops, net_s = self.tile_flops(tile) * done, state["seconds"]
        return {
            "device": str(device),
            "precision": precision_name(state["dtype"]),
            "tile": list(tile if self.spatial_dims == 3 else tile[1:]),
            "overlap": self.overlap,
            "batch_size": state["batch"],
            "tiles": done,
            "slabs": sink.slabs,
            "network_seconds": round(net_s, 3),
            "gflop": round(flops / 1e9, 2),
            "gflops_per_s": round(flops / 1e9 / net_s, 1) if net_s > 0 else None,
            "bn_folded": self._nets[f"{device}/{state['dtype']}"][1],
            "fallbacks": state["fallbacks"],
        }

    def _pass(self, work: _Work, sink: _Sink, state: dict):
        """One pass over the volume; returns the tile count, or None to start over."""
        tile = state["tile"]
        positions = tile_positions(work.shape, tile, self.overlap)
        rows = sorted({p[0] for p in positions})
        if work.mask is not None:
            positions = [p for p in positions if work.tile_has_mask(p, tile)]
        weight = torch.from_numpy(gaussian_map(tile) if self.gaussian else np.ones(tile, "f4"))
        min_tile = tuple(min(t, 16) for t in tile)
        step = int(getattr(self.network, "divisor", 16))
        sink.reset()
        state["seconds"], done = 0.0, 0
        for slab in self._slabs(rows, tile[0], work):
            lo, hi = slab[0], slab[-1] + tile[0]
            todo = [p for p in positions if lo <= p[0] <= slab[-1]]
            x = work.read(lo, hi)  # (C, hi - lo, H, W) float32, normalised
            sink.start_slab(lo, hi)
            i = 0
            while i < len(todo):
                chunk = todo[i : i + state["batch"]]
                try:
                    logits = self._forward(x, chunk, lo, state)
                except Exception as err:  # noqa: BLE001 - anything but OOM is re-raised
                    if not is_out_of_memory(err):
                        raise
                    if state["device"].type == "cuda":
                        torch.cuda.empty_cache()
                    nxt = next_fallback(state["batch"], tile, min_tile, state["device"], step)
                    if nxt is None:
                        raise MemoryError(
                            f"out of memory with a single {list(tile)} tile on "
                            f"{state['device']}; free memory or choose a smaller tile"
                        ) from err
                    state["batch"], state["tile"], state["device"], message = nxt
                    state["dtype"] = resolve_precision(self.precision, state["device"])
                    state["fallbacks"].append(message)
                    yield Progress(done, len(positions), "fallback", message)
                    if state["tile"] != tile:
                        return None
                    continue
                sink.add(chunk, logits, weight, tile)
                i += len(chunk)
                done += len(chunk)
                yield Progress(done, len(positions), "tiles")
            later = [r for r in rows if r > slab[-1]]
            sink.emit(lo, later[0] if later else work.shape[0])
        return done

    def _slabs(self, rows: list[int], depth_tile: int, work: _Work) -> list[list[int]]:
        """Tile rows grouped into slabs of at most ``slab_size`` planes (at least one row)."""
        depth = self.slab_size
        if depth is None:
            plane = int(np.prod(work.shape[1:])) * 4 * (self.num_classes + 1 + work.channels)
            depth = SLAB_BYTES // max(plane, 1)
        slabs: list[list[int]] = [[]]
        for r in rows:
            if slabs[-1] and r + depth_tile - slabs[-1][0] > depth:
                slabs.append([])
            slabs[-1].append(r)
        return slabs

    def _forward(self, x_slab: torch.Tensor, chunk, lo: int, state: dict) -> torch.Tensor:
        """Logits ``(B, K, *tile)`` float32 on the CPU for the tiles at ``chunk``."""
        device, tile = state["device"], state["tile"]
        net, _ = self.inference_network(device, state["dtype"])
        t0 = time.perf_counter()
        with torch.inference_mode():
            x = torch.stack(
                [
                    x_slab[:, z - lo : z - lo + tile[0], y : y + tile[1], w : w + tile[2]]
                    for z, y, w in chunk
                ]  # fmt: skip
            ).to(device, non_blocking=True)
            if self.spatial_dims == 2:
                x = x[:, :, 0]
            if self.channels_last:
                fmt = torch.channels_last_3d if x.ndim == 5 else torch.channels_last
                x = x.contiguous(memory_format=fmt)
            with autocast(device, state["dtype"]):
                y = net(x)
            y = (y[:, :, None] if self.spatial_dims == 2 else y).float().cpu()
        state["seconds"] += time.perf_counter() - t0
        return y


# ----------------------------------------------------------------------------- input side


class _Work:
    """The input in work order ``(C, D, H, W)``: normalised, resampled, slice axis first."""

    def __init__(self, pred: Predictor, image, spacing, mask, streaming: bool):
        from . import preprocess

        data = image if _is_lazy(image) else np.asarray(image)
        if data.dtype != bool and data.dtype.kind not in "iuf":
            raise ValueError(f"image dtype {data.dtype} is not a real number type")
        nc = self.channels = pred.in_channels
        spatial = tuple(int(s) for s in (data.shape[1:] if nc > 1 else data.shape))
        if nc > 1 and data.shape[0] != nc:
            raise ValueError(f"the model takes {nc} channels first; the image has {data.shape}")
        nd = len(spatial)
        if pred.spatial_dims == 3 and nd != 3:
            raise ValueError(f"a 3D model needs a 3D volume; got a {nd}D image of shape {spatial}")
        if pred.spatial_dims == 2 and nd not in (2, 3):
            raise ValueError(f"a 2D model needs a 2D image or a 3D volume; got shape {spatial}")
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
        self.spacing, self.target = spacing, _target_spacing(card, spacing, self.axis)
        if streaming and self.target is not None:
            raise ValueError(
                "streaming does not resample: resample the volume to the model spacing "
                f"{list(card.spacing)} mm first, or segment it in memory"
            )
        if streaming:
            self.data, self.mask = data, mask
            self.stats = [self._stats(c, preprocess) for c in range(nc)]
        else:
            m = None if mask is None else np.asarray(mask).astype(bool)
            arrays = [preprocess.normalize(ch, self.spec, mask=m) for ch in _channels(data, nc)]
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
        self.info = {
            "input_shape": list(spatial),
            "model_shape": list(self.model_shape),
            "resampled_to": list(self.target) if self.target else None,
            "streaming": streaming,
        }

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
        return preprocess.normalization_stats(sample, self.spec, mask=m)

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
        from . import preprocess

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


def _channels(data, nc: int) -> list:
    return [data[c] for c in range(nc)] if nc > 1 else [data]


def _target_spacing(card, spacing, axis: int):
    """Spacing to resample to, or None when the input has the model's spacing already."""
    if card is None or not card.spacing or spacing is None:
        return None
    target = [float(s) for s in card.spacing]
    if len(spacing) == 3 and len(target) == 2:  # 2D model: slices keep their thickness
        target.insert(axis, spacing[axis])
    if len(target) != len(spacing):
        raise ValueError(f"model spacing {card.spacing} does not fit a {len(spacing)}D image")
    if all(abs(s - t) <= 1e-3 * t for s, t in zip(spacing, target, strict=True)):
        return None
    return tuple(target)


# ----------------------------------------------------------------------------- output side


class _Sink:
    """Slab accumulators and the outputs (numpy arrays, or a zarr group under ``out``)."""

    def __init__(self, pred: Predictor, work: _Work, out):
        self.work, self.k = work, pred.num_classes
        self.label_dtype = np.uint8 if self.k <= 256 else np.uint16
        self.want_prob, self.want_unc = pred.probabilities, pred.uncertainty
        self.out = Path(out) if out is not None else None
        self.tmp = None
        shape = work.model_shape
        specs = {"labels": (shape, self.label_dtype)}
        if self.want_prob:
            specs["probabilities"] = ((self.k, *shape), np.float32)
        if self.want_unc:
            specs["uncertainty"] = (shape, np.float32)
        if work.target is not None:  # going back to the input grid needs all logits
            self.logits = np.zeros((self.k, *work.shape), np.float32)
            self.outputs = {}
        elif self.out is not None:
            if self.out.exists():
                raise FileExistsError(f"{self.out} exists; choose a new output path")
            self.tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
            self.outputs = _zarr_outputs(self.tmp, specs)
        else:
            self.outputs = {name: np.zeros(s, d) for name, (s, d) in specs.items()}

    def reset(self) -> None:
        self.slabs, self.acc, self.wsum, self.lo = 0, None, None, 0

    def start_slab(self, lo: int, hi: int) -> None:
        """Accumulators for planes ``lo:hi``, keeping what the previous slab left there."""
        carry = None
        if self.acc is not None and self.acc.shape[1] > lo - self.lo:
            carry = self.acc[:, lo - self.lo :].clone(), self.wsum[lo - self.lo :].clone()
        self.acc = self.wsum = None  # free the old slab before allocating the next
        self.acc = torch.zeros((self.k, hi - lo, *self.work.shape[1:]))
        self.wsum = torch.zeros((hi - lo, *self.work.shape[1:]))
        if carry is not None:
            self.acc[:, : carry[1].shape[0]] = carry[0]
            self.wsum[: carry[1].shape[0]] = carry[1]
        self.lo = lo
        self.slabs += 1

    def add(self, chunk, logits: torch.Tensor, weight: torch.Tensor, tile) -> None:
        """Add weighted tile logits ``(B, K, *tile)`` at the corners in ``chunk``."""
        with torch.inference_mode():
            for b, (z, y, x) in enumerate(chunk):
                region = (slice(z - self.lo, z - self.lo + tile[0]),
                          slice(y, y + tile[1]), slice(x, x + tile[2]))  # fmt: skip
                self.acc[(slice(None), *region)].addcmul_(logits[b], weight)
                self.wsum[region].add_(weight)

    def emit(self, lo: int, hi: int) -> None:
        """Planes ``lo:hi`` are final: write labels (and probabilities / uncertainty)."""
        logits = self.acc[:, : hi - lo]
        if self.work.target is not None or self.want_prob or self.want_unc:
            with torch.inference_mode():
                # in place: these planes are final, nothing of them is carried on
                logits.div_(self.wsum[: hi - lo].clamp_min(1e-12))
        # labels need no division: the weight sum is one positive number per voxel
        if self.work.target is not None:
            self.logits[:, lo:hi] = logits.numpy()
            return
        blocks = {"labels": argmax_classes(logits).numpy().astype(self.label_dtype, copy=False)}
        mask = self.work.read_mask(lo, hi)
        if mask is not None:
            blocks["labels"][~mask] = 0
        if self.want_prob or self.want_unc:
            probs = torch.softmax(logits, dim=0)
            if self.want_prob:
                blocks["probabilities"] = probs.numpy()
            if self.want_unc:
                blocks["uncertainty"] = _entropy(probs).numpy()
        w = self.work
        for name, block in blocks.items():
            lead = block.ndim - 3
            if len(w.model_shape) == 2:  # a 2D image: drop the depth-1 work axis
                self.outputs[name][...] = block[(slice(None),) * lead + (0,)]
                continue
            block = np.moveaxis(block, lead, lead + w.axis) if w.axis else block
            self.outputs[name][(slice(None),) * (lead + w.axis) + (slice(lo, hi),)] = block

    def finish(self) -> SegmentationResult:
        if self.work.target is not None:
            return self._finish_resampled()
        if self.out is None:
            o = self.outputs
            return SegmentationResult(o["labels"], o.get("probabilities"), o.get("uncertainty"))
        if self.out.exists():
            raise FileExistsError(f"{self.out} appeared while segmenting; it is not replaced")
        os.rename(self.tmp, self.out)
        import zarr

        group = zarr.open_group(str(self.out), mode="r")
        return SegmentationResult(
            group["labels"], group.get("probabilities"), group.get("uncertainty")
        )

    def _finish_resampled(self) -> SegmentationResult:
        """Probabilities back to the input grid (linear), then argmax."""
        from . import preprocess

        w = self.work
        probs = torch.softmax(torch.from_numpy(self.logits), dim=0).numpy()
        probs = np.moveaxis(probs, 1, 1 + w.axis) if w.axis else probs
        probs = probs.reshape((self.k, *w.model_shape))
        back = [preprocess.resample(p, w.target, w.spacing, 1, shape=w.input_shape) for p in probs]
        probs = np.stack(back).astype(np.float32)
        probs /= np.maximum(probs.sum(0, keepdims=True), 1e-12)
        labels = argmax_classes(torch.from_numpy(probs)).numpy().astype(self.label_dtype)
        if w.input_mask is not None:
            labels[~np.asarray(w.input_mask).astype(bool)] = 0
        unc = _entropy(torch.from_numpy(probs)).numpy() if self.want_unc else None
        return SegmentationResult(labels, probs if self.want_prob else None, unc)

    def abort(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def argmax_classes(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(0)`` (first maximum wins) as uint8 (int32 above 256 classes).

    One comparison pass per class: about 10x faster on the CPU than ``argmax(0)``,
    whose reduction runs across the class axis with a stride of the whole volume.
    """
    k = scores.shape[0]
    with torch.inference_mode():
        best = scores[0].clone()
        labels = torch.zeros(scores.shape[1:], dtype=torch.uint8 if k <= 256 else torch.int32)
        for c in range(1, k):
            labels.masked_fill_(scores[c] > best, c)
            torch.maximum(best, scores[c], out=best)
    return labels


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """Normalised entropy over axis 0: 0 = certain, 1 = uniform."""
    k = probs.shape[0]
    if k < 2:
        return torch.zeros(probs.shape[1:])
    ent = -(probs * probs.clamp_min(1e-12).log()).sum(0)
    return (ent / math.log(k)).clamp(0, 1)


def _zarr_outputs(path: Path, specs: dict) -> dict:
    """A new zarr group at ``path`` with one zero-filled array per ``name: (shape, dtype)``."""
    import zarr

    group = zarr.open_group(str(path), mode="w")
    create = getattr(group, "create_array", None) or group.create_dataset  # zarr 3 / 2
    arrays = {}
    for name, (shape, dtype) in specs.items():
        base = (1, 32, 256, 256)[-len(shape) :] if len(shape) < 4 else (1, 32, 256, 256)
        chunks = tuple(min(s, c) for s, c in zip(shape, base, strict=True))
        arrays[name] = create(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0)
    return arrays


# ----------------------------------------------------------------------------- module-level API


def iter_segment(image, model=None, spacing=None, mask=None, out=None, affine=None, **options):
    """Generator form: ``Predictor(model, **options).iter_segment(image, ...)``."""
    return Predictor(model, **options).iter_segment(
        image, spacing=spacing, mask=mask, out=out, affine=affine
    )


def segment(
    image, model=None, spacing=None, mask=None, out=None, affine=None, **options
) -> SegmentationResult:
    """Segment ``image`` with ``model`` (default: the bundled model); see :class:`Predictor`."""
    return Predictor(model, **options).segment(
        image, spacing=spacing, mask=mask, out=out, affine=affine
    )


__all__ = [
    "Predictor",
    "Progress",
    "SegmentationResult",
    "auto_batch",
    "count_flops",
    "exact_max_pools",
    "fold_batchnorm",
    "gaussian_map",
    "is_out_of_memory",
    "iter_segment",
    "next_fallback",
    "segment",
    "tile_positions",
    "tile_starts",
]
