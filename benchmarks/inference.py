"""Inference speed: our predictor against MONAI's sliding window, same network and weights.

On the MNI152 1 mm T1 (197 x 233 x 189) and a 256^3 phantom, alternating in one process:

* (a) ``napari_selfreg.predict.Predictor`` with its default settings (tile = the
  model's patch size, overlap 0.25, Gaussian weighting, auto precision = bf16 on CPUs
  with bf16 units, channels-last, BatchNorm folded);
* (b) ``monai.inferers.sliding_window_inference`` as a user writes it: fp32, the
  same roi as our tile, overlap 0.25, sw_batch_size 1, mode "constant" (MONAI's
  defaults), argmax of the stitched logits;
* (c) MONAI as an expert writes it: bf16 autocast, network and input channels-last,
  roi 128^3, sw_batch_size 2, Gaussian blending, overlap 0.25, under inference_mode;
* (d) our predictor at overlap 0 (the fewest tiles that cover the volume, spread
  evenly, so neighbours still share the remainder) and (e) at nnU-Net's overlap 0.5:
  what the faster and the smoother setting cost in labels; (f) our default without
  cropping to the nonzero voxels' box (``crop_to_nonzero=False``: every tile of the
  volume, as both MONAI arms run): what the crop saves on a brain-extracted scan.

On the MNI152 volume also: MONAI user-style with Gaussian weighting against (b) and
(c) against (b), the agreement MONAI's own tilings reach with this model (a floor set by
how much the model's labels depend on where a tile starts); each method against one
pass over the whole volume (no tile edges: the labels every tiling approximates); and
each method's Dice against the template's tissue labels.

All include intensity normalisation. Reported: median seconds of ``--runs`` runs,
speed-up, label agreement (Dice per class between (a) and (b), and the mean),
where our time goes (``info["stages"]``: prepare, read, network, stitch, finish),
achieved GFLOP/s inside the network (FLOPs counted with FlopCounterMode) against a
bf16 / fp32 matrix product timed in the same process, peak RSS of this process and,
in a subprocess, of the zarr streaming path on a 512^3 volume.

Usage::

    .venv/bin/python benchmarks/inference.py [--runs 3] [--model NAME|PATH] [--threads N]
        [--skip-stream] [--stream-size 512]

Writes ``benchmarks/results/inference.json``. Compare ratios measured in one run; the
machine is shared, so absolute seconds move with its load.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine_info  # benchmarks/machine.py

from napari_selfreg import models
from napari_selfreg.device import cpu_bf16_fast
from napari_selfreg.inference import Predictor
from napari_selfreg.modelfile import ModelBundle, ModelCard, ModelFileError, load_model, save_model
from napari_selfreg.preprocess import normalize
from napari_selfreg.training.metrics import volume_dice

RESULTS = Path(__file__).parent / "results" / "inference.json"
TARGET_SPEEDUP_USER, TARGET_SPEEDUP_EXPERT, TARGET_AGREEMENT, TARGET_RSS_GIB = 8.0, 4.0, 0.99, 3.0


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def get_model(name: str | None) -> tuple[ModelBundle, str]:
    """The model to benchmark and a note on its weights."""
    try:
        bundle = load_model(name)
        return bundle, f"{bundle.card.name} (trained weights)"
    except ModelFileError:
        if name is not None:
            raise
    from napari_selfreg.data import load_mni152

    torch.manual_seed(0)
    net = models.build("unet3d", num_classes=3)  # the small default options
    image = normalize(load_mni152()[0], {"method": "zscore"})
    net.train()
    with torch.no_grad():  # BatchNorm statistics from the data, so the labels vary
        for z in (40, 80):
            net(torch.from_numpy(image[None, None, z : z + 64, 80:144, 60:124].copy()))
    card = ModelCard(
        name="unet3d-random",
        architecture="unet3d",
        options={"num_classes": 3, "in_channels": 1},
        class_names=["class 0", "class 1", "class 2"],
        normalization={"method": "zscore"},
    )
    note = "unet3d defaults, RANDOM weights (BN statistics from MNI): agreement is on untrained weights"
    return ModelBundle(network=net.eval(), card=card), note


def gemm_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Median GFLOP/s of an n x n matrix product in ``dtype``."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def run_ours(bundle: ModelBundle, image: np.ndarray, **options):
    t0 = time.perf_counter()
    result = Predictor(bundle, device="cpu", **options).segment(image)
    return time.perf_counter() - t0, np.asarray(result.labels), result.info


def run_monai(bundle: ModelBundle, image: np.ndarray, roi: tuple[int, ...], mode="constant"):
    """MONAI as a user writes it: fp32, MONAI's defaults (``mode``: its blending)."""
    from monai.inferers import sliding_window_inference

    t0 = time.perf_counter()
    x = torch.from_numpy(normalize(image, bundle.card.normalization))[None, None]
    net = bundle.network.eval()
    with torch.no_grad():
        logits = sliding_window_inference(x, roi, 1, net, overlap=0.25, mode=mode)
    labels = logits.argmax(1)[0].numpy().astype(np.uint8)
    return time.perf_counter() - t0, labels, {}


