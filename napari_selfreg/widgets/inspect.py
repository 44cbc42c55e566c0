"""Inspect features dock widget: block channels, PCA composite, redundancy plots, Grad-CAM.

A thin shell over :mod:`napari_selfreg.analysis`: it reads the choices and the
region from the viewer, runs ``analysis.iter_inspect`` in a ``thread_worker``
(progress, Cancel) and turns the result into aligned Image layers and
matplotlib plots. torch is imported only inside the worker threads.
"""

from __future__ import annotations

import threading
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from napari.layers import Image, Points, Shapes
from napari.qt.threading import create_worker
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QPushButton,
    QSpinBox,
    QWidget,
)

from .. import analysis
from ..geometry import layer_ras_affine, world_matrix
from ._common import JobPanel, LayerPicker, ModelPicker, user_error, warn
from ._layout import scrolling_layout

if TYPE_CHECKING:
    import napari

AROUND, VISIBLE, CENTRED = "around the current slice", "visible region", "centred patch"
AROUND_SIZE = {"in-plane": 128, "across": 32}  # voxels of the default region (3D models)
MAX_VOXELS = {2: 1024 * 1024, 3: 128**3}
BAR_STATS = [
    ("mean_abs_cos", "mean off-diagonal |cos|", False),
    ("ifd", "IFD", True),
    ("scr", "SCR vs final", True),
    ("effective_rank", "effective rank", False),
    ("decor", "decorrelation (ours; IFD raises |cos|)", True),
]


_LOAD_LOCK = threading.Lock()


def _load_model(path: str):
    """Worker body: one model load at a time (a model and a second model both load)."""
    from ..modelfile import load_model

    with _LOAD_LOCK:
        return load_model(path)


def _inspect_job(bundles, data, block, **kwargs):
    """Worker body: materialise the image (dask/zarr too), then run the analysis."""
    image = np.asarray(data)
    return (yield from analysis.iter_inspect(bundles, image, block, **kwargs))


class _Combo(QComboBox):
    """A combo box that refreshes its items right before it opens."""

    def __init__(self, refresh):
        super().__init__()
        self._refresh = refresh

    def showPopup(self):  # noqa: N802 (Qt name)
        self._refresh()
        super().showPopup()


