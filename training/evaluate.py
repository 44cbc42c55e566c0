"""Validation during training (fixed patches) and on whole volumes (the predictor)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from napari_selfreg.device import precision_name
from napari_selfreg.modelfile import ModelBundle, ModelCard

from . import metrics
from .config import TrainConfig
from .datasets import Case, PatchSampler


def predict_volume(
    network: nn.Module,
    card: ModelCard,
    image: np.ndarray,
    device: torch.device | str = "cpu",
    precision: torch.dtype | None | str = None,
    overlap: float = 0.25,
    axis: int = 0,
) -> np.ndarray:
    """Labels ``(*S)`` of a raw image ``(*S)`` as the Segment command would produce them.

    The predictor normalises the image with the card's spec, tiles it with the
    card's patch size and runs 2D models slice by slice.
    """
    from napari_selfreg.inference import Predictor

    if not isinstance(precision, str):
        precision = precision_name(precision)
    network.eval()
    bundle = ModelBundle(network=network, card=card, path=None)
    predictor = Predictor(
        bundle,
        tile=tuple(card.patch_size) if card.patch_size else None,
        overlap=overlap,
        device=str(device),
        precision=precision,
        axis=axis,
    )
    return np.asarray(predictor.segment(image).labels)


def segment_cases(
    network: nn.Module,
    card: ModelCard,
    cases: list[Case],
    device: torch.device | str,
    precision: Any,
    axis: int = 0,
) -> np.ndarray:
    """Summed ``(3, K)`` Dice counts of ``network`` over whole cases (raw images);
    voxels a case weighs 0 are not counted."""
    was_training = network.training
    total = np.zeros((3, card.num_classes))
    for case in cases:
        image = case.raw if case.raw is not None else case.image[0]
        pred = predict_volume(network, card, image, device, precision, axis=axis)
        total += metrics.volume_dice(pred, case.labels, card.num_classes, case.weight)["counts"]
    network.train(was_training)
    return total


class PatchValidation:
    """Fixed validation patches, the same on every run with this seed.

    Args:
        cases: validation cases.
        config: their patch size, slice axis, seed and number of patches.
        spatial_dims: 2 or 3.
        rank: this process; it scores patches ``rank::world_size``.
        world_size: number of processes.
    """

    def __init__(
        self, cases: list[Case], config: TrainConfig, spatial_dims: int, rank: int, world_size: int
    ):
        self.patches: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        if cases and config.val_patches > 0:
            sampler = PatchSampler(
                cases, config.patch_size, spatial_dims, slice_axis=config.slice_axis,
                fg_fraction=0.5, focus_fraction=config.focus_fraction,
                rng=np.random.default_rng([config.seed, 7919]),
            )  # fmt: skip
            patches = [sampler.sample(1) for _ in range(config.val_patches)]
            self.patches = patches[rank::world_size]

    @torch.no_grad()
    def counts(self, network: nn.Module, num_classes: int, to_device, amp) -> torch.Tensor:
        """Summed ``(3, K)`` Dice counts of ``network`` on this process's patches."""
        from napari_selfreg.device import autocast

        was_training = network.training
        network.eval()
        total = torch.zeros(3, num_classes, dtype=torch.float64)
        for image, labels, weight in self.patches:
            x = to_device(image, image=True)
            with autocast(x.device, amp):
                pred = network(x).argmax(1).cpu()
            total += metrics.dice_counts(
                pred, torch.from_numpy(labels), num_classes, torch.from_numpy(weight)
            )
        network.train(was_training)
        return total
