"""``napari-selfreg train`` and ``napari-selfreg finetune``: thin shells over the loop.

``napari_selfreg.cli`` calls :func:`add_parsers`; ``python -m napari_selfreg.training``
runs the same two commands on their own. Both print a progress bar with the loss
terms; ``train`` works unchanged under ``torchrun`` (only rank 0 prints and
writes). Errors a user can cause are ``ValueError`` subclasses (one sentence).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from napari_selfreg.jobs import ProgressPrinter, drain

from .config import (
    BATCHNORM_STATISTICS,
    LATER_ROUND_UNREVIEWED_WEIGHT,
    PRESETS,
    FinetuneConfig,
    TrainConfig,
    TrainingError,
    finetune_iterations_text,
)


def _label_map(text: str | None) -> dict[int, int] | None:
    if not text:
        return None
    try:
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        return {int(a): int(b) for a, b in pairs}
    except ValueError as err:
        raise TrainingError(
            f"bad --label-map {text!r}; write OLD:NEW pairs separated by commas, e.g. 4:1,5:2"
        ) from err


def _normalization(text: str) -> dict[str, Any]:
    method, *rest = text.split(":")
    spec: dict[str, Any] = {"method": method}
    if rest:
        if len(rest) != 2:
            raise TrainingError(f"bad --normalization {text!r}; write METHOD or METHOD:LOW:HIGH")
        spec.update(low=float(rest[0]), high=float(rest[1]))
    return spec


def _arch_options(arch: str, items: list[str], channels: list[int] | None) -> dict[str, Any]:
    """``--arch-option KEY=VALUE`` pairs (VALUE as JSON, else as text), checked against ``arch``."""
    import json

    from napari_selfreg import models

    options: dict[str, Any] = {"channels": list(channels)} if channels else {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise TrainingError(f"bad --arch-option {item!r}; write KEY=VALUE, e.g. img_size=64")
        key = key.strip()
        if key in options:
            raise TrainingError(f"{key} is given twice (--channels or --arch-option)")
        words = {"true": True, "false": False, "none": None, "null": None}
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = words.get(text.strip().lower(), text)
    try:
        models.check_options(arch, options)
    except ValueError as err:
        raise TrainingError(str(err)) from err
    return options


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``train`` and ``finetune`` subcommands."""
    tr = subparsers.add_parser(
        "train",
        help="train a model on folders of images and labels (also under torchrun)",
        description="Train a model on image/label files matched by name. Writes the best "
        "model to OUT (model.safetensors + model.json) and keeps best/last checkpoints in "
        "OUT.checkpoints/ (--resume continues from there). Multi-process: "
        "torchrun --standalone --nproc_per_node=N --no-python napari-selfreg train ... "
        "(from the repository root, --no-python may be left out)",
    )
    t = TrainConfig()  # the defaults
    tr.add_argument("--images", required=True, help="folder of image files")
    tr.add_argument("--labels", required=True, help="folder of label files (same names)")
    tr.add_argument("--out", required=True, help="model folder to write (must not exist)")
    tr.add_argument("--arch", default=t.arch, help=f"architecture (default {t.arch})")
    tr.add_argument("--channels", type=int, nargs="+", help="UNet widths per level, e.g. 16 32 64 128")  # fmt: skip
    tr.add_argument("--arch-option", action="append", default=[], metavar="KEY=VALUE", help="architecture option, VALUE as JSON or text; repeatable, e.g. --arch-option training_modules=true --arch-option img_size=64 (a wrong KEY lists the valid ones)")  # fmt: skip
    tr.add_argument("--iterations", type=int, default=t.iterations, help=f"optimiser steps (default {t.iterations})")  # fmt: skip
    tr.add_argument("--patch", type=int, nargs="+", metavar="N", help="patch size: D H W (H W for 2D models; default 64^3 / 128^2)")  # fmt: skip
    tr.add_argument("--batch-size", type=int, default=t.batch_size, help=f"patches per step and process (default {t.batch_size})")  # fmt: skip
    tr.add_argument("--optimizer", default=t.optimizer, choices=["adamw", "sgd"])
    tr.add_argument("--lr", type=float, default=None, help="initial learning rate (poly decay)")
    tr.add_argument("--lambda-scr", type=float, default=t.lambda_scr, help="SelfReg SCR weight")
    tr.add_argument("--lambda-ifd", type=float, default=t.lambda_ifd, help="SelfReg IFD weight (top-half to bottom-half channel distillation)")  # fmt: skip
    tr.add_argument("--lambda-decor", type=float, default=t.lambda_decor, help="our channel decorrelation weight (0: off; lowers channel similarity, unlike IFD)")  # fmt: skip
    tr.add_argument("--no-selfreg", action="store_true", help="plain training (both lambdas 0)")
    tr.add_argument("--preset", choices=sorted(PRESETS), default=None, help="the SelfReg-UNet authors' settings: loss weights, squared Dice over all classes, lambdas, optimiser (override those options)")  # fmt: skip
    tr.add_argument("--seed", type=int, default=t.seed)
    tr.add_argument("--device", default=t.device, help="auto, cpu, cuda, cuda:N or mps")
    tr.add_argument("--precision", default=t.precision, choices=["auto", "bf16", "fp16", "fp32"])
    tr.add_argument("--resume", action="store_true", help="continue from OUT.checkpoints/last")
    tr.add_argument("--restart", action="store_true", help="discard an interrupted run in OUT.checkpoints and start over")  # fmt: skip
    tr.add_argument("--val-fraction", type=float, default=t.val_fraction, help="share of cases held out")  # fmt: skip
    tr.add_argument("--val-every", type=int, default=t.val_every, help="iterations between validations")  # fmt: skip
    tr.add_argument("--patience", type=int, default=t.patience, help="validations without gain before stopping (0: never)")  # fmt: skip
    tr.add_argument("--max-seconds", type=float, default=None, help="time budget")
    tr.add_argument("--anneal-to-budget", action="store_true", help="the learning rate decays over --max-seconds when that ends the run before --iterations")  # fmt: skip
    tr.add_argument("--num-classes", type=int, default=None, help="classes incl. background")
    tr.add_argument("--class-names", default=None, help="comma-separated, background first")
    tr.add_argument("--label-map", default=None, help="remap labels, e.g. 10:1,20:2")
    tr.add_argument("--normalization", default="zscore", help="zscore, percentile or ct_window:LOW:HIGH")  # fmt: skip
    tr.add_argument("--slice-axis", type=int, default=0, choices=[0, 1, 2], help="slice axis of 2D models")  # fmt: skip
    tr.add_argument("--split-from", default=None, help="reuse the train/val split of this model")
    tr.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)

    ft = subparsers.add_parser(
        "finetune",
        help="fine-tune a model on corrected labels or scribbles of one image; writes a new model",
        description="Fine-tune MODEL on an image and its corrected labels. What you reviewed is "
        "truth, the rest is unknown: every slice holding a change (along --review-axis, by "
        "default the axis whose few slices hold the changes) counts as reviewed in full; with "
        "--sparse only painted voxels are known (0 unpainted, --background-value background). "
        "Writes a new model version (OUT, or OUT-v2 if taken) whose card names MODEL as "
        "parent; MODEL's files are not touched.",
    )
    d = FinetuneConfig()
    ft.add_argument("--model", required=True, help="base model name or folder")
    ft.add_argument("--image", required=True, help="image file")
    ft.add_argument("--labels", required=True, help="corrected label file (or scribbles with --sparse)")  # fmt: skip
    ft.add_argument("--out", default=None, help="new model folder (default: user models/<model>-ft)")  # fmt: skip
    ft.add_argument("--changed", default=None, help="mask file of corrected voxels (default: labels != the model's prediction)")  # fmt: skip
    ft.add_argument("--reviewed", default=None, help="review map of earlier rounds, as --save-reviewed wrote it (0 unknown, 1 reviewed, 2 corrected; any other value reviewed): kept as truth, its corrections stay corrections; not with --sparse, whose earlier rounds stay in the scribble layer")  # fmt: skip
    ft.add_argument("--review-axis", type=int, default=None, choices=[0, 1, 2], help="array axis you painted along (slices along it count as reviewed)")  # fmt: skip
    ft.add_argument("--save-reviewed", default=None, help="write the review map of the rounds so far (for --reviewed next round)")  # fmt: skip
    ft.add_argument("--sparse", action="store_true", help="the labels are scribbles: 0 unknown, background painted as --background-value")  # fmt: skip
    ft.add_argument("--background-value", type=int, default=d.background_value, help=f"scribble value of background (default {d.background_value})")  # fmt: skip
    ft.add_argument("--iterations", type=int, default=None, help=f"optimiser steps (default: {finetune_iterations_text()})")  # fmt: skip
    ft.add_argument("--seconds", type=float, default=d.seconds_budget, help=f"training time budget in seconds, 0 for none (default {d.seconds_budget:g})")  # fmt: skip
    ft.add_argument("--lr", type=float, default=None, help=f"learning rate (default {d.default_lr(False):g}, with --sparse {d.default_lr(True):g})")  # fmt: skip
    ft.add_argument("--freeze", default=d.freeze, help="none, encoder or stage:K")
    ft.add_argument("--batchnorm", default=d.batchnorm, choices=BATCHNORM_STATISTICS, help=f"BatchNorm running statistics: estimated anew through the final weights, or PyTorch's exponential average during training (default {d.batchnorm})")  # fmt: skip
    ft.add_argument("--corrected-weight", type=float, default=d.corrected_weight, help=f"loss weight of corrected voxels (other reviewed voxels 1; default {d.corrected_weight:g})")  # fmt: skip
    ft.add_argument("--unreviewed-weight", type=float, default=None, help=f"loss weight of voxels nobody reviewed, where the labels hold the model's prediction (default 0: unknown; with --reviewed, a later round, {LATER_ROUND_UNREVIEWED_WEIGHT:g}: keeps what earlier rounds taught)")  # fmt: skip
    ft.add_argument("--lambda-scr", type=float, default=d.lambda_scr)
    ft.add_argument("--lambda-ifd", type=float, default=d.lambda_ifd)
    ft.add_argument("--extend-classes", action="store_true", help="add classes for new label values")  # fmt: skip
    ft.add_argument("--class-name", action="append", default=[], help="name of an added class (repeat in order)")  # fmt: skip
    ft.add_argument("--label-map", default=None, help="remap labels, e.g. 4:1")
    ft.add_argument("--seed", type=int, default=d.seed)
    ft.add_argument("--device", default=d.device)
    ft.add_argument("--precision", default=d.precision, choices=["auto", "bf16", "fp16", "fp32"])
    ft.add_argument("--threads", type=int, default=None)
    ft.add_argument("--quiet", action="store_true")
    ft.set_defaults(func=cmd_finetune)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of ``train``'s arguments."""
    from napari_selfreg import models

    if args.arch not in models.available():
        raise TrainingError(
            f"unknown architecture {args.arch!r}; choose {', '.join(models.available())}"
        )
    two_d = args.arch.endswith("2d")
    patch = tuple(args.patch) if args.patch else ((128, 128) if two_d else (64, 64, 64))
    if len(patch) != (2 if two_d else 3):
        raise TrainingError(f"--patch needs {2 if two_d else 3} sizes for {args.arch}")
    options = _arch_options(args.arch, args.arch_option, args.channels)
    lam_scr, lam_ifd = (0.0, 0.0) if args.no_selfreg else (args.lambda_scr, args.lambda_ifd)
    split = None
    if args.split_from:
        from napari_selfreg.modelfile import load_model

        split = load_model(args.split_from).card.training.get("split")
        if not split:
            raise TrainingError(f"model {args.split_from} records no train/val split")
    config = TrainConfig(
        arch=args.arch,
        arch_options=options,
        num_classes=args.num_classes,
        class_names=args.class_names.split(",") if args.class_names else None,
        patch_size=patch,
        batch_size=args.batch_size,
        iterations=args.iterations,
        max_seconds=args.max_seconds,
        anneal_to_budget=args.anneal_to_budget,
        optimizer=args.optimizer,
        lr=args.lr,
        lambda_scr=lam_scr,
        lambda_ifd=lam_ifd,
        precision=args.precision,
        device=args.device,
        num_threads=args.threads,
        val_fraction=args.val_fraction,
        val_every=args.val_every,
        patience=args.patience,
        seed=args.seed,
        normalization=_normalization(args.normalization),
        slice_axis=args.slice_axis,
        label_map=_label_map(args.label_map),
        split=split,
        lambda_decor=args.lambda_decor,
    )
    return dataclasses.replace(config, **PRESETS[args.preset]) if args.preset else config


