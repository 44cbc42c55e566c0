"""The papers' architectures side by side: size, FLOPs and CPU time per tile, short training.

Rows: ``unet3d``, ``missu3d`` (128^3 tile) and ``swin_unet2d`` (224^2 tile) at their
default options: parameters, GFLOPs per tile (convolutions, matrix products and
attention, ``torch.utils.flop_counter.FlopCounterMode``; 1 MAC = 2 FLOPs), median CPU time
per tile in fp32 and in bf16 autocast + channels-last, and the bf16 speed-up.

Then a same-budget comparison on the seeded phantom set: 3D UNet (plain),
SelfReg-UNet (SCR + IFD at 0.015) and MISSU (KL self-distillation + LMSF),
each trained by ``napari_selfreg.training`` for the same number of optimiser
steps on the same patches (``--iterations``; ``--budget`` adds a wall-clock cap,
but on a shared machine a time budget measures the neighbours' load) and scored
by whole-volume Dice on held-out phantoms; seconds per step are reported.

Usage::

    .venv/bin/python benchmarks/architectures.py [--repeats 3] [--iterations 100] [--skip-train]

Writes ``benchmarks/results/architectures.json`` and prints the tables. Times are
medians of one run on this machine; compare ratios, not absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import machine_info  # benchmarks/machine.py
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from napari_selfreg import models

RESULTS = Path(__file__).parent / "results" / "architectures.json"
ROWS = [
    ("unet3d", (128, 128, 128)),
    ("missu3d", (128, 128, 128)),
    ("swin_unet2d", (224, 224)),
]


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def count_gflops(net: torch.nn.Module, x: torch.Tensor) -> float:
    """GFLOPs of one forward pass.

    The fused Transformer fast path is switched off and the CPU attention kernel
    is given its formula, so that attention is counted too.
    """
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=sdpa) as counter:
            net(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return counter.get_total_flops() / 1e9


def time_tile(net: torch.nn.Module, x: torch.Tensor, bf16: bool, repeats: int) -> float:
    """Median seconds of ``repeats`` forward passes after one warm-up."""
    if bf16:
        layout = torch.channels_last_3d if x.ndim == 5 else torch.channels_last
        net = net.to(memory_format=layout)
        x = x.contiguous(memory_format=layout)
    times = []
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        for i in range(repeats + 1):
            start = time.perf_counter()
            net(x)
            if i:
                times.append(time.perf_counter() - start)
    net.to(memory_format=torch.contiguous_format)
    return statistics.median(times)


def architecture_rows(repeats: int) -> list[dict]:
    rows = []
    for name, tile in ROWS:
        torch.manual_seed(0)
        net = models.build(name, in_channels=1, num_classes=4).eval()
        x = torch.randn(1, 1, *tile)
        row = {
            "model": name,
            "tile": list(tile),
            "params_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
            "gflops_per_tile": round(count_gflops(net, x), 1),
        }
        row["cpu_s_fp32"] = round(time_tile(net, x, False, repeats), 3)
        row["cpu_s_bf16"] = round(time_tile(net, x, True, repeats), 3)
        row["bf16_speedup"] = round(row["cpu_s_fp32"] / row["cpu_s_bf16"], 2)
        rows.append(row)
        print(row, flush=True)
    ref = next(r for r in rows if r["model"] == "unet3d")
    for row in rows:
        if len(row["tile"]) == 3:
            row["fp32_time_vs_unet3d"] = round(row["cpu_s_fp32"] / ref["cpu_s_fp32"], 2)
            row["bf16_time_vs_unet3d"] = round(row["cpu_s_bf16"] / ref["cpu_s_bf16"], 2)
    return rows


def comparison_rows(setup: dict) -> list[dict]:
    """Train each variant with the same settings on the same phantoms; whole-volume Dice."""
    from napari_selfreg.data import make_phantom_set
    from napari_selfreg.training.datasets import case_from_arrays

    shape = (setup["shape"],) * 3
    phantoms = make_phantom_set(setup["cases"], shape, 4, seed=0)
    cases = [
        case_from_arrays(image, labels, name=f"phantom{i}")
        for i, (image, labels) in enumerate(phantoms)
    ]
    patch = setup["patch"]
    variants = {
        "unet3d": ("unet3d", {}, 0.0),
        "selfreg-unet3d": ("unet3d", {}, 0.015),
        "missu3d": ("missu3d", {"img_size": [patch] * 3, "training_modules": True}, 0.0),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (arch, options, lam) in variants.items():
            row = train_variant(cases, Path(tmp) / label, arch, options, lam, setup)
            rows.append({"variant": label, **row})
            print(rows[-1], flush=True)
    return rows


def train_variant(cases, out: Path, arch: str, options: dict, lam: float, setup: dict) -> dict:
    """One training run through ``napari_selfreg.training``; the numbers of its card."""
    from napari_selfreg.modelfile import ModelCard, read_card
    from napari_selfreg.training.config import TrainConfig
    from napari_selfreg.training.loop import train

    iterations = setup["iterations"]
    config = TrainConfig(
        arch=arch, arch_options=options, num_classes=4, patch_size=(setup["patch"],) * 3,
        batch_size=2, iterations=iterations, max_seconds=setup["budget"], lr=1e-3,
        precision=setup["precision"], lambda_scr=lam, lambda_ifd=lam, val_fraction=0.34,
        val_every=max(iterations // 4, 1), val_patches=4, patience=0, seed=0,
    )  # fmt: skip
    extra = {}
    if arch == "missu3d":
        # The card must describe the deployed network (no LMSF), but the loop writes
        # arch_options verbatim: hand it the training network and the deployed card.
        torch.manual_seed(config.seed)
        net = models.build(arch, 1, 4, **options)
        card_options = {"in_channels": 1, "num_classes": 4, **net.deployed_options}
        names = ["background", "class 1", "class 2", "class 3"]
        extra = {"network": net, "base_card": ModelCard(out.name, arch, card_options, names)}
    losses = []
    start = time.perf_counter()
    path = train(
        config, cases, out, callback=lambda e: e.kind == "iteration" and losses.append(e.losses),
        **extra,
    )  # fmt: skip
    card = read_card(path)
    done = card.training["iterations_done"]
    net = models.build(arch, **card.options)
    return {
        "arch": arch,
        "params_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
        "iterations": done,
        "train_seconds": card.training["seconds"],
        "seconds_per_step": round(card.training["seconds"] / max(done, 1), 3),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "last_losses": {k: round(v, 4) for k, v in losses[-1].items()} if losses else {},
        "val_mean_dice": card.metrics.get("mean_dice"),
        "val_dice": card.metrics.get("dice"),
    }


def print_tables(result: dict) -> None:
    print(
        "\nmodel         tile          params(M)  GFLOPs  fp32 s  bf16 s  bf16 x  vs unet3d (fp32/bf16)"
    )
    for r in result["architectures"]:
        vs = ""
        if "fp32_time_vs_unet3d" in r:
            vs = f"{r['fp32_time_vs_unet3d']:.2f} / {r['bf16_time_vs_unet3d']:.2f}"
        tile = "x".join(map(str, r["tile"]))
        print(
            f"{r['model']:<13} {tile:<13} {r['params_M']:>9.2f} {r['gflops_per_tile']:>7.1f} "
            f"{r['cpu_s_fp32']:>7.3f} {r['cpu_s_bf16']:>7.3f} {r['bf16_speedup']:>6.2f}  {vs}"
        )
    comp = result.get("comparison")
    if isinstance(comp, list):
        print(f"\nsame budget ({result['comparison_setup']})")
        print("variant          steps  s/step  mean Dice (whole val volumes)  per class")
        for r in comp:
            dice = r["val_mean_dice"]
            dice = f"{dice:.4f}" if dice is not None else "n/a"
            per = " ".join(f"{v:.3f}" if v is not None else "n/a" for v in r["val_dice"].values())
            print(
                f"{r['variant']:<16} {r['iterations']:>5} {r['seconds_per_step']:>7.2f}  "
                f"{dice:>8}                       {per}"
            )
    else:
        print(f"\ncomparison: {comp}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per tile")
    parser.add_argument("--iterations", type=int, default=100, help="training steps per variant")
    parser.add_argument("--budget", type=float, default=None, help="optional seconds cap")
    parser.add_argument("--cases", type=int, default=6, help="phantoms (about 1/3 validation)")
    parser.add_argument("--shape", type=int, default=48, help="phantom side in voxels")
    parser.add_argument("--patch", type=int, default=32, help="training patch side")
    parser.add_argument("--precision", default="fp32", help="training precision: fp32, bf16, auto")
    parser.add_argument("--skip-train", action="store_true", help="architecture rows only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {
        "machine": {**machine_info(), "load_average_at_start": list(os.getloadavg())},
        "architectures": architecture_rows(args.repeats),
    }
    if args.skip_train:
        result["comparison"] = "not run (--skip-train)"
    else:
        setup = {
            k: getattr(args, k)
            for k in ("iterations", "budget", "cases", "shape", "patch", "precision")
        }
        result["comparison_setup"] = {
            **setup, "classes": 4, "batch": 2, "optimizer": "AdamW lr 1e-3 poly", "seed": 0,
        }  # fmt: skip
        result["comparison"] = comparison_rows(setup)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print_tables(result)
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
