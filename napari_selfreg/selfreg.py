"""SelfReg-UNet's training-only losses (SCR, IFD) and the segmentation loss.

Formulas: ``shared/method.md`` section 1. All functions take 2D ``(B, C, H, W)``
or 3D ``(B, C, D, H, W)`` tensors of any size; reductions are in float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TEACHER = "final"


def scr_loss(
    student: torch.Tensor, teacher: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Semantic consistency regularisation of one student block.

    The teacher is detached and average-pooled to the student's spatial size
    (a teacher already of that size is used as it is: :func:`selfreg_loss` pools
    once per size); ``K = min(C_S, C_T)`` distinct channels are drawn at random on
    each side (from ``generator`` when given) and paired; the result is the mean
    squared difference over batch, pairs and voxels.
    """
    pooled = pooled_teachers(teacher, [student.shape[2:]])[tuple(student.shape[2:])]
    return block_terms(student, pooled, generator, ifd=False)["scr"]


def ifd_loss(feature: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Internal feature distillation (channel redundancy reduction) of one block.

    Channels are scored by the mean of their spatially L2-normalised maps,
    sorted (descending, no gradient through the order) and the top half is
    pulled towards the bottom half: ``mean((top - bottom)^2)``.
    """
    return block_terms(feature, ifd=True, eps=eps)["ifd"]


def block_terms(
    feature: torch.Tensor,
    pooled_teacher: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    ifd: bool = True,
    eps: float = 1e-12,
) -> dict[str, torch.Tensor]:
    """IFD and (given the teacher pooled to the block's size) SCR of one block.

    Both come from one matrix product: on the channels-innermost view ``x``
    (B, *S, C), ``x @ M`` with ``M``'s columns the IFD differences (+1 top channel,
    -1 its bottom partner) and SCR's picked channels (unit vectors) equals the
    gathers, and its gradient is a product again, in the block's own (channels-last)
    layout. The product runs in the block's own dtype, never autocast's (for bf16
    blocks the IFD differences are rounded to bf16 once; picks are exact); squares
    and means in float32.
    """
    x = channels_innermost(feature)
    c = x.shape[-1]
    half = c // 2 if ifd else 0
    k = min(c, pooled_teacher.shape[1]) if pooled_teacher is not None else 0
    terms: dict[str, torch.Tensor] = {}
    if ifd and half == 0:
        terms["ifd"] = x.new_zeros((), dtype=torch.float32)
    if half + k == 0:
        return terms
    mixing = np.zeros((c, half + k), np.float32)  # the columns of M (numpy: no op overhead)
    if half:
        spatial = tuple(range(1, x.ndim - 1))
        with torch.no_grad():  # N * mean(x / max(|x|, eps)) = sum(x) / max(|x|, eps)
            xf = x.float()  # reductions over all but the innermost axis: fast
            norms = xf.square().sum(spatial).sqrt().clamp_min(eps)
            scores = (xf.sum(spatial) / norms).mean(0).cpu().numpy()
            del xf
        order = np.argsort(-scores, kind="stable")
        mixing[order[:half], np.arange(half)] = 1.0
        mixing[order[half : 2 * half], np.arange(half)] = -1.0
    if k:
        c_t = pooled_teacher.shape[1]
        a = torch.randperm(c, generator=generator)[:k].numpy()
        b = torch.randperm(c_t, generator=generator)[:k].numpy()
        by_teacher = np.argsort(b)  # the mean over pairs ignores their order
        mixing[a[by_teacher], half + np.arange(k)] = 1.0
        target = channels_innermost(pooled_teacher)
        if k < c_t:
            target = target.index_select(-1, torch.from_numpy(b[by_teacher]).to(x.device))
    with torch.autocast(x.device.type, enabled=False):  # keep float32 features float32
        products = (x @ torch.from_numpy(mixing).to(device=x.device, dtype=x.dtype)).float()
    if half:
        terms["ifd"] = products[..., :half].pow(2).mean()
    if k:
        terms["scr"] = (products[..., half:] - target).pow(2).mean()
    return terms


def channels_innermost(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, *S)`` as the view ``(B, *S, C)``: contiguous for channels-last tensors, so
    channel products read rows and their gradients come back channels-last, in the
    layout of the network's own gradients (mixed layouts made backward 30% slower)."""
    return x.movedim(1, -1)


def block_mean(x: torch.Tensor, size) -> torch.Tensor:
    """Float32 average of ``(B, C, *S)`` over equal blocks down to ``size`` (``S`` a
    multiple of it): sums of strided slices, 5x faster here than adaptive pooling of
    a float copy and the same result."""
    out, count = x, 1
    for axis, (have, want) in enumerate(zip(x.shape[2:], size, strict=True), start=2):
        factor = have // want
        if factor == 1:
            continue
        lead = (slice(None),) * axis
        parts = [out[(*lead, slice(i, None, factor))].float() for i in range(factor)]
        out, count = sum(parts[1:], parts[0]), count * factor
    return out.float() / count


def pooled_teachers(teacher: torch.Tensor, sizes) -> dict[tuple[int, ...], torch.Tensor]:
    """The detached float32 teacher average-pooled to each spatial size in ``sizes``.

    Largest size first. A size that divides the teacher's is a block mean, taken
    from the smallest size already pooled that it divides (means of equal blocks
    of equal blocks are block means); other sizes use adaptive average pooling.
    """
    base = teacher.detach()
    full = tuple(base.shape[2:])

    def divides(big, small) -> bool:
        return all(b % s == 0 for b, s in zip(big, small, strict=True))

    done: dict[tuple[int, ...], torch.Tensor] = {}
    for size in sorted(
        {tuple(int(s) for s in size) for size in sizes}, key=lambda s: -math.prod(s)
    ):
        if not divides(full, size):
            pool = F.adaptive_avg_pool2d if base.ndim == 4 else F.adaptive_avg_pool3d
            done[size] = pool(base.float(), size)
            continue
        source = base
        for have, pooled in done.items():  # the smallest exact intermediate so far
            exact = divides(full, have) and divides(have, size)
            if exact and math.prod(have) < math.prod(source.shape[2:]):
                source = pooled
        done[size] = block_mean(source, size)
    return done


def default_groups(names: list[str]) -> dict[str, tuple[str | None, str | None]]:
    """Groups by the UNet naming convention: ``enc*``/``bottleneck`` -> encoder, ``dec*`` -> decoder."""
    groups: dict[str, tuple[str | None, str | None]] = {}
    for name in names:
        if name.startswith(("enc", "bottleneck")):
            groups[name] = ("encoder", "all")
        elif name.startswith("dec"):
            groups[name] = ("decoder", "all")
        else:
            groups[name] = (None, None)
    return groups


def selfreg_loss(
    features: Mapping[str, torch.Tensor],
    lambda_scr: float = 0.015,
    lambda_ifd: float = 0.015,
    generator: torch.Generator | None = None,
    groups: Mapping[str, tuple[str | None, str | None]] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SCR and IFD over every student of a ``forward_features`` mapping.

    Each term is averaged within its group and the group means are summed
    (UNet: IFD = mean(encoder) + mean(decoder), SCR = mean(all students)).

    Args:
        features: ordered block outputs ending with ``"final"`` (the teacher).
        lambda_scr: weight of SCR.
        lambda_ifd: weight of IFD.
        generator: random source of SCR's channel pairing.
        groups: name -> (IFD group, SCR group), None for non-students;
            default from :func:`default_groups`, normally
            ``models.selfreg_groups(model)``.

    Returns:
        ``(total, terms)``: ``total = lambda_scr * scr + lambda_ifd * ifd`` and a
        flat dict with ``scr``, ``ifd`` and ``scr/<block>``, ``ifd/<block>``.
    """
    if TEACHER not in features:
        raise KeyError("features must contain the teacher block 'final'")
    teacher = features[TEACHER]
    groups = dict(groups) if groups is not None else default_groups(list(features))
    terms: dict[str, torch.Tensor] = {}
    ifd_groups: dict[str, list[torch.Tensor]] = {}
    scr_groups: dict[str, list[torch.Tensor]] = {}
    scr_sizes = [
        f.shape[2:]
        for name, f in features.items()
        if name != TEACHER and groups.get(name, (None, None))[1] is not None
    ]
    pooled = pooled_teachers(teacher, scr_sizes)
    for name, feature in features.items():
        if name == TEACHER:
            continue
        ifd_group, scr_group = groups.get(name, (None, None))
        if ifd_group is None and scr_group is None:
            continue
        target = pooled[tuple(feature.shape[2:])] if scr_group is not None else None
        block = block_terms(feature, target, generator, ifd=ifd_group is not None)
        if ifd_group is not None:
            terms[f"ifd/{name}"] = block["ifd"]
            ifd_groups.setdefault(ifd_group, []).append(block["ifd"])
        if scr_group is not None:
            terms[f"scr/{name}"] = block["scr"]
            scr_groups.setdefault(scr_group, []).append(block["scr"])
    zero = teacher.new_zeros((), dtype=torch.float32)
    scr = sum((torch.stack(v).mean() for v in scr_groups.values()), zero)
    ifd = sum((torch.stack(v).mean() for v in ifd_groups.values()), zero)
    terms = {"scr": scr, "ifd": ifd, **terms}
    return lambda_scr * scr + lambda_ifd * ifd, terms


class SegmentationLoss(nn.Module):
    """Cross-entropy + soft Dice with settable weights and optional voxel weights.

    Args:
        ce_weight: weight of cross-entropy.
        dice_weight: weight of soft Dice loss (1 - mean Dice over classes).
        include_background: count class 0 in the Dice mean.
        smooth: Dice smoothing term.
    """

    def __init__(
        self,
        ce_weight: float = 0.5,
        dice_weight: float = 0.5,
        include_background: bool = False,
        smooth: float = 1e-5,
    ):
        super().__init__()
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.include_background = include_background
        self.smooth = smooth

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        voxel_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of logits ``(B, K, *S)`` against integer target ``(B, *S)``.

        ``voxel_weight`` ``(B, *S)`` scales each voxel (0 ignores it).
        Returns ``(total, {"ce": ..., "dice": ...})``.
        """
        logits = logits.float()
        target = target.long()
        num_classes = logits.shape[1]
        ce = F.cross_entropy(logits, target, reduction="none")
        if voxel_weight is None:
            weight = torch.ones_like(ce)
        else:
            weight = voxel_weight.float()
        ce = (ce * weight).sum() / weight.sum().clamp_min(1e-8)

        probs = logits.softmax(1)
        onehot = F.one_hot(target, num_classes).movedim(-1, 1).float()
        w = weight.unsqueeze(1)
        axes = [0, *range(2, logits.ndim)]
        intersect = (probs * onehot * w).sum(axes)
        denom = (probs * w).sum(axes) + (onehot * w).sum(axes)
        dice = (2 * intersect + self.smooth) / (denom + self.smooth)
        if not self.include_background and num_classes > 1:
            dice = dice[1:]
        dice_loss = 1 - dice.mean()
        total = self.ce_weight * ce + self.dice_weight * dice_loss
        return total, {"ce": ce.detach(), "dice": dice_loss.detach()}


class SelfRegLoss(nn.Module):
    """Segmentation loss plus SCR and IFD over a model's named blocks.

    Args:
        base: the segmentation loss (``SegmentationLoss``).
        lambda_scr: SCR weight; 0 switches it off.
        lambda_ifd: IFD weight; 0 switches it off.
        groups: name -> (IFD group, SCR group) from ``models.selfreg_groups``.
        generator: random source of SCR's pairing.
    """

    def __init__(
        self,
        base: nn.Module | None = None,
        lambda_scr: float = 0.015,
        lambda_ifd: float = 0.015,
        groups: Mapping[str, tuple[str | None, str | None]] | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.base = base if base is not None else SegmentationLoss()
        self.lambda_scr = lambda_scr
        self.lambda_ifd = lambda_ifd
        self.groups = groups
        self.generator = generator

    def forward(
        self,
        logits: torch.Tensor,
        features: Mapping[str, torch.Tensor],
        target: torch.Tensor,
        voxel_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(total, parts)``; parts hold seg, ce, dice, scr, ifd and per-block terms."""
        seg, parts = self.base(logits, target, voxel_weight)
        parts = {"seg": seg.detach(), **parts}
        total = seg
        if self.lambda_scr or self.lambda_ifd:
            reg, terms = selfreg_loss(
                features, self.lambda_scr, self.lambda_ifd, self.generator, self.groups
            )
            total = total + reg
            parts.update({k: v.detach() for k, v in terms.items()})
        return total, parts
