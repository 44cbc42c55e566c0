"""Recipe of the bundled default model: a 3D SelfReg-UNet for brain tissue.

Data: nilearn's MNI152 2009 1 mm T1 with labels = argmax(background, GM, WM)
(``napari_selfreg.data.load_mni152``). The network trains on the left
hemisphere only (voxel index i < 98, x < 0 mm); it is validated during training
on the left hemisphere of an intensity-shifted copy, and tested on

* the whole sample volume,
* the held-out right hemisphere (i >= 99),
* a shifted scan made with ``data.make_shifted_scan`` (other intensity scale and
  gamma, smooth bias field, 1.3 mm voxels), segmented from its 1.3 mm grid the
  way a user would (the predictor resamples to the card's 1 mm and back).

Augmentation (flips incl. left-right, rotations, scaling, intensity scale and
shift, gamma, noise, bias field) is what lets one template carry over to other
T1 scans. The weights ship in bfloat16 (about 9 MB).

Run: ``python training/recipes/default_model.py [--iterations N] [--minutes M]``
(writes ``napari_selfreg/bundled_models/brain-tissue-unet3d`` and a JSON report;
refuses to overwrite an existing bundled model unless ``--replace``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_selfreg import data
from napari_selfreg.modelfile import BUNDLED_DIR, DEFAULT_MODEL, load_model, save_model
from napari_selfreg.predict import Predictor
from napari_selfreg.training import TrainConfig, case_from_arrays, train

MIDLINE = 98  # voxel index of x = 0 mm in the 197-voxel MNI152 grid
NORMALIZATION = {"method": "zscore", "foreground": "otsu"}


def dice_per_class(pred: np.ndarray, truth: np.ndarray, classes=(1, 2)) -> dict[int, float]:
    """Dice of each foreground class."""
    out = {}
    for c in classes:
        p, t = pred == c, truth == c
        denom = p.sum() + t.sum()
        out[c] = float(2 * (p & t).sum() / denom) if denom else float("nan")
    return out


def evaluate(model_dir: Path, threads: int | None = None) -> dict[str, dict[str, float]]:
    """Dice for grey and white matter on the three test sets of the module docstring."""
    image, labels, affine = data.load_mni152()
    bundle = load_model(model_dir)
    predictor = Predictor(bundle, overlap=0.5)
    names = {1: "grey matter", 2: "white matter"}
    results = {}
    pred = predictor.segment(image, spacing=(1.0, 1.0, 1.0)).labels
    results["sample"] = dice_per_class(pred, labels)
    results["held_out_hemisphere"] = dice_per_class(pred[MIDLINE + 1 :], labels[MIDLINE + 1 :])
    s_img, s_lab, s_aff = data.make_shifted_scan(image, labels, affine, spacing=1.3, seed=7)
    spacing = tuple(float(v) for v in np.linalg.norm(s_aff[:3, :3], axis=0))
    s_pred = predictor.segment(s_img, spacing=spacing).labels
    results["shifted_1.3mm"] = dice_per_class(s_pred, s_lab)
    return {k: {names[c]: round(v, 4) for c, v in d.items()} for k, d in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--minutes", type=float, default=45.0, help="training time cap")
    parser.add_argument("--patch", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=BUNDLED_DIR / DEFAULT_MODEL)
    parser.add_argument("--replace", action="store_true", help="replace an existing --out")
    parser.add_argument("--workdir", type=Path, help="keep checkpoints here (default: temporary)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --workdir")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.replace:
        print(f"{args.out} exists; pass --replace to train it again", file=sys.stderr)
        return 2

    image, labels, affine = data.load_mni152()
    shifted, _, _ = data.make_shifted_scan(image, labels, affine, spacing=1.0, seed=1)
    cases = [
        case_from_arrays(image, labels, name="mni152", normalization=NORMALIZATION, affine=affine),
        case_from_arrays(
            shifted, labels, name="mni152-shifted", normalization=NORMALIZATION, affine=affine
        ),
    ]
    left = {"axis": 0, "start": 0, "stop": MIDLINE}
    config = TrainConfig(
        arch="unet3d",
        num_classes=3,
        class_names=list(data.MNI152_CLASSES),
        patch_size=(args.patch,) * 3,
        batch_size=2,
        iterations=args.iterations,
        max_seconds=args.minutes * 60,
        lr=2e-3,
        val_every=100,
        patience=0,
        seed=args.seed,
        normalization=NORMALIZATION,
        split={"train": [{"case": "mni152", **left}], "val": [{"case": "mni152-shifted", **left}]},
        description=(
            "3D SelfReg-UNet for brain tissue (background, grey matter, white matter) on T1 MRI "
            "at 1 mm; trained on the left hemisphere of nilearn's MNI152 2009 template."
        ),
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        trained = train(config, cases, work / "trained", callback=_print_event, resume=args.resume)
        minutes = (time.perf_counter() - start) / 60
        # Score the weights as they ship (bfloat16), then write the final card.
        shipped = save_model(load_model(trained).network, load_model(trained).card,
                             Path(tmp) / "bf16", dtype="bfloat16")  # fmt: skip
        metrics = evaluate(shipped)
        bundle = load_model(shipped)
        card = bundle.card
        card.class_colors = list(data.MNI152_COLORS)
        card.spacing = [1.0, 1.0, 1.0]
        card.metrics = {**card.metrics, "test_dice": metrics}
        card.training = {
            **card.training,
            "recipe": "training/recipes/default_model.py",
            "command": "python training/recipes/default_model.py " + " ".join(sys.argv[1:]),
            "wall_minutes": round(minutes, 1),
        }
        if args.out.exists():
            shutil.rmtree(args.out)
        path = save_model(bundle.network, card, args.out, dtype="bfloat16")
    report = {"test_dice": metrics, "train_minutes": round(minutes, 1), "model": str(path)}
    print(json.dumps(report, indent=2))
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/default_model.json").write_text(json.dumps(report, indent=2))
    return 0


def _print_event(event) -> None:
    if event.kind == "iteration" and event.iteration % 20:
        return
    losses = {k: round(v, 4) for k, v in event.losses.items() if "/" not in k}
    print(f"[{event.kind}] {event.iteration}/{event.total} {event.seconds:.0f}s {losses} "
          f"{event.dice or ''} {event.message}", flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
