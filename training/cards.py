"""The model card a training run writes: settings, data, split, metrics, parent."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from napari_selfreg.device import precision_name
from napari_selfreg.modelfile import DEFAULT_COLORS, ModelCard

from . import metrics
from .datasets import summarize
from .evaluate import segment_cases


class CardMixin:
    """Model-card methods of :class:`~napari_selfreg.training.loop.Trainer`.

    They read the trainer's settings, data, split, state and network.
    """

    config: Any
    net: nn.Module

    def make_card(
        self, metrics_: dict[str, Any] | None = None, deployed: bool = True
    ) -> ModelCard:
        """The model card of the network as trained so far.

        ``deployed``: the card of ``models.deploy(net)`` (training-only modules
        dropped, e.g. MISSU's LMSF); else of the training network itself.
        """
        cfg = self.config
        base = self.base_card or self.resumed_card
        options = dict(base.options) if base is not None else dict(cfg.arch_options)
        if deployed and hasattr(self.net, "deployed_options"):
            options.update(self.net.deployed_options)
        elif not deployed and isinstance(getattr(self.net, "options", None), dict):
            options.update(self.net.options)
        options.update(in_channels=int(self.net.in_channels), num_classes=self.num_classes)
        colors = list(base.class_colors) if base is not None else []
        colors += [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(len(colors), self.num_classes)]  # fmt: skip
        colors = colors[: self.num_classes]
        training = {
            "config": cfg.to_dict(),
            "split": self.split,
            "data": summarize(self.train_cases, self.num_classes),
            "validation_data": summarize(self.val_cases, self.num_classes),
            "iterations_done": int(self.state["iteration"]),
            "seconds": round(float(self.state["seconds"]), 1),
            "best_iteration": self.state["best_iteration"],
            "history": self.state["history"][-200:],
            "processes": self.dist.world_size,
            "device": str(self.device),
            "precision": precision_name(self.amp),
            **self.extra_training,
        }
        if self.base_card is not None and self.base_card.training:
            training["parent_training"] = {
                k: self.base_card.training.get(k) for k in ("config", "data", "iterations_done")
            }
        return ModelCard(
            name=self.out.name,
            architecture=base.architecture if base is not None else cfg.arch,  # type: ignore[union-attr]
            options=options,
            class_names=self.class_names,
            class_colors=colors,
            normalization=base.normalization if base is not None else cfg.normalization,
            patch_size=list(  # a fine-tuned model keeps its parent's inference tile
                self.base_card.patch_size
                if self.base_card is not None and self.base_card.patch_size
                else cfg.patch_size
            ),
            orientation=self.grid[0],  # the grid the cases were brought to (setup)
            spacing=self.grid[1],
            keep_largest=base.keep_largest if base is not None else None,
            description=cfg.description or (base.description if base is not None else ""),
            training=training,
            metrics=metrics_ or {},
            parent=self.parent,
        )

    def _whole_volume_metrics(self, net: nn.Module) -> dict[str, Any]:
        """Patch Dice (the best validation's, or ``net``'s own when the last weights are
        kept), and Dice of ``net`` on whole validation cases (predictor)."""
        out: dict[str, Any] = {}
        if self.config.keep == "last" and self.validation.patches:  # the saved weights' own
            dice = metrics.dice_from_counts(
                self.validation.counts(net, self.num_classes, self._to_device, self.amp)
            )
            out["patch_dice"] = metrics.named(dice, self.class_names)
            out["patch_mean_dice"] = round(metrics.mean_foreground(dice), 5)
        elif self.state["best_iteration"] is not None:
            out["patch_dice"] = self.state.get("best_dice", {})
            out["patch_mean_dice"] = round(float(self.state["best_score"]), 5)
        if self.state.get("base_score") is not None:  # a fine-tune: its base on the same voxels
            out["base_patch_mean_dice"] = round(float(self.state["base_score"]), 5)
        if self.val_cases and self.config.volume_metrics:
            counts = segment_cases(
                net,
                self.make_card(),
                self.val_cases,
                self.device,
                self.amp,
                self.config.slice_axis,
            )
            dice = metrics.dice_from_counts(counts)
            out.update(
                dice=metrics.named(dice, self.class_names),
                mean_dice=round(metrics.mean_foreground(dice), 5),
                validation="whole volumes through the predictor",
                val_cases=[c.name for c in self.val_cases],
            )
        return out
