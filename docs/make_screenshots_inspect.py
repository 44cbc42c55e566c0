"""Screenshots of the Inspect features widget: ``docs/screenshots/inspect*.png``.

Run from the repository root (about two minutes on two CPU cores)::

    xvfb-run -a .venv/bin/python docs/make_screenshots_inspect.py

Data: the MNI152 2009 T1 template (nilearn's bundled copy). ``inspect.png`` and
``inspect_channels.png`` show the bundled default model on the 1 mm template. ``inspect_compare.png``
compares two small 3D UNets (channels 8-16-32-64) trained here for ``--iterations``
steps on the 2 mm template's grey/white-matter labels with ``napari_selfreg.training``:
one plain (lambda_scr = lambda_ifd = 0) and one self-regularised (0.015 each), same
seed, cached in ``--models`` so reruns only redraw. A short run like this shows what
SelfReg does to the channels early in training, not in a fully trained network.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHOTS = HERE / "screenshots"
CLASSES = ["background", "grey matter", "white matter"]


def train_models(folder: Path, iterations: int) -> list[Path]:
    """Two briefly trained tiny UNets (plain, SelfReg) in ``folder``; reused when present."""
    from napari_selfreg.data import load_mni152
    from napari_selfreg.training.config import TrainConfig
    from napari_selfreg.training.datasets import case_from_arrays
    from napari_selfreg.training.loop import train

    image, labels, affine = load_mni152(2)
    paths = []
    for name, lam in [("mni-unet-plain", 0.0), ("mni-unet-selfreg", 0.015)]:
        out = folder / f"{name}-{iterations}"
        if not out.is_dir():
            config = TrainConfig(
                arch="unet3d",
                arch_options={"channels": [8, 16, 32, 64]},
                class_names=CLASSES,
                patch_size=(48, 48, 48),
                batch_size=2,
                iterations=iterations,
                lambda_scr=lam,
                lambda_ifd=lam,
                val_every=max(1, iterations),
                val_patches=2,
                augment=False,
                num_threads=2,
                seed=0,
                description=f"screenshot model, {iterations} iterations on MNI152 2 mm",
            )
            case = case_from_arrays(image, labels, name="mni152", affine=affine)
            t0 = time.perf_counter()
            train(config, [case], out)
            print(f"trained {out.name} in {time.perf_counter() - t0:.0f} s")
        paths.append(out)
    return paths


def close_toasts(viewer) -> None:
    """Close napari's notification pop-ups (they would cover part of the canvas)."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()


def wait(app, widget, timeout: float = 600) -> None:
    """Process Qt events until the widget's job (or model loading) is over."""
    end = time.time() + timeout
    while (widget.job.busy or widget._loaders) and time.time() < end:
        app.processEvents()
        time.sleep(0.02)
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--models", type=Path, default=Path("/tmp/napari-selfreg-screenshots"))
    parser.add_argument(
        "--no-compare", action="store_true", help="leave inspect_compare.png (no training)"
    )
    args = parser.parse_args()
    os.environ.setdefault("NAPARI_SELFREG_HOME", str(args.models))

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_selfreg.data import load_mni152
    from napari_selfreg.modelfile import resolve_model_path
    from napari_selfreg.widgets.inspect import VISIBLE, InspectWidget

    torch.set_num_threads(2)
    app = QApplication.instance() or QApplication([])

    def open_viewer(models, compare, mm):
        image, _labels, affine = load_mni152(mm)
        viewer = napari.Viewer(show=True, title="napari-selfreg: Inspect features")
        viewer.window.set_geometry(0, 0, 1700, 1050)
        from napari_selfreg._reader import META_KEY, place

        data, transform, meta = place(image, affine)  # axial slices, as the reader opens a scan
        viewer.add_image(
            data, name="MNI152 T1", colormap="gray", metadata={META_KEY: meta}, **transform
        )
        widget = InspectWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Inspect features", area="right")
        widget.add_model(models[0])
        if compare:
            widget.add_model(models[1], compare=True)
        wait(app, widget)
        # axial slice near the centre (world axis 0 = superior, in mm)
        viewer.dims.set_point(0, float(affine[2, 2] * 100 / mm + affine[2, 3]))
        viewer.reset_view()
        widget.region_combo.setCurrentIndex(widget.region_combo.findData(VISIBLE))
        return viewer, widget

    def run(widget, block, cam_class, top_k=4):
        widget.block_combo.setCurrentText(block)
        widget.class_combo.setCurrentText(cam_class)
        widget.topk_spin.setValue(top_k)
        widget.run()
        wait(app, widget)
        print(widget.status.text())
        return widget._results[0].features.model

    def grad_cam_shot(viewer, widget, filename):
        """Grad-CAM of white matter at enc2 over the image, with the dock and its plots."""
        name = run(widget, "enc2", "white matter")
        for layer in viewer.layers:
            layer.visible = layer.name == "MNI152 T1" or layer.name.startswith(f"grad-cam/{name}/")
        close_toasts(viewer)
        wait(app, widget)
        viewer.screenshot(path=str(SHOTS / filename), canvas_only=False, flash=False)
        return name

    SHOTS.mkdir(exist_ok=True)
    # 1. what a user sees first: the bundled default model, Grad-CAM of white matter
    viewer, widget = open_viewer([resolve_model_path(None)], compare=False, mm=1)
    name = grad_cam_shot(viewer, widget, "inspect.png")
    # 2. its PCA composite and five strongest channels of a shallow block, side by side
    run(widget, "enc1", "off", top_k=5)
    for layer in viewer.layers:
        layer.visible = layer.name.startswith(f"features/{name}/enc1/")
    viewer.grid.enabled = True
    viewer.grid.shape = (2, 3)
    viewer.reset_view()
    wait(app, widget)
    viewer.screenshot(path=str(SHOTS / "inspect_channels.png"), canvas_only=True, flash=False)
    viewer.close()
    # 3. plain vs SelfReg, same data, seed and budget: channel similarity per block
    if args.no_compare:
        return
    viewer, widget = open_viewer(train_models(args.models, args.iterations), compare=True, mm=2)
    name = grad_cam_shot(viewer, widget, "inspect_compare.png")
    viewer.close()
    print("wrote", *sorted(p.name for p in SHOTS.glob("inspect*.png")))


if __name__ == "__main__":
    main()
