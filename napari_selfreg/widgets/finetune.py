"""Fine-tune dock widget: one ``training.iter_finetune`` call in a napari thread worker.

Two ways to teach the model:

* **Corrections**: the labels Segment made, corrected with napari's brush. A slice
  you painted on, in the plane you painted in, counts as reviewed in full
  (including what you left as it was); the rest of the volume is unknown and the
  model does not learn from it.
* **Scribbles**: a new, empty labels layer ("New scribble layer"): strokes of each
  class, and background painted with label 255; unpainted voxels are unknown.

The widget passes *copies* of image and labels to the training code (your layer is
never modified), draws the loss and the Dice on the reviewed voxels live, and saves
a new model version. Rounds: "Segment with new model" re-segments the image; the new
labels layer keeps what you reviewed in earlier rounds (and your corrections there
still count as corrections, so a round does not unlearn them), and the widget lists the
chain of versions with each round's Dice. "Check next" lists the slices where the
model is least sure (its uncertainty, summed per slice along the current view's axis);
a click goes there.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QSpinBox,
    QWidget,
)

if TYPE_CHECKING:
    import napari

from ..device import resolve_device
from ..training.config import (
    LATER_ROUND_UNREVIEWED_WEIGHT,
    SCRIBBLE_BACKGROUND,
    FinetuneConfig,
    finetune_iterations_text,
)
from ._common import (
    JobPanel,
    LayerPicker,
    ModelPicker,
    announce_model,
    labels_colormap,
    layer_transform,
    unwrap,
    user_error,
)
from ._curves import Curves, mean_foreground_dice
from ._layout import WrappedLabel, scrolling_layout
from .segment import IMAGE_KEY, MODEL_KEY, PREDICTION_KEY, SLICE_SCORES_KEY

FREEZE = ("none", "encoder", "stage:1", "stage:2", "stage:3")
MODES = ("corrections", "scribbles")
REVIEWED_KEY = "selfreg_reviewed"  # labels metadata: review map of the rounds so far (uint8)
PAINT_AXES_KEY = "selfreg_paint_axes"  # labels metadata: array axes painted along
PAINT_SLICES_KEY = "selfreg_paint_slices"  # labels metadata: {axis: slices painted on}
SCRIBBLES_KEY = "selfreg_scribbles"  # labels metadata: True for a scribble layer
SCRIBBLE_GREY = "#9a9a9a"
_TARGET = Qt.ItemDataRole.UserRole  # list item data: (axis, slice index)


def finetune_job(
    model_path: Path,
    image: np.ndarray,
    labels: np.ndarray,
    changed: np.ndarray | None,
    settings: dict[str, Any],
    options: dict[str, Any],
) -> Generator[Any, None, tuple[Path, np.ndarray]]:
    """Worker body: run ``iter_finetune`` on copies; returns the new model folder and the
    review map of the rounds so far (0 unknown, 1 reviewed, 2 corrected)."""
    from ..training.finetune import iter_finetune

    reviewed: list[np.ndarray] = []
    result = yield from iter_finetune(
        model_path, image, labels, changed_mask=changed, config=FinetuneConfig(**settings),
        on_reviewed=reviewed.append, **options,
    )  # fmt: skip
    return Path(result), reviewed[0]


class FinetuneWidget(QWidget):
    """Fine-tune a model on the labels the user corrected or scribbled.

    Attributes:
        image_picker, labels_picker: the image and the corrected labels / scribbles.
        mode: ``corrections`` or ``scribbles``.
        model_picker: the model to start from (the one that predicted the labels).
        job: progress bar, status and Cancel of the running fine-tuning.
        curves: the live loss / validation-Dice plot.
        next_slices: the slices to check next (click to go there).
        rounds: one line per finished round (model, parent, Dice).
        new_model: the folder of the last model this widget saved, or None.
        trained: Qt signal with the new model folder (``str``).
    """

    trained = Signal(str)

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = viewer
        self.new_model: Path | None = None
        self.round_lines: list[str] = []
        defaults = FinetuneConfig()
        self.image_picker = LayerPicker(viewer, Image)
        self.labels_picker = LayerPicker(viewer, Labels)
        self.mode = QComboBox()
        self.mode.addItems(MODES)
        self.mode.setToolTip(
            "corrections: slices you painted on are truth, the rest is unknown; "
            f"scribbles: only painted voxels are known, background is label {SCRIBBLE_BACKGROUND}"
        )
        self.scribble_button = QPushButton("New scribble layer")
        self.scribble_button.clicked.connect(self.new_scribble_layer)
        self.brush = QComboBox()
        self.brush.setToolTip("The label the brush paints in the labels layer")
        self.brush.activated.connect(self._set_brush)
        self.changed_line = WrappedLabel()
        self.model_picker = ModelPicker()
        self.new_classes = QLineEdit()
        self.new_classes.setPlaceholderText("names of new label values, e.g. scalp, lesion")
        self.new_classes.setToolTip(
            "Label values the model does not know become new classes with these names"
        )
        self.iterations = QSpinBox()
        self.iterations.setRange(1, 100_000)
        self.iterations.setValue(defaults.iterations_for(resolve_device("auto").type))
        self.iterations.setToolTip(
            f"Optimiser steps of the round; the default fits about a minute: {finetune_iterations_text()}"
        )
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(5)
        self.lr.setRange(1e-5, 1.0)
        self.lr.setSingleStep(1e-4)
        self.lr.setValue(defaults.learning_rate)
        self.lr.setToolTip(
            f"Learning rate; set to the mode's default when the mode changes "
            f"(corrections {defaults.default_lr(False):g}, scribbles {defaults.default_lr(True):g})"
        )
        self.lambda_scr = QDoubleSpinBox()
        self.lambda_ifd = QDoubleSpinBox()
        for spin, value in ((self.lambda_scr, defaults.lambda_scr), (self.lambda_ifd, defaults.lambda_ifd)):  # fmt: skip
            spin.setDecimals(3)
            spin.setRange(0.0, 1.0)
            spin.setSingleStep(0.005)
            spin.setValue(value)
        self.lambda_scr.setToolTip("SelfReg SCR weight (0: off); 0.015 in the paper")
        self.lambda_ifd.setToolTip(
            "SelfReg IFD weight (0: off); 0.015 in the paper, where it makes the channels of each block alike"
        )
        self.freeze = QComboBox()
        self.freeze.addItems(FREEZE)
        self.freeze.setCurrentText(defaults.freeze)
        self.freeze.setToolTip(
            "none: train everything; encoder: train the decoder only; "
            "stage:k: train encoder blocks from the k-th on"
        )
        self.corrected_weight = QDoubleSpinBox()
        self.corrected_weight.setRange(1.0, 100.0)
        self.corrected_weight.setValue(defaults.corrected_weight)
        self.corrected_weight.setToolTip(
            "Loss weight of the voxels you corrected (other reviewed voxels: 1; unreviewed: 0 "
            f"in a first round, {LATER_ROUND_UNREVIEWED_WEIGHT:g} in later rounds)"
        )
        self.seconds = QSpinBox()
        self.seconds.setRange(0, 24 * 3600)
        self.seconds.setValue(int(defaults.seconds_budget or 0))
        self.seconds.setSpecialValueText("no limit")
        self.seconds.setSuffix(" s")
        self.augment = QCheckBox("augment")
        self.augment.setChecked(defaults.augment)
        self.run_button = QPushButton("Fine-tune")
        self.run_button.clicked.connect(self.run)
        self.job = JobPanel(viewer)
        self.curves = Curves()
        self.result_line = WrappedLabel()
        self.rounds = WrappedLabel()
        self.segment_button = QPushButton("Segment with new model")
        self.segment_button.setEnabled(False)
        self.segment_button.clicked.connect(self.segment_with_new_model)
        self.next_slices = QListWidget()
        self.next_slices.setMaximumHeight(110)
        self.next_slices.itemClicked.connect(self._go_to_slice)
        self.job.lock_while_running(self.run_button, self.segment_button)
        self.job.finished.connect(
            lambda: self.segment_button.setEnabled(self.new_model is not None)
        )

        form = QFormLayout()
        form.addRow("Image", self.image_picker)
        form.addRow("Labels", self.labels_picker)
        form.addRow("Teach with", self.mode)
        form.addRow("", self.scribble_button)
        form.addRow("Brush", self.brush)
        form.addRow("", self.changed_line)
        form.addRow("Start from", self.model_picker)
        form.addRow("New classes", self.new_classes)
        form.addRow("Iterations", self.iterations)
        form.addRow("Learning rate", self.lr)
        form.addRow("λ SCR", self.lambda_scr)
        form.addRow("λ IFD", self.lambda_ifd)
        form.addRow("Freeze", self.freeze)
        form.addRow("Corrected weight", self.corrected_weight)
        form.addRow("Time limit", self.seconds)
        form.addRow("", self.augment)
        box = scrolling_layout(self)
        box.addLayout(form)
        box.addWidget(self.run_button)
        box.addWidget(self.job)
        box.addWidget(self.curves)
        box.addWidget(self.result_line)
        box.addWidget(self.rounds)
        box.addWidget(self.segment_button)
        check_next = QLabel("Check next (least sure slices along the current view):")
        check_next.setWordWrap(True)
        box.addWidget(check_next)
        box.addWidget(self.next_slices)
        box.addStretch(1)

        self._watched = None
        self._carry: dict[str, Any] | None = None
        self.labels_picker.changed.connect(self._on_labels_changed)
        self.mode.currentTextChanged.connect(lambda _: self._count_changes())
        self.mode.currentTextChanged.connect(
            lambda text: self.lr.setValue(FinetuneConfig.default_lr(text == "scribbles"))
        )
        self.mode.currentTextChanged.connect(lambda _: self._fill_brush())
        self.model_picker.changed.connect(self._fill_brush)
        self.viewer.dims.events.order.connect(self.update_next_slices)
        self.viewer.dims.events.ndisplay.connect(self.update_next_slices)
        self.viewer.layers.events.inserted.connect(self._follow_new_result)
        self._on_labels_changed()

    def _follow_new_result(self, event) -> None:
        """A new Segment result is the labels to correct next: choose it and its image."""
        layer = unwrap(event.value)
        if not isinstance(layer, Labels) or PREDICTION_KEY not in layer.metadata:
            return
        self.labels_picker.set_layer(layer)
        self.mode.setCurrentText("corrections")
        for image in self.viewer.layers:
            if isinstance(image, Image) and image.name == layer.metadata.get(IMAGE_KEY):
                self.image_picker.set_layer(image)

    # ------------------------------------------------------------------ the labels
    def changed_mask(self) -> np.ndarray | None:
        """Voxels whose label differs from the prediction, or None when none is known."""
        layer = self.labels_picker.layer()
        if layer is None:
            return None
        prediction = layer.metadata.get(PREDICTION_KEY)
        if prediction is None or np.shape(prediction) != np.shape(layer.data):
            return None
        return np.asarray(layer.data) != prediction

    def view_axis(self, layer=None) -> int | None:
        """The layer's array axis the current 2D view slices along (None in 3D view)."""
        layer = layer or self.labels_picker.layer()
        dims = self.viewer.dims
        if layer is None or dims.ndisplay != 2 or layer.ndim != 3:
            return None
        axis = dims.not_displayed[-1] - (dims.ndim - layer.ndim)
        return int(axis) if 0 <= axis < 3 else None

    def _on_labels_changed(self) -> None:
        layer = self.labels_picker.layer()
        if self._watched is not None:
            for event in (self._watched.events.paint, self._watched.events.data):
                event.disconnect(self._on_paint)
        self._watched = layer
        if layer is not None:
            layer.events.paint.connect(self._on_paint)
            layer.events.data.connect(self._on_paint)
            if layer.metadata.get(SCRIBBLES_KEY):
                self.mode.setCurrentText("scribbles")
            model = layer.metadata.get(MODEL_KEY)
            if model and Path(model).is_dir():
                self.model_picker.select(model)
        self._fill_brush()
        self._count_changes()
        self.update_next_slices()

    def _on_paint(self, event=None) -> None:
        """Record the plane of a brush stroke: the slice painted on counts as reviewed."""
        layer = self.labels_picker.layer()
        axis = self.view_axis(layer)
        if layer is not None and axis is not None and getattr(event, "type", "") == "paint":
            axes = set(layer.metadata.get(PAINT_AXES_KEY, []))
            layer.metadata[PAINT_AXES_KEY] = sorted(axes | {axis})
            # the array slice under the slider (a slider step is not an index: axes may run
            # backwards, as the reader's display frame does, or be scaled)
            index = int(np.round(layer.world_to_data(self.viewer.dims.point)[axis]))
            slices = layer.metadata.setdefault(PAINT_SLICES_KEY, {})
            slices[axis] = sorted(set(slices.get(axis, [])) | {index})
        self._count_changes()

    def review_map(self, layer) -> np.ndarray | None:
        """The review map of earlier rounds (their corrections kept) plus every slice
        painted on, as reviewed (None: none)."""
        known = layer.metadata.get(REVIEWED_KEY)
        slices = layer.metadata.get(PAINT_SLICES_KEY, {})
        if known is None and not slices:
            return None
        review = np.zeros(np.shape(layer.data), np.uint8) if known is None else np.array(known, np.uint8)  # fmt: skip
        for axis, indices in slices.items():
            index = [slice(None)] * review.ndim
            index[int(axis)] = [i for i in indices if 0 <= i < review.shape[int(axis)]]
            review[tuple(index)] = np.maximum(review[tuple(index)], 1)
        return review

    def _count_changes(self) -> None:
        layer = self.labels_picker.layer()
        scribbles = self.mode.currentText() == "scribbles"
        self.scribble_button.setVisible(scribbles)
        if layer is None:
            self.changed_line.setText(
                "Scribbles: press 'New scribble layer' and paint."
                if scribbles
                else "Segment an image first, correct its labels, then fine-tune."
            )
            return
        if scribbles:
            n = int(np.count_nonzero(layer.data))
            self.changed_line.setText(
                f"{n:,} voxels painted. Unpainted voxels are unknown; paint background with "
                f"label {SCRIBBLE_BACKGROUND} (brush 'background')."
            )
            return
        mask = self.changed_mask()
        reviewed = layer.metadata.get(REVIEWED_KEY)
        earlier = "" if reviewed is None else f" {np.count_nonzero(reviewed):,} voxels reviewed in earlier rounds stay truth, and their corrections keep their weight; the rest keeps this layer's labels at weight {LATER_ROUND_UNREVIEWED_WEIGHT:g}."  # fmt: skip
        if mask is None:
            self.changed_line.setText(
                "No prediction is stored with these labels: the corrected voxels will be "
                "found by predicting with the base model." + earlier
            )
            return
        n = int(mask.sum())
        axis = self.view_axis(layer)
        planes = "."
        if n and axis is not None:
            count = np.unique(np.nonzero(mask)[axis]).size
            planes = f" in {count} slice(s) along axis {axis}; those slices count as reviewed, the rest is unknown."  # fmt: skip
        self.changed_line.setText(f"{n:,} voxels corrected since the prediction{planes}{earlier}")

    def _class_names(self) -> list[str]:
        from ..modelfile import read_card

        path = self.model_picker.model_path()
        try:
            return list(read_card(path).class_names) if path else []
        except ValueError:
            return []

    def _fill_brush(self) -> None:
        self.brush.clear()
        names = self._class_names()
        if self.mode.currentText() == "scribbles":
            self.brush.addItem(f"background ({SCRIBBLE_BACKGROUND})", SCRIBBLE_BACKGROUND)
        for i, name in enumerate(names[1:], start=1):
            self.brush.addItem(f"{name} ({i})", i)
        self.brush.addItem(f"new class ({max(len(names), 1)})", max(len(names), 1))

    def _set_brush(self, index: int) -> None:
        layer = self.labels_picker.layer()
        value = self.brush.itemData(index)
        if layer is not None and value is not None:
            layer.selected_label = int(value)
            layer.mode = "paint"

    def new_scribble_layer(self):
        """An empty labels layer over the chosen image, coloured by class (background grey)."""
        image = self.image_picker.layer()
        if image is None:
            user_error("Open an image first: scribbles are painted over an image.")
            return None
        from ..modelfile import DEFAULT_COLORS, colors_after, read_card

        path = self.model_picker.model_path()
        colors = list(read_card(path).class_colors) if path else DEFAULT_COLORS[:1]
        colors += colors_after(colors, SCRIBBLE_BACKGROUND - len(colors))
        shape = image.data[0].shape if image.multiscale else image.data.shape
        layer = self.viewer.add_labels(
            np.zeros(shape, np.uint8), name=f"{image.name} scribbles",
            metadata={SCRIBBLES_KEY: True}, **layer_transform(image),
        )  # fmt: skip
        layer.colormap = labels_colormap([*colors, SCRIBBLE_GREY])
        self.mode.setCurrentText("scribbles")
        self.labels_picker.set_layer(layer)
        self._set_brush(0)
        return unwrap(layer)

    # ------------------------------------------------------------------ check next
    def update_next_slices(self, event=None) -> None:
        """List the least sure slices along the current view's axis, not yet reviewed."""
        from ..review import rank_slices, reviewed_slices, suggestion_spacing

        self.next_slices.clear()
        layer = self.labels_picker.layer()
        axis = self.view_axis(layer)
        scores = None if layer is None else layer.metadata.get(SLICE_SCORES_KEY)
        if axis is None or scores is None:
            self.next_slices.addItem("(segment a volume and view it in 2D)")
            return
        done = reviewed_slices(layer.metadata.get(REVIEWED_KEY), axis)
        spacing = suggestion_spacing(len(scores[axis]))
        for index, score in rank_slices(scores[axis], exclude=done, top=8, spacing=spacing):
            self.next_slices.addItem(f"slice {index} along axis {axis}  (uncertainty {score:.2f})")
            self.next_slices.item(self.next_slices.count() - 1).setData(_TARGET, (axis, index))

    def _go_to_slice(self, item) -> None:
        target = item.data(_TARGET)
        layer = self.labels_picker.layer()
        if not target or layer is None:
            return
        axis, index = target
        dims = self.viewer.dims  # the world position of that array slice (see _on_paint)
        point = np.asarray(layer.world_to_data(dims.point), float)
        point[axis] = index
        dims.set_point(axis + dims.ndim - layer.ndim, float(layer.data_to_world(point)[axis]))

    # ------------------------------------------------------------------ run
    def settings(self) -> dict[str, Any]:
        """Keyword arguments for ``FinetuneConfig`` from the form."""
        names = [n.strip() for n in self.new_classes.text().split(",") if n.strip()]
        return {
            "iterations": int(self.iterations.value()),
            "lr": float(self.lr.value()),
            "lambda_scr": float(self.lambda_scr.value()),
            "lambda_ifd": float(self.lambda_ifd.value()),
            "freeze": self.freeze.currentText(),
            "corrected_weight": float(self.corrected_weight.value()),
            "seconds_budget": float(self.seconds.value()) or None,
            "augment": self.augment.isChecked(),
            "sparse": self.mode.currentText() == "scribbles",
            "extend_classes": True,
            "new_class_names": names or None,
        }

    def run(self):
        """Fine-tune on copies of the chosen image and labels in a worker; returns the worker."""
        from ..geometry import layer_ras_affine

        if self.job.refuse_if_busy("fine-tuning"):
            return None
        image_layer = self.image_picker.layer()
        labels_layer = self.labels_picker.layer()
        if image_layer is None:
            user_error("Fine-tune needs an image layer: open a volume or a sample first.")
            return None
        if labels_layer is None:
            user_error("Fine-tune needs a labels layer: run Segment and correct it, or add scribbles.")  # fmt: skip
            return None
        if image_layer.rgb:
            user_error(
                f"{image_layer.name!r} is an RGB image; fine-tuning needs a grey-scale volume."
            )
            return None
        image = image_layer.data[0] if image_layer.multiscale else image_layer.data
        labels = labels_layer.data[0] if labels_layer.multiscale else labels_layer.data
        if tuple(np.shape(labels)) != tuple(np.shape(image)):
            user_error(
                f"Labels {labels_layer.name!r} have shape {tuple(np.shape(labels))} but image "
                f"{image_layer.name!r} has shape {tuple(np.shape(image))}; pick the labels "
                "of this image."
            )
            return None
        model_path = self.model_picker.model_path()
        if model_path is None:
            user_error("Choose the model to start from (or press Load… to add one).")
            return None
        settings = self.settings()
        axes = labels_layer.metadata.get(PAINT_AXES_KEY, [])
        options = {
            "reviewed": None if settings["sparse"] else self.review_map(labels_layer),
            "review_axis": axes[0] if len(axes) == 1 else self.view_axis(labels_layer),
            "affine": layer_ras_affine(image_layer) if np.ndim(image) == 3 else None,
        }
        changed = None if settings["sparse"] else self.changed_mask()
        import napari_selfreg.training.finetune  # noqa: F401 - torch in the GUI thread first

        self.curves.clear()
        self.result_line.setText("")
        self._image_layer, self._labels_layer = image_layer, labels_layer
        return self.job.start(
            finetune_job,
            model_path,
            np.array(image, copy=True),
            np.array(labels, copy=True),
            changed,
            settings,
            options,
            on_return=self._on_trained,
            on_yield=self.curves.add,
            watch=[image_layer, labels_layer],
            keep_going=True,
            what="fine-tuning",
        )

    def _on_trained(self, output: tuple[Path, np.ndarray]) -> None:
        path, reviewed = output
        self.new_model = Path(path)
        announce_model(self.new_model)
        from ..modelfile import model_lineage, read_card
        from ..training.metrics import lowered, unlearnt

        labels = getattr(self, "_labels_layer", None)
        if labels is not None and labels in self.viewer.layers:
            labels.metadata[REVIEWED_KEY] = reviewed
            labels.metadata.pop(PAINT_SLICES_KEY, None)  # now part of the reviewed voxels
        card = read_card(self.new_model)
        metrics = card.metrics or {}
        dice = metrics.get("dice") or metrics.get("patch_dice")  # fine-tuning: patches
        score = mean_foreground_dice(dice) if isinstance(dice, dict) else None
        parent = Path(card.parent).name if card.parent else "?"
        text = f"Saved {card.name} (fine-tuned from {parent})"
        base = metrics.get("base_patch_mean_dice")
        if score is not None:
            text += f", Dice {score:.3f} on the voxels you reviewed (sampled patches"
            text += f"; the base model {base:.3f})" if isinstance(base, float) else ")"
            if lowered(metrics):
                text += ". Lower than before the round: lower the Learning rate and run it again"
        low = unlearnt(dice) if isinstance(dice, dict) else []
        if low:
            text += (
                f". Not learnt yet on the voxels you reviewed: {', '.join(low)}. Raise "
                "Iterations and fine-tune again, or run another round from the new model"
            )
        self.result_line.setText(text + ". Segment lists it now.")
        self.result_line.setToolTip(str(self.new_model))
        seconds, steps = card.training.get("seconds"), card.training.get("iterations_done")
        took = f", {steps} steps" if isinstance(steps, int) else ""
        took += f", {seconds:.0f} s of training" if isinstance(seconds, float | int) else ""
        measure = f"Dice {score:.3f} on reviewed voxels" if score is not None else "no Dice"
        self.round_lines.append(f"{len(self.round_lines) + 1}. {card.name}: {measure}{took}")
        chain = " → ".join(model_lineage(self.new_model))
        self.rounds.setText("Rounds:\n" + "\n".join(self.round_lines) + f"\nVersions: {chain}")
        self.segment_button.setEnabled(True)
        self._count_changes()
        self.update_next_slices()
        self.trained.emit(str(self.new_model))

    def segment_with_new_model(self):
        """Open Segment and re-segment the image with the new model (one click); the new
        labels layer keeps the voxels reviewed so far (their labels and the mask)."""
        if self.new_model is None:
            user_error("Fine-tune a model first.")
            return None
        _, segment = self.viewer.window.add_plugin_dock_widget("napari-selfreg", "Segment")
        image = getattr(self, "_image_layer", None)
        if image is not None and image not in self.viewer.layers:
            image = None
        labels = getattr(self, "_labels_layer", None)
        if labels is not None and labels in self.viewer.layers:
            reviewed = labels.metadata.get(REVIEWED_KEY)
            if reviewed is not None and not labels.metadata.get(SCRIBBLES_KEY):
                self._carry = {"labels": np.array(labels.data, copy=True), "reviewed": reviewed,
                               "axes": labels.metadata.get(PAINT_AXES_KEY, []), "segment": segment}  # fmt: skip
                segment.segmented.connect(self._carry_reviewed)
        return segment.segment_with(self.new_model, image)

    def _carry_reviewed(self, layer) -> None:
        """Paste the reviewed voxels of the last round into the new labels layer."""
        carry, self._carry = self._carry, None
        if carry is None:
            return
        carry["segment"].segmented.disconnect(self._carry_reviewed)
        if np.shape(layer.data) != np.shape(carry["labels"]):
            return
        reviewed = np.asarray(carry["reviewed"]) != 0
        layer.data[reviewed] = carry["labels"][reviewed]
        layer.metadata[PREDICTION_KEY] = np.array(layer.data, copy=True)
        layer.metadata[REVIEWED_KEY] = carry["reviewed"]
        layer.metadata[PAINT_AXES_KEY] = list(carry["axes"])
        layer.refresh()
        self.labels_picker.set_layer(layer)
        self._on_labels_changed()  # chosen when added: its reviewed voxels came after
