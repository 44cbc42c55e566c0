"""Reproduction: plain UNet vs SelfReg-UNet, same data, same budget, 3 seeds each.

Settings (all trained with the one training loop, ``napari_selfreg.training``):

* ``mni3d``: nilearn's MNI152 2009 T1 at 2 mm with tissue labels (background,
  grey matter, white matter; ``data.load_mni152(2)``). Train on the left
  hemisphere (voxel index i < 49, x < 0 mm), test on the right one (i >= 50)
  with the predictor, as ``napari-selfreg segment`` would run it. 3D UNet.
* ``mni2d``: the same hemispheres, a 2D UNet trained and run slice by slice
  (sagittal slices, the predictor's axis 0).
* ``phantom``: 8 seeded phantoms (``data.make_phantom_set``, 48^3, 4 classes):
  train on 6, test on 2. 3D UNet.

Plain and SelfReg runs differ only in ``lambda_scr = lambda_ifd`` (0 vs 0.015):
same architecture, seed, patches, augmentation, iterations and learning rate;
no validation-based model selection (the last model is tested). Reported: Dice
per class on the test data (mean +- sd over seeds), the mean foreground Dice,
seconds per step measured in the runs, and SelfReg's step time over plain's
measured by interleaving plain and SelfReg steps of the loop's own
``Trainer.train_step`` (robust to the load of a shared machine).

Run: ``python training/recipes/reproduce_selfreg.py [--iterations N] [--seeds 0 1 2]``
(writes ``training/results/reproduction_v1.json`` and ``.md``; v2 is ``reproduce_selfreg_v2.py``). The phantom
setting trains 3x the iterations (it is harder: class intensities are
permuted per phantom, so shape and context must be learnt). One torch thread
per process: on a 2-core machine shared with other jobs, two OpenMP threads
made a step up to 50x slower.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_selfreg import data
from napari_selfreg.device import reuse_freed_memory
from napari_selfreg.files import write_json_atomic
from napari_selfreg.inference import Predictor
from napari_selfreg.modelfile import load_model
from napari_selfreg.training import TrainConfig, Trainer, case_from_arrays, train

RESULTS = Path(__file__).resolve().parents[1] / "results"
CHANNELS = [8, 16, 32, 64]


def mni_cases() -> tuple[list, list[tuple[np.ndarray, np.ndarray]]]:
    """Left hemisphere for training, right hemisphere (raw image, labels) for testing."""
    image, labels, affine = data.load_mni152(2)
    mid = int(round((np.linalg.inv(affine) @ [0, 0, 0, 1])[0]))  # x = 0 mm
    train_cases = [case_from_arrays(image[:mid], labels[:mid], name="mni152-left")]
    return train_cases, [(image[mid + 1 :], labels[mid + 1 :])]


def phantom_cases() -> tuple[list, list[tuple[np.ndarray, np.ndarray]]]:
    """Six training and two test phantoms."""
    pairs = data.make_phantom_set(8, (48, 48, 48), 4, seed=2024)
    cases = [case_from_arrays(img, lab, name=f"phantom{i}") for i, (img, lab) in enumerate(pairs[:6])]  # fmt: skip
    return cases, pairs[6:]


SETTINGS: dict[str, dict[str, Any]] = {
    "mni3d": {"data": mni_cases, "arch": "unet3d", "patch": (32, 32, 32), "batch": 2,
              "classes": ["background", "grey matter", "white matter"]},
    "mni2d": {"data": mni_cases, "arch": "unet2d", "patch": (64, 64), "batch": 8,
              "classes": ["background", "grey matter", "white matter"]},
    "phantom": {"data": phantom_cases, "arch": "unet3d", "patch": (32, 32, 32), "batch": 2,
                "classes": ["background", "class 1", "class 2", "class 3"], "budget": 3},
}  # fmt: skip


def config(setting: dict, iterations: int, seed: int, selfreg: bool, threads: int) -> TrainConfig:
    options: dict[str, Any] = {"channels": CHANNELS}
    if setting["arch"] == "unet2d":
        options.update(norm="batch", upsample="interp")  # the paper's 2D reference
    lam = 0.015 if selfreg else 0.0
    return TrainConfig(
        arch=setting["arch"], arch_options=options, class_names=setting["classes"],
        num_classes=len(setting["classes"]), patch_size=setting["patch"],
        batch_size=setting["batch"], iterations=iterations, lr=2e-3, lambda_scr=lam,
        lambda_ifd=lam, val_fraction=0.0, val_every=iterations, patience=0, seed=seed,
        num_threads=threads, slice_axis=0,
    )  # fmt: skip


def test_dice(model: Path, tests: list[tuple[np.ndarray, np.ndarray]], k: int) -> list[float]:
    """Dice per class over all test volumes (voxel counts pooled)."""
    predictor = Predictor(load_model(model), overlap=0.5, axis=0)
    inter, total = np.zeros(k), np.zeros(k)
    for image, labels in tests:
        pred = np.asarray(predictor.segment(image).labels)
        for c in range(k):
            p, t = pred == c, labels == c
            inter[c] += (p & t).sum()
            total[c] += p.sum() + t.sum()
    return [float(2 * i / t) if t else float("nan") for i, t in zip(inter, total, strict=True)]


def step_ratio(
    setting: dict, cases: list, threads: int, steps: int = 24, default_channels: bool = False
) -> dict[str, float]:
    """Median seconds of plain and SelfReg steps of ``Trainer.train_step``, interleaved."""
    cfg = config(setting, 10**6, 0, True, threads)
    if default_channels:
        cfg.arch_options = {}
    with tempfile.TemporaryDirectory() as tmp, reuse_freed_memory():  # as in Trainer.run
        trainer = Trainer(cfg, cases, Path(tmp) / "m")
        trainer.setup()
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(2 * steps + 4):
            on = bool(i % 2)
            trainer.loss.lambda_scr = trainer.loss.lambda_ifd = 0.015 if on else 0.0
            start = time.perf_counter()
            trainer.train_step(i)
            if i >= 4:  # warm-up
                times[on].append(time.perf_counter() - start)
        trainer.dist.close()
    plain, selfreg = statistics.median(times[False]), statistics.median(times[True])
    pairs = [b / a for a, b in zip(times[False], times[True], strict=True)]
    return {"plain_s": plain, "selfreg_s": selfreg, "ratio": statistics.median(pairs)}


def default_arch_ratio(threads: int, log) -> dict[str, dict[str, float]]:
    """SelfReg/plain step time of the registry's default UNets at paper-like sizes."""
    out = {}
    image, labels, _ = data.load_mni152(2)
    cases = [case_from_arrays(image, labels, name="mni152")]
    for name, arch, patch, batch in (("unet3d default (16-192), 64^3 x 2", "unet3d", (64, 64, 64), 2),
                                     ("unet2d default (64-512), 128^2 x 4", "unet2d", (128, 128), 4)):  # fmt: skip
        setting = {"arch": arch, "patch": patch, "batch": batch, "classes": ["bg", "gm", "wm"]}
        out[name] = step_ratio(setting, cases, threads, steps=8, default_channels=True)
        log(f"{name}: plain {out[name]['plain_s']:.3f} s, SelfReg {out[name]['selfreg_s']:.3f} s, "
            f"ratio {out[name]['ratio']:.3f}")  # fmt: skip
    return out


