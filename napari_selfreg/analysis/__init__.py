"""Feature inspector library: block features, redundancy statistics, PCA composite, Grad-CAM.

:mod:`.regions` (what to look at), :mod:`.passes` (model passes: features and
Grad-CAM, cached), :mod:`.statistics` (channel similarity, effective rank, SelfReg
terms, PCA), :mod:`.inspection` (whole jobs for the widget).

Everything here rests on one mechanism, ``network.forward_features(x) ->
(logits, OrderedDict of block outputs ending with "final")`` plus
``network.feature_info``. No Qt and no napari; torch is imported inside the
functions that need it, so the widget module stays light.

Arrays keep the image's axis order. A block's map of reduction ``r`` (per image
axis) computed on a region starting at voxel ``o`` sits in image space with
``scale = r * image_scale`` and ``translate = image_translate + image_linear @
(o + (r - 1) / 2)`` (:func:`block_placement`): feature voxel ``j`` covers the
image voxels ``o + r*j ... o + r*j + r - 1`` and sits at their centre.
"""

from .inspection import ModelInspection, compare, inspect, iter_inspect
from .passes import (
    CACHE_SIZE,
    DEFAULT_PATCH,
    CamSet,
    FeatureSet,
    clear_cache,
    extract_features,
    grad_cam,
)
from .regions import InspectError, block_placement, box_region, centred_region, limit_region
from .statistics import (
    BlockStats,
    block_stats,
    channel_scores,
    channel_similarity,
    effective_rank,
    pca_rgb,
    redundancy_stats,
    stats_table,
    top_channels,
)

__all__ = [
    "CACHE_SIZE", "DEFAULT_PATCH", "BlockStats", "CamSet", "FeatureSet", "InspectError",
    "ModelInspection", "block_placement", "block_stats", "box_region", "centred_region",
    "channel_scores", "channel_similarity", "clear_cache", "compare", "effective_rank",
    "extract_features", "grad_cam", "inspect", "iter_inspect", "limit_region", "pca_rgb",
    "redundancy_stats", "stats_table", "top_channels",
]  # fmt: skip
