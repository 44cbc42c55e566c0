"""Qt-free part of the SelfReg Segmentation module: importable with Slicer's MRML
libraries alone (``slicer-core``), e.g. in tests or scripts."""

from .logic import Inspection, SelfRegSegmentationLogic, run_job

__all__ = ["Inspection", "SelfRegSegmentationLogic", "run_job"]
