"""SelfReg's training cost: seconds per step with SCR + IFD against plain training.

The same ``Trainer.train_step`` (sampling, augmentation, forward under autocast,
loss, backward, clipping, AdamW) with lambda_scr = lambda_ifd = 0.015 and with
both at 0, interleaved step by step in one process so that machine load hits
both alike; the ratio is the median of the per-pair ratios. Settings: the three
of the reproduction recipe (small UNets, 32^3 / 64^2 patches) and the registry's
default UNets at the patch sizes they train with.

Usage::

    .venv/bin/python benchmarks/selfreg_overhead.py [--steps 30] [--threads 2]

Writes ``benchmarks/results/selfreg_overhead.json``. Target (issue 4): <= 1.10x.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch
from machine import machine_info  # benchmarks/machine.py

from napari_selfreg import data
from napari_selfreg.training import case_from_arrays

RESULTS = Path(__file__).parent / "results" / "selfreg_overhead.json"
RECIPE = Path(__file__).parents[1] / "training" / "recipes" / "reproduce_selfreg.py"
TARGET = 1.10


def _recipe():
    spec = importlib.util.spec_from_file_location("reproduce_selfreg", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each kind")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = _recipe()
    image, labels, _ = data.load_mni152(2)
    mni = [case_from_arrays(image, labels, name="mni152")]
    rows = []
    for name, setting in recipe.SETTINGS.items():
        cases = setting["data"]()[0]
        rows.append((f"recipe {name}: {setting['arch']} 8-64, {setting['patch']}", setting,
                     cases, False))  # fmt: skip
    for arch, patch, batch in (("unet3d", (64, 64, 64), 2), ("unet2d", (128, 128), 4)):
        setting = {"arch": arch, "patch": patch, "batch": batch, "classes": ["bg", "gm", "wm"]}
        rows.append((f"default {arch}, {patch} x {batch}", setting, mni, True))
    report = {
        "machine": machine_info(args.threads),
        "steps": args.steps,
        "target_ratio": TARGET,
        "rows": [],
    }
    print(f"{'setting':<46} {'plain s':>8} {'SelfReg s':>9} {'ratio':>6}  target")
    for name, setting, cases, default in rows:
        r = recipe.step_ratio(setting, cases, args.threads, steps=args.steps, default_channels=default)  # fmt: skip
        ok = r["ratio"] <= TARGET
        report["rows"].append({"setting": name, **r, "meets_target": ok})
        print(f"{name:<46} {r['plain_s']:>8.3f} {r['selfreg_s']:>9.3f} {r['ratio']:>6.3f}  "
              f"{'PASS' if ok else 'FAIL'}", flush=True)  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
