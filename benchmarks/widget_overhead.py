"""What does running Segment in a napari thread worker cost against a bare call?

micro-sam reported a large slowdown of inference inside napari thread workers
(micro-sam #740) and switched them off. This script measures ours, in one
process, on the same input and model, interleaving the modes:

* ``bare``: ``Predictor.iter_segment`` drained in the main thread;
* ``worker``: the same generator in a napari ``create_worker`` thread (through
  the widgets' ``JobPanel``: progress bar and status updated on every yield),
  the Qt event loop running in the main thread;
* ``fresh``: like ``bare`` but building the ``Predictor`` from the model folder on
  every call (model loading, BatchNorm folding), as the widget does;
* ``widget``: the whole Segment widget in a napari viewer, from ``run()`` to the
  new Labels layer (model loading and ``add_labels`` included): compare with ``fresh``.

It prints a table and writes ``benchmarks/results/widget_overhead.json``. Target:
worker / bare - 1 < 10 %. Run: ``xvfb-run -a python benchmarks/widget_overhead.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_info  # benchmarks/machine.py

RESULTS = Path(__file__).parent / "results" / "widget_overhead.json"


def _model(home: Path, channels: tuple[int, ...]) -> Path:
    import torch

    from napari_selfreg import models
    from napari_selfreg.modelfile import ModelCard, save_model

    os.environ["NAPARI_SELFREG_HOME"] = str(home)
    torch.manual_seed(0)
    net = models.build("unet3d", channels=channels, num_classes=4)
    card = ModelCard(
        name="bench",
        architecture="unet3d",
        options={"channels": list(channels), "num_classes": 4, "in_channels": 1},
        class_names=["background", "a", "b", "c"],
    )
    return save_model(net, card)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96, help="volume edge in voxels")
    parser.add_argument("--tile", type=int, default=48)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--channels", default="8,16,32,64")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from napari.qt import get_qapp
    from qtpy.QtCore import QEventLoop

    from napari_selfreg.data import make_phantom
    from napari_selfreg.inference import Predictor
    from napari_selfreg.widgets._common import JobPanel
    from napari_selfreg.widgets.segment import SegmentWidget

    app = get_qapp()
    home = Path(tempfile.mkdtemp(prefix="selfreg-bench-"))
    model = _model(home, tuple(int(c) for c in args.channels.split(",")))
    image, _ = make_phantom((args.size,) * 3, num_classes=4, seed=0)
    options = {"tile": args.tile, "overlap": args.overlap, "device": "cpu", "precision": "auto"}
    predictor = Predictor(model, **options)

    def job():
        return (yield from predictor.iter_segment(image))

    def drain(gen) -> None:
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            assert stop.value.labels.shape == image.shape

    def bare() -> float:
        t0 = time.perf_counter()
        drain(job())
        return time.perf_counter() - t0

    def bare_fresh() -> float:
        t0 = time.perf_counter()
        drain(Predictor(model, **options).iter_segment(image))  # load the model, as Segment does
        return time.perf_counter() - t0

    import napari

    viewer = napari.Viewer(show=False)
    panel = JobPanel(viewer)

    def worker() -> float:
        loop = QEventLoop()
        out = {}
        panel.finished.connect(loop.quit)
        t0 = time.perf_counter()
        panel.start(job, on_return=lambda r: out.setdefault("t", time.perf_counter()))
        loop.exec()
        panel.finished.disconnect(loop.quit)
        assert panel.outcome == "returned", panel.status.text()
        return out["t"] - t0

    viewer.add_image(image, name="bench")
    widget = SegmentWidget(viewer)
    widget.model_picker.select(model)
    widget.tile.setValue(args.tile)
    widget.overlap.setValue(args.overlap)
    widget.device.setCurrentText("cpu")
    widget._check_device()

    def whole_widget() -> float:
        loop = QEventLoop()
        widget.job.finished.connect(loop.quit)
        t0 = time.perf_counter()
        widget.run()
        loop.exec()
        elapsed = time.perf_counter() - t0
        widget.job.finished.disconnect(loop.quit)
        assert widget.job.outcome == "returned", widget.job.status.text()
        viewer.layers.pop()  # keep the viewer small
        return elapsed

    modes = {"bare": bare, "worker": worker, "fresh": bare_fresh, "widget": whole_widget}
    bare()  # warm-up: oneDNN kernels, allocator
    worker()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for name, fn in modes.items():  # interleaved: load drifts hit every mode alike
            times[name].append(fn())
    med = {m: statistics.median(v) for m, v in times.items()}
    tiles = len(
        __import__("napari_selfreg.predict", fromlist=["tile_positions"]).tile_positions(
            image.shape, predictor.tile, args.overlap
        )
    )
    result = {
        "what": "Segment in a napari thread worker vs a bare call of the same generator",
        "volume": list(image.shape),
        "model_channels": args.channels,
        "tile": args.tile,
        "overlap": args.overlap,
        "tiles": tiles,
        "repeats": args.repeats,
        "seconds": times,
        "median_seconds": med,
        "worker_overhead": med["worker"] / med["bare"] - 1,
        "widget_overhead_vs_fresh": med["widget"] / med["fresh"] - 1,
        "machine": machine_info(),
        "python": sys.version.split()[0],
        "napari": napari.__version__,
    }
    print(
        f"volume {args.size}^3, tile {args.tile}, overlap {args.overlap}, {tiles} tiles, "
        f"median of {args.repeats} (interleaved)"
    )
    print(f"{'mode':<8} {'median s':>9} {'vs bare':>9}")
    for name in modes:
        print(f"{name:<8} {med[name]:9.3f} {med[name] / med['bare'] - 1:+9.1%}")
    ok = result["worker_overhead"] < 0.10
    print(
        f"worker overhead {result['worker_overhead']:+.1%} (target < 10%: {'met' if ok else 'MISSED'})"
    )
    print(
        f"whole widget vs a bare call that also loads the model: "
        f"{result['widget_overhead_vs_fresh']:+.1%}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    widget.close()
    viewer.close()
    app.processEvents()


if __name__ == "__main__":
    main()
