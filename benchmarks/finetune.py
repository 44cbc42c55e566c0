"""Fine-tuning on a few corrected slices: Dice on the untouched slices against seconds.

Scenario (the issue's acceptance test, larger than the unit test): a small 3D
UNet is trained on phantoms whose class 3 is labelled background, so on a new
phantom it misses class 3 completely. The "user" corrects three slices (axis 0)
that contain class 3; fine-tuning runs for a time budget, and the Dice of every
class is measured on the slices the user did not touch.

Run: ``python benchmarks/finetune.py [--threads 1] [--budgets 5 10 20 40 60]``;
prints a table and writes ``benchmarks/results/finetune.json``.

Note on threads: on a 2-core machine shared with other jobs, two OpenMP threads
made a training step 3x (OMP_WAIT_POLICY=PASSIVE) to 50x (default) slower than
one thread, so the default here is one thread; use ``--threads 2`` on an idle machine.
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
from machine import machine_info  # benchmarks/machine.py

from napari_selfreg.data import make_phantom, make_phantom_set
from napari_selfreg.modelfile import load_model
from napari_selfreg.predict import Predictor
from napari_selfreg.training import FinetuneConfig, TrainConfig, case_from_arrays, train
from napari_selfreg.training.finetune import finetune

SHAPE = (48, 48, 48)


def dice(pred: np.ndarray, truth: np.ndarray, c: int) -> float:
    p, t = pred == c, truth == c
    return float(2 * (p & t).sum() / max(p.sum() + t.sum(), 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the note)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[5, 10, 20, 40, 60])
    parser.add_argument("--base-iterations", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))

    cases = []
    for i, (image, labels) in enumerate(make_phantom_set(4, SHAPE, 4, seed=1)):
        labels = labels.copy()
        labels[labels == 3] = 0  # the base model never learns class 3
        cases.append(case_from_arrays(image, labels, name=f"p{i}"))
    base_cfg = TrainConfig(
        arch="unet3d", arch_options={"channels": [8, 16, 32]}, num_classes=4,
        patch_size=(32, 32, 32), batch_size=2, iterations=args.base_iterations, lr=3e-3,
        val_fraction=0, val_every=10**6, seed=0, num_threads=args.threads,
    )  # fmt: skip
    t0 = time.perf_counter()
    base = train(base_cfg, cases, work / "base")
    base_seconds = time.perf_counter() - t0

    image, truth = make_phantom(SHAPE, 4, seed=100)
    predictor = Predictor(load_model(base), device="cpu")
    pred = np.asarray(predictor.segment(image).labels)
    slices = [z for z in range(SHAPE[0]) if (truth[z] == 3).any()]
    touched = slices[len(slices) // 4 :: max(1, len(slices) // 4)][:3]
    corrected = pred.copy()
    corrected[touched] = truth[touched]
    changed = corrected != pred
    keep = np.ones(SHAPE[0], bool)
    keep[touched] = False

    def scores(labels: np.ndarray) -> dict[str, float]:
        return {f"class {c}": round(dice(labels[keep], truth[keep], c), 4) for c in (1, 2, 3)}

    rows = [{"budget_s": 0, "seconds": 0.0, "iterations": 0, "dice_untouched": scores(pred)}]
    runs = [(b, FinetuneConfig(iterations=10**5, seconds_budget=b, num_threads=args.threads)) for b in args.budgets]  # fmt: skip
    runs.append(("default", FinetuneConfig(num_threads=args.threads)))
    for budget, config in runs:
        events = []
        t0 = time.perf_counter()
        new = finetune(
            base, image, corrected, changed, config, work / "ft", callback=events.append
        )
        seconds = time.perf_counter() - t0
        labels = np.asarray(Predictor(load_model(new), device="cpu").segment(image).labels)
        done = events[-1]
        rows.append({"budget_s": budget, "seconds": round(seconds, 1),
                     "train_seconds": round(done.seconds, 1), "iterations": done.iteration,
                     "dice_untouched": scores(labels)})  # fmt: skip

    print(f"base model: {args.base_iterations} iterations in {base_seconds:.0f} s; "
          f"corrected slices {touched} ({int(changed.sum())} voxels changed); threads {args.threads}")  # fmt: skip
    print(f"{'budget':>8} {'wall s':>7} {'iters':>6}  Dice on untouched slices (class 1 / 2 / 3)")
    for r in rows:
        d = r["dice_untouched"]
        print(f"{r['budget_s']!s:>8} {r['seconds']:>7} {r['iterations']:>6}  "
              f"{d['class 1']:.3f} / {d['class 2']:.3f} / {d['class 3']:.3f}")  # fmt: skip
    rise = rows[-1]["dice_untouched"]["class 3"] - rows[0]["dice_untouched"]["class 3"]
    print(f"default settings: class 3 Dice rises by {rise:+.3f} on untouched slices (target >= 0.05)")  # fmt: skip
    report = {
        "benchmark": "finetune",
        "machine": machine_info(args.threads),
        "shape": list(SHAPE),
        "base_iterations": args.base_iterations,
        "base_seconds": round(base_seconds, 1),
        "touched_slices": touched,
        "changed_voxels": int(changed.sum()),
        "rows": rows,
        "default_rise_class3": round(rise, 4),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
