"""Screenshots of the Inspect features widget: ``docs/screenshots/inspect*.png``.

Run from the repository root (about two minutes on two CPU cores)::

    xvfb-run -a .venv/bin/python docs/make_screenshots_inspect.py

Data: the MNI152 2009 T1 template at 2 mm (nilearn's bundled copy). Models: the
bundled default model when this copy of napari-selfreg has one; otherwise two small
3D UNets (channels 8-16-32-64) trained here for ``--iterations`` steps on the same
template's grey/white-matter labels with ``napari_selfreg.training``: one plain
(lambda_scr = lambda_ifd = 0) and one self-regularised (0.015 each), same seed.
They are cached in ``--models`` so reruns only redraw. A short run like this shows
how the inspector looks, not how much SelfReg changes a fully trained network.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

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


def wait(app, widget, timeout: float = 600) -> None:
    """Process Qt events until the widget's job (or model loading) is over."""
    end = time.time() + timeout
    while (widget._worker is not None or widget._loaders) and time.time() < end:
        app.processEvents()
        time.sleep(0.02)
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--models", type=Path, default=Path("/tmp/napari-selfreg-screenshots"))
    args = parser.parse_args()
    os.environ.setdefault("NAPARI_SELFREG_HOME", str(args.models))

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_selfreg.data import load_mni152
    from napari_selfreg.modelfile import ModelFileError, resolve_model_path
    from napari_selfreg.widgets.inspect import VISIBLE, InspectWidget

    torch.set_num_threads(2)
    try:
        models = [resolve_model_path(None)]
        print("using the bundled default model")
    except ModelFileError:
        models = train_models(args.models, args.iterations)
        print("no bundled model: using two briefly trained tiny models")

    image, _labels, affine = load_mni152(2)
    viewer = napari.Viewer(show=True, title="napari-selfreg: Inspect features")
    viewer.window.set_geometry(0, 0, 1700, 1050)
    viewer.add_image(image, name="MNI152 T1", scale=np.diag(affine)[:3], colormap="gray")
    widget = InspectWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Inspect features", area="right")
    app = QApplication.instance()
    widget.add_model(models[0])
    if len(models) > 1:
        widget.add_model(models[1], compare=True)
    wait(app, widget)
    # axial slice near the centre, anterior up, patient's left on the right (radiological)
    viewer.dims.order = (2, 1, 0)
    viewer.dims.set_point(2, float(np.diag(affine)[2] * 50))
    viewer.camera.orientation2d = ("up", "right")
    viewer.reset_view()
    widget.region_combo.setCurrentIndex(widget.region_combo.findData(VISIBLE))
    widget.block_combo.setCurrentText("enc2")
    widget.class_combo.setCurrentText("white matter")
    widget.run()
    wait(app, widget)
    print(widget.status.text())

    SHOTS.mkdir(exist_ok=True)
    name = widget._results[0].features.model
    for layer in viewer.layers:
        layer.visible = layer.name == "MNI152 T1" or layer.name.startswith(f"grad-cam/{name}/")
    viewer.screenshot(path=str(SHOTS / "inspect.png"), canvas_only=False, flash=False)

    # PCA composite and the five strongest channels of a shallower block, side by side
    widget.block_combo.setCurrentText("enc1")
    widget.topk_spin.setValue(5)
    widget.class_combo.setCurrentText("off")
    widget.run()
    wait(app, widget)
    for layer in viewer.layers:
        layer.visible = layer.name.startswith(f"features/{name}/enc1/")
    viewer.grid.enabled = True
    viewer.grid.shape = (2, 3)
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    viewer.screenshot(path=str(SHOTS / "inspect_channels.png"), canvas_only=True, flash=False)
    print("wrote", *sorted(p.name for p in SHOTS.glob("inspect*.png")))
    viewer.close()


if __name__ == "__main__":
    main()