def run_monai_expert(bundle: ModelBundle, image: np.ndarray, roi=(128, 128, 128)):
    """MONAI as an expert writes it: bf16 autocast, channels-last, large roi, Gaussian."""
    from monai.inferers import sliding_window_inference

    t0 = time.perf_counter()
    x = torch.from_numpy(normalize(image, bundle.card.normalization))[None, None]
    x = x.contiguous(memory_format=torch.channels_last_3d)
    net = bundle.network.eval().to(memory_format=torch.channels_last_3d)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = sliding_window_inference(x, roi, 2, net, overlap=0.25, mode="gaussian")
    labels = logits.float().argmax(1)[0].numpy().astype(np.uint8)
    return time.perf_counter() - t0, labels, {}


def dice_per_class(a: np.ndarray, b: np.ndarray, k: int) -> list[float | None]:
    """Dice of each class between two label maps (None when neither has the class)."""
    return volume_dice(a, b, k)["dice"]


def mean_dice(dice: list[float | None]) -> float:
    """Mean Dice over the classes present in either map."""
    return float(np.mean([d for d in dice if d is not None]))


def bench_volume(name, image, reference, bundle, runs, attribute: bool, tile_sweep=()) -> dict:
    """Alternate (a), (b), (c) ``runs`` times after one untimed warm-up of each.

    A bf16 GEMM is timed just before each run of (a), so the GEMM share compares
    rates measured under the same machine load. With ``attribute``: where the
    differences come from (precision, MONAI's own tilings) and, with ``reference``
    labels (None: none), each method's Dice against them. ``tile_sweep``: edges of
    cubic tiles to run ours with once each (with ``attribute``), against MONAI both
    ways, the one pass and the reference: can another tile reach the agreement target?
    """
    tile = tuple(Predictor(bundle, device="cpu").tile)
    jobs = {
        "ours": lambda: run_ours(bundle, image),
        "monai": lambda: run_monai(bundle, image, tile),
        "monai_expert": lambda: run_monai_expert(bundle, image),
        "ours_overlap_0": lambda: run_ours(bundle, image, overlap=0.0),
        "ours_overlap_0.5": lambda: run_ours(bundle, image, overlap=0.5),
        "ours_no_crop": lambda: run_ours(bundle, image, crop_to_nonzero=False),
    }
    crop = image[:64, :64, :64]  # warm-up: oneDNN kernels, allocator
    run_ours(bundle, crop)
    run_monai(bundle, crop, tuple(min(t, 64) for t in tile))
    run_monai_expert(bundle, crop, (64, 64, 64))
    times = {k: [] for k in jobs}
    net_rates, gemm_rates, last = [], [], {}
    for r in range(runs):
        for key, job in jobs.items():
            if key == "ours":
                gemm_rates.append(gemm_gflops(torch.bfloat16))
            seconds, labels, info = job()
            times[key].append(seconds)
            last[key] = (labels, info)
            if key == "ours":
                net_rates.append(info["gflops_per_s"] or 0.0)
            print(f"  {name} run {r + 1}/{runs} {key}: {seconds:.1f} s", flush=True)
    k = bundle.card.num_classes
    ours, monai = last["ours"][0], last["monai"][0]
    agreement = {
        "ours_vs_monai": dice_per_class(ours, monai, k),
        "ours_vs_monai_expert": dice_per_class(ours, last["monai_expert"][0], k),
        "ours_overlap_0_vs_ours": dice_per_class(last["ours_overlap_0"][0], ours, k),
        "ours_overlap_0_vs_monai": dice_per_class(last["ours_overlap_0"][0], monai, k),
        "ours_overlap_0_vs_monai_expert": dice_per_class(
            last["ours_overlap_0"][0], last["monai_expert"][0], k
        ),
        "ours_overlap_0.5_vs_ours": dice_per_class(last["ours_overlap_0.5"][0], ours, k),
        "ours_no_crop_vs_ours": dice_per_class(last["ours_no_crop"][0], ours, k),
        "ours_no_crop_vs_monai": dice_per_class(last["ours_no_crop"][0], monai, k),
    }
    if attribute:  # where do the differences come from: precision or stitching?
        fp32 = run_ours(bundle, image, precision="fp32")[1]
        agreement["ours_fp32_vs_monai"] = dice_per_class(fp32, monai, k)
        agreement["ours_fp32_vs_ours_bf16"] = dice_per_class(fp32, ours, k)
        # the floor a tile-sensitive model sets: MONAI against MONAI with other weights
        monai_gaussian = run_monai(bundle, image, tile, mode="gaussian")[1]
        agreement["monai_gaussian_vs_monai"] = dice_per_class(monai_gaussian, monai, k)
        agreement["monai_expert_vs_monai"] = dice_per_class(last["monai_expert"][0], monai, k)
        # no tile edges at all: the whole volume in one pass, what every tiling approximates
        single = run_ours(bundle, image, tile=image.shape, overlap=0.0)[1]
        for key in ("ours", "monai", "monai_expert"):
            agreement[f"{key}_vs_single_pass"] = dice_per_class(last[key][0], single, k)
    if reference is not None:
        for key in ("ours", "monai", "monai_expert"):
            agreement[f"{key}_vs_reference"] = dice_per_class(last[key][0], reference, k)
    sweep = []
    for edge in tile_sweep if attribute else ():
        seconds, labels, swept = run_ours(bundle, image, tile=(edge,) * 3)
        row = {"tile": edge, "seconds": seconds, "tiles": swept["tiles"]}
        for key, other in (("monai", monai), ("monai_expert", last["monai_expert"][0]),
                           ("single_pass", single), ("reference", reference)):  # fmt: skip
            row[f"vs_{key}"] = (
                None if other is None else mean_dice(dice_per_class(labels, other, k))
            )
        sweep.append(row)
    info = last["ours"][1]
    med = {key: statistics.median(v) for key, v in times.items()}
    return {
        "volume": name,
        "shape": list(image.shape),
        "tile": list(tile),
        "seconds": times,
        "median_s": med,
        "speedup": med["monai"] / med["ours"],
        "speedup_vs_expert": med["monai_expert"] / med["ours"],
        "speedup_overlap_0": med["monai"] / med["ours_overlap_0"],
        "speedup_overlap_0_vs_expert": med["monai_expert"] / med["ours_overlap_0"],
        "speedup_overlap_0.5": med["monai"] / med["ours_overlap_0.5"],
        "speedup_no_crop": med["monai"] / med["ours_no_crop"],
        "speedup_no_crop_vs_expert": med["monai_expert"] / med["ours_no_crop"],
        "dice_per_class": agreement["ours_vs_monai"],
        "dice_mean": mean_dice(agreement["ours_vs_monai"]),
        "agreement": {key: {"per_class": d, "mean": mean_dice(d)} for key, d in agreement.items()},
        "class_fractions_ours": (np.bincount(ours.ravel(), minlength=k) / ours.size)
        .round(4)
        .tolist(),
        "tile_sweep": sweep,
        "ours_info": info,
        "ours_tiles": info["tiles"],
        "ours_stages_s": info["stages"],
        "ours_overlap_0_tiles": last["ours_overlap_0"][1]["tiles"],
        "ours_overlap_0_stages_s": last["ours_overlap_0"][1]["stages"],
        "ours_overlap_0.5_tiles": last["ours_overlap_0.5"][1]["tiles"],
        "ours_no_crop_tiles": last["ours_no_crop"][1]["tiles"],
        "network_gflops_per_s": statistics.median(net_rates),
        "gemm_bf16_gflops_per_s": statistics.median(gemm_rates),
        "pipeline_gflops_per_s": info["gflop"] / med["ours"],
    }


