"""Fine-tune a model on a user's corrected labels or scribbles (what the Fine-tune widget calls).

The user segments a volume, corrects it with napari's brush (or paints scribbles on
an empty layer) and hands over the image and the labels. What the user reviewed is
truth and what they did not is unknown: a slice the user painted on, in the plane
they painted in, counts as reviewed in full, including what they left as it was;
with scribbles only the painted voxels are known. The loss ignores unknown voxels
(by default), patches are centred on known voxels class by class and on the
corrections, and the validation Dice is measured on the reviewed voxels. The volume
is brought to the model's orientation and voxel spacing first. Fine-tuning runs the
one training loop and saves a NEW model version whose card names its parent; the
base model's files are never touched.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from napari_selfreg import models
from napari_selfreg.device import autocast, resolve_device, resolve_precision
from napari_selfreg.files import clear_stale, temporary_path
from napari_selfreg.jobs import drain
from napari_selfreg.modelfile import (
    ModelBundle,
    colors_after,
    load_model,
    model_reference,
    user_models_dir,
)

from .config import FinetuneConfig, LabelError, TrainConfig, TrainingError
from .datasets import Case, PatchSampler, case_from_arrays, check_labels, number_new_classes
from .grid import to_model_grid
from .loop import Trainer
from .setup import check_classes

NEW_CLASS_LOGIT_OFFSET = 4.0  # a new class starts at e^-4 (1.8 %) of background's odds
REVIEWED, CORRECTED = 1, 2  # values of a review map (0: unknown)


def extend_classes(network: nn.Module, card_options: dict[str, Any], arch: str, num_classes: int):
    """A copy of ``network`` with ``num_classes`` outputs; new channels start below background.

    Every tensor whose first axis is the old class count (the 1x1 head, auxiliary
    heads) is grown by repeating its background row, and the new rows of the biases
    are lowered by ``NEW_CLASS_LOGIT_OFFSET``: the extended model predicts exactly what
    the old one did, and a new class starts at a small probability (not tied with
    background, which made the first steps paint it over all of the background).
    """
    old = int(network.num_classes)
    options = {k: v for k, v in card_options.items() if k not in ("in_channels", "num_classes")}
    new = models.build(arch, int(network.in_channels), num_classes, **options)
    old_state, new_state = network.state_dict(), new.state_dict()
    for key, value in new_state.items():
        prev = old_state[key]
        if prev.shape == value.shape:
            new_state[key] = prev
        elif (
            prev.shape[0] == old
            and value.shape[0] == num_classes
            and prev.shape[1:] == value.shape[1:]
        ):
            extra = prev[:1].expand(num_classes - old, *prev.shape[1:])
            if prev.dim() == 1:  # a bias
                extra = extra - NEW_CLASS_LOGIT_OFFSET
            new_state[key] = torch.cat([prev, extra])
        else:
            raise TrainingError(
                f"cannot extend the classes of {arch}: {key} has shape {tuple(prev.shape)}"
            )
    new.load_state_dict(new_state)
    return new


PROBE_PATCHES = 4  # patches centred on painted voxels of each new class, as many elsewhere
PROBE_STEPS = 100  # L-BFGS steps of the linear probe


def probe_new_classes(
    network: nn.Module,
    case: Case,
    old: int,
    patch: tuple[int, ...],
    seed: int = 0,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> dict[int, float]:
    """Fit the new classes' rows of the 1x1 head ``network.head`` to the known voxels
    first, the rest of the network fixed (a linear probe on the head's input ``final``,
    as LP-FT does before fine-tuning: Kumar et al., ICLR 2022).

    The features come from patches centred on painted voxels of each new class and on
    other known voxels, in eval mode on ``device`` (autocast to ``dtype``, None: float32);
    the loss is cross-entropy with classes weighted
    by their inverse frequency; the old rows stay as they are. Fine-tuning then starts
    with the class present where it was painted: without the probe a new class on 6
    slices was learnt within 65 steps for one seed and not at all for another.

    Skipped (the rows stay as :func:`extend_classes` made them) for heads without a
    bias and 2D models on volumes. Returns the recall of each new class on its known
    voxels after the probe.
    """
    head = getattr(network, "head", None)
    dims = int(getattr(network, "spatial_dims", 3))
    total = int(network.num_classes)
    if head is None or getattr(head, "bias", None) is None or case.labels.ndim != dims:
        return {}
    rng = np.random.default_rng(seed)
    known = case.weight > 0 if case.weight is not None else np.ones(case.shape, bool)
    centres = []
    for k in range(old, total):
        painted = np.argwhere((case.labels == k) & known)
        centres += list(painted[rng.choice(len(painted), min(PROBE_PATCHES, len(painted)), replace=False)])  # fmt: skip
    others = np.argwhere(known & (case.labels < old))
    if not centres or not len(others):
        return {}
    centres += list(others[rng.choice(len(others), min(len(centres), len(others)), replace=False)])  # fmt: skip
    was_training, home = network.training, next(network.parameters()).device
    device = device or torch.device("cpu")
    network.eval().to(device)
    sampler = PatchSampler([case], patch, dims, rng=rng)
    feats, labels = [], []
    for centre in centres:
        image, patch_labels, weight = (torch.from_numpy(a) for a in sampler.centred(case, centre))
        with torch.no_grad(), autocast(device, dtype):
            final = network.forward_features(image[None].to(device))[1]["final"][0].float()
        keep = weight > 0
        feats.append(final[:, keep.to(device)])
        labels.append(patch_labels[keep].to(device))
    network.train(was_training).to(home)
    f, y = torch.cat(feats, 1).T, torch.cat(labels)  # (N, C), (N,)
    weight = head.weight.detach().view(total, -1).float().to(device)
    bias = head.bias.detach().float().to(device)
    fixed = f @ weight[:old].T + bias[:old]  # the old classes' logits
    new_w = weight[old:].clone().requires_grad_(True)
    new_b = bias[old:].clone().requires_grad_(True)
    counts = torch.bincount(y, minlength=total).float()
    class_weight = torch.where(counts > 0, counts.sum() / counts.clamp_min(1), 0.0)
    optimizer = torch.optim.LBFGS([new_w, new_b], max_iter=PROBE_STEPS, line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        optimizer.zero_grad()
        logits = torch.cat([fixed, f @ new_w.T + new_b], 1)
        loss = nn.functional.cross_entropy(logits, y, weight=class_weight)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        head.weight.view(total, -1)[old:] = new_w.to(home, head.weight.dtype)
        head.bias[old:] = new_b.to(home, head.bias.dtype)
        predicted = torch.cat([fixed, f @ new_w.T + new_b], 1).argmax(1)
    return {k: round(float((predicted[y == k] == k).float().mean()), 4) for k in range(old, total) if (y == k).any()}  # fmt: skip


def encoder_stages(network: nn.Module, patch_size: tuple[int, ...]) -> list[list[nn.Parameter]]:
    """Parameters of each encoder stage (stem first, bottleneck last), found by autograd.

    Stage ``i`` holds the parameters that encoder feature ``i`` depends on and no
    earlier encoder feature does; this works for any model with the feature
    contract (``feature_info`` + ``forward_features``).
    """
    names = [f.name for f in network.feature_info]
    groups = [(f.ifd_group or "") + (f.scr_group or "") for f in network.feature_info]
    last = max(
        (
            i
            for i, (n, g) in enumerate(zip(names, groups, strict=True))
            if "enc" in g or n == "bottleneck"
        ),
        default=-1,
    )
    if last < 0:
        raise TrainingError(
            "this model does not say which blocks form its encoder; use freeze='none'"
        )
    params = [p for p in network.parameters() if p.requires_grad]
    was_training = network.training
    network.eval()
    x = torch.zeros(
        1, int(network.in_channels), *patch_size, device=next(network.parameters()).device
    )
    with torch.enable_grad():
        _, features = network.forward_features(x)
        seen: set[int] = set()
        stages = []
        for name in names[: last + 1]:
            grads = torch.autograd.grad(
                features[name].float().sum(), params, allow_unused=True, retain_graph=True
            )
            deps = {i for i, g in enumerate(grads) if g is not None}
            stages.append([params[i] for i in sorted(deps - seen)])
            seen |= deps
    network.train(was_training)
    return stages


def freezer(freeze: str, patch_size: tuple[int, ...]) -> Callable[[nn.Module], None] | None:
    """A ``configure`` hook for :class:`Trainer` that freezes encoder stages.

    ``encoder`` freezes stem to bottleneck; ``stage:k`` freezes stages ``0..k-1``
    (the stem is stage 0) and trains the rest. BatchNorm layers inside frozen
    stages normalise with their running statistics, in training as at inference,
    and do not update them: a frozen stage computes exactly what the deployed model
    computes, so the trained stages adapt to the features they will see.
    """
    if freeze == "none":
        return None

    def configure(network: nn.Module) -> None:
        stages = encoder_stages(network, patch_size)
        if freeze == "encoder":
            k = len(stages)
        else:
            try:
                k = int(freeze.split(":", 1)[1])
            except ValueError as err:
                raise TrainingError(
                    f"bad freeze {freeze!r}; write stage:K with K a number"
                ) from err
            if not 0 <= k <= len(stages):
                raise TrainingError(
                    f"freeze stage:{k} is out of range; this model has {len(stages)} encoder stages (0-{len(stages) - 1})"
                )
        frozen = {id(p) for stage in stages[:k] for p in stage}
        for p in network.parameters():
            if id(p) in frozen:
                p.requires_grad_(False)
        for module in network.modules():
            own = list(module.parameters(recurse=False))
            if (
                isinstance(module, nn.modules.batchnorm._BatchNorm)
                and own
                and all(id(p) in frozen for p in own)
            ):
                module.register_forward_pre_hook(_use_running_statistics)

    return configure


def _use_running_statistics(module: nn.Module, _inputs) -> None:
    """Forward pre-hook of a frozen BatchNorm: evaluation mode whatever ``train()`` set."""
    module.training = False


def edit_axis(changed: np.ndarray, max_fraction: float = 0.5) -> int | None:
    """The axis the user painted along: corrections sit in few of its slices.

    Returns the axis whose slices holding corrections are the smallest share of
    its length, if that share is at most ``max_fraction``; None for 2D images or
    corrections spread in 3D.
    """
    if changed.ndim != 3 or not changed.any():
        return None
    coords = np.nonzero(changed)
    shares = [np.unique(c).size / n for c, n in zip(coords, changed.shape, strict=True)]
    axis = int(np.argmin(shares))
    return axis if shares[axis] <= max_fraction else None


def reviewed_region(
    changed: np.ndarray, axis: int | None = None, reviewed: np.ndarray | None = None
) -> np.ndarray:
    """The voxels the user reviewed: bool ``(*S)``.

    The whole image in 2D; in 3D every slice along ``axis`` (the plane the user
    painted in; default :func:`edit_axis`) that holds a change, whole; with changes
    spread in 3D, the changed voxels only. ``reviewed`` (earlier rounds) is added.
    """
    region = np.zeros(changed.shape, dtype=bool) if reviewed is None else np.array(reviewed, dtype=bool)  # fmt: skip
    if changed.ndim == 2:
        region[:] = True
        return region
    axis = edit_axis(changed) if axis is None else int(axis) % changed.ndim
    region |= changed
    if axis is not None and changed.any():
        index = [slice(None)] * changed.ndim
        index[axis] = np.unique(np.nonzero(changed)[axis])
        region[tuple(index)] = True
    return region


def review_map(reviewed: np.ndarray, corrected: np.ndarray) -> np.ndarray:
    """uint8 ``(*S)`` kept between rounds: 0 unknown, ``REVIEWED``, ``CORRECTED`` (a
    reviewed voxel the user changed, in this round or an earlier one)."""
    out = np.asarray(reviewed, dtype=bool).astype(np.uint8)
    out[np.asarray(corrected, dtype=bool)] = CORRECTED
    return out


def loss_weights(
    changed: np.ndarray, reviewed: np.ndarray, corrected_weight: float, unreviewed_weight: float
) -> np.ndarray:
    """Loss weight per voxel ``(*S)`` float32: corrected voxels ``corrected_weight``, other
    reviewed voxels 1, unreviewed voxels ``unreviewed_weight`` (0: unknown)."""
    weight = np.where(reviewed, np.float32(1.0), np.float32(unreviewed_weight))
    weight[changed] = corrected_weight
    return weight


def reviewed_case(case: Case, reviewed: np.ndarray) -> Case:
    """The fine-tuning case restricted to the voxels the user reviewed.

    Fine-tuning has no held-out data: its validation Dice (the live curve, the best
    checkpoint, the card) is the fit to the reviewed voxels, and says so.
    """
    weight = np.asarray(reviewed, dtype=np.float32)
    return dataclasses.replace(case, name=f"{case.name} (reviewed voxels)", weight=weight, _class_index={})  # fmt: skip


def _changed_against_prediction(
    bundle: ModelBundle, image: np.ndarray, labels: np.ndarray, cfg: FinetuneConfig, affine
) -> Generator[Any, None, np.ndarray]:
    """Voxels whose label differs from the base model's prediction (a generator: the
    prediction yields its progress and can be cancelled)."""
    from napari_selfreg.inference import Predictor

    predictor = Predictor(bundle, device=cfg.device, precision=cfg.precision)
    result = yield from predictor.iter_segment(image, affine=affine)
    return np.asarray(result.labels) != labels


def _patch_size(
    card_patch: list[int] | None, shape: tuple[int, ...], dims: int, flat_axis: int | None = None
) -> tuple[int, ...]:
    """The fine-tuning patch: the card's (at most 64^3 / 256^2); flat along ``flat_axis``
    (the axis the user painted along: 96 x 96 x 32, about the voxels of 64^3) so that a
    patch holds more of the reviewed slices it is centred on."""
    cap = 64 if dims == 3 else 256
    spatial = shape[-dims:]  # 2D models on 3D volumes slice along axis 0
    base = card_patch[-dims:] if card_patch else [cap] * dims
    patch = [min(int(p), cap) for p in base]
    if dims == 3 and flat_axis is not None:
        patch = [cap // 2 if a == flat_axis else cap * 3 // 2 for a in range(3)]
    return tuple(min(p, max(int(s), 8)) for p, s in zip(patch, spatial, strict=True))


def _model_axis(card, affine, axis: int | None) -> int | None:
    """A stored array axis as the model's axis after reorientation (None stays None)."""
    if axis is None or affine is None or not getattr(card, "orientation", None):
        return axis
    from napari_selfreg.geometry import reorientation

    return reorientation(affine, card.orientation).order.index(int(axis) % 3)