def run_setting(name: str, iterations: int, seeds: list[int], threads: int, log) -> dict:
    setting = SETTINGS[name]
    iterations = int(iterations * setting.get("budget", 1))
    cases, tests = setting["data"]()
    k = len(setting["classes"])
    runs = []
    for seed in seeds:
        for selfreg in (False, True):
            steps: list[float] = []
            last = [0.0]

            def on_event(event, steps=steps, last=last):
                if event.kind == "iteration":
                    steps.append(event.seconds - last[0])
                    last[0] = event.seconds

            tmp = Path(tempfile.mkdtemp(prefix="reproduce-"))
            try:
                start = time.perf_counter()
                model = train(config(setting, iterations, seed, selfreg, threads), cases,
                              tmp / "model", callback=on_event)  # fmt: skip
                seconds = time.perf_counter() - start
                dice = test_dice(model, tests, k)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            run = {"seed": seed, "selfreg": selfreg, "dice": dice,
                   "mean_fg_dice": float(np.nanmean(dice[1:])),
                   "s_per_step": statistics.median(steps[5:] or steps),
                   "train_s": round(seconds, 1)}  # fmt: skip
            runs.append(run)
            log(f"{name} seed {seed} {'selfreg' if selfreg else 'plain  '}: "
                f"Dice {[round(d, 4) for d in dice]} ({run['mean_fg_dice']:.4f}), "
                f"{run['s_per_step']:.3f} s/step, {seconds:.0f} s")  # fmt: skip
    ratio = step_ratio(setting, cases, threads)
    log(f"{name} interleaved step time: plain {ratio['plain_s']:.3f} s, SelfReg "
        f"{ratio['selfreg_s']:.3f} s, ratio {ratio['ratio']:.3f}")  # fmt: skip
    return {"classes": setting["classes"], "arch": setting["arch"],
            "patch": list(setting["patch"]), "batch": setting["batch"], "runs": runs,
            "summary": summarize(runs, setting["classes"]), "step_time": ratio}  # fmt: skip


def _msd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not np.isnan(v)]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return float(np.mean(values)), float(sd)


