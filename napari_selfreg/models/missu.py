"""MISSU: the self-distilling 3D TransUNet (Wang et al., IEEE TMI 2023).

Backbone (``docs/method.md`` section 2, TransBTS lineage): a CNN stem of
pre-activation residual blocks (GroupNorm, ReLU) at ``channels`` with stride-2
3^3 convs between the levels; a tokeniser (norm, ReLU, 3^3 conv to ``embed_dim``)
with a learned positional embedding sized from ``img_size`` (trilinearly
interpolated for other token grids); pre-norm Transformer layers (dropout as
modules, so ``eval()`` switches it off); a detokeniser back to the deepest CNN
width; a decoder whose levels halve the channels with a 1x1 conv, upsample with
a stride-2 transposed conv, concatenate the skip and fuse it with a 1x1 conv and
a residual block; a final GroupNorm + ReLU (pre-activation networks end with one)
and a 1x1 classifier that returns logits. Residual blocks per level default to
TransBTS's 1, 2, 2, 4, which gives the paper's size (20.1 M parameters, about
270 GMAC per 128^3 tile). Any input size works: it is padded (replicate) to a
multiple of ``2 ** (levels - 1)`` (8) and logits and features are cropped back.

Features: ``enc1..enc{n-1}`` (skips x_k, ``enc1`` at full resolution),
``bottleneck`` (the Transformer output as ``(B, E, d, h, w)``),
``dec{n-1}..dec1`` (decoder outputs y_k, same widths as the skips) and
``final`` (norm + ReLU of ``dec1``, the classifier input). SelfReg students as
in the UNet: encoder levels below full resolution plus the bottleneck
(``encoder``) and decoder levels except the last (``decoder``), SCR group
``all``; the full-resolution ``enc1`` and ``dec1`` are not students.

Self-distillation (training only, :meth:`MISSU.training_losses`): the skip x_k
teaches the decoder feature y_k through a channel-softmax KL
(:mod:`napari_selfreg.distill`) with explicit level weights ``kd_weights``
(deepest level first) and temperature ``kd_tau``. With ``training_modules=True``
the teacher is ``T_k = LMSF_k(x_k)``, a local multi-scale fusion block (our
reconstruction: LMSF is not in the authors' repository; dense
atrous 3^3 convs with dilations 1, 3, 5 and a 1x1x1 projection, residual).
The paper leaves open how LMSF learns; here each ``T_k`` feeds a 1x1x1
auxiliary segmentation head whose upsampled logits get the segmentation loss
(CE + Dice), weighted by ``lmsf_weight`` (term ``lmsf_aux``; its gradient also
reaches the encoder, as deep supervision). The KL's teacher stays detached.
Without training modules the raw skip is the teacher.

Deployment: the decoder always consumes the raw skips, so LMSF and the
auxiliary heads never touch the inference graph. :meth:`MISSU.deploy` returns
the network built with ``training_modules=False`` (the registry default) holding
the same weights, so a model card must store ``training_modules: false`` (or
leave it out): :attr:`MISSU.deployed_options` are exactly the options to store.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distill import distillation_loss, level_pairs
from ._registry import FeatureInfo, register_model
from .layers import Conv3d, crop_to, pad_to_multiple

OFFICIAL_KD_WEIGHTS = (0.5, 2.0, 8.0)  # deepest first, as the published code weights them


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 8 groups (fewer when ``channels`` is not a multiple of 8)."""
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(relu(norm(conv(relu(norm(x))))))``."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            group_norm(channels),
            nn.ReLU(inplace=True),
            Conv3d(channels, channels, 3, padding=1),
            group_norm(channels),
            nn.ReLU(inplace=True),
            Conv3d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class DecoderLevel(nn.Module):
    """1x1 halving, stride-2 transposed conv, concat skip, 1x1 fuse, residual block."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.reduce = Conv3d(in_ch, out_ch, 1)
        self.up = nn.ConvTranspose3d(out_ch, out_ch, 2, stride=2)
        self.fuse = Conv3d(2 * out_ch, out_ch, 1)
        self.block = ResBlock(out_ch)

    def forward(self, y: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        y = self.up(self.reduce(y))
        return self.block(self.fuse(torch.cat([skip, y], dim=1)))


class LMSF(nn.Module):
    """Local multi-scale fusion (training-only teacher): dense atrous convs + 1x1x1 projection.

    ``a_i = conv_{d_i}(relu(norm(a_{i-1})))`` with ``a_0 = x`` and dilations 1, 3, 5;
    output ``x + proj(cat(x, a_1, a_2, a_3))``, same shape as ``x``.
    """

    def __init__(self, channels: int, dilations: Sequence[int] = (1, 3, 5)):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(
                group_norm(channels),
                nn.ReLU(),
                Conv3d(channels, channels, 3, padding=d, dilation=d),
            )
            for d in dilations
        )
        self.project = Conv3d(channels * (len(dilations) + 1), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x]
        for branch in self.branches:
            outs.append(branch(outs[-1]))
        return x + self.project(torch.cat(outs, dim=1))


class MISSU(nn.Module):
    """Hybrid CNN-Transformer 3D UNet with training-only self-distillation.

    Args:
        in_channels: image channels.
        num_classes: output classes, background included.
        channels: CNN widths per level (the last level feeds the Transformer).
        blocks: residual blocks per level.
        embed_dim: Transformer width E.
        num_layers: Transformer layers.
        num_heads: attention heads.
        mlp_dim: hidden width of the Transformer MLP.
        dropout: dropout of the positional embedding, attention and MLP.
        img_size: tile (D, H, W) that sizes the positional embedding.
        training_modules: build the LMSF teachers and their auxiliary heads.
        kd_weights: KL weight per level, deepest first (x3->y3, x2->y2, x1->y1);
            default 1 for every level; ``"official"``: (0.5, 2, 8), the weights the
            published code applies implicitly through its divisor (3 skip levels).
        kd_tau: distillation temperature.
        lmsf_weight: weight of the LMSF auxiliary segmentation loss.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128),
        blocks: Sequence[int] = (1, 2, 2, 4),
        embed_dim: int = 512,
        num_layers: int = 4,
        num_heads: int = 8,
        mlp_dim: int = 1024,
        dropout: float = 0.1,
        img_size: int | Sequence[int] = (128, 128, 128),
        training_modules: bool = False,
        kd_weights: Sequence[float] | str | None = None,
        kd_tau: float = 1.0,
        lmsf_weight: float = 0.5,
    ):
        super().__init__()
        channels, blocks = [int(c) for c in channels], [int(b) for b in blocks]
        if isinstance(img_size, int):
            img_size = (img_size,) * 3
        img_size = [int(s) for s in img_size]
        n = len(channels)
        if n < 2 or len(blocks) != n or len(img_size) != 3:
            raise ValueError(
                "MISSU needs >= 2 levels, one block count per level and a 3D img_size"
            )
        if kd_weights == "official":
            kd_weights = OFFICIAL_KD_WEIGHTS
        kd_weights = [1.0] * (n - 1) if kd_weights is None else kd_weights
        if len(kd_weights) != n - 1:
            raise ValueError(f"kd_weights needs {n - 1} values (one per skip level)")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by {num_heads} heads")
        self.spatial_dims = 3
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.divisor = 2 ** (n - 1)
        self.training_modules = bool(training_modules)
        self.kd_weights = [float(w) for w in kd_weights]
        self.kd_tau = float(kd_tau)
        self.lmsf_weight = float(lmsf_weight)
        self.options: dict[str, Any] = {
            "channels": channels, "blocks": blocks, "embed_dim": embed_dim,
            "num_layers": num_layers, "num_heads": num_heads, "mlp_dim": mlp_dim,
            "dropout": dropout, "img_size": img_size,
            "training_modules": self.training_modules, "kd_weights": self.kd_weights,
            "kd_tau": self.kd_tau, "lmsf_weight": self.lmsf_weight,
        }  # fmt: skip

        self.init_conv = Conv3d(in_channels, channels[0], 3, padding=1)
        self.down = nn.ModuleList(
            Conv3d(channels[i - 1], channels[i], 3, stride=2, padding=1) for i in range(1, n)
        )
        self.stages = nn.ModuleList(
            nn.Sequential(*(ResBlock(c) for _ in range(b)))
            for c, b in zip(channels, blocks, strict=True)
        )
        self.tokenizer = nn.Sequential(
            group_norm(channels[-1]),
            nn.ReLU(inplace=True),
            Conv3d(channels[-1], embed_dim, 3, padding=1),
        )
        grid = [-(-s // self.divisor) for s in img_size]
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            embed_dim, num_heads, mlp_dim, dropout, activation="gelu",
            batch_first=True, norm_first=True,
        )  # fmt: skip
        self.transformer = nn.TransformerEncoder(
            layer, num_layers, norm=nn.LayerNorm(embed_dim), enable_nested_tensor=False
        )
        self.detokenizer = nn.Sequential(
            group_norm(embed_dim),
            nn.ReLU(inplace=True),
            Conv3d(embed_dim, channels[-1], 3, padding=1),
            group_norm(channels[-1]),
            nn.ReLU(inplace=True),
            Conv3d(channels[-1], channels[-1], 3, padding=1),
            ResBlock(channels[-1]),
        )
        self.decoder = nn.ModuleList(
            DecoderLevel(channels[k], channels[k - 1]) for k in range(n - 1, 0, -1)
        )
        self.final_norm = nn.Sequential(group_norm(channels[0]), nn.ReLU(inplace=True))
        self.head = Conv3d(channels[0], num_classes, 1)
        if self.training_modules:
            self.lmsf = nn.ModuleList(LMSF(c) for c in channels[:-1])
            self.aux_heads = nn.ModuleList(Conv3d(c, num_classes, 1) for c in channels[:-1])

        info = [FeatureInfo("enc1", channels[0], 1)]
        for k in range(1, n - 1):
            info.append(FeatureInfo(f"enc{k + 1}", channels[k], 2**k, "encoder", "all"))
        info.append(FeatureInfo("bottleneck", embed_dim, 2 ** (n - 1), "encoder", "all"))
        for k in range(n - 1, 1, -1):
            info.append(FeatureInfo(f"dec{k}", channels[k - 1], 2 ** (k - 1), "decoder", "all"))
        info += [FeatureInfo("dec1", channels[0], 1), FeatureInfo("final", channels[0], 1)]
        self.feature_info = info
        self.kd_pairs = level_pairs(f.name for f in info)  # (enc3, dec3), ..., (enc1, dec1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, D, H, W)`` for input ``(B, C, D, H, W)``."""
        return self.forward_features(x)[0]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, OrderedDict]:
        """Logits and the ordered named features (``enc1 ... bottleneck ... dec1, final``)."""
        size = x.shape[2:]
        x = self.stages[0](self.init_conv(pad_to_multiple(x, self.divisor)))
        skips = [x]
        for down, stage in zip(self.down, self.stages[1:], strict=True):
            skips.append(stage(down(skips[-1])))
        bottleneck = self.transform(self.tokenizer(skips.pop()))
        y = self.detokenizer(bottleneck)
        decoded = []
        for level, skip in zip(self.decoder, reversed(skips), strict=True):
            y = level(y, skip)
            decoded.append(y)
        final = self.final_norm(y)
        logits = self.head(final)
        tensors = [*skips, bottleneck, *decoded, final]
        features = OrderedDict(
            (info.name, crop_to(t, size, info.reduction))
            for info, t in zip(self.feature_info, tensors, strict=True)
        )
        return crop_to(logits, size, 1), features

    def transform(self, tokens: torch.Tensor) -> torch.Tensor:
        """Transformer over a token grid ``(B, E, d, h, w)`` -> ``(B, E, d, h, w)``."""
        b, e, *grid = tokens.shape
        pos = self.pos_embed
        if list(pos.shape[2:]) != grid:
            pos = F.interpolate(pos, size=grid, mode="trilinear", align_corners=False)
        seq = self.pos_drop((tokens + pos).flatten(2).transpose(1, 2))  # (B, N, E)
        seq = self.transformer(seq)
        return seq.transpose(1, 2).reshape(b, e, *grid)

    def training_losses(
        self, features: dict[str, torch.Tensor], target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Training-only terms, already weighted; add every value to the loss.

        Args:
            features: the mapping of :meth:`forward_features` (same forward pass).
            target: integer labels ``(B, D, H, W)`` of the input's size.

        Returns:
            ``{"kd": ...}`` (channel-softmax KL, skips teach decoder levels) and,
            with training modules, ``{"lmsf_aux": ...}`` (LMSF auxiliary heads).
        """
        teachers = {}
        if self.training_modules:
            for k, lmsf in enumerate(self.lmsf, start=1):
                teachers[f"enc{k}"] = lmsf(features[f"enc{k}"])
        kd, _ = distillation_loss(features, self.kd_pairs, self.kd_weights, self.kd_tau, teachers)
        losses = {"kd": kd}
        if self.training_modules and self.lmsf_weight:
            from ..selfreg import SegmentationLoss

            seg = SegmentationLoss()
            aux = []
            for k, head in enumerate(self.aux_heads, start=1):
                logits = head(teachers[f"enc{k}"])
                if logits.shape[2:] != target.shape[1:]:
                    logits = F.interpolate(
                        logits, size=target.shape[1:], mode="trilinear", align_corners=False
                    )
                aux.append(seg(logits, target)[0])
            losses["lmsf_aux"] = self.lmsf_weight * torch.stack(aux).mean()
        return losses

    @property
    def deployed_options(self) -> dict[str, Any]:
        """Build options of the network :meth:`deploy` returns: what a model card stores."""
        return {**self.options, "training_modules": False}

    def deploy(self) -> MISSU:
        """The inference network: same weights, no LMSF teachers or auxiliary heads.

        Returns ``self`` when it was built without training modules. Otherwise a
        new network built with ``training_modules=False`` on the same device,
        dtype and train/eval mode.
        """
        if not self.training_modules:
            return self
        net = MISSU(self.in_channels, self.num_classes, **self.deployed_options)
        state = {
            k: v for k, v in self.state_dict().items() if not k.startswith(("lmsf.", "aux_heads."))
        }
        net.load_state_dict(state, strict=True)
        param = next(self.parameters())
        return net.to(device=param.device, dtype=param.dtype).train(self.training)


@register_model("missu3d")
def missu3d(in_channels: int = 1, num_classes: int = 2, **options) -> MISSU:
    """MISSU 3D; defaults are the paper's sizes (E=512, 4 layers, 8 heads, 128^3 tile)."""
    return MISSU(in_channels, num_classes, **options)
