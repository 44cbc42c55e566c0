"""``napari_selfreg.predict``: the predictor's public names (they live in :mod:`napari_selfreg.inference`)."""

from .inference import *  # noqa: F403
from .inference import __all__ as _inference_all
from .inference.network import _NoAutocastPool  # noqa: F401 - used by tests and benchmarks
from .jobs import Progress

__all__ = [*_inference_all, "Progress"]
