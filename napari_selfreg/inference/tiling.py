"""Where the tiles go: offsets, Gaussian weights, batch sizes and out-of-memory fallbacks."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Tile offsets covering ``size``: step at most ``tile * (1 - overlap)``, spread evenly
    from 0 to ``size - tile`` (nnU-Net's rule)."""
    if tile >= size:
        return [0]
    n = math.ceil((size - tile) / max(1.0, tile * (1.0 - overlap))) + 1
    step = (size - tile) / (n - 1)
    return [int(round(i * step)) for i in range(n)]


def tile_positions(
    shape: Sequence[int], tile: Sequence[int], overlap: float, box=None
) -> list[tuple]:
    """All tile corners for ``shape`` in z-major (C) order; with ``box`` (``(lo, hi)`` per
    axis) only those covering the box, widened to at least a tile where it is thinner."""
    starts = []
    for axis, (s, t) in enumerate(zip(shape, tile, strict=True)):
        lo, hi = (0, s) if box is None else (int(box[axis][0]), int(box[axis][1]))
        if hi - lo < t:  # widen about the centre, inside the volume
            lo = max(0, min(s - t, (lo + hi - t) // 2))
            hi = min(s, lo + t)
        starts.append([lo + p for p in tile_starts(hi - lo, t, overlap)])
    return list(itertools.product(*starts))


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


OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")  # CUDA/MPS, CPU


def is_out_of_memory(err: BaseException) -> bool:
    """True for allocator out-of-memory errors (CUDA, MPS, and the CPU allocator's
    "DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(words in text for words in OUT_OF_MEMORY)
