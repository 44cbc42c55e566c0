"""Fine-tuning from a few reviewed slices or scribbles: does it fix the slices nobody touched?

The base model makes a systematic error: the first default model
(``brain-tissue-unet3d-v1``, trained on a brain-extracted template) labels scalp,
skull and face as grey or white matter when the MNI152 brain sits in a synthetic head
(``synthesis.held_out_scan``, a seed no training used). Each scenario runs what a
user runs: ``iter_finetune`` with the defaults of the Fine-tune widget (the corrected
voxels are the edits of the layer Segment wrote, the painting axis is found from them,
the volume's affine), then segments the whole volume again.

* ``corrections``: 6 axial slices, spread over the extent of the errors, corrected
  (tissue outside the brain cleared, the brain's labels fixed); measure: tissue labelled
  outside the brain on the untouched slices (target: down by >= 90 % within 60 s).
* ``new class``: on 6 axial slices spread over the head the tissue outside the brain is
  painted as a new class ("extracerebral"); measure: its Dice on the untouched slices
  (>= 0.85); also grey or white matter left outside the brain (the head's brain mask)
  and CSF inside it labelled tissue, apart, as ``brain_model.py`` counts them.
* ``scribbles``: on a T2-like scan, strokes of background, grey and white matter
  covering <= 2 % of the voxels (unpainted = unknown); measure: GM/WM Dice on the
  whole volume (>= 0.85).
* ``two rounds``: 3 slices, fine-tune, re-segment, 3 more slices (the first 3 kept),
  fine-tune again; the 3 more are the top of the "where to correct next" list the
  widget shows after round 1 (``two rounds fixed``: the 3 slices between the first 3);
  measure: the error on slices untouched in both rounds (round 2 not worse than
  round 1).

Run on an otherwise idle machine: ``python benchmarks/finetune.py [--threads 2]``;
prints a table and writes ``benchmarks/results/finetune.json``. ``--base
brain-tissue-unet3d`` runs the head scenarios from the bundled default instead (what
a user with a full-head scan starts from); ``--only`` picks scenarios, ``--out`` the
JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine_info, model_sha256  # benchmarks/machine.py

from napari_selfreg.inference import Predictor
from napari_selfreg.jobs import drain
from napari_selfreg.modelfile import load_model
from napari_selfreg.review import rank_slices, suggestion_spacing
from napari_selfreg.training import FinetuneConfig
from napari_selfreg.training import heads as H
from napari_selfreg.training.finetune import iter_finetune
from napari_selfreg.training.metrics import volume_dice
from napari_selfreg.training.synthesis import held_out_scan

BASE = "brain-tissue-unet3d-v1"
SEED = 2001


def dice(pred: np.ndarray, truth: np.ndarray, c: int) -> float:
    """Dice of class ``c`` (0 when neither map has it)."""
    return volume_dice(pred, truth, c + 1)["dice"][c] or 0.0


def review_slices(truth: np.ndarray, n: int, axis: int = 2) -> list[int]:
    """``n`` slices along ``axis`` spread evenly over the labelled extent."""
    other = tuple(a for a in range(3) if a != axis)
    idx = np.flatnonzero(truth.any(axis=other))
    lo, hi = idx[0], idx[-1]
    return [int(v) for v in np.linspace(lo + 0.12 * (hi - lo), hi - 0.12 * (hi - lo), n).round()]


def segment(model, image, affine) -> np.ndarray:
    return np.asarray(Predictor(load_model(model)).segment(image, affine=affine).labels)


def untouched(shape, slices, axis=2) -> np.ndarray:
    keep = np.ones(shape[axis], bool)
    keep[slices] = False
    index = [slice(None)] * 3
    index[axis] = keep
    return tuple(index)


def run_finetune(base, image, labels, affine, out, changed=None, **settings) -> tuple[Path, float]:
    """Fine-tune as the widget does: ``changed`` is what the user edited (the widget keeps
    the layer as Segment wrote it); None makes the fine-tune predict the volume again."""
    t0 = time.perf_counter()
    path = drain(iter_finetune(base, image, labels, changed, FinetuneConfig(**settings), out, affine=affine))  # fmt: skip
    return path, time.perf_counter() - t0


def steps(model) -> dict:
    """Optimiser steps and training seconds of a fine-tuned model, from its card."""
    training = load_model(model).card.training
    return {"steps": training.get("iterations_done"), "train_seconds": training.get("seconds")}


def outside_ml(pred, truth, region) -> float:
    return float(((pred[region] > 0) & (truth[region] == 0)).sum()) / 1000


def scenario_corrections(base, image, truth, affine, base_pred, work, **settings) -> dict:
    slices = review_slices((truth > 0) | (base_pred > 0), 6)  # over the extent of the errors
    labels = base_pred.copy()
    labels[:, :, slices] = truth[:, :, slices]
    new, seconds = run_finetune(base, image, labels, affine, work / "corr", labels != base_pred, **settings)  # fmt: skip
    pred = segment(new, image, affine)
    region = untouched(truth.shape, slices)
    before, after = outside_ml(base_pred, truth, region), outside_ml(pred, truth, region)
    return {
        "slices": slices, "seconds": round(seconds, 1), **steps(new),
        "outside_ml_before": round(before, 1), "outside_ml_after": round(after, 1),
        "error_drop_pct": round(100 * (1 - after / max(before, 1e-9)), 1),
        "brain_lost_ml_after": round(float(((pred[region] == 0) & (truth[region] > 0)).sum()) / 1000, 1),
        "gm_wm_before": [round(dice(base_pred[region], truth[region], c), 4) for c in (1, 2)],
        "gm_wm_after": [round(dice(pred[region], truth[region], c), 4) for c in (1, 2)],
    }  # fmt: skip


def scenario_new_class(base, image, truth, codes, affine, base_pred, work, **settings) -> dict:
    extracerebral = (codes != H.AIR) & (codes != H.BRAIN)
    slices = review_slices(extracerebral, 6)  # over the extent of the new structure
    target = np.where(extracerebral, 3, truth).astype(np.uint8)
    labels = base_pred.copy()
    labels[:, :, slices] = target[:, :, slices]
    new, seconds = run_finetune(base, image, labels, affine, work / "newclass", labels != base_pred, extend_classes=True, new_class_names=["extracerebral"], **settings)  # fmt: skip
    pred = segment(new, image, affine)
    region = untouched(truth.shape, slices)
    return {
        "slices": slices, "seconds": round(seconds, 1), **steps(new),
        "new_class_dice": round(dice(pred[region], target[region], 3), 4),
        "outside_ml_before": round(outside_ml(base_pred, truth, region), 1),
        "brain_tissue_outside_ml_after": round(float(((pred[region] == 1) | (pred[region] == 2))[truth[region] == 0].sum()) / 1000, 1),
        "brain_as_new_class_ml_after": round(float((pred[region] == 3)[codes[region] == H.BRAIN].sum()) / 1000, 1),
        "gm_wm_after": [round(dice(pred[region], truth[region], c), 4) for c in (1, 2)],
        **{f"{k}_before": v for k, v in tissue_split(base_pred, truth, codes, region).items()},
        **{f"{k}_after": v for k, v in tissue_split(pred, truth, codes, region).items()},
        "class_names": load_model(new).card.class_names,
    }  # fmt: skip


def tissue_split(pred, truth, codes, region) -> dict:
    """Grey or white matter outside the brain (the head's brain mask) and on CSF inside it, ml
    (``brain_tissue_outside_ml`` counts both: every truth-background voxel)."""
    tissue, brain = (pred[region] == 1) | (pred[region] == 2), codes[region] == H.BRAIN
    return {
        "outside_brain_ml": round(float((tissue & ~brain).sum()) / 1000, 1),
        "csf_as_tissue_ml": round(float((tissue & brain & (truth[region] == 0)).sum()) / 1000, 1),
    }


def scribbles_for(truth: np.ndarray, rng: np.random.Generator, share: float = 0.015, margin: int = 1):  # fmt: skip
    """Strokes inside each class (background with value 255): short thick lines on
    axial slices, about ``share`` of the voxels in all, at least ``margin`` voxels inside
    their class (1: a careful user paints up to the edge of the cortical ribbon)."""
    from scipy import ndimage

    scribbles = np.zeros(truth.shape, np.uint8)
    budget = int(share * truth.size)
    values = {0: 255, 1: 1, 2: 2}
    inner = {c: ndimage.binary_erosion(truth == c, iterations=margin) if margin else truth == c for c in values}  # fmt: skip
    per_class = budget // len(values)
    for c, value in values.items():
        points = np.argwhere(inner[c])
        painted = 0
        while painted < per_class and points.size:
            x, y, z = points[rng.integers(len(points))]
            direction = rng.normal(size=2)
            direction /= np.linalg.norm(direction)
            for t in range(-12, 13):
                px, py = int(round(x + t * direction[0])), int(round(y + t * direction[1]))
                block = (slice(px - 1, px + 2), slice(py - 1, py + 2), slice(z, z + 1))
                if 0 < px < truth.shape[0] - 1 and 0 < py < truth.shape[1] - 1:
                    inside = inner[c][block] & (scribbles[block] == 0)
                    scribbles[block][inside] = value
                    painted += int(inside.sum())
    return scribbles


def scenario_scribbles(base, work, **settings) -> dict:
    image, truth, affine = held_out_scan("t2", SEED + 1)
    base_pred = segment(base, image, affine)
    scribbles = scribbles_for(truth, np.random.default_rng(0))
    new, seconds = run_finetune(
        base, image, scribbles, affine, work / "scribbles", sparse=True, **settings
    )
    pred = segment(new, image, affine)
    return {
        "base": base, "seconds": round(seconds, 1), **steps(new),
        "painted_pct": round(100 * float((scribbles > 0).mean()), 2),
        "gm_wm_before": [round(dice(base_pred, truth, c), 4) for c in (1, 2)],
        "gm_wm_after": [round(dice(pred, truth, c), 4) for c in (1, 2)],
    }  # fmt: skip


def scenario_rounds(
    base, image, truth, affine, base_pred, work, suggested=True, **settings
) -> dict:
    """Round 1 on 3 spread slices; round 2 on 3 more: the top of the ranking the Fine-tune
    widget lists after round 1 (``suggested``) or the 3 slices between round 1's."""
    slices = review_slices((truth > 0) | (base_pred > 0), 6)
    first = slices[::2]
    labels = base_pred.copy()
    labels[:, :, first] = truth[:, :, first]
    reviewed: list[np.ndarray] = []
    t0 = time.perf_counter()
    model1 = drain(iter_finetune(base, image, labels, labels != base_pred, FinetuneConfig(**settings), work / "round1", affine=affine, on_reviewed=reviewed.append))  # fmt: skip
    t1 = time.perf_counter() - t0
    result1 = Predictor(load_model(model1), slice_scores=True).segment(image, affine=affine)
    pred1 = np.asarray(result1.labels)
    if suggested:  # what the widget lists along the painted axis, at its spacing
        scores = result1.slice_scores[2]
        ranked = rank_slices(scores, exclude=first, top=3, spacing=suggestion_spacing(len(scores)))  # fmt: skip
        second = sorted(i for i, _ in ranked)
    else:
        second = slices[1::2]
    labels2 = pred1.copy()
    known = reviewed[0] != 0  # the review map of round 1; its corrections stay corrections
    labels2[known] = labels[known]  # what was reviewed stays as the user left it
    changed = labels2 != pred1
    labels2[:, :, second] = truth[:, :, second]
    changed |= labels2 != pred1
    t0 = time.perf_counter()
    model2 = drain(iter_finetune(model1, image, labels2, changed, FinetuneConfig(**settings), work / "round2", affine=affine, reviewed=reviewed[0]))  # fmt: skip
    t2 = time.perf_counter() - t0
    pred2 = segment(model2, image, affine)
    region = untouched(truth.shape, first + second)
    return {
        "round1_slices": first, "round2_slices": second, "round2_from": "suggestions" if suggested else "fixed",
        "seconds": [round(t1, 1), round(t2, 1)],
        "outside_ml": [round(outside_ml(p, truth, region), 1) for p in (base_pred, pred1, pred2)],
        "gm_wm": [[round(dice(p[region], truth[region], c), 4) for c in (1, 2)] for p in (base_pred, pred1, pred2)],
    }  # fmt: skip


def measure(name: str, r: dict) -> tuple[str, str]:
    """The scenario's measure and its target, as text."""
    if name == "corrections":
        lost = f"; brain lost {r['brain_lost_ml_after']} ml" if "brain_lost_ml_after" in r else ""
        error = (
            f"{r['outside_ml_before']} -> {r['outside_ml_after']} ml (-{r['error_drop_pct']} %)"
        )
        return f"error {error}{lost}", "-90 %"
    if name == "new class":
        split = f"; tissue outside the brain {r['outside_brain_ml_after']} ml" if "outside_brain_ml_after" in r else ""  # fmt: skip
        if "brain_as_new_class_ml_after" in r:
            split += f"; brain labelled the new class {r['brain_as_new_class_ml_after']} ml"
        return f"Dice {r['new_class_dice']}{split}", ">= 0.85"
    if name == "scribbles":
        return (
            f"GM/WM {r['gm_wm_before']} -> {r['gm_wm_after']} ({r['painted_pct']} % painted)",
            ">= 0.85",
        )
    return f"error {' -> '.join(map(str, r['outside_ml']))} ml", "round 2 <= round 1"


def parse_settings(pairs: list[str]) -> dict:
    """``["patch_size=48,48,48", "iterations=150"]`` -> FinetuneConfig keyword arguments."""
    defaults = FinetuneConfig().__dict__
    settings = {}
    for pair in pairs:
        field, _, text = pair.partition("=")
        if field not in defaults:
            raise SystemExit(f"--set: FinetuneConfig has no field {field!r}")
        try:
            settings[field] = json.loads(f"[{text}]" if "," in text else text)
        except json.JSONDecodeError:
            settings[field] = text  # a word, e.g. freeze=stage:1
    return settings


def print_table(results: dict) -> None:
    print(
        f"{'scenario':<12} {'measure (untouched slices)':<58} {'target':<20} {'steps':>5} {'s':>7}"
    )
    for name, r in results.items():
        text, target = measure(name, r)
        seconds = (
            r["seconds"] if isinstance(r["seconds"], float) else "+".join(map(str, r["seconds"]))
        )
        print(f"{name:<12} {text:<58} {target:<20} {str(r.get('steps', '')):>5} {seconds:>7}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    parser.add_argument("--base", default=BASE, help="base model of the head scenarios (default: the fixed first model, whose error is the test; the bundled default is what a user starts from)")  # fmt: skip
    parser.add_argument("--scribble-base", default="brain-tissue-unet3d", help="base model of the scribble scenario")  # fmt: skip
    parser.add_argument("--only", nargs="+", default=["corrections", "new class", "scribbles", "two rounds"])  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune.json"))
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", help="change a default of FinetuneConfig, e.g. patch_size=48,48,48 iterations=150")  # fmt: skip
    args = parser.parse_args(argv)
    settings = parse_settings(args.set)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    image, truth, affine, codes = held_out_scan("t1", SEED, with_codes=True)
    base_pred = segment(args.base, image, affine)
    results = {}
    runs = {
        "corrections": lambda: scenario_corrections(
            args.base, image, truth, affine, base_pred, work, **settings
        ),  # fmt: skip
        "new class": lambda: scenario_new_class(
            args.base, image, truth, codes, affine, base_pred, work, **settings
        ),  # fmt: skip
        "scribbles": lambda: scenario_scribbles(args.scribble_base, work, **settings),
        "two rounds": lambda: scenario_rounds(
            args.base, image, truth, affine, base_pred, work, **settings
        ),
        "two rounds fixed": lambda: scenario_rounds(
            args.base, image, truth, affine, base_pred, work, suggested=False, **settings
        ),
    }
    for name in args.only:
        print(f"{name} ...", flush=True)
        results[name] = runs[name]()
        print(f"  {results[name]}", flush=True)
    print_table(results)
    bases = {args.base, args.scribble_base}
    report = {"base": args.base, "scribble_base": args.scribble_base, "sha256": {m: model_sha256(m) for m in bases}, "seed": SEED, "settings": FinetuneConfig(**settings).__dict__, "changed_defaults": settings, "results": results, "machine": machine_info()}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
