"""Swin-UNet (2D) with every Swin block exposed as a named feature (SelfReg Swin-UNet).

The network follows Cao et al.'s Swin-Unet ("Swin-T lite": patch 4, embed 96,
depths 2-2-2-2, heads 3-6-12-24, window 7): a patch-embedding encoder of Swin
stages with patch merging, a bottleneck stage, a decoder of patch-expanding
stages that concatenate the encoder skip (the input of the matching encoder
stage, as in the reference) and fuse it with a linear layer, then a final x4
patch expansion, LayerNorm and a 1x1 classifier. Trained from scratch here.

Features (channel-first ``(B, C, H, W)``): ``enc{i}_{j}`` (stage i, block j),
``bottleneck_{j}``, ``dec{i}_{j}`` and ``final`` (the LayerNorm-ed output of the
final patch expansion, SelfReg's teacher). SelfReg groups as the paper's Swin
code: IFD ``encoder_first/encoder_last/decoder_first/decoder_last``, SCR
``first/last`` (block 0 of a stage is "first", every later block "last").

Any input size works. The input is padded (replicate) to a multiple of
``patch_size * 2 ** (stages - 1)`` (32) so every patch merging sees an even
grid; inside each Swin block the token grid is padded to a multiple of the
window and the padded tokens are masked out as keys (they form their own
attention region), so real tokens never attend to padding. A stage whose grid
fits into one window uses no shift (as the reference does at 7x7). Logits and
features are cropped back to the input size (``ceil(size / reduction)``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._registry import FeatureInfo, register_model
from .layers import crop_to, pad_to_multiple

_MASKED = -100.0  # additive attention mask value (finite: safe under bf16 autocast)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """``(B, H, W, C)`` with H, W multiples of ``ws`` -> ``(B * nW, ws * ws, C)``."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, ws * ws, C)`` -> ``(B, H, W, C)``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def attention_mask(
    h: int, w: int, hp: int, wp: int, ws: int, shift: int, device: torch.device
) -> torch.Tensor | None:
    """Additive mask ``(nW, N, N)`` for windows of a padded, rolled ``hp x wp`` grid.

    Tokens attend only within their region: the shifted-window regions of the
    reference (in the rolled frame) and one extra region for the padding
    (rows >= h or columns >= w before the roll). None when nothing is masked.
    """
    if shift == 0 and (h, w) == (hp, wp):
        return None
    ids = torch.zeros(hp, wp, dtype=torch.long, device=device)
    if shift:
        cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
        for i, rows in enumerate(cuts):
            for j, cols in enumerate(cuts):
                ids[rows, cols] = 3 * i + j
    valid = torch.zeros(hp, wp, dtype=torch.bool, device=device)
    valid[:h, :w] = True
    valid = torch.roll(valid, (-shift, -shift), dims=(0, 1))
    ids = torch.where(valid, ids, -1)
    ids = window_partition(ids[None, :, :, None], ws).squeeze(-1)  # (nW, N)
    different = ids[:, :, None] != ids[:, None, :]
    return torch.zeros(different.shape, device=device).masked_fill(different, _MASKED)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Swin width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        ws = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))
        coords = coords.flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        index = rel[..., 0] * (2 * ws - 1) + rel[..., 1]  # (N, N)
        self.register_buffer("relative_position_index", index, persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` ``(B * nW, N, C)``, ``mask`` ``(nW, N, N)`` or None -> ``(B * nW, N, C)``."""
        bw, n, c = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B * nW, heads, N, d)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(bw, self.num_heads, n, n)
        out = attn.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    """Pre-norm Swin block on ``(B, H, W, C)``: (shifted) window attention + MLP."""

    def __init__(self, dim, num_heads, window_size, shifted, mlp_ratio, qkv_bias, drop_path):
        super().__init__()
        self.window_size = window_size
        self.shift = window_size // 2 if shifted else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        shift = self.shift if max(h, w) > ws else 0  # one window covers the grid: no shift
        hp, wp = h + (-h) % ws, w + (-w) % ws
        y = F.pad(self.norm1(x), (0, 0, 0, wp - w, 0, hp - h))
        if shift:
            y = torch.roll(y, (-shift, -shift), dims=(1, 2))
        mask = attention_mask(h, w, hp, wp, ws, shift, x.device)
        y = window_reverse(self.attn(window_partition(y, ws), mask), ws, hp, wp)
        if shift:
            y = torch.roll(y, (shift, shift), dims=(1, 2))
        x = x + self.drop_path(y[:, :h, :w])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbours -> LayerNorm(4C) -> Linear(4C, 2C): ``(B, H, W, C)`` -> ``(B, H/2, W/2, 2C)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = (
            x.view(b, h // 2, 2, w // 2, 2, c)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(b, h // 2, w // 2, 4 * c)
        )
        return self.reduction(self.norm(x))


class PatchExpand(nn.Module):
    """Linear(C, f^2 C_out) then pixel shuffle by ``f`` and LayerNorm(C_out).

    ``f=2, C_out=C/2`` is Swin-Unet's patch expanding; ``f=4, C_out=C`` its final x4.
    """

    def __init__(self, dim: int, factor: int, out_dim: int):
        super().__init__()
        self.factor = factor
        self.out_dim = out_dim
        self.expand = nn.Linear(dim, factor * factor * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        f, c = self.factor, self.out_dim
        x = self.expand(x).view(b, h, w, f, f, c).permute(0, 1, 3, 2, 4, 5)
        return self.norm(x.reshape(b, h * f, w * f, c))


class SwinUNet(nn.Module):
    """Swin-UNet for 2D images with named per-block features.

    Args:
        in_channels: image channels.
        num_classes: output classes, background included.
        embed_dim: width C of the first stage (stage i has C * 2^i).
        depths: Swin blocks per encoder stage; the last stage is the bottleneck
            and the decoder mirrors the others.
        num_heads: attention heads per stage (the decoder reuses them).
        window_size: attention window (tokens per side).
        patch_size: patch embedding stride; the final expansion undoes it.
        mlp_ratio: MLP hidden width / block width.
        qkv_bias: bias in the query/key/value projection.
        drop_path: stochastic depth rate of the deepest block (linear schedule).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.2,
    ):
        super().__init__()
        depths, num_heads = [int(d) for d in depths], [int(h) for h in num_heads]
        if len(depths) < 2 or len(num_heads) != len(depths) or min(depths) < 1:
            raise ValueError("depths needs >= 2 positive stages and one heads entry per stage")
        self.spatial_dims = 2
        self.in_channels = in_channels
        self.num_classes = num_classes
        n = len(depths)
        self.divisor = patch_size * 2 ** (n - 1)
        dims = [embed_dim * 2**i for i in range(n)]
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(n)]

        def stage(i: int) -> nn.ModuleList:
            return nn.ModuleList(
                SwinBlock(
                    dims[i], num_heads[i], window_size, j % 2 == 1, mlp_ratio, qkv_bias,
                    rates[starts[i] + j],
                )
                for j in range(depths[i])
            )  # fmt: skip

        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.patch_norm = nn.LayerNorm(embed_dim)
        self.encoder = nn.ModuleList(stage(i) for i in range(n))
        self.merge = nn.ModuleList(PatchMerging(dims[i]) for i in range(n - 1))
        self.norm = nn.LayerNorm(dims[-1])
        # Decoder level i (deep to shallow, i = n-2 .. 0): expand, concat skip, fuse, blocks.
        self.expand = nn.ModuleList(PatchExpand(dims[i + 1], 2, dims[i]) for i in range(n - 1))
        self.fuse = nn.ModuleList(nn.Linear(2 * dims[i], dims[i]) for i in range(n - 1))
        self.decoder = nn.ModuleList(stage(i) for i in range(n - 1))
        self.norm_up = nn.LayerNorm(embed_dim)
        self.final_expand = PatchExpand(embed_dim, patch_size, embed_dim)
        self.head = nn.Conv2d(embed_dim, num_classes, 1, bias=False)
        self.apply(_init_weights)

        info = []
        for i in range(n):
            name = "bottleneck" if i == n - 1 else f"enc{i + 1}"
            info += _stage_info(name, dims[i], patch_size * 2**i, depths[i], "encoder")
        for i in range(n - 2, -1, -1):
            info += _stage_info(f"dec{i + 1}", dims[i], patch_size * 2**i, depths[i], "decoder")
        info.append(FeatureInfo("final", embed_dim, 1))
        self.feature_info = info

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, H, W)`` for input ``(B, C, H, W)``."""
        return self.forward_features(x)[0]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, OrderedDict]:
        """Logits and the ordered per-block features (channel-first), ending with ``final``."""
        size = x.shape[2:]
        x = self.patch_embed(pad_to_multiple(x, self.divisor))
        x = self.patch_norm(x.permute(0, 2, 3, 1))  # (B, H, W, C) token grid
        tensors: list[torch.Tensor] = []

        def run(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
            for block in blocks:
                # Continue from the channel-first view, so the feature lies on the
                # path to the logits (gradients w.r.t. it exist, as for Grad-CAM).
                feature = block(x).permute(0, 3, 1, 2)
                tensors.append(feature)
                x = feature.permute(0, 2, 3, 1)
            return x

        skips = []
        for i, blocks in enumerate(self.encoder):
            if i > 0:
                x = self.merge[i - 1](x)
            skips.append(x)  # the stage input is the skip, as in Swin-Unet
            x = run(blocks, x)
        x = self.norm(x)
        for i in range(len(self.decoder) - 1, -1, -1):
            x = self.fuse[i](torch.cat([self.expand[i](x), skips[i]], dim=-1))
            x = run(self.decoder[i], x)
        final = self.final_expand(self.norm_up(x)).permute(0, 3, 1, 2)
        tensors.append(final)
        logits = self.head(final)
        features = OrderedDict(
            (info.name, crop_to(t, size, info.reduction))
            for info, t in zip(self.feature_info, tensors, strict=True)
        )
        return crop_to(logits, size, 1), features


def _stage_info(name: str, dim: int, reduction: int, depth: int, part: str) -> list[FeatureInfo]:
    out = []
    for j in range(depth):
        position = "first" if j == 0 else "last"
        out.append(FeatureInfo(f"{name}_{j + 1}", dim, reduction, f"{part}_{position}", position))
    return out


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@register_model("swin_unet2d")
def swin_unet2d(in_channels: int = 1, num_classes: int = 2, **options) -> SwinUNet:
    """Swin-UNet 2D; defaults are the SelfReg paper's Swin-T lite (about 27 M parameters)."""
    return SwinUNet(in_channels, num_classes, **options)
