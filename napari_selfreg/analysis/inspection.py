"""Whole inspector jobs: everything the Inspect features widget shows, for one or two models."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..jobs import Progress, drain
from .passes import CamSet, FeatureSet, extract_features, grad_cam
from .regions import InspectError
from .statistics import BlockStats, block_stats, pca_rgb, redundancy_stats, top_channels


@dataclass
class ModelInspection:
    """Everything the inspector shows for one model."""

    features: FeatureSet
    stats: dict[str, BlockStats]
    block: str
    top: np.ndarray  # channel indices, highest energy first
    pca: np.ndarray  # (*spatial, 3) in [0, 1]
    cams: CamSet | None = None


def iter_inspect(
    bundles: Sequence,
    image,
    block: str,
    region=None,
    spacing=None,
    top_k: int = 4,
    cam_class: int | None = None,
    cam: bool = True,
    device="cpu",
    precision="fp32",
    draws: int = 4,
    affine=None,
) -> Generator[Any, None, list[ModelInspection]]:
    """Everything the inspector shows, for one or two models; yields ``jobs.Progress``.

    ``affine`` (the image's voxel-to-world matrix) brings the region to each model's
    orientation; the maps come back in the image's order.

    Returns (as ``StopIteration.value``) one :class:`ModelInspection` per bundle.
    Cancelling between yields leaves nothing half-done.
    """
    import torch

    steps = [len(b.network.feature_info) + 2 + int(cam) for b in bundles]
    total, done = sum(steps), 0
    results = []
    for bundle in bundles:
        name = bundle.card.name
        yield Progress(done, total, "features", f"{name}: features")
        fs = extract_features(bundle, image, region, spacing, device, precision, affine)
        if block not in fs.features:
            raise InspectError(f"model {name!r} has no block {block!r}")
        done += 1
        generator = torch.Generator().manual_seed(0)
        stats = {}
        for bname, feature in fs.features.items():
            yield Progress(done, total, "statistics", f"{name}: statistics of {bname}")
            teacher = None if bname == "final" else fs.features.get("final")
            if (bname, draws) not in fs.stats_cache:
                fs.stats_cache[bname, draws] = block_stats(feature, teacher, generator, draws)
            stats[bname] = fs.stats_cache[bname, draws]
            done += 1
        yield Progress(done, total, "pca", f"{name}: top channels and PCA of {block}")
        feature = fs.features[block]
        result = ModelInspection(fs, stats, block, top_channels(feature, top_k), pca_rgb(feature))
        done += 1
        if cam:
            yield Progress(done, total, "grad-cam", f"{name}: Grad-CAM")
            result.cams = grad_cam(
                bundle, image, cam_class, None, region, spacing, device, precision, affine
            )
            done += 1
        results.append(result)
    yield Progress(total, total, "finish", "done")
    return results


def inspect(bundles: Sequence, image, block: str, **kwargs) -> list[ModelInspection]:
    """Drain :func:`iter_inspect` and return its result."""
    return drain(iter_inspect(bundles, image, block, **kwargs))


def compare(
    bundle_a, bundle_b, image, region=None, **kwargs
) -> tuple[dict[str, BlockStats], dict[str, BlockStats]]:
    """Redundancy statistics of two models on the same image region (for side-by-side plots)."""
    out = []
    for bundle in (bundle_a, bundle_b):
        fs = extract_features(bundle, image, region, **kwargs)
        out.append(redundancy_stats(fs))
    return out[0], out[1]
