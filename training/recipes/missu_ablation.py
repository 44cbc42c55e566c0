"""MISSU ablation: which part of MISSU's self-distillation moves Dice?

Declared before running (the endpoint): for every arm, the mean paired difference of
the mean foreground Dice (grey and white matter) against ``plain`` over the same seeds,
with its 95 % confidence interval (t distribution).

Arms (a small ``missu3d``, same data, seeds, patches and iterations; the last model is
tested, no model selection):

* ``plain``: no training-only term (KL weights 0, no LMSF);
* ``distillation``: the skips teach the decoder levels (channel-softmax KL, weights 1);
* ``distillation_lmsf``: the same with LMSF teachers and their auxiliary segmentation
  heads (our reconstruction: LMSF is not in the authors' repository);
* ``aux_heads``: LMSF and its auxiliary heads without the KL: what the auxiliary
  segmentation loss alone does (deep supervision of the encoder), the confound of the
  ``distillation_lmsf`` arm.

Data: the synthetic cohort of ``reproduce_selfreg_v2.py`` (one anatomy, the MNI152
template in procedural heads, T1-like, 2 mm; test subjects from other heads and seeds).

Run (resumable: finished runs are kept in the JSON, a rerun skips them)::

    python training/recipes/missu_ablation.py --minutes 40 [--seeds 5]

It writes ``training/results/missu_ablation.json`` (settings -> arms -> seeds, dice) and
``training/results/missu_ablation.md`` (the table).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from reproduce_selfreg_v2 import ROOT, cohort, foreground_dice, load_results, paired

from napari_selfreg.files import write_json_atomic
from napari_selfreg.inference import Predictor
from napari_selfreg.modelfile import load_model
from napari_selfreg.training import TrainConfig, case_from_arrays, train

RESULTS = ROOT / "training" / "results" / "missu_ablation.json"
SMALL = {  # a small MISSU: 4 levels, a 2-layer Transformer on a 6^3 token grid
    "channels": [8, 16, 32, 64], "blocks": [1, 1, 1, 1], "embed_dim": 64,
    "num_layers": 2, "num_heads": 4, "mlp_dim": 128,
}  # fmt: skip
ARMS = {
    "plain": {"kd_weights": [0.0, 0.0, 0.0]},
    "distillation": {},
    "distillation_lmsf": {"training_modules": True},
    "aux_heads": {"training_modules": True, "kd_weights": [0.0, 0.0, 0.0]},
}


def config(arm: str, seed: int, iterations: int, patch: int) -> TrainConfig:
    return TrainConfig(
        arch="missu3d", arch_options={**SMALL, "img_size": [patch] * 3, **ARMS[arm]},
        num_classes=3, class_names=["background", "grey matter", "white matter"],
        patch_size=(patch,) * 3, batch_size=2, iterations=iterations, lr=1e-3,
        lambda_scr=0.0, lambda_ifd=0.0, val_fraction=0.0, val_every=iterations,
        patience=0, seed=seed, num_threads=1,
    )  # fmt: skip


def report(data: dict) -> str:
    setting = data["settings"]["synth3d"]
    lines = ["| arm | seeds | mean fg Dice | difference vs plain (points, 95 % CI) |", "|---|---|---|---|"]  # fmt: skip
    for arm, r in setting["arms"].items():
        diff = paired(setting, arm) if arm != "plain" else None
        text = f"{diff[0]:+.2f} +- {diff[1]:.2f} (n={diff[2]})" if diff else ""
        lines.append(f"| {arm} | {len(r['seeds'])} | {100 * sum(r['dice']) / len(r['dice']):.2f} | {text} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--patch", type=int, default=48, help="training patch and inference tile (cube, 2 mm voxels)")  # fmt: skip
    parser.add_argument("--minutes", type=float, default=40.0, help="stop starting runs after this")  # fmt: skip
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--subjects", type=int, nargs=2, default=(12, 6), metavar=("TRAIN", "TEST"))  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = load_results(args.out, __doc__)
    setting = data["settings"].setdefault("synth3d", {"arms": {}, "iterations": args.iterations, "patch": args.patch, "model": SMALL, "note": "one anatomy (MNI152), synthetic T1-like subjects at 2 mm; test subjects: other heads and seeds"})  # fmt: skip
    train_pairs, tests = cohort(*args.subjects)
    cases = [case_from_arrays(img, lab, name=f"s{i}") for i, (img, lab) in enumerate(train_pairs)]
    for seed in range(args.seeds):  # seed-major: every arm gets the same seeds first
        for arm in args.arms:
            r = setting["arms"].setdefault(arm, {"seeds": [], "dice": []})
            if seed in r["seeds"] or (time.perf_counter() - start) / 60 > args.minutes:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                model = train(config(arm, seed, args.iterations, args.patch), cases, Path(tmp) / "m")  # fmt: skip
                dice = foreground_dice(Predictor(load_model(model)), tests)
            r["seeds"].append(seed)
            r["dice"].append(round(dice, 5))
            write_json_atomic(args.out, data)  # a kill mid-write keeps the runs done
            print(f"{arm} seed {seed}: Dice {dice:.4f} ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)  # fmt: skip
    table = report(data)
    args.out.with_suffix(".md").write_text("# MISSU ablation\n\n" + data["endpoint"] + "\n\n" + table + "\n")  # fmt: skip
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
