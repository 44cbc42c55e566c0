"""The registry behind :mod:`napari_selfreg.models`: names, builders, options, feature contract."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
MAX_PARAMETERS = 1_000_000_000  # 4 GB of float32 weights


@dataclass(frozen=True)
class FeatureInfo:
    """One named block output of a network.

    Attributes:
        name: key in the ``forward_features`` mapping.
        channels: number of channels of that output.
        reduction: spatial down-sampling factor against the input.
        ifd_group: IFD averaging group (None: not a student).
        scr_group: SCR averaging group (None: not a student).
    """

    name: str
    channels: int
    reduction: int
    ifd_group: str | None = None
    scr_group: str | None = None


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder ``fn(in_channels, num_classes, **options) -> nn.Module``."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return decorator


def available() -> list[str]:
    """Names of all registered architectures, sorted."""
    _import_builtin()
    return sorted(_REGISTRY)


def build(name: str, in_channels: int = 1, num_classes: int = 2, **options) -> nn.Module:
    """Build a registered architecture by name.

    Args:
        name: one of :func:`available`.
        in_channels: image channels.
        num_classes: output classes, background included.
        **options: architecture options (:func:`architecture_options`); ``None``
            values are dropped.

    Raises:
        ValueError: unknown architecture or option (the message lists the valid ones), or
            options that give more than :data:`MAX_PARAMETERS` parameters.
    """
    check_options(name, options)
    options = {k: v for k, v in options.items() if v is not None}
    builder = _REGISTRY[name]
    try:  # count first, on the meta device: absurd widths would allocate gigabytes
        with torch.device("meta"):
            probe = builder(in_channels=in_channels, num_classes=num_classes, **options)
        count = sum(p.numel() for p in probe.parameters())
    except (NotImplementedError, RuntimeError):  # a builder that needs real tensors
        count = 0
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"{name} with these options would have {count / 1e6:,.0f} M parameters, more "
            f"than the {MAX_PARAMETERS / 1e6:,.0f} M napari-selfreg builds; check the channel widths"
        )
    return builder(in_channels=in_channels, num_classes=num_classes, **options)


def check_options(name: str, options) -> None:
    """Raise ValueError naming the valid options when ``options`` has a key ``name`` lacks."""
    valid = architecture_options(name)
    unknown = sorted(set(options) - set(valid)) if valid is not None else []
    if unknown:
        raise ValueError(
            f"{name} has no option {', '.join(map(repr, unknown))}; "
            f"its options: {', '.join(valid)}"
        )


def architecture_options(name: str) -> list[str] | None:
    """The options of a registered architecture: the keyword arguments of the class its
    builder returns (read from the builder's return annotation), else of the builder;
    None when that takes ``**options`` and names no class (options are then not checked)."""
    _import_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    builder = _REGISTRY[name]
    try:
        cls = typing.get_type_hints(builder).get("return")
    except (NameError, TypeError):
        cls = None
    target = cls.__init__ if isinstance(cls, type) and cls is not nn.Module else builder
    params = inspect.signature(target).parameters
    if target is builder and any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None  # a builder taking **options says nothing about which: no check
    return [p for p in params if p not in ("self", "in_channels", "num_classes", "spatial_dims")]


def selfreg_groups(model: nn.Module) -> dict[str, tuple[str | None, str | None]]:
    """Map feature name -> (IFD group, SCR group) read from ``model.feature_info``."""
    return {f.name: (f.ifd_group, f.scr_group) for f in model.feature_info}


def deploy(model: nn.Module) -> nn.Module:
    """The inference network of ``model``: training-only modules removed.

    Models with training-only parts (MISSU's LMSF teachers) implement
    ``deploy()``; for the others the model itself is returned. Save this,
    not the training model.
    """
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.deploy() if hasattr(model, "deploy") else model


def _import_builtin() -> None:
    # Importing the modules runs their @register_model decorators.
    from . import missu, swin_unet, unet  # noqa: F401