def stream_child(model_path: str, folder: str) -> None:
    """Subprocess body: stream ``folder/input.zarr`` to ``folder/labels.zarr``; print JSON."""
    import zarr

    source = zarr.open_array(str(Path(folder) / "input.zarr"), mode="r")
    t0 = time.perf_counter()
    result = Predictor(model_path, device="cpu").segment(source, out=Path(folder) / "labels.zarr")
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak_rss_gib(), "info": result.info}))


def bench_streaming(bundle: ModelBundle, phantom: np.ndarray, size: int, threads: int) -> dict:
    """Peak RSS of the zarr streaming path on a ``size``^3 volume, in a fresh subprocess."""
    import zarr

    folder = Path(tempfile.mkdtemp(prefix="selfreg-stream-"))
    try:
        model_path = save_model(bundle.network, bundle.card, folder / "model")
        store = zarr.open_array(str(folder / "input.zarr"), mode="w", shape=(size,) * 3,
                                chunks=(64, 128, 128), dtype="f4")  # fmt: skip
        n = phantom.shape[0]
        for z in range(0, size, n):  # tile the phantom (mirrored) to fill the volume
            for y in range(0, size, n):
                for x in range(0, size, n):
                    block = phantom[:: (-1) ** (z // n), :: (-1) ** (y // n), :: (-1) ** (x // n)]
                    sz, sy, sx = (min(n, size - o) for o in (z, y, x))
                    store[z : z + sz, y : y + sy, x : x + sx] = block[:sz, :sy, :sx]
        cmd = [sys.executable, __file__, "--stream-child", str(model_path), str(folder),
               "--threads", str(threads)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out = json.loads(done.stdout.strip().splitlines()[-1])
        labels = zarr.open_group(str(folder / "labels.zarr"), mode="r")["labels"]
        out["labels_shape"] = list(labels.shape)
        out["size"] = size
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-stream", action="store_true")
    parser.add_argument("--stream-size", type=int, default=512)
    parser.add_argument("--volumes", nargs="+", default=["mni152", "phantom256"])
    parser.add_argument("--stream-child", nargs=2, metavar=("MODEL", "FOLDER"), help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--tile-sweep", type=int, nargs="*", default=[], metavar="EDGE",
                        help="also run ours once with cubic tiles of these edges (MNI152 only)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.stream_child:
        stream_child(*args.stream_child)
        return

    from napari_selfreg.data import load_mni152, make_phantom

    bundle, note = get_model(args.model)
    print(f"model: {note}; threads {args.threads}; CPU bf16 fast: {cpu_bf16_fast()}", flush=True)
    gemm = {"bf16": gemm_gflops(torch.bfloat16), "fp32": gemm_gflops(torch.float32)}
    print(f"GEMM 2048^2: bf16 {gemm['bf16']:.0f} GFLOP/s, fp32 {gemm['fp32']:.0f} GFLOP/s")

    def phantom():
        return np.asarray(make_phantom((256,) * 3, num_classes=4, seed=0)[0], dtype=np.float32)

    volumes = {"mni152": lambda: load_mni152()[:2], "phantom256": lambda: (phantom(), None)}
    rows = [
        bench_volume(
            v,
            *volumes[v](),
            bundle=bundle,
            runs=args.runs,
            attribute=v == "mni152",
            tile_sweep=args.tile_sweep,
        )  # fmt: skip
        for v in args.volumes
    ]
    gemm_after = gemm_gflops(torch.bfloat16)
    stream = None
    if not args.skip_stream:
        stream = bench_streaming(bundle, phantom(), args.stream_size, args.threads)
    precision = rows[0]["ours_info"]["precision"]
    report = {
        "machine": machine_info(args.threads),
        "model": note,
        "runs": args.runs,
        "gemm_gflops_per_s": {**gemm, "bf16_after": gemm_after},
        "volumes": rows,
        "streaming": stream,
        "peak_rss_gib_main_process": peak_rss_gib(),
        "targets": {},
    }
    print_table(rows, precision, stream, report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {args.json}")


def print_table(rows, precision, stream, report) -> None:
    def verdict(ok):
        return "PASS" if ok else "FAIL"

    print(f"\nmodel: {report['model']}")
    head = (f"{'volume':<11} {'setting':<11} {'tiles':>5} {'s':>6} {'x MONAI':>8} {'x expert':>9} "
            f"{'agree':>7} {'agree exp':>9}  user  expert agree")  # fmt: skip
    print(f"MONAI user-style (fp32, roi = our tile) and expert-style (bf16, channels-last, "
          f"roi 128^3, sw_batch 2, Gaussian), both at overlap 0.25\n{head}")  # fmt: skip
    targets = report["targets"]
    for r in rows:
        gemm_ref = (
            r["gemm_bf16_gflops_per_s"]
            if precision == "bf16"
            else report["gemm_gflops_per_s"]["fp32"]
        )
        share = r["network_gflops_per_s"] / gemm_ref
        r["gemm_share"] = share
        med, agree = r["median_s"], r["agreement"]
        for setting, key, user, expert, tiles in (
            ("overlap .25", "ours", r["speedup"], r["speedup_vs_expert"], r["ours_tiles"]),
            ("overlap 0", "ours_overlap_0", r["speedup_overlap_0"],
             r["speedup_overlap_0_vs_expert"], r["ours_overlap_0_tiles"]),
        ):  # fmt: skip
            a_user = agree[f"{key}_vs_monai"]["mean"]
            a_expert = agree[f"{key}_vs_monai_expert"]["mean"]
            checks = {"user": user >= TARGET_SPEEDUP_USER, "expert": expert >= TARGET_SPEEDUP_EXPERT,
                      "agreement": min(a_user, a_expert) >= TARGET_AGREEMENT}  # fmt: skip
            targets[f"{r['volume']} {setting}"] = checks
            print(
                f"{r['volume']:<11} {setting:<11} {tiles:>5} {med[key]:>6.1f} {user:>8.2f} "
                f"{expert:>9.2f} {a_user:>7.4f} {a_expert:>9.4f}  "
                + "  ".join(verdict(ok) for ok in checks.values())
            )
        print(f"{'':<11} MONAI user {med['monai']:.1f} s, expert {med['monai_expert']:.1f} s; "
              f"overlap 0.5: {med['ours_overlap_0.5']:.1f} s; without the crop "
              f"{med['ours_no_crop']:.1f} s ({r['ours_no_crop_tiles']} tiles, "
              f"{r['speedup_no_crop']:.2f}x / {r['speedup_no_crop_vs_expert']:.2f}x)")  # fmt: skip
        for key, a in agree.items():
            per = ", ".join("-" if d is None else f"{d:.4f}" for d in a["per_class"])
            print(f"{'':<11} Dice {key}: mean {a['mean']:.4f} (per class {per})")
        for row in r["tile_sweep"]:
            vs = ", ".join(f"{k[3:]} {v:.4f}" for k, v in row.items() if k.startswith("vs_") and v)
            print(f"{'':<11} ours, tile {row['tile']}^3: {row['seconds']:.1f} s, "
                  f"{row['tiles']} tiles; mean Dice vs {vs}")  # fmt: skip
        stages = ", ".join(f"{k} {v:.2f}" for k, v in r["ours_stages_s"].items())
        print(f"{'':<11} our stages (s, last run): {stages}")
        print(
            f"{'':<11} network {r['network_gflops_per_s'] or 0:.0f} GFLOP/s = {100 * share:.0f} % "
            f"of a {precision} GEMM ({gemm_ref:.0f}); class fractions {r['class_fractions_ours']}"
        )
    print(
        f"x = MONAI s / ours s (targets >= {TARGET_SPEEDUP_USER} user-style, >= "
        f"{TARGET_SPEEDUP_EXPERT} expert-style); agree = mean Dice over the classes present "
        f"(>= {TARGET_AGREEMENT})"
    )
    if stream is not None:
        ok = stream["peak_rss_gib"] <= TARGET_RSS_GIB
        targets["streaming_rss"] = ok
        print(f"streaming {stream['size']}^3 zarr -> zarr: peak RSS {stream['peak_rss_gib']:.2f} GiB "
              f"(target <= {TARGET_RSS_GIB}) {verdict(ok)}, {stream['seconds']:.0f} s, "
              f"{stream['info']['tiles']} tiles in {stream['info']['slabs']} slabs")  # fmt: skip
    print(f"peak RSS of this process: {report['peak_rss_gib_main_process']:.2f} GiB")


if __name__ == "__main__":
    main()
