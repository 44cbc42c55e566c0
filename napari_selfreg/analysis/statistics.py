"""Redundancy statistics of a block's channels: similarity, effective rank, scores, PCA, SelfReg terms."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass
class BlockStats:
    """Redundancy statistics of one block (see ``docs/method.md``)."""

    channels: int
    mean_abs_cos: float
    ifd: float
    scr: float  # NaN for the teacher itself
    effective_rank: float
    decor: float  # our decorrelation term: mean squared off-diagonal channel correlation
    channel_scores: np.ndarray
    similarity: np.ndarray  # (C, C) |cosine|


def _gram(feature: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """``(C, C)`` float64 Gram matrix of the flattened channels, accumulated in chunks."""
    x = np.asarray(feature).reshape(feature.shape[0], -1)
    gram = np.zeros((x.shape[0], x.shape[0]))
    for i in range(0, x.shape[1], chunk):
        part = x[:, i : i + chunk].astype(np.float64)
        gram += part @ part.T
    return gram


def channel_similarity(feature: np.ndarray, gram: np.ndarray | None = None) -> np.ndarray:
    """``(C, C)`` |cosine similarity| of the flattened channel maps; diagonal 1.

    Args:
        feature: ``(C, *spatial)``.
        gram: its :func:`_gram`, when already computed.
    """
    gram = _gram(feature) if gram is None else gram
    norm = np.sqrt(np.clip(np.diag(gram), 0, None))
    sim = np.clip(np.abs(gram) / np.maximum(np.outer(norm, norm), 1e-30), 0.0, 1.0)
    np.fill_diagonal(sim, 1.0)
    return sim.astype(np.float32)


def effective_rank(feature: np.ndarray, gram: np.ndarray | None = None) -> float:
    """exp(entropy) of the normalised singular values of the ``C x N`` channel matrix (1..C)."""
    gram = _gram(feature) if gram is None else gram
    s = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None))
    if s.sum() <= 0:
        return 1.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def channel_scores(feature: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """IFD channel scores ``s_c``: mean of each channel map divided by its L2 norm."""
    x = np.asarray(feature, dtype=np.float32).reshape(feature.shape[0], -1)
    norm = np.maximum(np.linalg.norm(x, axis=1), eps)
    return (x.sum(axis=1) / norm / x.shape[1]).astype(np.float32)


def top_channels(feature: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` channels of highest energy (mean square), highest first."""
    x = np.asarray(feature, dtype=np.float32).reshape(feature.shape[0], -1)
    energy = np.mean(x.astype(np.float64) ** 2, axis=1)
    return np.argsort(-energy, kind="stable")[: max(1, int(k))]


def pca_rgb(feature: np.ndarray) -> np.ndarray:
    """First three principal components over channels as RGB in [0, 1], ``(*spatial, 3)``.

    Each component is centred, its sign fixed (largest loading positive) and
    stretched between its 1st and 99th percentiles.
    """
    c = feature.shape[0]
    x = np.asarray(feature, dtype=np.float32).reshape(c, -1)
    x = x - x.mean(axis=1, keepdims=True)
    cov = (x @ x.T).astype(np.float64) / max(1, x.shape[1])
    _, vecs = np.linalg.eigh(cov)
    vecs = vecs[:, ::-1][:, :3]
    vecs *= np.sign(vecs[np.abs(vecs).argmax(axis=0), range(vecs.shape[1])])
    rgb = np.zeros((3, x.shape[1]), dtype=np.float32)
    proj = vecs.T.astype(np.float32) @ x
    step = max(1, proj.shape[1] // 200_000)
    for i, comp in enumerate(proj):
        lo, hi = np.percentile(comp[::step], [1, 99])
        if hi > lo:
            rgb[i] = np.clip((comp - lo) / (hi - lo), 0, 1)
    return np.moveaxis(rgb.reshape(3, *feature.shape[1:]), 0, -1)


def block_stats(feature: np.ndarray, teacher: np.ndarray | None, generator=None, draws=4):
    """:class:`BlockStats` of one ``(C, *spatial)`` block; SCR against ``teacher`` (None: NaN)."""
    import torch
    import torch.nn.functional as F

    from ..selfreg import decorrelation_loss, ifd_loss, scr_loss

    gram = _gram(feature)
    sim = channel_similarity(feature, gram)
    c = sim.shape[0]
    off = float((sim.sum() - c) / (c * (c - 1))) if c > 1 else 0.0
    f = torch.from_numpy(np.ascontiguousarray(feature, dtype=np.float32))[None]
    scr = float("nan")
    if teacher is not None:
        t = torch.from_numpy(np.ascontiguousarray(teacher, dtype=np.float32))[None]
        f_s, t_s = _drop_unit_axes(f, t)
        pool = F.adaptive_avg_pool2d if f_s.ndim == 4 else F.adaptive_avg_pool3d
        t_s = pool(t_s, f_s.shape[2:])  # once; scr_loss's own pooling is then the identity
        scr = float(np.mean([float(scr_loss(f_s, t_s, generator)) for _ in range(draws)]))
    return BlockStats(
        channels=c,
        mean_abs_cos=off,
        ifd=float(ifd_loss(f)),
        scr=scr,
        effective_rank=effective_rank(feature, gram),
        decor=float(decorrelation_loss(f)),
        channel_scores=channel_scores(feature),
        similarity=sim,
    )


def _drop_unit_axes(f, t):
    """Squeeze spatial axes that are 1 in both (a 2D model's slice axis) for pooling."""
    axes = [i for i in range(2, f.ndim) if f.shape[i] == 1 and t.shape[i] == 1]
    if f.ndim - len(axes) >= 4:
        for i in reversed(axes):
            f, t = f.squeeze(i), t.squeeze(i)
    return f, t


def redundancy_stats(features, generator=None, draws: int = 4) -> dict[str, BlockStats]:
    """Per-block statistics of a :class:`FeatureSet` or a name -> ``(C, *S)`` mapping.

    SCR is measured against the ``final`` block (the SelfReg teacher),
    averaged over ``draws`` random pairings from ``generator`` (default seeded 0).
    """
    import torch

    feats = getattr(features, "features", features)  # a FeatureSet or its mapping
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    teacher = feats.get("final")
    return {
        name: block_stats(f, None if name == "final" else teacher, generator, draws)
        for name, f in feats.items()
    }


def stats_table(stats: Mapping[str, BlockStats]) -> dict[str, list]:
    """Column-wise table (block, channels, mean |cos|, IFD, SCR, effective rank,
    decorrelation) for plots."""
    return {
        "block": list(stats),
        "channels": [s.channels for s in stats.values()],
        "mean_abs_cos": [s.mean_abs_cos for s in stats.values()],
        "ifd": [s.ifd for s in stats.values()],
        "scr": [s.scr for s in stats.values()],
        "effective_rank": [s.effective_rank for s in stats.values()],
        "decor": [s.decor for s in stats.values()],
    }
