"""npe2 sample data: the MNI152 T1 brain with tissue labels and a 3D phantom with labels.

Each sample opens as an Image layer and a Labels layer placed like the reader places
a file (``_reader.place``: axial slices in the display frame), with the class names as label
features and the class colours as a direct colormap. The affine goes into
``layer.metadata`` like the reader's, so the writer saves the layers back with it.
This module imports neither torch nor Qt.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._reader import META_KEY

LayerData = tuple[Any, dict[str, Any], str]


def mni152() -> list[LayerData]:
    """MNI152 2009 T1 template (1 mm) and its background / grey / white matter labels."""
    return _sample("mni152", "MNI152 T1", "MNI152 tissue labels")


def phantom() -> list[LayerData]:
    """A seeded 3D phantom (96 x 112 x 96 voxels, 1 mm) with four classes."""
    return _sample("phantom", "phantom", "phantom labels")


def _sample(key: str, image_name: str, labels_name: str) -> list[LayerData]:
    from ._reader import place
    from .data import SAMPLES

    sample = SAMPLES[key]
    image, labels, affine = sample.load()
    affine = np.asarray(affine, dtype=float)
    image, transform, meta = place(image, affine)
    labels, _, _ = place(labels, affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    meta.update(spacing=tuple(float(s) for s in spacing), source=f"sample:{key}", metadata={})

    colors = {None: "transparent", 0: "transparent"}
    colors.update({i: c for i, c in enumerate(sample.class_colors) if i > 0})
    image_kwargs = {"name": image_name, "metadata": {META_KEY: dict(meta)}, **transform}
    labels_kwargs = {
        "name": labels_name,
        "metadata": {META_KEY: dict(meta)},
        "colormap": colors,
        "features": {
            "index": np.arange(len(sample.class_names)),
            "class": list(sample.class_names),
        },
        "opacity": 0.5,
        **transform,
    }
    return [(image, image_kwargs, "image"), (labels, labels_kwargs, "labels")]
