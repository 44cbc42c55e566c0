"""SelfReg-UNet's training-only losses (SCR, IFD) and the segmentation loss.

Formulas and what the losses do, measured: ``docs/method.md`` section 1. All functions take 2D ``(B, C, H, W)``
or 3D ``(B, C, D, H, W)`` tensors of any size; reductions are in float32.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import NamedTuple

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
    """Internal feature distillation of one block: top-half to bottom-half channel
    distillation.

    Channels are scored by the mean of their spatially L2-normalised maps,
    sorted (descending, no gradient through the order) and the top half is
    pulled towards the bottom half: ``mean((top - bottom)^2)``. The paper calls it
    redundancy reduction; as specified it raises channel similarity (measured:
    ``docs/method.md``).
    """
    return block_terms(feature, ifd=True, eps=eps)["ifd"]


def block_terms(
    feature: torch.Tensor,
    pooled_teacher: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    ifd: bool = True,
    eps: float = 1e-12,
) -> dict[str, torch.Tensor]:
    """IFD and (given the teacher pooled to the block's size) SCR of one block."""
    values = block_values(block_plans([(feature, pooled_teacher, ifd)], generator), eps=eps)
    terms = {"ifd": values[0]} if ifd else {}
    if pooled_teacher is not None:
        terms["scr"] = values[1]
    return terms


class BlockPlan(NamedTuple):
    """One student: ``x`` (B, *S, C) its channels-innermost view, ``half`` its IFD
    pairs, ``picks`` the student channels SCR pairs with the columns of ``target``
    (N, k), the pooled teacher's picked channels (None without SCR)."""

    x: torch.Tensor
    half: int
    picks: np.ndarray
    target: torch.Tensor | None


def block_plans(
    blocks: list[tuple[torch.Tensor, torch.Tensor | None, bool]],
    generator: torch.Generator | None = None,
) -> list[BlockPlan]:
    """Draw SCR's random pairing of each block in ``blocks``, given as
    ``(feature, teacher pooled to its size or None, with IFD)``: ``K = min(C_S, C_T)``
    distinct channels on each side."""
    plans = []
    for feature, pooled_teacher, ifd in blocks:
        x = channels_innermost(feature)
        c = x.shape[-1]
        picks, target = np.zeros(0, np.int64), None
        if pooled_teacher is not None:
            c_t = pooled_teacher.shape[1]
            k = min(c, c_t)
            a = torch.randperm(c, generator=generator)[:k].numpy()
            b = torch.randperm(c_t, generator=generator)[:k].numpy()
            by_teacher = np.argsort(b)  # the mean over pairs ignores their order
            picks, target = a[by_teacher], channels_innermost(pooled_teacher)
            if k < c_t:
                target = target.index_select(-1, torch.from_numpy(b[by_teacher]).to(x.device))
            target = target.reshape(-1, k)
        plans.append(BlockPlan(x, c // 2 if ifd else 0, picks, target))
    return plans


def block_values(
    plans: list[BlockPlan], combine: np.ndarray | None = None, eps: float = 1e-12
) -> torch.Tensor:
    """Float32 ``v @ combine`` (default: ``v``) for ``v`` the blocks' IFD and SCR means
    ``(ifd_0, scr_0, ifd_1, ...)``, 0 where a block has none.

    Each block's terms are the columns of one product ``P = x @ M``: IFD
    ``mean(P[:, :half]^2)`` with ``M``'s first columns the differences of ranked
    channels (+1 top, -1 its bottom partner; ranked by the mean of their
    L2-normalised maps), SCR ``mean((P[:, half:] - target)^2)`` with unit columns
    picking the paired channels. The product equals the gathers of the formulas
    and its gradient is a product again, in the block's own (channels-last)
    layout. It runs in the block's own dtype, never autocast's (for bf16 blocks
    the IFD differences are rounded to bf16 once; picks are exact); ranking,
    squares and means in float32.
    """
    widths = [p.half + len(p.picks) for p in plans]
    weights = np.zeros((sum(widths), 2 * len(plans)), np.float32)
    start = 0
    for i, (plan, width) in enumerate(zip(plans, widths, strict=True)):
        rows, half = math.prod(plan.x.shape[:-1]), plan.half  # column sums -> the two means
        weights[start : start + half, 2 * i] = 1.0 / max(rows * half, 1)
        weights[start + half : start + width, 2 * i + 1] = 1.0 / max(rows * (width - half), 1)
        start += width
    if combine is not None:
        weights = weights @ combine
    weights_t = torch.from_numpy(weights).to(plans[0].x.device)
    return _ProjectedSquares.apply(plans, eps, weights_t, *(p.x for p in plans))


def mixing_matrix(x: torch.Tensor, half: int, picks: np.ndarray, eps: float) -> torch.Tensor:
    """``M`` of one block (C, half + k) in ``x``'s dtype; see :func:`block_values`."""
    mixing = np.zeros((x.shape[-1], half + len(picks)), np.float32)  # numpy: no op overhead
    if half:  # N * mean(x / max(|x|, eps)) = sum(x) / max(|x|, eps)
        xf = x.detach().float()  # reductions over all but the innermost axis: fast
        spatial = tuple(range(1, x.ndim - 1))
        scores = (xf.sum(spatial) / (xf * xf).sum(spatial).sqrt().clamp_min(eps)).mean(0)
        order = np.argsort(-scores.cpu().numpy(), kind="stable")
        mixing[order[:half], np.arange(half)] = 1.0
        mixing[order[half : 2 * half], np.arange(half)] = -1.0
    mixing[picks, half + np.arange(len(picks))] = 1.0
    return torch.from_numpy(mixing).to(device=x.device, dtype=x.dtype)


def _autocast_off(device: torch.device):
    """Autocast switched off where it is on (entering the context costs as much as an op)."""
    on = torch.is_autocast_enabled(device.type)
    return torch.autocast(device.type, enabled=False) if on else contextlib.nullcontext()


class _ProjectedSquares(torch.autograd.Function):
    """Weighted column sums of squares of ``R = x @ M - [0, target]`` over all
    blocks, in one autograd node whose backward is one scaled product ``R @ M^T``
    per block (chains of small autograd ops per block cost more than the products
    in small networks)."""

    @staticmethod
    def forward(ctx, plans, eps, weights, *xs):
        residuals, mixings, squares = [], [], []
        with _autocast_off(weights.device):  # float32 stays float32
            for plan, x, needed in zip(plans, xs, ctx.needs_input_grad[3:], strict=True):
                mixing = mixing_matrix(x, plan.half, plan.picks, eps)
                residual = (x.reshape(-1, x.shape[-1]) @ mixing).float()
                if plan.target is not None:
                    residual[:, plan.half :] -= plan.target
                squares.append((residual * residual).sum(0))
                residuals.append(residual if needed else None)  # frozen blocks: nothing kept
                mixings.append(mixing if needed else None)
            values = torch.cat(squares) @ weights
        # only what the backward needs: not the features, not the (float) targets
        ctx.save_for_backward(weights, *residuals, *mixings)
        ctx.shapes = [x.shape for x in xs]
        ctx.widths = [len(s) for s in squares]
        return values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values):
        weights, *saved = ctx.saved_tensors
        residuals, mixings = saved[: len(ctx.shapes)], saved[len(ctx.shapes) :]
        grads = []
        with _autocast_off(weights.device):
            scale = weights @ (2 * grad_values.float())  # d/dR of the weighted sums: 2 R scale
            for residual, mixing, s, shape in zip(residuals, mixings, scale.split(ctx.widths), ctx.shapes, strict=True):  # fmt: skip
                if residual is None:
                    grads.append(None)
                else:
                    grads.append(((residual * s).to(mixing.dtype) @ mixing.T).view(shape))
        return None, None, None, *grads


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
    scr_sizes = [
        f.shape[2:]
        for name, f in features.items()
        if name != TEACHER and groups.get(name, (None, None))[1] is not None
    ]
    pooled = pooled_teachers(teacher, scr_sizes)
    names, blocks, memberships = [], [], []
    for name, feature in features.items():
        ifd_group, scr_group = groups.get(name, (None, None))
        if name == TEACHER or (ifd_group is None and scr_group is None):
            continue
        target = pooled[tuple(feature.shape[2:])] if scr_group is not None else None
        blocks.append((feature, target, ifd_group is not None))
        names.append(name)
        memberships.append((ifd_group, scr_group))
    if not blocks:
        zero = teacher.new_zeros((), dtype=torch.float32)
        return zero, {"scr": zero, "ifd": zero}
    # v = (ifd_0, scr_0, ifd_1, ...) -> (v, IFD and SCR group means summed over
    # groups, total): one product inside the SelfReg node
    plans = block_plans(blocks, generator)
    n = len(plans)
    combine = np.zeros((2 * n, 2 * n + 3), np.float32)
    combine[:, : 2 * n] = np.eye(2 * n)
    for term, lam in ((0, lambda_ifd), (1, lambda_scr)):
        members = [m[term] for m in memberships]
        for i, group in enumerate(members):
            if group is not None:
                combine[2 * i + term, 2 * n + term] = 1.0 / members.count(group)
                combine[2 * i + term, 2 * n + 2] = lam / members.count(group)
    values = block_values(plans, combine)
    *each, ifd, scr, _ = values.detach().unbind()
    terms = {"scr": scr, "ifd": ifd}
    for i, (name, (ifd_group, scr_group)) in enumerate(zip(names, memberships, strict=True)):
        if ifd_group is not None:
            terms[f"ifd/{name}"] = each[2 * i]
        if scr_group is not None:
            terms[f"scr/{name}"] = each[2 * i + 1]
    total = values[-1]
    return total, terms


def decorrelation_loss(feature: torch.Tensor) -> torch.Tensor:
    """Our channel decorrelation of one block (not in the paper; opt-in): the mean squared
    off-diagonal correlation between its channels, each channel centred and scaled to unit
    norm over batch and voxels. Unlike IFD it pushes channels apart, so it lowers the
    mean |cos| the feature inspector shows (``docs/method.md``)."""
    c = feature.shape[1]
    if c < 2:
        return feature.new_zeros((), dtype=torch.float32)
    with torch.autocast(feature.device.type, enabled=False):
        x = feature.float().transpose(0, 1).reshape(c, -1)
        x = x - x.mean(dim=1, keepdim=True)
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)
        corr = x @ x.T
        off = corr - torch.diag_embed(torch.diagonal(corr))
        return (off**2).sum() / (c * (c - 1))


class SegmentationLoss(nn.Module):
    """Cross-entropy + soft Dice with settable weights and optional voxel weights.

    Args:
        ce_weight: weight of cross-entropy.
        dice_weight: weight of soft Dice loss (1 - mean Dice over classes).
        include_background: count class 0 in the Dice mean.
        smooth: Dice smoothing term.
        squared: squared denominators, ``sum p^2 + sum g^2`` (the SelfReg-UNet authors'
            Dice, as in TransUNet's code); else ``sum p + sum g``.
    """

    def __init__(
        self,
        ce_weight: float = 0.5,
        dice_weight: float = 0.5,
        include_background: bool = False,
        smooth: float = 1e-5,
        squared: bool = False,
    ):
        super().__init__()
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.include_background = include_background
        self.smooth = smooth
        self.squared = squared

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
        power = 2 if self.squared else 1  # one-hot targets: g^2 = g
        denom = (probs.pow(power) * w).sum(axes) + (onehot * w).sum(axes)
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
        lambda_decor: weight of our channel decorrelation (:func:`decorrelation_loss`),
            averaged like IFD (mean per IFD group, groups summed); 0 (default) is off.
    """

    def __init__(
        self,
        base: nn.Module | None = None,
        lambda_scr: float = 0.015,
        lambda_ifd: float = 0.015,
        groups: Mapping[str, tuple[str | None, str | None]] | None = None,
        generator: torch.Generator | None = None,
        lambda_decor: float = 0.0,
    ):
        super().__init__()
        self.base = base if base is not None else SegmentationLoss()
        self.lambda_scr = lambda_scr
        self.lambda_ifd = lambda_ifd
        self.lambda_decor = lambda_decor
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
        if self.lambda_decor:
            groups = dict(self.groups) if self.groups is not None else default_groups(list(features))  # fmt: skip
            by_group: dict[str, list[torch.Tensor]] = {}
            for name, (ifd_group, _) in groups.items():
                if ifd_group is not None and name in features:
                    by_group.setdefault(ifd_group, []).append(decorrelation_loss(features[name]))
            decor = sum(torch.stack(v).mean() for v in by_group.values())
            total = total + self.lambda_decor * decor
            parts["decor"] = decor.detach()
        return total, parts