def _drain(gen, label: str, quiet: bool) -> Path:
    printer = ProgressPrinter(label, quiet)
    try:
        return Path(drain(gen, printer))
    finally:
        printer.close()


def cmd_train(args: argparse.Namespace) -> int:
    """``napari-selfreg train``."""
    from .datasets import load_folder
    from .loop import iter_train

    config = train_config(args)
    cases = load_folder(args.images, args.labels, config.normalization, config.label_map)
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints
    job = iter_train(config, cases, args.out, resume=args.resume, restart=args.restart)
    try:
        path = _drain(job, "train", args.quiet or not rank0)
    except KeyboardInterrupt:
        from .checkpoint import checkpoint_dir

        folder = checkpoint_dir(args.out)
        if rank0 and (folder / "last").is_dir():
            print(f"napari-selfreg: interrupted; the checkpoints in {folder} are kept - continue with --resume", file=sys.stderr)  # fmt: skip
        elif rank0:
            print("napari-selfreg: interrupted before the first checkpoint; nothing to resume", file=sys.stderr)  # fmt: skip
        return 130
    if rank0:
        print(path)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """``napari-selfreg finetune``."""
    import numpy as np

    from napari_selfreg.io import read_volume, write_labels
    from napari_selfreg.modelfile import read_card

    from .finetune import iter_finetune
    from .metrics import lowered, unlearnt

    image = read_volume(args.image)
    given = {"labels": args.labels, "changed": args.changed, "reviewed": args.reviewed}
    read = {name: read_volume(path) for name, path in given.items() if path}
    for name, volume in read.items():
        if volume.shape != image.shape:
            raise TrainingError(
                f"image and {name} differ in shape ({image.shape} vs {volume.shape}); "
                "resample them onto the image grid"
            )
        if float(np.max(np.abs(image.affine - volume.affine))) > 1e-3:
            raise TrainingError(
                f"image and {name} have different affines; they must share one voxel grid"
            )
    labels = read["labels"]
    masks = {name: np.asarray(read[name].data) for name in ("changed", "reviewed") if name in read}
    if "changed" in masks:  # a mask; reviewed: the review map --save-reviewed wrote
        masks["changed"] = masks["changed"] != 0
    if args.save_reviewed:  # a new file: never an input, never an earlier round's map
        target = Path(args.save_reviewed).expanduser()
        if target.exists():
            raise TrainingError(f"--save-reviewed {target} exists; give a new file name (the earlier map goes in with --reviewed)")  # fmt: skip
    config = FinetuneConfig(
        iterations=args.iterations,
        seconds_budget=args.seconds or None,
        lr=args.lr,
        lambda_scr=args.lambda_scr,
        lambda_ifd=args.lambda_ifd,
        freeze=args.freeze,
        batchnorm=args.batchnorm,
        corrected_weight=args.corrected_weight,
        unreviewed_weight=args.unreviewed_weight,
        sparse=args.sparse,
        background_value=args.background_value,
        extend_classes=args.extend_classes or bool(args.class_name),
        new_class_names=args.class_name or None,
        label_map=_label_map(args.label_map),
        precision=args.precision,
        device=args.device,
        num_threads=args.threads,
        seed=args.seed,
    )

    review_maps: list[np.ndarray] = []  # written once the round has saved its model
    gen = iter_finetune(
        args.model, image.data, labels.data, masks.get("changed"), config, args.out,
        reviewed=masks.get("reviewed"), review_axis=args.review_axis,
        affine=image.affine if image.ndim == 3 else None, on_reviewed=review_maps.append,
    )  # fmt: skip
    path = _drain(gen, "finetune", args.quiet)
    if args.save_reviewed and review_maps:
        written = write_labels(args.save_reviewed, review_maps[-1], reference=image, overwrite=False)  # fmt: skip
        print(f"wrote the review map {written} (1 reviewed, 2 corrected)", file=sys.stderr)
    scores = read_card(path).metrics or {}
    if drop := lowered(scores):
        print(f"napari-selfreg: the round lowered the Dice on the voxels you reviewed ({drop[0]:.3f} -> {drop[1]:.3f}); run it again with a lower --lr", file=sys.stderr)  # fmt: skip
    low = unlearnt(scores.get("patch_dice") or {})
    if low:
        print(f"napari-selfreg: not learnt yet on the voxels you reviewed: {', '.join(low)}; "
              "raise --iterations, or run another round from the new model", file=sys.stderr)  # fmt: skip
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m napari_selfreg.training {train,finetune} ...``."""
    parser = argparse.ArgumentParser(prog="python -m napari_selfreg.training")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    from napari_selfreg.cli import sigterm_like_ctrl_c

    try:
        with sigterm_like_ctrl_c():  # a scheduler's SIGTERM stops it like Ctrl-C
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
