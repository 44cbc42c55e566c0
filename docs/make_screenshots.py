"""Screenshots of the Segment and Fine-tune widgets at work on the MNI152 sample brain.

Run under a virtual display::

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshots.py

It opens a real napari viewer with the ``mni152`` sample, docks Segment and runs
it, then paints a correction into the predicted labels, docks Fine-tune and
fine-tunes and re-segments with the new model. It saves the whole window (canvas
and docks) to ``docs/screenshots/``: ``segment_running.png`` and
``finetune_running.png`` halfway through each job (progress bar, Cancel, live
curve), ``segment.png`` and ``finetune.png`` when they are done. The model is the bundled default when this
copy of napari-selfreg has one; otherwise a small 3D UNet is trained on the
MNI152 sample for a few hundred iterations first (in a private
``NAPARI_SELFREG_HOME``, reused on the next run) and the script says so.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "screenshots"
DEMO_MODEL = "mni152-demo-unet3d"


def wait(signal, timeout: float = 1800.0) -> None:
    """Run the Qt event loop until ``signal`` fires (the viewer stays live meanwhile)."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    signal.connect(loop.quit)
    QTimer.singleShot(int(timeout * 1000), loop.quit)
    loop.exec()
    signal.disconnect(loop.quit)


def settle(seconds: float = 0.5) -> None:
    from napari.qt import get_qapp

    end = time.time() + seconds
    while time.time() < end:
        get_qapp().processEvents()
        time.sleep(0.02)


def args_threads() -> int | None:
    """torch threads: ``SELFREG_THREADS`` (1 is fastest on a busy 2-core machine)."""
    value = os.environ.get("SELFREG_THREADS")
    return int(value) if value else None


def dice(pred: np.ndarray, ref: np.ndarray) -> str:
    """Grey / white matter Dice of two label volumes, as text."""
    scores = [
        2 * np.sum((pred == k) & (ref == k)) / max(np.sum(pred == k) + np.sum(ref == k), 1)
        for k in (1, 2)
    ]
    return "grey {:.3f}, white {:.3f}".format(*scores)


def snapshot_during(viewer, worker, when, path: Path) -> None:
    """Save a screenshot of the whole window at the first yielded event where ``when(event)``."""
    taken = []

    def take(event) -> None:
        if not taken and when(event):
            taken.append(path)
            viewer.screenshot(str(path), canvas_only=False, flash=False)
            print(f"wrote {path} (job running)")

    worker.yielded.connect(take)