def summarize(runs: list[dict], classes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method, flag in (("plain", False), ("selfreg", True)):
        sel = [r for r in runs if r["selfreg"] == flag]
        out[method] = {
            "dice": {c: _msd([r["dice"][i] for r in sel]) for i, c in enumerate(classes)},
            "mean_fg_dice": _msd([r["mean_fg_dice"] for r in sel]),
            "s_per_step": statistics.median(r["s_per_step"] for r in sel),
        }
    gain = out["selfreg"]["mean_fg_dice"][0] - out["plain"]["mean_fg_dice"][0]
    out["selfreg_minus_plain_mean_fg_dice_points"] = round(100 * gain, 2)
    out["run_step_time_ratio"] = out["selfreg"]["s_per_step"] / out["plain"]["s_per_step"]
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(report: dict) -> str:
    lines = [
        "# SelfReg-UNet vs plain UNet: reproduction on our data",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; torch {report['torch']}; "
        f"{report['iterations']} iterations per run (phantom x3), seeds {report['seeds']}; "
        f"wall time {report['wall_minutes']} min.",
        "",
        "Dice on the test data, mean +- sd over seeds (foreground classes; background omitted).",
        "",
        "| setting | method | " + "per-class Dice | mean fg Dice | s/step (runs) |",
        "|---|---|---|---|---|",
    ]
    for name, res in report["settings"].items():
        for method in ("plain", "selfreg"):
            s = res["summary"][method]
            per = ", ".join(f"{c} {m:.4f} +- {sd:.4f}" for c, (m, sd) in list(s["dice"].items())[1:])  # fmt: skip
            m, sd = s["mean_fg_dice"]
            label = "SelfReg (0.015/0.015)" if method == "selfreg" else "plain"
            lines.append(f"| {name} | {label} | {per} | {m:.4f} +- {sd:.4f} | {s['s_per_step']:.3f} |")  # fmt: skip
    notes = []
    for name, res in report["settings"].items():
        s = res["summary"]
        gain = s["selfreg_minus_plain_mean_fg_dice_points"]
        noise = 100 * np.sqrt((s["plain"]["mean_fg_dice"][1] ** 2 + s["selfreg"]["mean_fg_dice"][1] ** 2) / 2)  # fmt: skip
        verdict = "within" if abs(gain) < noise else "outside"
        notes.append(f"- {name}: SelfReg - plain = {gain:+.2f} Dice points, {verdict} the seed-to-seed sd ({noise:.2f} points).")  # fmt: skip
    lines += ["", "Reading:", "", *notes]
    lines += ["", "| setting | SelfReg - plain (Dice points) | step time SelfReg/plain, interleaved | same, from the runs |", "|---|---|---|---|"]  # fmt: skip
    for name, res in report["settings"].items():
        s, st = res["summary"], res["step_time"]
        lines.append(f"| {name} | {s['selfreg_minus_plain_mean_fg_dice_points']:+.2f} | {st['ratio']:.3f} | {s['run_step_time_ratio']:.3f} |")  # fmt: skip
    if report.get("step_time_default_archs"):
        lines += ["", "Step time of the full-size default UNets (interleaved loop steps, median):", "",
                  "| network | plain s/step | SelfReg s/step | SelfReg/plain |", "|---|---|---|---|"]  # fmt: skip
        for name, r in report["step_time_default_archs"].items():
            lines.append(
                f"| {name} | {r['plain_s']:.3f} | {r['selfreg_s']:.3f} | {r['ratio']:.3f} |"
            )
    lines += ["", "Published claim (2D, Synapse/ACDC): +1 to +1.5 Dice points; time target <= 1.10x.", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "reproduction_v1")
    parser.add_argument("--skip-default-arch", action="store_true", help="skip the step-time ratio of the full-size default UNets")  # fmt: skip
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the .md from the .json"
    )
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(args.out.with_suffix(".json").read_text())
        args.out.with_suffix(".md").write_text(markdown(report))
        return 0
    start = time.perf_counter()
    log_lines: list[str] = []

    def log(text: str) -> None:
        log_lines.append(text)
        print(text, flush=True)

    settings = {name: run_setting(name, args.iterations, args.seeds, args.threads, log) for name in args.settings}  # fmt: skip
    default_ratio = {} if args.skip_default_arch else default_arch_ratio(args.threads, log)
    report = {
        "command": "python training/recipes/reproduce_selfreg.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),  # fmt: skip
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch threads {args.threads}",
        "torch": torch.__version__,
        "iterations": args.iterations,
        "seeds": args.seeds,
        "wall_minutes": round((time.perf_counter() - start) / 60, 1),
        "settings": settings,
        "step_time_default_archs": default_ratio,
        "log": log_lines,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out.with_suffix(".json"), report)
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
