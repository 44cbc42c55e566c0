"""Dice per class: from counts (so processes can sum them) and on whole volumes."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def dice_counts(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-class ``[intersection, predicted, true]`` voxel counts ``(3, K)`` float64.

    Args:
        pred: predicted class indices ``(B, *S)``.
        target: true class indices ``(B, *S)``.
        num_classes: K.
        weight: voxels with weight 0 are not counted.
    """
    keep = None if weight is None else weight > 0
    if keep is not None:
        pred, target = pred[keep], target[keep]
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    inter = torch.bincount(target[pred == target], minlength=num_classes)[:num_classes]
    npred = torch.bincount(pred, minlength=num_classes)[:num_classes]
    ntrue = torch.bincount(target, minlength=num_classes)[:num_classes]
    return torch.stack([inter, npred, ntrue]).double().cpu()


def dice_from_counts(counts: torch.Tensor | np.ndarray) -> list[float | None]:
    """Dice per class from :func:`dice_counts` output; None where a class is absent everywhere."""
    counts = np.asarray(counts, dtype=np.float64)
    out: list[float | None] = []
    for inter, npred, ntrue in counts.T:
        denom = npred + ntrue
        out.append(None if denom == 0 else float(2 * inter / denom))
    return out


def mean_foreground(dice: list[float | None]) -> float:
    """Mean Dice over foreground classes that occur (0 when none does)."""
    values = [d for d in dice[1:] if d is not None]
    return float(np.mean(values)) if values else 0.0


LOWER_THAN_BASE = 0.005
"""A fine-tune whose Dice on the reviewed voxels falls this far under its base's is said to."""


def lowered(card_metrics: dict[str, Any]) -> tuple[float, float] | None:
    """``(base, round)`` mean Dice on the reviewed voxels when a fine-tuning round ended
    :data:`LOWER_THAN_BASE` or more under its base model there, else None."""
    base, after = card_metrics.get("base_patch_mean_dice"), card_metrics.get("patch_mean_dice")
    if isinstance(base, float) and isinstance(after, float) and after < base - LOWER_THAN_BASE:
        return base, after
    return None


UNLEARNT_DICE = 0.5
"""A class under this Dice on the voxels a user reviewed is not learnt by the fine-tune."""


def unlearnt(dice: dict[str, float | None]) -> list[str]:
    """``"name (0.18)"`` for each class but background under :data:`UNLEARNT_DICE`: the
    round underfits where the user said what is what, and more steps help."""
    return [f"{k} ({v:.2f})" for k, v in dice.items() if k.lower() != "background" and v is not None and v < UNLEARNT_DICE]  # fmt: skip


def named(dice: list[float | None], class_names: list[str]) -> dict[str, float | None]:
    """``{class name: dice}``."""
    return {name: (None if d is None else round(d, 5)) for name, d in zip(class_names, dice)}  # noqa: B905


def volume_dice(
    pred: np.ndarray, target: np.ndarray, num_classes: int, weight: np.ndarray | None = None
) -> dict[str, Any]:
    """Dice per class of two label volumes (numpy), via :func:`dice_counts` (weight 0: not counted)."""
    counts = dice_counts(
        torch.as_tensor(pred),
        torch.as_tensor(target),
        num_classes,
        None if weight is None else torch.as_tensor(weight),
    )
    return {"counts": counts.numpy(), "dice": dice_from_counts(counts)}
