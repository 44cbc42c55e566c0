"""Segment dock widget: one ``Predictor.iter_segment`` call in a napari thread worker.

The widget only gathers settings, runs the library generator in a worker (progress
bar, Cancel) and adds the result as a *new* Labels layer placed exactly over the
image, coloured and named from the model card. It never changes existing layers.
torch is imported in the worker thread, not when the widget is created.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHeaderView,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

if TYPE_CHECKING:
    import napari

from ..geometry import layer_ras_affine, layer_world_matrix
from ..settings import DEFAULTS, DEVICES, PRECISIONS
from ._common import (
    JobPanel,
    LayerPicker,
    ModelPicker,
    labels_colormap,
    layer_spacing,
    layer_transform,
    unwrap,
    user_error,
    warn,
)
from ._layout import WrappedLabel, scrolling_layout

EXTRAS = ("none", "uncertainty", "probabilities")
PREDICTION_KEY = "selfreg_prediction"  # labels metadata: the labels as predicted (uint8 copy)
MODEL_KEY = "selfreg_model"  # labels metadata: the model folder that predicted them
IMAGE_KEY = "selfreg_image"  # labels metadata: the name of the image layer segmented
SLICE_SCORES_KEY = "selfreg_slice_scores"  # labels metadata: per axis, uncertainty per slice
SOURCE_KEYS = ("selfreg_volume",)  # image metadata copied to the labels (affine, header)


def segment_job(
    image: Any,
    spacing: tuple[float, ...] | None,
    model_path: Path,
    options: dict[str, Any],
    affine: np.ndarray | None = None,
) -> Generator[Any, None, tuple[Any, Path, Any]]:
    """Worker body: build the predictor and run ``iter_segment`` on ``image``.

    ``affine`` is the layer's data-to-world matrix (a 3D volume is reoriented to the
    model's order and back).

    Returns:
        ``(card, model_path, SegmentationResult)``.
    """
    from ..inference import Predictor
    from ..jobs import Progress

    yield Progress(0, 0, "prepare", f"Loading model {model_path.name}…")
    predictor = Predictor(model_path, **options)
    result = yield from predictor.iter_segment(image, spacing=spacing, affine=affine)
    return predictor.card, model_path, result


def _device_summary() -> tuple[str, str]:
    from ..device import device_report

    report = device_report()
    lines = report.splitlines()
    short = [ln for ln in lines if ln.startswith(("CUDA:", "auto choice:"))]
    return " · ".join(short) or lines[-1], report


class SegmentWidget(QWidget):
    """Segment an image layer with a napari-selfreg model.

    Attributes:
        image_picker: the image layer to segment.
        model_picker: bundled / user / loaded model folders.
        job: progress bar, status and Cancel of the running segmentation.
        volumes: table of each class's voxels, volume and share of the last result.
        segmented: Qt signal with the new Labels layer after each run.
    """

    segmented = Signal(object)

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = viewer
        self.image_picker = LayerPicker(viewer, Image)
        self.model_picker = ModelPicker()
        self.model_info = WrappedLabel()
        self.device = QComboBox()
        self.device.addItems(DEVICES)
        self.device_line = WrappedLabel("checking devices…")
        self.precision = QComboBox()
        self.precision.addItems(PRECISIONS)
        self.precision.setToolTip("auto: bf16 on CPUs/GPUs with bf16 units, fp16 on older GPUs")
        self.tile = QSpinBox()
        self.tile.setRange(0, 1024)
        self.tile.setSingleStep(16)
        self.tile.setSpecialValueText("model default")
        self.tile.setToolTip("Sliding-window tile edge in voxels (smaller: less memory)")
        self.overlap = QDoubleSpinBox()
        self.overlap.setRange(0.0, 0.9)
        self.overlap.setSingleStep(0.05)
        self.overlap.setValue(DEFAULTS.overlap)
        self.overlap.setToolTip(
            "Share of a tile overlapping its neighbour (more: smoother, slower)"
        )
        self.extra = QComboBox()
        self.extra.addItems(EXTRAS)
        self.extra.setToolTip("Also add an uncertainty (entropy) or per-class probability layer")
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.job = JobPanel(viewer)
        self.job.lock_while_running(self.run_button)
        self.volumes = QTableWidget(0, 4)
        self.volumes.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.volumes.verticalHeader().setVisible(False)
        self.volumes.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.volumes.setVisible(False)
        self.copy_button = QPushButton("Copy table")
        self.copy_button.setToolTip("Copy the class volumes as tab-separated text (pastes into a spreadsheet)")  # fmt: skip
        self.copy_button.clicked.connect(self.copy_volumes)
        self.copy_button.setVisible(False)
        self._volumes_tsv = ""

        form = QFormLayout()
        form.addRow("Image", self.image_picker)
        form.addRow("Model", self.model_picker)
        form.addRow("", self.model_info)
        form.addRow("Device", self.device)
        form.addRow("", self.device_line)
        form.addRow("Precision", self.precision)
        form.addRow("Tile", self.tile)
        form.addRow("Overlap", self.overlap)
        form.addRow("Extra output", self.extra)
        box = scrolling_layout(self)
        box.addLayout(form)
        box.addWidget(self.run_button)
        box.addWidget(self.job)
        box.addWidget(self.volumes)
        box.addWidget(self.copy_button)
        box.addStretch(1)

        self.model_picker.changed.connect(self._show_model_info)
        self._show_model_info()
        self._pending: dict[str, Any] = {}
        self._device_checked = False
        QTimer.singleShot(0, self._check_device)  # after the dock is shown

    # ------------------------------------------------------------------ settings
    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``Predictor`` from the form."""
        extra = self.extra.currentText()
        return {
            "tile": self.tile.value() or None,
            "overlap": float(self.overlap.value()),
            "device": self.device.currentText(),
            "precision": self.precision.currentText(),
            "probabilities": extra == "probabilities",
            "uncertainty": extra == "uncertainty",
            "slice_scores": True,  # where to correct next (Fine-tune lists the slices)
        }

    def _show_model_info(self) -> None:
        path = self.model_picker.model_path()
        if path is None:
            self.model_info.setText("No model found: press Load… to add a model folder.")
            return
        from ..modelfile import read_card

        try:
            card = read_card(path)
        except ValueError as err:
            self.model_info.setText(str(err))
            return
        text = f"{card.architecture} · {len(card.class_names)} classes: " + ", ".join(
            card.class_names
        )
        if card.parent:
            text += f" · fine-tuned from {card.parent}"
        self.model_info.setText(text)

    def _check_device(self) -> None:
        """Fill the diagnostic line (imports torch, in the GUI thread: see ``_common``)."""
        if self._device_checked:
            return
        self._device_checked = True
        try:
            short, report = _device_summary()
        except Exception as err:  # noqa: BLE001 - a diagnostic must never break the widget
            short, report = f"device check failed: {err}", repr(err)
        try:
            self.device_line.setText(short)
            self.device_line.setToolTip(report)
        except RuntimeError:  # the widget was closed meanwhile
            pass

    # ------------------------------------------------------------------ run
    def run(self):
        """Segment the chosen image with the chosen model in a worker; returns the worker."""
        if self.job.refuse_if_busy("segmentation"):
            return None
        layer = self.image_picker.layer()
        if layer is None:
            user_error("Segment needs an image layer: open a volume or a sample first.")
            return None
        if layer.rgb:
            user_error(
                f"{layer.name!r} is an RGB image; Segment needs a grey-scale 2D image or "
                "3D volume."
            )
            return None
        model_path = self.model_picker.model_path()
        if model_path is None:
            user_error("Choose a model first (or press Load… to add a model folder).")
            return None
        data = layer.data[0] if layer.multiscale else layer.data
        self._pending = {
            "image": layer.name,
            "transform": layer_transform(layer),
            "metadata": {k: layer.metadata[k] for k in SOURCE_KEYS if k in layer.metadata},
        }
        spacing = layer_spacing(layer)
        self._note_unknown_orientation(layer, model_path, data.ndim)
        self._check_device()  # torch is imported here, in the GUI thread, before the worker
        return self.job.start(
            segment_job,
            data,
            spacing,
            model_path,
            self.options(),
            layer_ras_affine(layer) if data.ndim == 3 else None,
            on_return=self._add_result,
            watch=[layer],
            what="segmentation",
        )

    @staticmethod
    def _note_unknown_orientation(layer, model_path: Path, ndim: int) -> None:
        """Warn when a model that expects an orientation gets a volume without one (not
        opened by this plugin's reader from a medical format): its axes are taken as is."""
        from ..modelfile import read_card

        frame = (layer.metadata.get(SOURCE_KEYS[0]) or {}).get("frame")  # the reader's
        expected = read_card(model_path).orientation
        if ndim == 3 and expected and frame in (None, "RAS"):  # no file, or a TIFF stack
            warn(
                f"{layer.name!r} carries no patient orientation (it was not opened from a "
                f"NIfTI, DICOM or other medical file by this plugin), so its array axes are "
                f"taken as {expected}, the model's; if the labels look wrong, open the file "
                "with napari-selfreg's reader."
            )

    def _add_result(self, output: tuple[Any, Path, Any]) -> None:
        card, model_path, result = output
        labels = np.asarray(result.labels)
        names = list(card.class_names) if card else [f"class {i}" for i in range(labels.max() + 1)]
        colors = list(card.class_colors) if card else []
        model_name = card.name if card else model_path.name
        image_name = self._pending["image"]
        transform = self._pending["transform"]
        metadata = {
            **self._pending["metadata"],
            PREDICTION_KEY: labels.copy(),
            MODEL_KEY: str(model_path),
            IMAGE_KEY: image_name,
            "selfreg_class_names": names,
            "selfreg_class_colors": colors,
            "selfreg_info": dict(result.info),
        }
        if result.slice_scores is not None:
            metadata[SLICE_SCORES_KEY] = [np.asarray(s) for s in result.slice_scores]
        kwargs: dict[str, Any] = {
            "name": f"{image_name} [{model_name}]",
            "features": {"index": np.arange(len(names)), "class": names},
            "metadata": metadata,
            **transform,
        }
        if colors:
            kwargs["colormap"] = labels_colormap(colors)
        if result.uncertainty is not None:
            self.viewer.add_image(
                np.asarray(result.uncertainty),
                name=f"{image_name} [{model_name}] uncertainty",
                colormap="magma",
                contrast_limits=(0.0, 1.0),
                blending="additive",
                visible=True,
                **transform,
            )
        if result.probabilities is not None:
            probs = np.asarray(result.probabilities)
            for k, class_name in enumerate(names[1:], start=1):
                self.viewer.add_image(
                    probs[k],
                    name=f"{image_name} [{model_name}] p({class_name})",
                    colormap="gray",
                    contrast_limits=(0.0, 1.0),
                    blending="additive",
                    visible=False,
                    **transform,
                )
        layer = self.viewer.add_labels(labels, **kwargs)
        seconds = result.info.get("seconds")
        took = f" in {seconds:.1f} s" if isinstance(seconds, float | int) else ""
        self.job.status.setText(
            f"Added {layer.name!r}{took} on {result.info.get('device', '?')} "
            f"({result.info.get('precision', '?')})."
        )
        self.show_volumes(layer)
        self.segmented.emit(unwrap(layer))

    def show_volumes(self, layer) -> None:
        """Fill the table with the class volumes of a Labels layer (names from its metadata)."""
        from ..volumes import as_table, as_tsv, class_volumes

        data = np.asarray(layer.data)
        names = layer.metadata.get("selfreg_class_names") or ["background"]
        linear = layer_world_matrix(layer)[:-1, :-1]  # voxel -> world millimetres
        rows, unit = class_volumes(data, names, linear)
        table = as_table(rows, unit)
        self.volumes.setHorizontalHeaderLabels(table[0])
        self.volumes.setRowCount(len(table) - 1)
        for i, line in enumerate(table[1:]):
            for j, text in enumerate(line):
                item = QTableWidgetItem(text)
                if j:
                    item.setTextAlignment(
                        Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
                    )
                self.volumes.setItem(i, j, item)
        height = self.volumes.horizontalHeader().height() + sum(self.volumes.rowHeight(i) for i in range(len(rows)))  # fmt: skip
        self.volumes.setFixedHeight(height + 2 * self.volumes.frameWidth())
        self.volumes.setToolTip(f"Class volumes of {layer.name!r}")
        self._volumes_tsv = as_tsv(rows, unit)
        self.volumes.setVisible(True)
        self.copy_button.setVisible(True)

    def copy_volumes(self) -> str:
        """Put the class volume table on the clipboard; returns the text."""
        QApplication.clipboard().setText(self._volumes_tsv)
        self.job.status.setText("Copied the class volumes to the clipboard.")
        return self._volumes_tsv

    # ------------------------------------------------------------------ helpers for other widgets
    def segment_with(self, model_path: str | Path, image_layer=None):
        """Select ``model_path`` (and ``image_layer``) and run; used by Fine-tune's button."""
        self.model_picker.select(model_path)
        if image_layer is not None:
            self.image_picker.set_layer(image_layer)
        return self.run()