def demo_model(iterations: int) -> Path:
    """The bundled default model, or a small UNet trained here on the MNI152 sample."""
    from napari_selfreg.modelfile import (
        ModelCard,
        ModelFileError,
        resolve_model_path,
        user_models_dir,
    )

    try:
        path = resolve_model_path(None)
        print(f"model: the bundled default {path.name}")
        return path
    except ModelFileError:
        pass
    target = user_models_dir() / DEMO_MODEL
    if target.is_dir():
        print(f"model: {target} (trained by an earlier run of this script)")
        return target
    from napari_selfreg.data import MNI152_CLASSES, MNI152_COLORS, load_mni152
    from napari_selfreg.training.config import TrainConfig
    from napari_selfreg.training.datasets import case_from_arrays
    from napari_selfreg.training.loop import train

    print(
        f"model: no bundled default; training {DEMO_MODEL} on MNI152 for {iterations} iterations"
    )
    image, labels, affine = load_mni152()
    options = {"channels": [8, 16, 32, 64]}
    config = TrainConfig(
        arch="unet3d",
        arch_options=options,
        num_classes=3,
        class_names=list(MNI152_CLASSES),
        patch_size=(48, 48, 48),
        batch_size=2,
        iterations=iterations,
        lr=3e-3,
        num_threads=args_threads(),
        val_every=max(iterations // 4, 1),
        val_patches=4,
        description="Demo model for the screenshots: a small 3D UNet trained on the MNI152 sample.",
    )
    base = ModelCard(
        DEMO_MODEL,
        "unet3d",
        {**options, "num_classes": 3, "in_channels": 1},
        list(MNI152_CLASSES),
        list(MNI152_COLORS),
        patch_size=[64, 64, 64],
    )
    case = case_from_arrays(image, labels, name="mni152", affine=affine)
    t0 = time.time()
    last = [0]

    def report(event) -> None:
        if event.kind == "iteration" and event.iteration - last[0] >= 25:
            last[0] = event.iteration
            print(
                f"  iteration {event.iteration}/{event.total} loss {event.losses.get('total', 0):.3f}"
            )

    path = train(config, [case], target, callback=report, base_card=base)
    print(f"  trained in {time.time() - t0:.0f} s: {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--home", type=Path, default=Path(tempfile.gettempdir()) / "napari-selfreg-screens"
    )
    parser.add_argument("--iterations", type=int, default=200, help="training of the demo model")
    parser.add_argument("--finetune-iterations", type=int, default=40)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    os.environ["NAPARI_SELFREG_HOME"] = str(args.home)
    args.out.mkdir(parents=True, exist_ok=True)

    import napari

    if args_threads():
        import torch

        torch.set_num_threads(args_threads())
    model = demo_model(args.iterations)
    viewer = napari.Viewer(title="napari-selfreg")
    viewer.window._qt_window.resize(1560, 960)
    image, truth = viewer.open_sample("napari-selfreg", "mni152")
    truth.visible = False  # the sample's reference labels; we show the model's
    # the sample opens on axial slices (world axis 0 = superior), anterior up, the
    # patient's left on the right; z = 12 mm: basal ganglia, lots of grey/white border
    viewer.dims.set_point(0, 12.0)
    settle()

    # ---------------------------------------------------------------- Segment
    _, segment = viewer.window.add_plugin_dock_widget("napari-selfreg", "Segment")
    segment.model_picker.select(model)
    segment.image_picker.set_layer(image)
    segment.extra.setCurrentText("none")
    worker = segment.run()
    snapshot_during(
        viewer,
        worker,
        lambda e: e.stage == "tiles" and e.total and e.done >= e.total // 2,
        args.out / "segment_running.png",
    )
    wait(segment.job.finished)
    if segment.job.outcome != "returned":
        raise SystemExit(f"Segment did not finish: {segment.job.status.text()}")
    predicted = viewer.layers[-1]
    viewer.layers.selection.active = predicted
    viewer.reset_view()
    settle(1.0)
    path = args.out / "segment.png"
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print(f"wrote {path}: {predicted.name}, {segment.job.status.text()}")

    # ---------------------------------------------------------------- a correction + Fine-tune
    # the "user" repaints the axial slices around the one in view (display axis 0 is
    # superior-inferior) with the reference tissue labels
    here = int(viewer.dims.current_step[0])
    block = (slice(here - 6, here + 6), slice(None), slice(None))
    predicted.data[block] = truth.data[block]
    predicted.refresh()
    predicted.events.paint(value=[])
    _, finetune = viewer.window.add_plugin_dock_widget("napari-selfreg", "Fine-tune", tabify=True)
    finetune.image_picker.set_layer(image)
    finetune.labels_picker.set_layer(predicted)
    finetune.model_picker.select(model)
    finetune.iterations.setValue(args.finetune_iterations)
    finetune.seconds.setValue(0)
    finetune.augment.setChecked(False)  # one in-domain volume: augmentation hurt here
    worker = finetune.run()
    half = args.finetune_iterations // 2
    snapshot_during(
        viewer,
        worker,
        lambda e: e.kind == "iteration" and e.iteration >= half,
        args.out / "finetune_running.png",
    )
    wait(finetune.job.finished)
    if finetune.job.outcome != "returned":
        raise SystemExit(f"Fine-tune did not finish: {finetune.job.status.text()}")
    finetune.segment_with_new_model()
    wait(segment.job.finished)
    _, finetune = viewer.window.add_plugin_dock_widget("napari-selfreg", "Fine-tune")
    finetune.parentWidget().raise_()
    dock = viewer.window._wrapped_dock_widgets.get("Fine-tune (napari-selfreg)")
    if dock is not None:
        dock.raise_()
    resegmented = viewer.layers[-1]
    predicted.visible = False
    viewer.layers.selection.active = resegmented
    settle(1.0)
    path = args.out / "finetune.png"
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print(f"wrote {path}: {finetune.result_line.text()}; re-segmented as {resegmented.name}")
    before = predicted.metadata["selfreg_prediction"]
    print(f"  Dice vs the sample's tissue labels, first prediction: {dice(before, truth.data)}")
    print(
        f"  Dice vs the sample's tissue labels, after fine-tuning: {dice(resegmented.data, truth.data)}"
    )
    viewer.close()


if __name__ == "__main__":
    main()
