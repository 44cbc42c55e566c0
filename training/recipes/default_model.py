"""Recipe of the bundled default model ``brain-tissue-unet3d``: a 3D SelfReg-UNet for brain
tissue (background, grey matter, white matter) that works on the scans users have.

Data: only synthetic scans (``napari_selfreg.training.synthesis``, SynthSeg-style):
the MNI152 template brain in procedural heads (skull, face, neck) or skull-stripped,
randomly deformed, rendered with random T1-, T2-, PD-like or arbitrary contrast (the
brain from the template's tissue maps or its real T1 remapped), bias field, blur,
1-5 mm resolution with thick slices along any axis, noise and gamma, in RAS
orientation (the predictor reorients inputs). Every patch is a new subject.

Validation (and model selection): fixed patches of the sample volume and of three
held-out scans (the template brain in a head of other geometry than any training
head, with T1-, T2- and PD-like contrasts). It starts from the first default model's
weights (``brain-tissue-unet3d-v1``), which already know the template's tissue.

Run (resumable; checkpoints in ``--workdir``)::

    python training/recipes/default_model.py --minutes 300 [--resume]
    python training/recipes/default_model.py --finish   # publish the best checkpoint
    python training/recipes/default_model.py --publish MODEL --init PARENT --note "..."

A GPU machine trains it faster (``--device cuda --workers N --batch 8``; the GPU run's
script is ``training/recipes/default_model_gpu.sh``); publish what it made with ``--publish``.

Checkpoints live in the ignored ``.runs/``; a fresh checkout starts again from
``--init``. The shipped model is also committed as ``training/results/default-model-candidate``
(bf16 weights: about 20 700 steps of 2 patches on 2 CPU cores, then 2600 steps of 8
patches on one GPU): continue from it with ``--init`` and that folder.

The published model goes to ``--out`` (default: the bundled folder; an existing one
is replaced only with ``--replace``), weights in bfloat16; ``benchmarks/brain_model.py``
measures it on held-out scans.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from napari_selfreg import data
from napari_selfreg.modelfile import BUNDLED_DIR, DEFAULT_MODEL, load_model, save_model
from napari_selfreg.training import TrainConfig, case_from_arrays, train
from napari_selfreg.training.checkpoint import checkpoint_dir
from napari_selfreg.training.synthesis import SyntheticPatches, SynthSettings, held_out_scan
from napari_selfreg.training.workers import WorkerPatches

NORMALIZATION = {"method": "zscore", "foreground": "otsu"}
VALIDATION_SEEDS = {"t1": 11, "t2": 12, "pd": 13}  # the benchmark uses other seeds
DESCRIPTION = (
    "3D SelfReg-UNet for brain tissue (background, grey matter, white matter) in MRI of "
    "the head, with or without skull, face and neck; any stored orientation (reoriented to "
    "RAS when the affine is known); other voxel sizes are resampled to 1 mm. Trained only "
    "on synthetic scans made from one anatomy (nilearn's MNI152 2009 template in "
    "procedural heads, random contrast, 1-5 mm, thick slices). Measured on held-out "
    "synthetic heads (benchmarks/brain_model.py): T1 with skull GM/WM Dice 0.95/0.95 with "
    "under 1 ml of tissue labelled outside the brain; the same head folded otherwise (a "
    "stand-in for another anatomy) 0.95/0.94; 1 x 1 x 3 mm 0.93/0.92; 2 mm 0.92/0.92; "
    "T2-like 0.93/0.92; PD-like 0.92/0.92 (2-11 ml outside the brain at low resolution "
    "and PD; only the largest connected piece of grey plus white matter is kept); "
    "brain-extracted 1 mm T1 (the sample) 0.94/0.95 (the first model, still bundled as "
    "brain-tissue-unet3d-v1, 0.93/0.92). Real scans of other people were not "
    "available to measure it on. Unusual anatomy (children, large lesions, tumours, "
    "post-surgery), CT and non-brain images are outside what it learned; deep grey matter "
    "follows the template's tissue maps; the spinal cord is left as background."
)


def validation_cases():
    """The sample and three held-out heads (T1, T2, PD), as training cases."""
    image, labels, affine = data.load_mni152()
    cases = [case_from_arrays(image, labels, name="mni152", normalization=NORMALIZATION, affine=affine)]  # fmt: skip
    for contrast, seed in VALIDATION_SEEDS.items():
        image, labels, affine = held_out_scan(contrast, seed)
        cases.append(
            case_from_arrays(
                image, labels, name=f"head-{contrast}", normalization=NORMALIZATION, affine=affine
            )  # fmt: skip
        )
    return cases


def config(args) -> TrainConfig:
    return TrainConfig(
        arch="unet3d",
        num_classes=3,
        class_names=list(data.MNI152_CLASSES),
        patch_size=(args.patch,) * 3,
        batch_size=args.batch,
        iterations=args.iterations,
        max_seconds=args.minutes * 60,
        anneal_to_budget=True,  # the session's time, not the step count, ends a run
        lr=args.lr,
        val_every=args.val_every,
        val_patches=24,
        lambda_scr=args.lambda_scr,
        lambda_ifd=args.lambda_ifd,
        patience=0,
        seed=args.seed,
        augment=False,  # the generator deforms, flips and degrades every patch itself
        normalization=NORMALIZATION,
        spacing=[1.0, 1.0, 1.0],
        orientation="RAS",
        num_threads=args.threads,
        device=args.device,
        description=DESCRIPTION,
    )


def patch_source(rng, cfg: TrainConfig, settings: SynthSettings, workers: int):
    """Synthetic patches, generated in the training process or in ``workers`` processes
    (each with a pool of 2 heads, one replaced every 1000 patches)."""
    if not workers:
        return SyntheticPatches(cfg.patch_size, rng, NORMALIZATION, settings)
    factory = functools.partial(
        SyntheticPatches, cfg.patch_size, normalization=NORMALIZATION, settings=settings,
        heads=2, refresh_every=1000,
    )  # fmt: skip
    return WorkerPatches(factory, rng, cfg.batch_size, workers)


def publish(
    trained: Path, out: Path, minutes: float, command: str, init: str, extra: dict | None = None
) -> dict:
    """Write the shipped model (bf16 weights, the card of a default model) to ``out``."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_model(trained)
        card = bundle.card
        card.class_colors = list(data.MNI152_COLORS)
        card.patch_size = [64, 64, 64]  # inference tile: the fastest on 2 CPU cores
        card.keep_largest = [[1, 2]]  # grey + white matter: one piece; the rest is background
        card.description = DESCRIPTION
        card.training = {
            **card.training,
            "recipe": "training/recipes/default_model.py",
            "command": command,
            "wall_minutes": round(minutes, 1),
            "data_summary": "synthetic scans only (training/synthesis.py); see the recipe",
            "init": init,
            **(extra or {}),
        }
        staged = save_model(bundle.network, card, Path(tmp) / DEFAULT_MODEL, dtype="bfloat16")
        new, old = out.with_name(f".{out.name}.new"), out.with_name(f".{out.name}.old")
        shutil.rmtree(new, ignore_errors=True)
        shutil.copytree(staged, new)  # next to ``out``: the swap below is two renames
        if out.exists():
            out.rename(old)
        new.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    return {"model": str(out), "train_minutes": round(minutes, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20000, help="step cap; the learning rate decays over --minutes or these, whichever ends first")  # fmt: skip
    parser.add_argument("--minutes", type=float, default=420.0, help="total training time cap")
    parser.add_argument("--patch", type=int, default=64, help="training patch (cube); the candidate's runs used 64")  # fmt: skip
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--val-every", type=int, default=200)
    parser.add_argument("--lambda-scr", type=float, default=0.015)
    parser.add_argument("--lambda-ifd", type=float, default=0.0, help="IFD collapses channels (docs/method.md); off by default")  # fmt: skip
    parser.add_argument("--template-share", type=float, default=SynthSettings.template, help="share of patches that show the template T1 as it is (brain-extracted 1 mm T1)")  # fmt: skip
    parser.add_argument("--note", default="", help="a sentence for the card's training record")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=2, help="patches per step (the CPU runs used 2)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=0, help="processes that generate patches (0: in the training process); a GPU needs many")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--init", default="brain-tissue-unet3d-v1", help="start from this model")
    parser.add_argument("--workdir", type=Path, default=Path(".runs/default-model"))
    parser.add_argument("--out", type=Path, default=BUNDLED_DIR / DEFAULT_MODEL)
    parser.add_argument("--replace", action="store_true", help="replace an existing --out")
    parser.add_argument("--resume", action="store_true", help="continue the run in --workdir")
    parser.add_argument("--finish", action="store_true", help="publish the best checkpoint now")
    parser.add_argument("--publish", type=Path, default=None, metavar="MODEL", help="publish this trained model folder (one a GPU machine trained, say) with this recipe's card; --note says how it was made")  # fmt: skip
    args = parser.parse_args(argv)
    if args.out.exists() and not args.replace:
        print(f"{args.out} exists; pass --replace to publish over it", file=sys.stderr)
        return 2
    command = "python training/recipes/default_model.py " + " ".join(sys.argv[1:])
    if args.publish:  # trained elsewhere: its own training record, this recipe's card
        record = load_model(args.publish).card.training
        extra = {"trained_by": record.get("command", ""), **({"note": args.note} if args.note else {})}  # fmt: skip
        report = publish(args.publish, args.out, float(record.get("wall_minutes", 0.0)), command, args.init, extra)  # fmt: skip
        print(json.dumps(report, indent=2))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    trained = args.workdir / "trained"
    if args.finish:  # the finished model, else the best checkpoint so far
        source = trained if trained.exists() else checkpoint_dir(trained) / "best"
    else:
        cfg = config(args)
        settings = SynthSettings(template=args.template_share)
        changed = "" if settings == SynthSettings() else f"template={settings.template}"
        source = train(
            cfg, validation_cases(), trained, callback=_print_event, resume=args.resume,
            network=None if args.resume else load_model(args.init).network.train(),
            extra_training={"generator": f"synthesis.SyntheticPatches ({changed or 'defaults'})", **({"note": args.note} if args.note else {})},  # fmt: skip
            patch_source=lambda rng: patch_source(rng, cfg, settings, args.workers),
        )  # fmt: skip
    last = json.loads((checkpoint_dir(trained) / "last" / "trainer.json").read_text())
    minutes = float(last.get("seconds", 0.0)) / 60
    report = publish(source, args.out, minutes, command, args.init)
    print(json.dumps(report, indent=2))
    return 0


def _print_event(event) -> None:
    if event.kind == "iteration" and event.iteration % 20:
        return
    losses = {k: round(v, 4) for k, v in event.losses.items() if "/" not in k}
    print(f"[{event.kind}] {event.iteration}/{event.total} {event.seconds:.0f}s {losses} "
          f"{event.dice or ''} {event.message}", flush=True)  # fmt: skip


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
