"""Channel-softmax KL self-distillation between blocks of a U-shaped network (MISSU).

Formulas: ``docs/method.md`` section 2. At every voxel the teacher's and the
student's channels are turned into distributions with a softmax at temperature
``tau``; the loss of one level is ``tau^2 * KL(teacher || student)`` averaged
over the voxels and the batch, with the teacher detached. Levels are weighted
explicitly (the published code weights them implicitly 0.5 / 2 / 8 through a
wrong divisor). Works on 2D ``(B, C, H, W)`` and 3D ``(B, C, D, H, W)`` features
of any model that exposes ``forward_features``; computed in float32.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F


def channel_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``tau^2 * KL(softmax(T / tau) || softmax(S / tau))`` over channels, mean over voxels and batch.

    Args:
        student: ``(B, C, *spatial)``; receives the gradient.
        teacher: ``(B, C, *spatial')``; detached, and average-pooled to the
            student's spatial size when it differs.
        tau: softmax temperature (> 0); ``tau^2`` keeps gradient scales comparable.

    Returns:
        A scalar (float32).
    """
    if tau <= 0:
        raise ValueError(f"distillation temperature must be positive, got {tau}")
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in "
            "batch or channels"
        )
    teacher = teacher.detach().float()
    if teacher.shape[2:] != student.shape[2:]:
        pool = F.adaptive_avg_pool2d if student.ndim == 4 else F.adaptive_avg_pool3d
        teacher = pool(teacher, student.shape[2:])
    log_p = (teacher / tau).log_softmax(1)
    log_q = (student.float() / tau).log_softmax(1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1)  # (B, *spatial)
    return kl.mean() * tau**2


def level_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """``(teacher, student)`` pairs ``(enc{k}, dec{k})`` of a feature mapping, deepest first.

    The UNet naming convention (encoder skip ``enc{k}`` and decoder block
    ``dec{k}`` at the same level) gives MISSU's pairs x_k -> y_k.
    """
    names = list(names)
    levels = [int(m.group(1)) for n in names if (m := re.fullmatch(r"enc(\d+)", n))]
    return [(f"enc{k}", f"dec{k}") for k in sorted(levels, reverse=True) if f"dec{k}" in names]


def distillation_loss(
    features: Mapping[str, torch.Tensor],
    pairs: Sequence[tuple[str, str]],
    weights: Sequence[float],
    tau: float = 1.0,
    teachers: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of :func:`channel_kl` over ``(teacher, student)`` feature pairs.

    Args:
        features: named block outputs of ``forward_features``.
        pairs: ``(teacher name, student name)`` per level, e.g. :func:`level_pairs`.
        weights: one weight per pair (explicit level weights).
        tau: softmax temperature.
        teachers: replacement teacher tensors by teacher name (e.g. MISSU's
            LMSF-refined skips); the others are taken from ``features``.

    Returns:
        ``(total, terms)``: ``total = sum_i weights[i] * kl_i`` and
        ``{"kd/<student>": kl_i}`` (unweighted, for logging).
    """
    if len(weights) != len(pairs):
        raise ValueError(f"{len(weights)} distillation weights for {len(pairs)} level pairs")
    teachers = teachers or {}
    terms: dict[str, torch.Tensor] = {}
    total = None
    for (t_name, s_name), weight in zip(pairs, weights, strict=True):
        teacher = teachers[t_name] if t_name in teachers else features[t_name]
        term = channel_kl(features[s_name], teacher, tau)
        terms[f"kd/{s_name}"] = term
        total = weight * term if total is None else total + weight * term
    if total is None:
        raise ValueError("no distillation pairs given")
    return total, terms
