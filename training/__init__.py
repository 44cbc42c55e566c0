"""The bundled training module (installed as ``napari_selfreg.training``).

One loop for training from scratch, fine-tuning on a user's corrections and
data-parallel runs under ``torchrun``:

* :func:`iter_train` / :func:`train`: train on :class:`Case` lists from
  :func:`load_folder` (NIfTI folders) or :func:`case_from_arrays`;
* :func:`iter_finetune` (and ``training.finetune.finetune``, its draining form; the
  package name ``finetune`` is the module): a new model version from corrected labels;
* :class:`TrainConfig`, :class:`FinetuneConfig`: settings shared by CLI, widget, tests;
* :class:`TrainEvent`: the progress events every generator yields.

Names load on first use, so the CLI parser does not import torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "TrainConfig": "config",
    "FinetuneConfig": "config",
    "TrainEvent": "config",
    "TrainingError": "config",
    "LabelError": "config",
    "NonFiniteLossError": "config",
    "CheckpointError": "config",
    "Case": "datasets",
    "case_from_arrays": "datasets",
    "load_folder": "datasets",
    "Trainer": "loop",
    "iter_train": "loop",
    "train": "loop",
    "iter_finetune": "finetune",
    "checkpoint_dir": "checkpoint",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
