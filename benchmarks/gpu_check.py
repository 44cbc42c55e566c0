"""The predictor on a GPU: the sample segmented by the default model on ``--device``
(CUDA in the default model's GPU run), against the same run on the CPU; medians of
``--runs``, GM/WM Dice against the sample's labels, label agreement between devices.

    python benchmarks/gpu_check.py --device cuda --json gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine_info  # benchmarks/machine.py

from napari_selfreg import data
from napari_selfreg.inference import Predictor
from napari_selfreg.training.metrics import volume_dice


def timed_segment(predictor: Predictor, image, affine, runs: int):
    seconds, result = [], None
    for _ in range(runs):
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = predictor.segment(image, affine=affine)
        seconds.append(time.perf_counter() - start)
    return result, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    image, labels, affine = data.load_mni152()
    report = {"machine": machine_info(), "rows": []}
    results = {}
    for device in (args.device, "cpu"):
        predictor = Predictor(args.model, device=device)
        result, seconds = timed_segment(predictor, image, affine, args.runs + 1)  # 1 warm-up
        dice = volume_dice(np.asarray(result.labels), labels, 3)["dice"]
        results[device] = np.asarray(result.labels)
        row = {
            "device": device,
            "precision": str(result.info.get("precision")),
            "median_s": round(statistics.median(seconds[1:]), 3),
            "first_s": round(seconds[0], 3),
            "gm_dice": round(float(dice[1]), 4),
            "wm_dice": round(float(dice[2]), 4),
        }
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    a, b = results[args.device], results["cpu"]
    fg = (a > 0) | (b > 0)
    report["agreement"] = round(float((a[fg] == b[fg]).mean()), 5)
    report["speedup"] = round(report["rows"][1]["median_s"] / report["rows"][0]["median_s"], 2)
    print(json.dumps({k: report[k] for k in ("agreement", "speedup")}))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
