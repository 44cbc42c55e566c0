"""Settings, progress events and errors of the training module.

``TrainConfig`` is shared by the CLI, the Fine-tune widget, the recipes and the
tests; it is written into the model card's ``training`` field, so a model says
how it was made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_selfreg.jobs import Progress


class TrainingError(ValueError):
    """A problem the user can fix (bad data, bad settings, full disk); one sentence."""


class LabelError(TrainingError):
    """Labels that cannot be trained on: unknown values, nothing labelled, wrong shape."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; training stopped, the last good checkpoint is kept."""


class CheckpointError(TrainingError):
    """A checkpoint could not be written (disk full, no permission); the previous one is intact."""


PRESETS: dict[str, dict[str, Any]] = {
    # the SelfReg-UNet authors' released settings (their Synapse and ACDC scripts)
    "official-synapse": {
        "ce_weight": 0.4, "dice_weight": 0.6, "dice_squared": True, "dice_background": True,
        "lambda_scr": 0.01, "lambda_ifd": 0.01, "optimizer": "sgd", "lr": 0.01,
        "momentum": 0.9, "weight_decay": 1e-4, "poly_power": 0.9,
    },
    "official-acdc": {
        "ce_weight": 0.3, "dice_weight": 0.7, "dice_squared": True, "dice_background": True,
        "lambda_scr": 0.1, "lambda_ifd": 0.1, "optimizer": "adamw", "lr": 1e-4,
        "weight_decay": 1e-4, "poly_power": 0.0,
    },
}  # fmt: skip
"""Named settings a training run can take (``train --preset NAME``; they override the
options they name)."""


def check_label_map(mapping: dict) -> dict[int, int]:
    """``{old: new}`` with whole, non-negative values; else :class:`TrainingError`."""
    try:
        out = {int(k): int(v) for k, v in mapping.items()}
    except (TypeError, ValueError) as err:
        raise TrainingError(f"a label map needs whole numbers, got {mapping}") from err
    bad = {k: v for k, v in out.items() if k < 0 or v < 0}
    if bad:
        raise TrainingError(f"label values cannot be negative: {bad}; map to 0 (background) or 1, 2, ...")  # fmt: skip
    return out