class InspectWidget(QWidget):
    """Dock widget for the feature inspector (construct with the viewer only)."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self._bundles: dict[str, object] = {}
        self._loaders: dict[str, object] = {}
        # Model loaders can return after the dock is deleted (viewer closed):
        # their callbacks then must not touch Qt objects. The flag lives in a
        # plain dict so the destroyed handler does not reference the widget.
        alive = self._alive = {"widget": True}
        self.destroyed.connect(lambda *_: alive.update(widget=False))
        self._failed: dict[str, str] = {}
        self._results = None
        self._target: dict = {}

        self.image_picker = LayerPicker(viewer, Image)
        self.model_picker = ModelPicker()
        self.compare_picker = ModelPicker(none_label="(none)")
        self.block_combo = QComboBox()
        self.region_combo = _Combo(self._refresh_regions)
        self.topk_spin = QSpinBox()
        self.topk_spin.setRange(1, 32)
        self.topk_spin.setValue(4)
        self.class_combo = QComboBox()
        self.precision_combo = QComboBox()
        self.precision_combo.addItems(["fp32", "bf16"])
        self.precision_combo.setToolTip("bf16 is faster on CPUs with AMX/AVX-512 bf16")

        form = QFormLayout()
        form.addRow("image", self.image_picker)
        form.addRow("model", self.model_picker)
        form.addRow("compare with", self.compare_picker)
        form.addRow("block", self.block_combo)
        form.addRow("region", self.region_combo)
        form.addRow("top-k channels", self.topk_spin)
        form.addRow("Grad-CAM class", self.class_combo)
        form.addRow("precision", self.precision_combo)

        self.run_button = QPushButton("Run")
        self.job = JobPanel(viewer)
        self.job.lock_while_running(self.run_button)
        self.status = self.job.status  # model loading and refusals are reported there too

        self.figure = Figure(figsize=(4.0, 7.0), dpi=100, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(520)

        layout = scrolling_layout(self)
        layout.addLayout(form)
        layout.addWidget(self.run_button)
        layout.addWidget(self.job)
        layout.addWidget(self.canvas, stretch=1)

        self.run_button.clicked.connect(self.run)
        self.model_picker.changed.connect(self._on_model_changed)
        self.compare_picker.changed.connect(self._on_model_changed)
        self.block_combo.currentTextChanged.connect(self._on_block_changed)
        viewer.layers.events.inserted.connect(self._refresh_regions)
        viewer.layers.events.removed.connect(self._refresh_regions)
        self._refresh_regions()
        self._on_model_changed()

    # ------------------------------------------------------------ choices

    def _refresh_regions(self, *_):
        """Region choices: the visible region, a centred patch, boxes of Shapes/Points."""
        boxes = [
            (f"box of {ly.name}", ly.name)
            for ly in self.viewer.layers
            if isinstance(ly, Shapes | Points) and len(ly.data)
        ]
        _set_items(
            self.region_combo, [(AROUND, AROUND), (VISIBLE, VISIBLE), (CENTRED, CENTRED), *boxes]
        )

    def add_model(self, path: str | Path, compare: bool = False) -> None:
        """Add a model folder to the choices and select it (model, or second model)."""
        (self.compare_picker if compare else self.model_picker).select(path)

    def _on_model_changed(self, *_):
        for path in self._model_paths():
            if path not in self._bundles and path not in self._loaders:
                self._failed.pop(path, None)  # choosing it again retries
                _import_torch_here()
                worker = create_worker(_load_model, path, _ignore_errors=True)
                worker.returned.connect(lambda b, p=path: self._on_model_loaded(p, b))
                worker.errored.connect(lambda e, p=path: self._on_load_failed(p, e))
                self._loaders[path] = worker
                self.status.setText(f"loading {Path(path).name}...")
                worker.start()
        self._refresh_blocks()

    def _on_model_loaded(self, path, bundle):
        if not self._alive["widget"]:
            return
        self._loaders.pop(path, None)
        self._bundles[path] = bundle
        # say so only if nothing newer was said (a job's outcome stays on the line)
        if path in self._model_paths() and self.status.text().startswith("loading "):
            self.status.setText(f"model {bundle.card.name} ready")
        self._refresh_blocks()

    def _on_load_failed(self, path, err):
        if not self._alive["widget"]:
            return
        self._loaders.pop(path, None)
        self._failed[path] = f"cannot load model {Path(path).name}: {err}"
        self._refuse(self._failed[path])

    def _model_paths(self) -> list[str]:
        paths = [self.model_picker.model_path(), self.compare_picker.model_path()]
        return [str(p) for p in paths if p is not None]

    def _refresh_blocks(self):
        """Blocks and classes of the first model (once loaded)."""
        first = self.model_picker.model_path()
        bundle = self._bundles.get(str(first)) if first is not None else None
        if bundle is None:
            return
        blocks = [f.name for f in bundle.network.feature_info]
        keep = self.block_combo.currentText()
        _set_items(self.block_combo, [(b, b) for b in blocks])
        # the first encoder block shows anatomy at first click (the bottleneck is 1/16 scale)
        first = next((b for b in blocks if b.startswith("enc")), blocks[min(1, len(blocks) - 1)])
        default = keep if keep in blocks else first
        self.block_combo.setCurrentText(default)
        classes = [("off", "off"), ("all classes", None)]
        classes += [(n, i) for i, n in enumerate(bundle.card.class_names) if i > 0]
        keep = self.class_combo.currentText()
        _set_items(self.class_combo, classes)
        if self.class_combo.findText(keep) >= 0:
            self.class_combo.setCurrentText(keep)
        else:
            self.class_combo.setCurrentIndex(2 if len(classes) > 2 else 1)

    def _on_block_changed(self, block: str):
        if self._results and all(block in r.stats for r in self._results):
            self.draw_plots(self._results, block)

    # --------------------------------------------------------------- run

    def _refuse(self, text: str) -> None:
        """A user error before (or instead of) a job: status line and notification."""
        self.status.setText(text)
        user_error(text)

    def run(self):
        """Start the analysis in a worker thread; returns the worker or None."""
        if self.job.refuse_if_busy("feature inspection"):
            return None
        layer = self.image_picker.layer()
        if layer is None:
            return self._refuse("Add an image layer first: there is nothing to inspect.")
        if layer.rgb or layer.multiscale:
            kind = "RGB" if layer.rgb else "multiscale"
            return self._refuse(f"{kind} image {layer.name!r} cannot be inspected.")
        if layer.ndim not in (2, 3):
            return self._refuse(f"image {layer.name!r} is {layer.ndim}D; use 2D or 3D.")
        paths = self._model_paths()
        if not paths:
            return self._refuse("Choose a model first.")
        failed = [self._failed[p] for p in paths if p in self._failed]
        if failed:
            return self._refuse(failed[0])
        bundles = [self._bundles.get(p) for p in paths]
        if any(b is None for b in bundles):
            self.status.setText("The model is still loading; press Run again in a moment.")
            return None
        block = self.block_combo.currentText()
        sd = bundles[0].network.spatial_dims
        if sd == 3 and layer.ndim == 2:
            return self._refuse(
                f"model {bundles[0].card.name!r} is 3D and image {layer.name!r} is 2D."
            )
        try:
            region, shrunk = self._region(layer, bundles[0])
        except analysis.InspectError as err:
            return self._refuse(str(err))
        self._region_note = _describe_region(region, shrunk, layer.data.shape)
        cam_class = self.class_combo.currentData()
        self._target = {
            "name": layer.name,
            "scale": np.asarray(layer.scale, float),
            "translate": np.asarray(layer.translate, float),
            "rotate": np.asarray(layer.rotate),
            "shear": np.asarray(layer.shear),
            "affine": layer.affine.affine_matrix,
            "linear": world_matrix(layer.scale, None, layer.rotate, layer.shear)[:-1, :-1],
            "class_names": bundles[0].card.class_names,
            "block": block,
        }
        _import_torch_here()
        job = partial(
            _inspect_job,
            region=region,
            spacing=tuple(layer.scale),
            affine=layer_ras_affine(layer) if layer.ndim == 3 else None,
            top_k=self.topk_spin.value(),
            cam_class=None if cam_class == "off" else cam_class,
            cam=cam_class != "off",
            precision=self.precision_combo.currentText(),
        )
        return self.job.start(
            job, bundles, layer.data, block,
            on_return=self._on_returned, watch=[layer], keep_going=True,
            what="feature inspection",
        )  # fmt: skip

    def cancel(self) -> None:
        """Ask the running job to stop at its next step."""
        self.job.cancel()

    def _on_returned(self, results) -> None:
        self._results = results
        self.add_layers(results)
        self.draw_plots(results, self._target["block"])
        notes = [n for r in results for n in r.features.notes]
        notes += [n for r in results if r.cams for n in r.cams.notes]
        for note in dict.fromkeys(notes):
            warn(note)
        notes = [getattr(self, "_region_note", ""), *notes]
        self.status.setText("done: " + "; ".join(n for n in dict.fromkeys(notes) if n))

    def closeEvent(self, event):  # noqa: N802 (Qt name)
        """Stop the job and stop listening to the viewer."""
        self.cancel()
        self.viewer.layers.events.inserted.disconnect(self._refresh_regions)
        self.viewer.layers.events.removed.disconnect(self._refresh_regions)
        super().closeEvent(event)

    # ------------------------------------------------------------ region

    def _region(self, layer, bundle):
        """Region (tuple of slices) for the chosen mode and whether it was shrunk.

        Axes the view shows come from the camera (``corner_pixels``), the box
        layer or the image centre; the others from the current slice, widened
        to the model's patch (a 2D model on a 3D image gets one slice).
        """
        shape = layer.data.shape
        sd = bundle.network.spatial_dims
        patch = list(bundle.card.patch_size or [analysis.DEFAULT_PATCH[sd]] * sd)
        dims = self.viewer.dims
        offset = dims.ndim - layer.ndim
        displayed = [a - offset for a in dims.displayed if a >= offset]
        point = np.asarray(layer.world_to_data(dims.point), float)
        thin = None
        thickness = patch[-layer.ndim :]
        if sd == 2 and layer.ndim == 3:
            hidden = [a for a in range(3) if a not in displayed]
            thin = hidden[0] if hidden else 0
            displayed = [a for a in displayed if a != thin]
            thickness = [*patch[:thin], 1, *patch[thin:]]
        mode = self.region_combo.currentData()
        lo, hi = point.copy(), point.copy()
        if mode in (AROUND, None) and sd == 3:
            # a slab around the current slice (the nearest one of this image when the
            # slider is beyond it), centred on what the canvas shows
            point = np.clip(point, 0, np.asarray(shape) - 1)
            corners = np.asarray(layer.corner_pixels, float)
            size = [AROUND_SIZE["in-plane" if a in displayed else "across"] for a in range(layer.ndim)]  # fmt: skip
            for a in range(layer.ndim):
                centre = (corners[0, a] + corners[1, a]) / 2 if a in displayed and corners[1, a] > corners[0, a] else point[a]  # fmt: skip
                lo[a], hi[a] = centre - (size[a] - 1) / 2, centre + (size[a] - 1) / 2
        elif mode == CENTRED:
            for a in displayed if thin is not None else range(layer.ndim):
                lo[a] = hi[a] = (shape[a] - 1) / 2
        elif mode == VISIBLE or mode not in self.viewer.layers:
            corners = np.asarray(layer.corner_pixels, float)
            for a in displayed:
                drawn = corners[1, a] > corners[0, a]
                lo[a], hi[a] = (corners[0, a], corners[1, a]) if drawn else (0, shape[a] - 1)
        else:
            world = self.viewer.layers[mode].extent.world
            grid = np.meshgrid(*world.T, indexing="ij")
            data = np.array([layer.world_to_data(c) for c in np.reshape(grid, (len(grid), -1)).T])
            lo, hi = data.min(axis=0), data.max(axis=0)
            # keep the drawn extent; flat axes (a rectangle on one slice) get the patch
            thickness = [
                t if h - lo_ < 1 else 1 for t, lo_, h in zip(thickness, lo, hi, strict=True)
            ]
            if thin is not None:
                lo[thin] = hi[thin] = point[thin]
        region = analysis.box_region(lo, hi, shape, thickness)
        limited = analysis.limit_region(region, MAX_VOXELS[sd])
        return limited, limited != region

    # ----------------------------------------------------------- outputs

    def _place(self, name, data, origin, reduction, **kwargs):
        """Add (or replace) an Image layer aligned with the inspected image."""
        t = self._target
        scale, translate = analysis.block_placement(
            origin, reduction, t["scale"], t["translate"], t["linear"]
        )
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        return self.viewer.add_image(
            data,
            name=name,
            scale=scale,
            translate=translate,
            rotate=t["rotate"],
            shear=t["shear"],
            affine=t["affine"],
            **kwargs,
        )

    def add_layers(self, results) -> None:
        """Top-k channel layers, the PCA composite and the Grad-CAM map of the chosen block."""
        block = self._target["block"]
        for res in results:
            fs, model = res.features, res.features.model
            red = fs.reductions[block]
            feature = fs.features[block]
            for rank, c in enumerate(res.top):
                lo, hi = np.percentile(feature[c], [1, 99.5])
                self._place(
                    f"features/{model}/{block}/ch{c}",
                    feature[c],
                    fs.origin,
                    red,
                    colormap="magma",
                    contrast_limits=(float(lo), float(max(hi, lo + 1e-6))),
                    visible=rank == 0 and res is results[0],
                    metadata={"energy_rank": rank, "channel": int(c)},
                )
            self._place(
                f"features/{model}/{block}/PCA",
                res.pca,
                fs.origin,
                red,
                rgb=True,
                opacity=0.7,
                visible=res is results[0],
            )
            if res.cams is not None:
                ci = res.cams.class_index
                names = self._target["class_names"]
                label = "all" if ci is None else names[ci] if ci < len(names) else str(ci)
                self._place(
                    f"grad-cam/{model}/{block}/class {label}",
                    res.cams.maps[block],
                    res.cams.origin,
                    1,
                    colormap="turbo",
                    blending="additive",
                    opacity=0.5,
                    contrast_limits=(0.0, 1.0),
                    visible=res is results[0],
                )
        if self._target["name"] in self.viewer.layers:
            self.viewer.layers.selection.active = self.viewer.layers[self._target["name"]]

    def draw_plots(self, results, block: str) -> None:
        """Cosine-similarity heatmap(s) of ``block`` and per-block bar charts."""
        fig = self.figure
        fig.clear()
        rows = 1 + (len(BAR_STATS) + 1) // 2
        grid = fig.add_gridspec(rows, 2, height_ratios=[1.4] + [1] * (rows - 1))
        n = len(results)
        for i, res in enumerate(results):
            ax = fig.add_subplot(grid[0, i] if n == 2 else grid[0, :])
            im = ax.imshow(res.stats[block].similarity, vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{res.features.model}\n{block}: |cos|", fontsize=8)
            ax.tick_params(labelsize=6)
            ax.set_xlabel("channel", fontsize=7)
        fig.colorbar(im, ax=fig.axes[:n], shrink=0.8).ax.tick_params(labelsize=6)
        blocks = list(results[0].stats)
        x = np.arange(len(blocks))
        width = 0.8 / n
        for j, (key, title, log) in enumerate(BAR_STATS):
            ax = fig.add_subplot(grid[1 + j // 2, j % 2])
            for i, res in enumerate(results):
                values = [getattr(res.stats[b], key) if b in res.stats else np.nan for b in blocks]
                ax.bar(x + (i - (n - 1) / 2) * width, values, width, label=res.features.model)
            ax.set_title(title, fontsize=8)
            ax.set_xticks(x, blocks, rotation=90, fontsize=6)
            ax.tick_params(axis="y", labelsize=6)
            shown = np.array([getattr(s, key) for r in results for s in r.stats.values()])
            shown = shown[np.isfinite(shown) & (shown > 0)]
            if log and shown.size and shown.max() > 20 * shown.min():
                ax.set_yscale("log")
                ax.yaxis.set_minor_formatter(NullFormatter())  # powers of ten only: legible
            for tick in ax.get_xticklabels():
                if tick.get_text() == block:
                    tick.set_fontweight("bold")
        if n == 2:
            handles, labels = fig.axes[-1].get_legend_handles_labels()
            fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=7)
        self.canvas.draw_idle()


def _set_items(combo: QComboBox, items) -> None:
    """Replace a combo's (label, data) items, keeping the current choice when it remains."""
    current = combo.currentData()
    if [(combo.itemText(i), combo.itemData(i)) for i in range(combo.count())] == list(items):
        return
    combo.blockSignals(True)
    combo.clear()
    for label, data in items:
        combo.addItem(label, data)
    index = combo.findData(current)
    combo.setCurrentIndex(index if index >= 0 else 0)
    combo.blockSignals(False)
    if combo.currentData() != current:
        combo.currentIndexChanged.emit(combo.currentIndex())


def _import_torch_here() -> None:
    """Import torch in the GUI thread before a worker needs it.

    Two threads importing torch for the first time at once can break its
    operator registry; importing here first makes the workers' imports no-ops.
    """
    import torch  # noqa: F401


def _describe_region(region, shrunk: bool, shape) -> str:
    """A plain note on the region inspected, e.g. ``region 128 x 128 x 32 voxels at 40-168, ...``."""
    size = " x ".join(str(r.stop - r.start) for r in region)
    where = ", ".join(f"{r.start}-{r.stop - 1}" for r in region)
    note = f"region {size} voxels (array indices {where} of {' x '.join(map(str, shape))})"
    return note + (", reduced to keep the computation small" if shrunk else "")
