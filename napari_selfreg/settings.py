"""Defaults shared by the library, the CLI and the widgets (one place for each; no torch).

Training and fine-tuning settings are the dataclasses of
:mod:`napari_selfreg.training.config`; the predictor's are here.
"""

from __future__ import annotations

from dataclasses import dataclass

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class PredictorDefaults:
    """Defaults of :class:`~napari_selfreg.inference.Predictor`, the ``segment`` command and
    the Segment widget."""

    overlap: float = 0.25
    device: str = "auto"
    precision: str = "auto"
    gaussian: bool = True
    crop_to_nonzero: bool = True
    keep_largest: bool = True  # the card's ``keep_largest`` groups (connected pieces)


DEFAULTS = PredictorDefaults()
