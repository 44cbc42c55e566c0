"""napari-selfreg: self-regularised UNets for 3D medical segmentation in napari.

The package imports nothing heavy at start-up (napari loads the reader and the
sample data without torch); the public names below are loaded on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ModelCard": "napari_selfreg.modelfile",
    "ModelBundle": "napari_selfreg.modelfile",
    "save_model": "napari_selfreg.modelfile",
    "load_model": "napari_selfreg.modelfile",
    "list_models": "napari_selfreg.modelfile",
    "segment": "napari_selfreg.inference",
    "iter_segment": "napari_selfreg.inference",
    "Predictor": "napari_selfreg.inference",
    "read_volume": "napari_selfreg.io",
    "write_labels": "napari_selfreg.io",
}
_SUBMODULES = {"models", "selfreg", "modelfile", "data", "io", "preprocess", "predict", "analysis"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_LAZY, *sorted(_SUBMODULES)]
