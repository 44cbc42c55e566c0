"""Model registry: every network of napari-selfreg is built by name.

Each registered network is an ``nn.Module`` with

* ``forward(x) -> logits`` of shape ``(B, num_classes, *spatial)``;
* ``forward_features(x) -> (logits, features)`` where ``features`` is an ordered
  mapping of named block outputs that ends with ``"final"`` (the SelfReg teacher);
* ``feature_info``: a list of :class:`FeatureInfo` in the same order;
* ``spatial_dims`` (2 or 3), ``in_channels``, ``num_classes``.

The name and the keyword options passed to :func:`build` are what a model card
stores, so ``build(card.architecture, **card.options)`` rebuilds the network.
"""

from ._registry import (
    _REGISTRY,  # noqa: F401 - tests register models
    MAX_PARAMETERS,
    FeatureInfo,
    architecture_options,
    available,
    build,
    check_options,
    deploy,
    register_model,
    selfreg_groups,
)

__all__ = [
    "MAX_PARAMETERS",
    "FeatureInfo",
    "architecture_options",
    "available",
    "build",
    "check_options",
    "deploy",
    "register_model",
    "selfreg_groups",
]
