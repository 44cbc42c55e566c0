"""Sliding-window segmentation: the one predictor of the CLI, widgets and benchmarks.

``Predictor(model).iter_segment(image)`` is a generator: it yields :class:`Progress`
(one per batch of tiles) and returns a :class:`SegmentationResult`, so napari's
``thread_worker`` gets progress and cancel (``worker.quit()``) and the CLI drains it
with ``jobs.ProgressPrinter``; ``segment()`` is the draining form.

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
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from .. import geometry
from ..device import (
    autocast,
    precision_name,
    resolve_device,
    resolve_precision,
    reuse_freed_memory,
)
from ..jobs import Progress, drain
from ..settings import DEFAULTS
from .inputs import _is_lazy, _Work
from .network import _LOW_PRECISION_MODULES, count_flops, exact_max_pools, fold_batchnorm
from .outputs import SegmentationResult, _Sink, keep_largest_pieces
from .tiling import auto_batch, gaussian_map, is_out_of_memory, next_fallback, tile_positions

DEFAULT_TILE = {3: (96, 96, 96), 2: (256, 256)}

MIN_TILE = 4  # voxels per axis, and at least the network's down-sampling
SLAB_BYTES = 768 * 2**20  # per-slab budget: logits + weights + input, float32


@dataclass
class RunState:
    """What one prediction run settled on so far (fallbacks change it mid-run)."""

    device: torch.device
    dtype: torch.dtype | None
    tile: tuple[int, ...]
    batch: int
    fallbacks: list[str] = field(default_factory=list)
    seconds: float = 0.0  # time inside the network
    read_seconds: float = 0.0  # slabs of the normalised input
    stitch_seconds: float = 0.0  # weighting, accumulating, argmax of finished planes


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
        crop_to_nonzero: tile only the box holding the image's nonzero voxels (in-memory
            volumes, as nnU-Net crops); outside it the labels are background. A
            brain-extracted scan needs about half the tiles.
        keep_largest: apply the card's ``keep_largest`` post-processing (only the
            largest connected piece of each group of classes is kept) to in-memory results
            at least a tile thick (a thin slab cuts an organ into real pieces). It edits
            the labels only: probabilities and uncertainty stay the network's, as
            nnU-Net saves its softmax before post-processing.
    """

    def __init__(
        self,
        model=None,
        tile: int | Sequence[int] | None = None,
        overlap: float = DEFAULTS.overlap,
        batch_size: int | None = None,
        device: str | torch.device = DEFAULTS.device,
        precision: str | None = DEFAULTS.precision,
        gaussian: bool = DEFAULTS.gaussian,
        axis: int = 0,
        probabilities: bool = False,
        uncertainty: bool = False,
        slice_scores: bool = False,
        slab_size: int | None = None,
        fold_bn: bool = True,
        channels_last: bool = True,
        crop_to_nonzero: bool = DEFAULTS.crop_to_nonzero,
        keep_largest: bool = DEFAULTS.keep_largest,
    ):
        from ..modelfile import ModelBundle, load_model

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
        self.crop_to_nonzero = bool(crop_to_nonzero)
        self.keep_largest = bool(keep_largest)
        self._nets: dict[str, tuple[nn.Module, int]] = {}
        self._flops: dict[tuple, float] = {}
        self._told = False  # the CPU time expectation is said once

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
        floor = max(int(getattr(self.network, "divisor", 1)), MIN_TILE)
        if min(tile) < floor:
            raise ValueError(
                f"the tile {list(tile)} is too small: at least {floor} voxels per axis (the "
                "network down-samples that much, and smaller tiles cost more than they save)"
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
            t_prepared = time.perf_counter()
            try:
                info = yield from self._run(work, sink)
                yield Progress(info["tiles"], info["tiles"], "finish", "writing the result")
                t_tiled = time.perf_counter()
                result = sink.finish()
                t_finished = time.perf_counter()
                pieces = self._keep_largest(result, work.model_shape)
                t_postprocess = time.perf_counter() - t_finished
            except BaseException:  # cancel (GeneratorExit) included: leave nothing behind
                sink.abort()
                raise
        if turn is not None:
            result = self._restore_order(result, turn)
        t_end = time.perf_counter()
        stages = info.pop("stages")
        stages["prepare"] = t_prepared - t0  # checks, reorientation, normalisation, resampling
        stages["postprocess"] = t_postprocess  # the card's keep_largest
        stages["finish"] = t_end - t_tiled - t_postprocess  # last planes, resampling back, order
        stages["other"] = t_end - t0 - sum(stages.values())  # fallbacks' lost passes, yields
        result.info = {
            **work.info, **result.info, **info, **pieces, "seconds": round(t_end - t0, 3),
            "stages": {k: round(v, 3) for k, v in stages.items()},
        }  # fmt: skip
        if (
            self.slice_scores
            and result.uncertainty is not None
            and np.ndim(result.uncertainty) == 3
        ):
            from ..review import slice_scores

            result.slice_scores = slice_scores(result.uncertainty)
        if not self.keep_uncertainty:  # computed for the scores only
            result.uncertainty = None
        return result

    def _keep_largest(self, result: SegmentationResult, model_shape) -> dict:
        """The card's ``keep_largest`` post-processing on in-memory labels (a streamed zarr
        result and a slab thinner than a tile in the model's grid are left as they are);
        the info it adds."""
        groups = getattr(self.card, "keep_largest", None)
        if not groups or not self.keep_largest:
            return {}
        if not isinstance(result.labels, np.ndarray):
            return {"keep_largest": {"groups": groups, "skipped": "streamed result"}}
        thinnest = min(int(n) for n in model_shape)
        if self.spatial_dims == 3 and thinnest < min(self.tile):  # its faces cut real pieces
            return {"keep_largest": {"groups": groups, "skipped": f"a slab of {thinnest} voxels"}}
        removed = keep_largest_pieces(result.labels, groups)
        return {"keep_largest": {"groups": groups, "voxels_removed": removed}}

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
        tile = tuple(min(t, s) for t, s in zip(self.tile, work.shape, strict=True))
        state = RunState(
            self.device, self.dtype, tile, self.batch_size or auto_batch(tile, self.device)
        )
        t0 = time.perf_counter()
        self.inference_network(state.device, state.dtype)  # copied and folded once
        setup = time.perf_counter() - t0
        while True:
            done = yield from self._pass(work, sink, state)
            if done is not None:
                break
        tile, device = state.tile, state.device
        flops, net_s = self.tile_flops(tile) * done, state.seconds
        return {
            "device": str(device),
            "precision": precision_name(state.dtype),
            "tile": list(tile if self.spatial_dims == 3 else tile[1:]),
            "overlap": self.overlap,
            "batch_size": state.batch,
            "tiles": done,
            "slabs": sink.slabs,
            "network_seconds": round(net_s, 3),
            "gflop": round(flops / 1e9, 2),
            "gflops_per_s": round(flops / 1e9 / net_s, 1) if net_s > 0 else None,
            "bn_folded": self._nets[f"{device}/{state.dtype}"][1],
            "fallbacks": state.fallbacks,
            "stages": {
                "network setup": setup,
                "read": state.read_seconds,
                "network": net_s,
                "stitch": state.stitch_seconds,
            },
        }

    def _pass(self, work: _Work, sink: _Sink, state: RunState):
        """One pass over the volume; returns the tile count, or None to start over."""
        tile = state.tile
        positions = tile_positions(work.shape, tile, self.overlap, work.content)
        rows = sorted({p[0] for p in positions})
        if work.mask is not None:
            positions = [p for p in positions if work.tile_has_mask(p, tile)]
        weight = torch.from_numpy(gaussian_map(tile) if self.gaussian else np.ones(tile, "f4"))
        min_tile = tuple(min(t, 16) for t in tile)
        step = int(getattr(self.network, "divisor", 16))
        sink.reset()
        state.seconds = state.read_seconds = state.stitch_seconds = 0.0
        done = 0
        self._emit_background(sink, 0, rows[0], tile[0])  # planes before a cropped box
        for slab in self._slabs(rows, tile[0], work):
            lo, hi = slab[0], slab[-1] + tile[0]
            todo = [p for p in positions if lo <= p[0] <= slab[-1]]
            t0 = time.perf_counter()
            x = work.read(lo, hi)  # (C, hi - lo, H, W) float32, normalised
            sink.start_slab(lo, hi)
            state.read_seconds += time.perf_counter() - t0
            i = 0
            while i < len(todo):
                chunk = todo[i : i + state.batch]
                try:
                    logits = self._forward(x, chunk, lo, state)
                except Exception as err:  # noqa: BLE001 - anything but OOM is re-raised
                    if not is_out_of_memory(err):
                        raise
                    if state.device.type == "cuda":
                        torch.cuda.empty_cache()
                    nxt = next_fallback(state.batch, tile, min_tile, state.device, step)
                    if nxt is None:
                        raise MemoryError(
                            f"out of memory with a single {list(tile)} tile on "
                            f"{state.device}; free memory or choose a smaller tile"
                        ) from err
                    state.batch, state.tile, state.device, message = nxt
                    state.dtype = resolve_precision(self.precision, state.device)
                    state.fallbacks.append(message)
                    yield Progress(done, len(positions), "fallback", message)
                    if state.tile != tile:
                        return None
                    continue
                t0 = time.perf_counter()
                sink.add(chunk, logits, weight, tile)
                state.stitch_seconds += time.perf_counter() - t0
                i += len(chunk)
                done += len(chunk)
                yield Progress(done, len(positions), "tiles", self._expectation(state, done, len(positions), work))  # fmt: skip
            later = [r for r in rows if r > slab[-1]]
            t0 = time.perf_counter()
            sink.emit(lo, later[0] if later else hi)
            state.stitch_seconds += time.perf_counter() - t0
        self._emit_background(sink, hi, work.shape[0], tile[0])  # planes after a cropped box
        return done

    @staticmethod
    def _emit_background(sink: _Sink, lo: int, hi: int, depth: int) -> None:
        """Planes ``lo:hi`` that no tile reaches (outside the nonzero box): background,
        written ``depth`` planes at a time."""
        for start in range(lo, hi, depth):
            sink.start_slab(start, min(hi, start + depth))
            sink.emit(start, min(hi, start + depth))

    def _expectation(self, state: RunState, done: int, total: int, work: _Work) -> str:
        """Once per predictor, on a CPU, after the first tiles of a 3D run: a plain
        sentence on how long a volume of this size takes here."""
        if self._told or state.device.type != "cpu" or total < 4 or done < max(2, state.batch):
            return ""
        self._told = True
        seconds = state.seconds * total / done * 1.15  # + stitching, normalising, writing
        shape = " x ".join(map(str, work.input_shape))
        return f"no GPU: a {shape} volume takes about {seconds:.0f} s on this CPU"

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

    def _forward(self, x_slab: torch.Tensor, chunk, lo: int, state: RunState) -> torch.Tensor:
        """Logits ``(B, K, *tile)`` float32 on the CPU for the tiles at ``chunk``."""
        device, tile = state.device, state.tile
        net, _ = self.inference_network(device, state.dtype)
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
            with autocast(device, state.dtype):
                y = net(x)
            y = (y[:, :, None] if self.spatial_dims == 2 else y).float().cpu()
        state.seconds += time.perf_counter() - t0
        return y


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