@dataclass
class TrainConfig:
    """Settings of one training run (also the fine-tuning loop underneath).

    Attributes:
        arch: registry name for ``models.build`` (``unet3d``, ``unet2d``, ...).
        arch_options: architecture options, e.g. ``{"channels": [8, 16, 32, 64]}``.
        num_classes: output classes incl. background; None: max label + 1.
        class_names: one name per class; None: ``background, class 1, ...``.
        patch_size: training patch in array axis order (2 values for 2D models).
        batch_size: patches per step (per process under torchrun).
        iterations: optimiser steps.
        max_seconds: stop (and save) after this much training time; None: no limit.
        optimizer: ``adamw`` or ``sgd`` (Nesterov momentum ``momentum``); both with poly decay.
        lr: initial learning rate; None: 1e-3 (AdamW) or 1e-2 (SGD).
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        poly_power: ``lr_t = lr * (1 - t / iterations) ** poly_power``.
        cooldown: share of the run, at its end, over which the learning rate also falls
            linearly to 0 (the decay phase of a warmup-stable-decay schedule); 0: none.
        anneal_to_budget: the decay follows whichever runs out first, ``iterations``
            or ``max_seconds`` (``t`` is then the larger share done), so a run cut by
            its time budget still ends at a low learning rate.
        grad_clip: max gradient L2 norm; 0 switches clipping off.
        ce_weight: weight of cross-entropy in the segmentation loss.
        dice_weight: weight of soft Dice in the segmentation loss.
        dice_squared: squared Dice denominators (the SelfReg-UNet authors' Dice).
        dice_background: count background in the Dice mean (the authors' code does).
        lambda_scr: SelfReg SCR weight (0: off).
        lambda_ifd: SelfReg IFD weight (0: off): top-half to bottom-half channel
            distillation, which raises channel similarity (``docs/method.md``).
        lambda_decor: our channel decorrelation weight (0: off; not in the paper).
        momentum: SGD momentum.
        precision: ``auto`` (bf16 where the CPU/GPU has it, fp16 on other CUDA GPUs),
            ``bf16``, ``fp16`` or ``fp32``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        channels_last: channels-last memory format (faster convolutions).
        num_threads: CPU threads (None: torch's default).
        fg_fraction: share of patches centred on a labelled voxel (class drawn uniformly).
        focus_fraction: share of patches centred on a corrected voxel (fine-tuning).
        augment: random flips, rot90, rotation/scaling, intensity, gamma, noise, bias field.
        val_fraction: share of cases held out for validation (one case: a slab of it).
        val_every: iterations between validations (and checkpoints).
        val_patches: fixed validation patches scored during training.
        keep: which weights are saved: ``best`` (the best validation's) or ``last`` (the
            last step's; fine-tuning, whose validation runs with BatchNorm statistics
            still moving, so its best was often an early step: a 6-slice new class was
            saved from step 20 of 100).
        volume_metrics: after training, Dice of the saved model on the whole validation
            cases through the predictor (one segmentation per case); False keeps the best
            validation-patch Dice only (fine-tuning: the round's time).
        patience: validations without improvement before stopping early (0: never).
        batchnorm_batches: before the model is saved, its BatchNorm running statistics
            are estimated anew as the plain average over this many training batches run
            through the final weights (no gradient); 0 keeps the running averages of
            training.
        seed: seed of weights, split, sampling, augmentation and SelfReg pairing.
        normalization: intensity normalisation stored in the card and applied to images.
        spacing: voxel spacing (mm) of the training data, recorded in the card: the
            predictor resamples other spacings to it. None: arrays as they are.
        orientation: axis codes of the training data (``"RAS"``), recorded in the card:
            the predictor reorients volumes with affines to it. None: arrays as stored.
        slice_axis: axis along which 2D models take slices of 3D volumes (the
            predictor's ``axis``, 0 by default).
        label_map: remap label values before training, e.g. ``{10: 1, 20: 2}``.
        split: an explicit split ``{"train": [...], "val": [...]}`` (from an earlier
            model card); None: drawn from ``seed`` and saved with the model.
        description: free text for the model card.
    """

    arch: str = "unet3d"
    arch_options: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    class_names: list[str] | None = None
    patch_size: tuple[int, ...] = (64, 64, 64)
    batch_size: int = 2
    iterations: int = 1000
    max_seconds: float | None = None
    optimizer: str = "adamw"
    lr: float | None = None
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    cooldown: float = 0.0
    anneal_to_budget: bool = False
    grad_clip: float = 12.0
    ce_weight: float = 0.5
    dice_weight: float = 0.5
    dice_squared: bool = False
    dice_background: bool = False
    lambda_scr: float = 0.015
    lambda_ifd: float = 0.015
    lambda_decor: float = 0.0
    momentum: float = 0.99
    precision: str = "auto"
    device: str = "auto"
    channels_last: bool = True
    num_threads: int | None = None
    fg_fraction: float = 0.5
    focus_fraction: float = 0.0
    augment: bool = True
    val_fraction: float = 0.2
    val_every: int = 50
    val_patches: int = 8
    keep: str = "best"
    volume_metrics: bool = True
    patience: int = 10
    batchnorm_batches: int = 0
    seed: int = 0
    normalization: dict[str, Any] = field(default_factory=lambda: {"method": "zscore"})
    spacing: list[float] | None = None
    orientation: str | None = None
    slice_axis: int = 0
    label_map: dict[int, int] | None = None
    split: dict[str, Any] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.keep not in ("best", "last"):
            raise TrainingError(f"unknown keep {self.keep!r}; choose best or last")
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.optimizer not in ("adamw", "sgd"):
            raise TrainingError(f"unknown optimizer {self.optimizer!r}; choose adamw or sgd")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise TrainingError(
                f"unknown precision {self.precision!r}; choose auto, bf16, fp16 or fp32"
            )
        if self.iterations < 1 or self.batch_size < 1:
            raise TrainingError("iterations and batch size must be at least 1")
        if any(p < 1 for p in self.patch_size):
            raise TrainingError(f"patch size must be positive, got {self.patch_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise TrainingError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_every < 1:
            raise TrainingError(f"val_every must be at least 1 iteration, got {self.val_every}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise TrainingError(f"the time budget must be positive, got {self.max_seconds} s")
        if self.patience < 0 or self.val_patches < 0:
            raise TrainingError("patience and val_patches cannot be negative")
        if self.lr is not None and not self.lr >= 0:
            raise TrainingError(f"the learning rate cannot be negative, got {self.lr}")
        if self.label_map is not None:
            self.label_map = check_label_map(self.label_map)

    @property
    def learning_rate(self) -> float:
        """The initial learning rate (``lr`` or the optimiser's default)."""
        if self.lr is not None:
            return float(self.lr)
        return 1e-3 if self.optimizer == "adamw" else 1e-2

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (the model card's ``training["config"]``)."""
        data = dataclasses.asdict(self)
        data["patch_size"] = list(self.patch_size)
        if self.label_map is not None:
            data["label_map"] = {str(k): v for k, v in self.label_map.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Settings from :meth:`to_dict` output (unknown keys are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


SCRIBBLE_BACKGROUND = 255
"""The label value that marks background in a scribble (sparse) labels layer."""


BATCHNORM_STATISTICS = ("recompute", "ema")
# a later round teaches the last model's prediction where nobody looked at this weight
LATER_ROUND_UNREVIEWED_WEIGHT = 0.1
# optimiser steps of a fine-tuning round by device type: about a minute either way
FINETUNE_ITERATIONS = {"cpu": 100, "cuda": 300}


def finetune_iterations_text() -> str:
    """``FINETUNE_ITERATIONS`` for help texts: ``100 on CPU, 300 on CUDA``."""
    return ", ".join(f"{n} on {kind.upper()}" for kind, n in FINETUNE_ITERATIONS.items())


@dataclass
class FinetuneConfig:
    """Settings of fine-tuning a model on a user's corrected labels or scribbles.

    What the user reviewed is truth, the rest is unknown: a slice the user painted on
    (along the painting axis) counts as reviewed in full, including what they left as
    it was; with ``sparse`` only painted voxels are known. Unreviewed voxels weigh
    ``unreviewed_weight`` (0: ignored).

    Attributes:
        iterations: optimiser steps (a short schedule); None (the default):
            ``FINETUNE_ITERATIONS`` for the device the round runs on, 100 on a CPU (a
            minute on 2 cores with AMX) and 300 on a CUDA GPU. The round is limited by
            the patches it sees: at 300 steps the new class of ``benchmarks/finetune.py``
            reached 0.931 / 0.939 against 0.857 / 0.846 at 100
            (``benchmarks/results/finetune_iterations_300.json``).
        seconds_budget: stop after this much training time (None: no limit), a cap: the
            steps decide. A round with the defaults takes about a minute on 2 cores with
            bf16 units (AMX), about ten on 2 cores without (fp32: 4-6 s a step); a round
            cut to a few steps by a small budget learns little.
        lr: AdamW learning rate; None: 1e-3 for corrected labels, 3e-4 for scribbles
            (``sparse``), where 1e-3 wrecked white matter for two fine-tune seeds of three
            in ``benchmarks/finetune.py`` and 3e-4 held it for all three
            (``benchmarks/results/finetune_scribbles_seeds.json``), while 3e-4 learnt
            corrections and new classes less (-90 % instead of -97 %, 0.79 instead of 0.85).
        poly_power: learning-rate decay ``(1 - t / iterations) ** poly_power``; 0 (the
            default) keeps it constant: with 100 steps, poly decay at 0.9 halved the
            learning and left a missed structure missed in ``benchmarks/finetune.py``.
        cooldown: the last share of the steps over which the learning rate falls
            linearly to 0, so the saved last weights are not one noisy step of a
            constant rate (with a constant rate, a second round's last weights put
            676 ml of brain labels outside the brain, its first round's 188 ml).
        batch_size: patches per step.
        patch_size: None: the model card's patch size, capped at 64 (3D) / 256 (2D).
        lambda_scr: SelfReg SCR weight (0: off).
        lambda_ifd: SelfReg IFD weight (0: off, the default: as published it makes the
            channels of each block alike, docs/method.md; 0.015 in the paper).
        freeze: ``none``, ``encoder`` (stem to bottleneck) or ``stage:k`` (train
            encoder blocks from the k-th on, counting the stem as 0).
        batchnorm: the running statistics BatchNorm keeps for inference: ``recompute``
            (after training, the plain average over ``batchnorm_batches`` training
            batches through the final weights) or ``ema`` (PyTorch's exponential
            average during training, momentum 0.1: the last ten batches of two patches
            decide it, a noisy estimate that left grey matter in the air and 254 ml of
            brain labels outside the brain in ``benchmarks/finetune.py``).
        batchnorm_batches: batches of the ``recompute`` estimate.
        corrected_weight: loss weight of corrected (or painted) voxels; other reviewed
            voxels weigh 1.
        unreviewed_weight: loss weight of voxels nobody reviewed, where the labels hold
            the model's prediction: 0 treats them as unknown, a positive weight teaches
            that prediction there. None (the default): 0 in a first round (the base
            model's errors are not taught) and ``LATER_ROUND_UNREVIEWED_WEIGHT`` in a later
            round (earlier review map given), whose labels hold the last round's model's
            prediction: taught lightly, it keeps what earlier rounds taught where nobody
            looked (learning without forgetting); at 0 a second round on 3 slices of brain
            brought 390 ml of muscle back as brain tissue (41 -> 498 ml in
            ``benchmarks/finetune.py``), at 0.1 it held (41 -> 32 ml). Scribbles: 0 always.
        focus_fraction: share of patches centred on a corrected voxel; the others are
            centred on reviewed voxels, class by class.
        sparse: the labels are scribbles: 0 is unpainted (unknown), ``background_value``
            marks background, 1.. the classes.
        background_value: the scribble value of background.
        extend_classes: add output channels for label values the model lacks
            (initialised from background, a little below it) instead of refusing them.
        new_class_names: names of added classes, in order (default ``class N``).
        label_map: remap label values first, e.g. ``{4: 1}``.
        augment: random augmentation as in training.
        precision: as in :class:`TrainConfig`.
        device: as in :class:`TrainConfig`.
        num_threads: CPU threads (None: torch's default).
        seed: random seed.
    """

    iterations: int | None = None
    seconds_budget: float | None = 600.0  # a cap: 100 steps take 45 s with bf16 units (AMX)
    lr: float | None = None
    poly_power: float = 0.0
    cooldown: float = 0.3
    batch_size: int = 2
    patch_size: tuple[int, ...] | None = None
    lambda_scr: float = 0.015
    lambda_ifd: float = 0.0  # the published IFD collapses channels (docs/method.md)
    freeze: str = "none"
    batchnorm: str = "recompute"
    batchnorm_batches: int = 25
    corrected_weight: float = 3.0
    unreviewed_weight: float | None = None
    focus_fraction: float = 0.5
    sparse: bool = False
    background_value: int = SCRIBBLE_BACKGROUND
    extend_classes: bool = False
    new_class_names: list[str] | None = None
    label_map: dict[int, int] | None = None
    augment: bool = True
    precision: str = "auto"
    device: str = "auto"
    num_threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.patch_size is not None:
            self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.freeze not in ("none", "encoder") and not self.freeze.startswith("stage:"):
            raise TrainingError(f"unknown freeze {self.freeze!r}; choose none, encoder or stage:K")
        if self.batchnorm not in BATCHNORM_STATISTICS:
            raise TrainingError(f"unknown batchnorm {self.batchnorm!r}; choose recompute or ema")
        if self.batchnorm_batches < 1:
            raise TrainingError("batchnorm_batches must be at least 1")
        if self.corrected_weight <= 0 or (self.unreviewed_weight or 0) < 0:
            raise TrainingError(
                "the corrected weight must be positive and the unreviewed weight not negative"
            )
        if self.sparse and self.unreviewed_weight:
            raise TrainingError(
                "scribbles leave unpainted voxels unknown: there is no prediction there to "
                "weigh (unreviewed_weight must be 0 with sparse labels)"
            )
        if self.iterations is not None and self.iterations < 1:
            raise TrainingError("iterations must be at least 1")
        if self.seconds_budget is not None and self.seconds_budget <= 0:
            raise TrainingError("the time budget must be positive (or None for no limit)")
        if self.label_map is not None:
            self.label_map = check_label_map(self.label_map)
        if self.lr is not None and not self.lr > 0:
            raise TrainingError(f"the learning rate must be positive, got {self.lr}")

    @staticmethod
    def default_lr(sparse: bool) -> float:
        """The learning rate of corrected labels (1e-3) or of scribbles (3e-4)."""
        return 3e-4 if sparse else 1e-3

    @property
    def learning_rate(self) -> float:
        """``lr``, or the default of the kind of labels (``sparse`` or not)."""
        return float(self.lr) if self.lr is not None else self.default_lr(self.sparse)

    def iterations_for(self, device: str) -> int:
        """``iterations``, or the default for a device type (``cpu``, ``cuda``, ``mps``)."""
        if self.iterations is not None:
            return int(self.iterations)
        return FINETUNE_ITERATIONS.get(device, FINETUNE_ITERATIONS["cpu"])

    def unreviewed_weight_for(self, later_round: bool) -> float:
        """``unreviewed_weight``, or its default: 0 in a first round or for scribbles,
        ``LATER_ROUND_UNREVIEWED_WEIGHT`` in a later round."""
        if self.unreviewed_weight is not None:
            return float(self.unreviewed_weight)
        return LATER_ROUND_UNREVIEWED_WEIGHT if later_round and not self.sparse else 0.0


@dataclass
class TrainEvent(Progress):
    """One progress report of a training or fine-tuning run: a :class:`~napari_selfreg.jobs.Progress`
    whose ``stage`` is ``iteration``, ``validation``, ``checkpoint``, ``message`` or
    ``done``, ``done`` the optimiser steps so far and ``total`` the planned steps.

    Attributes:
        losses: loss terms of this step (``total``, ``seg``, ``ce``, ``dice``,
            ``scr``, ``ifd`` and any model-specific terms), averaged over processes.
        dice: validation Dice per class name (validation and done events).
        lr: learning rate of this step.
        seconds: training time so far.
        model_path: the folder written (checkpoint and done events).
    """

    losses: dict[str, float] = field(default_factory=dict)
    dice: dict[str, float | None] = field(default_factory=dict)
    lr: float = 0.0
    seconds: float = 0.0
    model_path: Path | None = None

    @property
    def kind(self) -> str:
        """The stage (``iteration``, ``validation``, ...)."""
        return self.stage

    @property
    def iteration(self) -> int:
        """Optimiser steps done so far."""
        return self.done