def iter_finetune(
    base_model: str | Path | ModelBundle,
    image: np.ndarray,
    labels: np.ndarray,
    changed_mask: np.ndarray | None = None,
    config: FinetuneConfig | None = None,
    out: str | Path | None = None,
    *,
    reviewed: np.ndarray | None = None,
    review_axis: int | None = None,
    affine: np.ndarray | None = None,
    on_reviewed: Callable[[np.ndarray], None] | None = None,
) -> Generator[Any, None, Path]:
    """Fine-tune ``base_model`` on corrected labels or scribbles; yield progress events
    (:class:`TrainEvent` and the predictor's ``Progress``); return the new model folder.

    Args:
        base_model: a model name, folder or loaded :class:`ModelBundle`.
        image: the raw image ``(*S)`` (as the predictor sees it), in the stored order.
        labels: the corrected labels ``(*S)`` (the prediction with the user's edits), or
            scribbles with ``config.sparse`` (0 unknown, ``config.background_value``
            background).
        changed_mask: bool ``(*S)``, voxels the user changed; None: computed against
            the base model's prediction (scribbles: the painted voxels).
        config: settings (:class:`FinetuneConfig`).
        out: new model folder; None: ``<user models>/<base>-ft`` (``-ft-v2`` ... when taken).
        reviewed: the review map of earlier rounds (:func:`review_map`; a bool mask
            counts as reviewed, none corrected): kept as truth, and its corrections stay
            corrections (their weight, patches centred on them), so a later round does
            not unlearn them in favour of its own. Given it, the round is a later one:
            by default the unreviewed voxels' labels (the last model's prediction) are
            taught lightly (:meth:`FinetuneConfig.unreviewed_weight_for`).
        review_axis: the axis the user painted along (napari's slider axis); None:
            the axis whose few slices hold the changes.
        affine: voxel-to-world matrix of the volume: it is brought to the model's
            orientation and spacing (from its card) before training.
        on_reviewed: called with the review map of the rounds so far (uint8, stored
            order) before training, so a caller can pass it to the next round.

    Raises:
        LabelError: labels with values the model lacks (use ``label_map`` or
            ``extend_classes``), of another shape, with nothing corrected or painted, or
            scribbles with a review map.
    """
    cfg = config or FinetuneConfig()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    bundle = base_model if isinstance(base_model, ModelBundle) else load_model(base_model)
    card = bundle.card
    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.shape[-labels.ndim :] != labels.shape:
        raise LabelError(f"image and labels differ in shape ({image.shape} vs {labels.shape})")
    for name, mask in (("changed", changed_mask), ("reviewed", reviewed)):
        if mask is not None and np.shape(mask) != labels.shape:
            raise LabelError(
                f"the mask of {name} voxels has shape {np.shape(mask)}, the labels {labels.shape}"
            )
    if cfg.sparse and reviewed is not None:  # its unpainted voxels would be learnt as background
        raise LabelError("scribbles take no review map: their earlier rounds stay painted in the scribble layer itself")  # fmt: skip
    earlier_reviewed = earlier_corrected = None  # from the review map of earlier rounds
    if reviewed is not None:  # any value but 0 is reviewed; CORRECTED stays a correction
        reviewed = np.asarray(reviewed)
        earlier_reviewed, earlier_corrected = reviewed != 0, reviewed == CORRECTED
    if cfg.sparse:
        painted = labels != 0
        if not painted.any():
            raise LabelError(
                "the scribbles are empty: paint some voxels of each class, and background "
                f"with label {cfg.background_value}"
            )
        labels = check_labels(np.where(labels == cfg.background_value, 0, labels), "the scribbles", cfg.label_map)  # fmt: skip
        changed = painted
        region = painted
    else:
        labels = check_labels(labels, "the corrected labels", cfg.label_map)
        if changed_mask is None:
            changed = yield from _changed_against_prediction(bundle, image, labels, cfg, affine)
        else:
            changed = np.asarray(changed_mask, dtype=bool)
        if not changed.any() and earlier_reviewed is None:
            raise LabelError(
                "no voxel was corrected: the labels equal the model's prediction; paint corrections first"
            )
        region = reviewed_region(changed, review_axis, earlier_reviewed)
        if earlier_corrected is not None:
            changed = changed | earlier_corrected
    if on_reviewed is not None:
        on_reviewed(review_map(region, changed))
    network = copy.deepcopy(bundle.network).float()
    class_names, class_colors = list(card.class_names), list(card.class_colors)
    if labels.size and labels.max() >= card.num_classes and not cfg.extend_classes:
        check_classes([labels], card.num_classes, f"model {card.name!r}")
    labels, added = number_new_classes(labels, card.num_classes, cfg.new_class_names)
    if added:  # (painted value, name) per new class
        network = extend_classes(network, card.options, card.architecture, card.num_classes + len(added))  # fmt: skip
        class_names += [name for _, name in added]
        class_colors += colors_after(class_colors, len(added))  # as the layer showed them
    grid, moved = to_model_grid(
        card,
        affine,
        {
            "image": (image, 1),
            "labels": (labels, 0),
            "changed": (changed, 0),
            "reviewed": (region, 0),
        },  # fmt: skip
    )
    unreviewed_weight = cfg.unreviewed_weight_for(later_round=earlier_reviewed is not None)
    weight = loss_weights(grid["changed"], grid["reviewed"], cfg.corrected_weight, unreviewed_weight)  # fmt: skip
    case = case_from_arrays(
        grid["image"], grid["labels"], grid["changed"], name="corrected",
        normalization=card.normalization, weight=weight,
    )  # fmt: skip
    check_classes([case.labels[grid["reviewed"]]], len(class_names), require_foreground=False)
    dims = int(getattr(network, "spatial_dims", 3))
    painted_axis = review_axis if review_axis is not None else edit_axis(changed)
    flat = _model_axis(card, affine, painted_axis) if case.labels.ndim == 3 else None
    patch = cfg.patch_size or _patch_size(card.patch_size, case.shape, dims, flat)
    if "img_size" in card.options:  # fixed positional embedding (MISSU): train on that size
        size = card.options["img_size"]
        patch = (int(size),) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
    # a small input suffices to trace which parameters each encoder stage uses
    probe = patch if "img_size" in card.options else tuple(min(p, 32) for p in patch)
    device, probed = resolve_device(cfg.device), {}
    iterations = cfg.iterations_for(device.type)
    if len(class_names) > card.num_classes:
        dtype = resolve_precision(cfg.precision, device)
        probed = probe_new_classes(network, case, card.num_classes, patch, cfg.seed, device, dtype)
    n_changed, n_reviewed = int(changed.sum()), int(region.sum())
    what = "painted" if cfg.sparse else "corrected"
    train_cfg = TrainConfig(
        arch=card.architecture,
        arch_options={
            k: v for k, v in card.options.items() if k not in ("in_channels", "num_classes")
        },
        num_classes=len(class_names),
        class_names=class_names,
        patch_size=patch,
        batch_size=cfg.batch_size,
        iterations=iterations,
        max_seconds=cfg.seconds_budget,
        lr=cfg.learning_rate,
        poly_power=cfg.poly_power,
        cooldown=cfg.cooldown,
        lambda_scr=cfg.lambda_scr,
        lambda_ifd=cfg.lambda_ifd,
        precision=cfg.precision,
        device=cfg.device,
        fg_fraction=0.3,
        focus_fraction=cfg.focus_fraction,
        augment=cfg.augment,
        val_fraction=0.0,
        val_every=max(1, iterations // 5),
        keep="last",  # validation runs with BatchNorm statistics still moving
        volume_metrics=False,  # the patches' Dice is the round's measure; saves a segmentation
        patience=0,
        batchnorm_batches=cfg.batchnorm_batches if cfg.batchnorm == "recompute" else 0,
        seed=cfg.seed,
        normalization=card.normalization,
        description=f"{card.description} Fine-tuned on {n_changed} {what} voxels ({n_reviewed} reviewed).".strip(),
    )
    base_card = copy.deepcopy(card)
    base_card.class_names = class_names
    base_card.class_colors = class_colors
    base_card.options = {**card.options, "num_classes": len(class_names)}
    target = Path(out) if out is not None else user_models_dir() / f"{card.name}-ft"
    target.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(target.parent)  # what killed fine-tunings left there
    work = temporary_path(target, "finetune", keep_suffix=False)  # made once Trainer accepts
    record = {**_asdict(cfg), f"{what}_voxels": n_changed, "reviewed_voxels": n_reviewed, **moved}
    # the steps and weight used, also when the round chose them
    record.update(iterations=iterations, unreviewed_weight=unreviewed_weight)
    if probed:  # new class -> its recall on the known voxels after the linear probe
        record["linear_probe_recall"] = {class_names[k]: v for k, v in probed.items()}
        record["new_class_values"] = {name: value for value, name in added}  # as painted
    trainer = Trainer(
        train_cfg,
        [case],
        target,
        network=network,
        base_card=base_card,
        parent=model_reference(bundle.path) if bundle.path is not None else card.name,
        checkpoints=work,
        configure=freezer(cfg.freeze, probe),
        new_version=True,
        extra_training={"finetune": record},
        validation_cases=[reviewed_case(case, grid["reviewed"])],
    )
    work.mkdir()
    try:
        return (yield from trainer.run())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def finetune(
    base_model: str | Path | ModelBundle,
    image: np.ndarray,
    labels: np.ndarray,
    changed_mask: np.ndarray | None = None,
    config: FinetuneConfig | None = None,
    out: str | Path | None = None,
    callback: Callable[[Any], None] | None = None,
    **options: Any,
) -> Path:
    """Drain :func:`iter_finetune` (``options``: ``reviewed``, ``review_axis``, ``affine``);
    return the new model folder."""
    return drain(
        iter_finetune(base_model, image, labels, changed_mask, config, out, **options), callback
    )


def _asdict(cfg: FinetuneConfig) -> dict[str, Any]:
    data = dataclasses.asdict(cfg)
    data["lr"] = cfg.learning_rate  # the rate used, also when the kind of labels chose it
    if cfg.patch_size is not None:
        data["patch_size"] = list(cfg.patch_size)
    if cfg.label_map is not None:
        data["label_map"] = {str(k): v for k, v in cfg.label_map.items()}
    return data
