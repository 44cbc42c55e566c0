"""Reproduction v2: does SelfReg help, and what do its losses do to the channels?

Declared before running (the endpoint): for every arm, the mean paired difference of
the mean foreground Dice (grey and white matter) against ``plain`` over the same seeds,
with its 95 % confidence interval (t distribution); and, per arm and block, the mean
off-diagonal |cos| between channels and the effective rank on fixed test regions.

Data: a synthetic cohort made from ONE anatomy, the MNI152 template (its brain in
procedural heads, random deformation, contrast, bias, noise and resolution:
``training/synthesis.py``), at 2 mm. Training subjects and test subjects come from
different seeds; the test subjects also have another head geometry (a domain shift;
all subjects are T1-like: a model trained on 12 T1 subjects scores about 0.2 on T2-like
ones, a floor that no arm could move). Setting ``synth2d``: the paper's 2D UNet depth (7 students,
widths 32-256), trained slice-wise on 64 x 64 axial patches (batch 8, 600 steps by
default: a test Dice of 0.863 at 300 steps, 0.88 at 1000, measured on one seed). Arms:

* ``plain``; ``scr`` and ``ifd`` alone at 0.015; ``both_0.005``, ``both_0.015``,
  ``both_0.05`` (SCR and IFD at that weight); ``decor``: our decorrelation term at
  0.015 instead of IFD, with SCR; ``deep_supervision``: a positive control known to
  help small-data training (auxiliary 1x1 heads on the decoder blocks).

Every arm trains with the same seeds, data, patches, augmentation and iterations; the
last model is tested (no model selection). Learning curves are saved.

Run (resumable: finished runs are kept in the JSON, a rerun skips them)::

    python training/recipes/reproduce_selfreg_v2.py --minutes 150 [--seeds 10]
    python training/recipes/reproduce_selfreg_v2.py --report-only   # table + figure so far

It writes ``training/results/reproduction.json`` (the schema of the issue:
settings -> arms -> seeds, dice, mean_abs_cos, effective_rank per block),
``training/results/reproduction.md`` (the table) and ``docs/reproduction.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from napari_selfreg import analysis, models
from napari_selfreg.files import write_json_atomic
from napari_selfreg.inference import Predictor
from napari_selfreg.modelfile import load_model
from napari_selfreg.models.unet import UNet
from napari_selfreg.training import TrainConfig, case_from_arrays, train
from napari_selfreg.training import heads as H
from napari_selfreg.training import synthesis as S

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "training" / "results" / "reproduction.json"
CHANNELS = [32, 64, 128, 256, 256]
ARMS: dict[str, dict[str, Any]] = {
    "plain": {"lambda_scr": 0.0, "lambda_ifd": 0.0},
    "scr": {"lambda_scr": 0.015, "lambda_ifd": 0.0},
    "ifd": {"lambda_scr": 0.0, "lambda_ifd": 0.015},
    "both_0.005": {"lambda_scr": 0.005, "lambda_ifd": 0.005},
    "both_0.015": {"lambda_scr": 0.015, "lambda_ifd": 0.015},
    "both_0.05": {"lambda_scr": 0.05, "lambda_ifd": 0.05},
    "decor": {"lambda_scr": 0.015, "lambda_ifd": 0.0, "lambda_decor": 0.015},
    "deep_supervision": {"lambda_scr": 0.0, "lambda_ifd": 0.0, "arch": "unet2d_ds"},
}
CLASSES = ["background", "grey matter", "white matter"]


class DeepSupervisedUNet(UNet):
    """The positive control: a UNet whose decoder blocks get 1x1 auxiliary heads while
    training (cross-entropy against the labels, weight 0.5 in all)."""

    def __init__(self, spatial_dims: int, in_channels: int = 1, num_classes: int = 2, **options):
        super().__init__(spatial_dims, in_channels, num_classes, **options)
        decoder = [f for f in self.feature_info if f.name.startswith("dec")]
        conv = nn.Conv2d if self.spatial_dims == 2 else nn.Conv3d
        self.aux = nn.ModuleDict({f.name: conv(f.channels, num_classes, 1) for f in decoder})

    def training_losses(self, features, target):
        terms = []
        for name, head in self.aux.items():
            logits = head(features[name])
            mode = "bilinear" if logits.ndim == 4 else "trilinear"
            logits = F.interpolate(logits.float(), size=target.shape[1:], mode=mode, align_corners=False)  # fmt: skip
            terms.append(F.cross_entropy(logits, target))
        return {"deep_supervision": 0.5 * torch.stack(terms).mean()}


if "unet2d_ds" not in models.available():

    @models.register_model("unet2d_ds")
    def unet2d_ds(in_channels: int = 1, num_classes: int = 2, **options) -> UNet:
        """The 2D UNet with deep supervision (its options are UNet's)."""
        defaults = {"channels": CHANNELS, "norm": "batch", "upsample": "interp"}
        return DeepSupervisedUNet(2, in_channels, num_classes, **{**defaults, **options})


def cohort(n_train: int, n_test: int, seed: int = 77):
    """Training and test subjects at 2 mm: ``[(image, labels)]`` each; cached on disk."""
    cache = Path(tempfile.gettempdir()) / f"selfreg-repro-cohort-v2-{n_train}-{n_test}-{seed}.npz"
    if cache.is_file():
        z = np.load(cache)
        return ([(z[f"ti{i}"], z[f"tl{i}"]) for i in range(n_train)],
                [(z[f"vi{i}"], z[f"vl{i}"]) for i in range(n_test)])  # fmt: skip
    from napari_selfreg.preprocess import resample

    out: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(seed)
    heads = [H.make_head(rng) for _ in range(3)]
    test_heads = [H.make_head(rng, H.TEST_HEAD) for _ in range(2)]
    gen = torch.Generator().manual_seed(seed)
    for kind, n, pool in (("t", n_train, heads), ("v", n_test, test_heads)):
        for i in range(n):
            settings = S.SynthSettings(contrast=(1, 0, 0, 0), template=0.0, skull_stripped=0.0, thick_slices=0.0, low_resolution=0.0)  # fmt: skip
            subject = S.draw_subject(rng, settings, len(pool))
            image, labels, _ = S.render_volume(subject, pool[subject.head], gen)
            out[f"{kind}i{i}"] = resample(image, (1, 1, 1), 2.0, order=1)
            out[f"{kind}l{i}"] = resample(labels, (1, 1, 1), 2.0, order=0)
    np.savez_compressed(cache, **out)
    return cohort(n_train, n_test, seed)


def config(arm: str, seed: int, iterations: int, patch: int = 64) -> TrainConfig:
    spec = dict(ARMS[arm])
    arch = spec.pop("arch", "unet2d")
    return TrainConfig(
        arch=arch, arch_options={"channels": CHANNELS, "norm": "batch", "upsample": "interp"},
        num_classes=3, class_names=CLASSES, patch_size=(patch, patch), batch_size=8,
        iterations=iterations, lr=2e-3, val_fraction=0.0, val_every=max(1, iterations // 10),
        val_patches=16, patience=0, seed=seed, num_threads=1, slice_axis=2, **spec,
    )  # fmt: skip


def evaluate(model: Path, tests) -> tuple[float, dict, dict]:
    """Mean foreground Dice over the test subjects (pooled voxels), and per block the mean
    off-diagonal |cos| and effective rank on a fixed axial slice of each subject."""
    bundle = load_model(model)
    cos: dict[str, list[float]] = {}
    rank: dict[str, list[float]] = {}
    for image, labels in tests:
        z = int(np.argmax((labels > 0).sum(axis=(0, 1))))
        fs = analysis.extract_features(bundle, image, (slice(None), slice(None), slice(z, z + 1)))
        for block, st in analysis.redundancy_stats(fs).items():
            cos.setdefault(block, []).append(st.mean_abs_cos)
            rank.setdefault(block, []).append(st.effective_rank)
    dice = foreground_dice(Predictor(bundle, axis=2, overlap=0.25), tests)
    return dice, {b: float(np.mean(v)) for b, v in cos.items()}, {b: float(np.mean(v)) for b, v in rank.items()}  # fmt: skip


def foreground_dice(predictor: Predictor, tests) -> float:
    """Mean foreground Dice (grey and white matter) over the test subjects, voxels pooled."""
    inter, total = np.zeros(3), np.zeros(3)
    for image, labels in tests:
        pred = np.asarray(predictor.segment(image).labels)
        for c in range(3):
            inter[c] += ((pred == c) & (labels == c)).sum()
            total[c] += (pred == c).sum() + (labels == c).sum()
    return float((2 * inter / np.maximum(total, 1))[1:].mean())


def paired(results: dict, arm: str) -> tuple[float, float, int] | None:
    """Mean paired difference (points of Dice) of ``arm`` against plain and the half width of
    its 95 % confidence interval; None with fewer than two shared seeds."""
    from scipy import stats

    a, p = results["arms"].get(arm), results["arms"].get("plain")
    if not a or not p:
        return None
    shared = sorted(set(a["seeds"]) & set(p["seeds"]))
    if len(shared) < 2:
        return None
    d = np.array([a["dice"][a["seeds"].index(s)] - p["dice"][p["seeds"].index(s)] for s in shared]) * 100  # fmt: skip
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return float(d.mean()), half, len(d)


def load_results(path: Path, doc: str) -> dict:
    """The results so far (a rerun resumes), or new ones with the endpoint ``doc`` declares."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    if "settings" not in data:
        endpoint = doc.split("Declared before running (the endpoint): ")[1].split("\n\n")[0]
        data = {"endpoint": endpoint, "settings": {}}
    return data


def report(data: dict) -> str:
    lines = ["| setting | arm | seeds | mean fg Dice | difference vs plain (points, 95 % CI) | mean |cos| (bottleneck) | effective rank (bottleneck) |",  # fmt: skip
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, setting in data["settings"].items():
        for arm, r in setting["arms"].items():
            diff = paired(setting, arm) if arm != "plain" else None
            text = f"{diff[0]:+.2f} +- {diff[1]:.2f} (n={diff[2]})" if diff else ""
            cos = np.mean(r["mean_abs_cos"].get("bottleneck", [np.nan]))
            rank = np.mean(r["effective_rank"].get("bottleneck", [np.nan]))
            lines.append(f"| {name} | {arm} | {len(r['seeds'])} | {100 * np.mean(r['dice']):.2f} | {text} | {cos:.2f} | {rank:.1f} |")  # fmt: skip
    return "\n".join(lines)


def figure(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setting = next(iter(data["settings"].values()))
    arms = [a for a in setting["arms"] if a != "plain"]
    colors = {arm: f"C{i}" for i, arm in enumerate(setting["arms"])}  # one colour per arm
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, arm in enumerate(arms):
        d = paired(setting, arm)
        if d:
            ax1.errorbar([i], [d[0]], yerr=[d[1]], fmt="o", capsize=4, color=colors[arm])
    ax1.axhline(0, color="grey", lw=0.8)
    ax1.set_xticks(range(len(arms)), arms, rotation=45, ha="right")
    ax1.set_ylabel("Dice difference vs plain (points, 95 % CI)")
    for arm, r in setting["arms"].items():
        blocks = list(r["mean_abs_cos"])
        ax2.plot(
            range(len(blocks)), [np.mean(r["mean_abs_cos"][b]) for b in blocks], "o-", label=arm,
            color=colors[arm],
        )  # fmt: skip
    ax2.set_xticks(range(len(blocks)), blocks, rotation=45, ha="right")
    ax2.set_ylabel("mean off-diagonal |cos|")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument(
        "--patch", type=int, default=64, help="training patch (square, 2 mm voxels)"
    )
    parser.add_argument("--minutes", type=float, default=150.0, help="stop starting runs after this")  # fmt: skip
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument(
        "--subjects", type=int, nargs=2, default=(12, 6), metavar=("TRAIN", "TEST")
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true", help="write the table and the figure of the runs so far")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = load_results(args.out, __doc__)
    if args.report_only:
        args.seeds = 0
    setting = data["settings"].setdefault("synth2d", {"arms": {}, "iterations": args.iterations, "note": "one anatomy (MNI152), synthetic subjects; test subjects: other heads and seeds, T1-like"})  # fmt: skip
    train_pairs, tests = cohort(*args.subjects)
    cases = [case_from_arrays(img, lab, name=f"s{i}") for i, (img, lab) in enumerate(train_pairs)]
    for seed in range(args.seeds):  # seed-major: every arm gets the same seeds first
        for arm in args.arms:
            r = setting["arms"].setdefault(arm, {"seeds": [], "dice": [], "mean_abs_cos": {}, "effective_rank": {}, "curves": []})  # fmt: skip
            if seed in r["seeds"]:
                continue
            if (time.perf_counter() - start) / 60 > args.minutes:
                break
            with tempfile.TemporaryDirectory() as tmp:
                curve: list[list[float]] = []
                model = train(config(arm, seed, args.iterations, args.patch), cases, Path(tmp) / "m",
                              callback=lambda e, c=curve: c.append([e.iteration, e.losses["total"]]) if e.stage == "iteration" and e.iteration % 20 == 0 else None)  # fmt: skip
                dice, cos, rank = evaluate(model, tests)
            r["seeds"].append(seed)
            r["dice"].append(round(dice, 5))
            r["curves"].append(curve)
            for block in cos:
                r["mean_abs_cos"].setdefault(block, []).append(round(cos[block], 4))
                r["effective_rank"].setdefault(block, []).append(round(rank[block], 3))
            write_json_atomic(args.out, data)  # a kill mid-write keeps the runs done
            print(f"{arm} seed {seed}: Dice {dice:.4f} ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)  # fmt: skip
    table = report(data)
    args.out.with_suffix(".md").write_text("# Reproduction v2\n\n" + data["endpoint"] + "\n\n" + table + "\n")  # fmt: skip
    figure(data, ROOT / "docs" / "reproduction.png" if args.out == RESULTS else args.out.with_suffix(".png"))  # fmt: skip
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
