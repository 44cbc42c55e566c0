"""The network as the predictor runs it: BatchNorm folded, pools outside autocast, FLOPs counted."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence

import torch
import torch.nn as nn

_LOW_PRECISION_MODULES = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def fold_batchnorm(net: nn.Module) -> int:
    """Fold eval BatchNorm that directly follows a conv (in ``nn.Sequential``) into the conv.

    Same function, one memory pass less per layer. Changes ``net`` in place;
    returns the number of folded layers.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for module in net.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for a, b in itertools.pairwise(list(module._modules)):
            conv, bn = module._modules[a], module._modules[b]
            if (
                isinstance(conv, (nn.Conv2d, nn.Conv3d))
                and isinstance(bn, (nn.BatchNorm2d, nn.BatchNorm3d))
                and bn.running_mean is not None
                and conv.out_channels == bn.num_features
            ):
                module._modules[a] = fuse_conv_bn_eval(conv.eval(), bn.eval())
                module._modules[b] = nn.Identity()
                folded += 1
    return folded


class _NoAutocastPool(nn.Module):
    """Max pooling outside autocast. CPU autocast runs ``max_pool3d`` in float32, i.e. it
    copies a bf16 input to fp32 and the next conv copies it back; the max of bf16
    values is exact in bf16, so skipping the casts gives the same numbers faster."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.pool(x)


def exact_max_pools(net: nn.Module) -> int:
    """Wrap every ``nn.MaxPoolNd`` of ``net`` in :class:`_NoAutocastPool` (in place)."""
    pools = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
    found = [
        (parent, name, child)
        for parent in net.modules()
        for name, child in parent.named_children()
        if isinstance(child, pools)
    ]
    for parent, name, child in found:
        setattr(parent, name, _NoAutocastPool(child))
    return len(found)


def count_flops(net: nn.Module, input_shape: Sequence[int]) -> float:
    """FLOPs of one forward pass at ``input_shape``, counted on the meta device (no compute;
    the fused Transformer fast path is off so attention is counted). 0.0 if it cannot count."""
    from torch.utils.flop_counter import FlopCounterMode

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        meta = copy.deepcopy(net).to("meta")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            meta(torch.empty(tuple(input_shape), device="meta"))
        return float(counter.get_total_flops())
    except (
        RuntimeError,
        NotImplementedError,
        TypeError,
        AssertionError,
    ):  # no meta kernel, or TorchScript
        return 0.0
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
