"""The module's self-test, Qt-free: run by Slicer's ``ScriptedLoadableModuleTest`` and by
the project's tests on ``slicer-core``.

It saves an untrained 3-class model (a random head, so that it predicts every class)
into a scratch folder, puts a phantom with an oblique IJK-to-RAS matrix in the scene,
segments it, inspects it and fine-tunes the model for one step on a painted segment
of a new class. Nothing outside ``folder`` and the scene is written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

import slicer

from . import nodes
from .logic import SelfRegSegmentationLogic

SHAPE = (24, 28, 26)
OPTIONS = {"tile": 16, "device": "cpu", "precision": "fp32"}


def oblique_affine() -> np.ndarray:
    """Axes permuted (i -> A, j -> S, k -> R), rotated 20 degrees about S, voxels 1.2 x
    0.9 x 1.5 mm: the model (RAS) needs a transpose, the segments the rotation."""
    t = np.deg2rad(20)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.array([[0, 0, 1.5], [1.2, 0, 0], [0, 0.9, 0]])
    affine[:3, 3] = [-10.0, 5.0, 3.0]
    return affine


def save_test_model(folder: Path) -> Path:
    """An untrained unet3d (channels 4, 8, 16; patch 16^3; orientation RAS) in ``folder``."""
    import torch

    from napari_selfreg import models
    from napari_selfreg.modelfile import ModelCard, save_model

    torch.manual_seed(0)
    net = models.build("unet3d", channels=(4, 8, 16), num_classes=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        net.head.weight.copy_(torch.randn(net.head.weight.shape, generator=generator))
        net.head.bias.zero_()
    card = ModelCard(
        name="selfreg-selftest",
        architecture="unet3d",
        options={"channels": [4, 8, 16], "num_classes": 3, "in_channels": 1},
        class_names=["background", "outer", "inner"],
        class_colors=["#000000", "#e6194b", "#3cb44b"],
        patch_size=[16, 16, 16],
        orientation="RAS",
        description="untrained self-test model",
    )
    return save_model(net, card, Path(folder) / "selftest-model", new_version=True)


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)


def run_self_test(scene, folder, say: Callable[[str], None] = print) -> dict:
    """Segment, inspect and fine-tune on MRML nodes; raises ``AssertionError`` on a
    failed check. Returns the nodes and the new model folder."""
    from napari_selfreg.data import make_phantom
    from napari_selfreg.inference import segment
    from napari_selfreg.modelfile import load_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = save_test_model(folder)
    image, _ = make_phantom(SHAPE, 3, seed=0)
    affine = oblique_affine()
    volume = nodes.add_scalar_volume(scene, "SelfReg self-test phantom", image, affine)
    logic = SelfRegSegmentationLogic(scene)

    say("Segmenting a phantom with an untrained model")
    segmentation = logic.segment(volume, model, **OPTIONS)
    listed = nodes.segment_list(segmentation)
    _check([n for _, n in listed] == ["outer", "inner"], f"segments {listed}")
    labels = nodes.export_segments(segmentation, [s for s, _ in listed], volume)
    direct = segment(nodes.volume_array(volume), model, affine=affine, **OPTIONS).labels
    _check(np.array_equal(labels, np.asarray(direct)), "segments differ from napari-selfreg's labels")  # fmt: skip
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    _check(segmentation.GetNodeReference(role) is volume, "the reference geometry is not the volume")  # fmt: skip
    stored = slicer.vtkOrientedImageData()
    segmentation.GetBinaryLabelmapRepresentation(listed[0][0], stored)
    world = nodes.array_to_matrix(np.eye(4))
    stored.GetImageToWorldMatrix(world)
    _check(np.allclose(nodes.matrix_to_array(world), affine, atol=1e-9), "segment geometry")
    _check(tuple(stored.GetDimensions()) == SHAPE, "segment dimensions")

    say("Inspecting the first encoder block")
    region = (slice(4, 20), slice(6, 22), slice(5, 21))
    inspection = logic.inspect(volume, model, block="enc1", region=region, top_k=1)
    centre = affine @ [4.5, 6.5, 5.5, 1]  # the first 2x2x2 voxels' centre
    first = nodes.ijk_to_ras(inspection.features[0]) @ [0, 0, 0, 1]
    _check(np.allclose(first, centre, atol=1e-9), "feature map placement")
    _check(inspection.table.GetNumberOfRows() == 5, "one statistics row per block")

    say("Fine-tuning on a painted segment of a new class")
    mask = np.zeros(SHAPE, np.uint8)
    mask[8:14, 10:16, 9:15] = 1
    segmentation.AddSegmentFromBinaryLabelmapRepresentation(
        nodes.oriented_image(mask, affine), "lesion", (0.9, 0.8, 0.1)
    )
    tuned = logic.finetune(
        volume, segmentation, out=folder / "selftest-tuned", iterations=1,
        seconds_budget=None, precision="fp32", device="cpu", augment=False,
    )  # fmt: skip
    card = load_model(tuned).card
    _check(card.parent == str(Path(model).resolve()), f"parent {card.parent!r}")
    _check(card.class_names == ["background", "outer", "inner", "lesion"], f"{card.class_names}")
    say("Self-test passed")
    return {"volume": volume, "segmentation": segmentation, "inspection": inspection, "model": tuned}  # fmt: skip
