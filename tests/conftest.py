"""Shared fixtures: a private model folder per test, one torch thread, a tiny saved model,
a small phantom and a folder of phantom files.

``selfreg_home`` points ``NAPARI_SELFREG_HOME`` at a fresh temporary folder so
tests never see or write the user's models; ``tiny_model`` saves a 3-class
``unet3d`` with channels (4, 8, 16) there. ``messages`` records the notifications
the plugin's widgets show.
"""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def selfreg_home(tmp_path, monkeypatch):
    """A private ``NAPARI_SELFREG_HOME`` for this test."""
    home = tmp_path / "selfreg-home"
    home.mkdir()
    monkeypatch.setenv("NAPARI_SELFREG_HOME", str(home))
    return home


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: on a busy 2-core machine tiny convolutions run ~100x
    faster without OpenMP threads waiting for each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_CLASSES = ["background", "outer", "inner"]
TINY_COLORS = ["#000000", "#e6194b", "#3cb44b"]


@pytest.fixture
def tiny_model(selfreg_home, one_torch_thread):
    """Folder of a saved 3-class 3D UNet with channels (4, 8, 16) and a 16^3 patch."""
    import torch

    from napari_selfreg import models
    from napari_selfreg.modelfile import ModelCard, save_model

    torch.manual_seed(0)
    net = models.build("unet3d", channels=(4, 8, 16), num_classes=3)
    card = ModelCard(
        name="tiny",
        architecture="unet3d",
        options={"channels": [4, 8, 16], "num_classes": 3, "in_channels": 1},
        class_names=list(TINY_CLASSES),
        class_colors=list(TINY_COLORS),
        patch_size=[16, 16, 16],
        description="untrained test model",
    )
    return save_model(net, card)


@pytest.fixture
def phantom():
    """A seeded 3-class phantom ``(image float32, labels uint8)`` of 20 x 24 x 22 voxels."""
    from napari_selfreg.data import make_phantom

    image, labels = make_phantom((20, 24, 22), num_classes=3, seed=0)
    return np.asarray(image, dtype=np.float32), np.asarray(labels, dtype=np.uint8)


@pytest.fixture
def phantom_folders(tmp_path):
    """``tmp_path`` with ``images/`` and ``labels/``: three 20^3 phantoms (3 classes) as NIfTI."""
    import nibabel as nib

    from napari_selfreg.data import make_phantom

    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    for i in range(3):
        image, labels = make_phantom((20, 20, 20), 3, seed=i)
        nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "images" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "labels" / f"c{i}.nii.gz")
    return tmp_path


@pytest.fixture
def messages(monkeypatch):
    """Notifications shown by the plugin's widgets, as ``[(kind, text)]``."""
    from napari_selfreg.widgets import _common

    shown: list[tuple[str, str]] = []
    monkeypatch.setattr(_common, "show_error", lambda text: shown.append(("error", str(text))))
    monkeypatch.setattr(_common, "show_warning", lambda text: shown.append(("warning", str(text))))
    return shown
