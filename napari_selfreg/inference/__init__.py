"""Sliding-window inference: the predictor and its parts.

* :mod:`.predictor`: :class:`Predictor` (configured once, called per volume),
  :func:`iter_segment`, :func:`segment`;
* :mod:`.tiling`: tile offsets, Gaussian weights, batch sizes, out-of-memory fallbacks;
* :mod:`.network`: the inference copy of a network (BatchNorm folded, exact pools), FLOPs;
* :mod:`.inputs`: the volume in work order (normalised, resampled, streamed);
* :mod:`.outputs`: slab accumulators, argmax, entropy, results (:class:`SegmentationResult`).
"""

from .network import count_flops, exact_max_pools, fold_batchnorm
from .outputs import SegmentationResult, argmax_classes
from .predictor import DEFAULT_TILE, Predictor, iter_segment, segment
from .tiling import (
    auto_batch,
    gaussian_map,
    is_out_of_memory,
    next_fallback,
    tile_positions,
    tile_starts,
)

__all__ = [
    "DEFAULT_TILE",
    "Predictor",
    "SegmentationResult",
    "argmax_classes",
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
