"""Fine-tune dock widget: one ``training.iter_finetune`` call in a napari thread worker.

The user picks the image and the labels they corrected. The widget knows which
voxels changed since the prediction (Segment keeps the predicted labels in the
Labels layer's metadata), passes *copies* of image, labels and the changed mask to
the training code (the user's layer is never modified), draws the loss and the
Dice on the reviewed voxels live, and announces the new model version so Segment lists it.
"Segment with new model" re-segments the image with it in one click.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

if TYPE_CHECKING:
    import napari

from ._common import JobPanel, LayerPicker, ModelPicker, announce_model, user_error, warn
from .segment import MODEL_KEY, PREDICTION_KEY

FREEZE = ("none", "encoder", "stage:1", "stage:2", "stage:3")


def finetune_job(
    model_path: Path,
    image: np.ndarray,
    labels: np.ndarray,
    changed: np.ndarray | None,
    settings: dict[str, Any],
) -> Generator[Any, None, Path]:
    """Worker body: run ``iter_finetune`` on copies; returns the new model folder."""
    from ..training.config import FinetuneConfig
    from ..training.finetune import iter_finetune

    config = FinetuneConfig(**settings)
    result = yield from iter_finetune(
        model_path, image, labels, changed_mask=changed, config=config
    )
    return Path(result)


class _Curves(QWidget):
    """Live loss (left axis, raw and smoothed) and Dice on the reviewed voxels (right axis) per iteration."""

    SMOOTH = 0.8  # weight of the past in the exponential moving average of the loss

    def __init__(self) -> None:
        super().__init__()
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        fg, grid, bg = "#d0d0d0", "#555555", "#262930"
        self.figure = Figure(figsize=(3.6, 2.4), dpi=100, facecolor=bg)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(200)
        self.loss_ax = self.figure.add_subplot(111)
        self.dice_ax = self.loss_ax.twinx()
        for ax in (self.loss_ax, self.dice_ax):
            ax.set_facecolor(bg)
            ax.tick_params(colors=fg, labelsize=7)
            for spine in ax.spines.values():
                spine.set_color(grid)
        self.loss_ax.set_xlabel("iteration", color=fg, fontsize=8)
        self.loss_ax.set_ylabel("loss", color="#f58231", fontsize=8)
        self.dice_ax.set_ylabel("Dice on reviewed voxels", color="#3cb44b", fontsize=8)
        self.dice_ax.set_ylim(0, 1)
        self.loss_ax.grid(True, color=grid, lw=0.5)
        self.loss_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        (self.raw_line,) = self.loss_ax.plot([], [], color="#f58231", lw=0.7, alpha=0.35)
        (self.loss_line,) = self.loss_ax.plot([], [], color="#f58231", lw=1.6, label="loss")
        (self.dice_line,) = self.dice_ax.plot(
            [], [], "o-", color="#3cb44b", lw=1.4, ms=4, label="Dice, reviewed voxels"
        )
        self.figure.tight_layout(pad=0.6)
        box = QVBoxLayout(self)
        box.setContentsMargins(0, 0, 0, 0)
        box.addWidget(self.canvas)
        self.clear()

    def clear(self) -> None:
        """Forget the curves (a new run starts)."""
        self.loss: list[tuple[int, float]] = []
        self.smooth: list[float] = []
        self.dice: list[tuple[int, float]] = []
        self.redraw()

    def add(self, event: Any) -> None:
        """Take one ``TrainEvent``: iterations add loss points, validations Dice points."""
        if event.kind == "iteration" and "total" in event.losses:
            value = float(event.losses["total"])
            self.loss.append((event.iteration, value))
            last = self.smooth[-1] if self.smooth else value
            self.smooth.append(self.SMOOTH * last + (1 - self.SMOOTH) * value)
        elif event.kind in ("validation", "done"):
            score = _mean_foreground_dice(event.dice)
            if score is None:
                return
            self.dice.append((event.iteration, score))
        else:
            return
        self.redraw()

    def redraw(self) -> None:
        """Update the lines and rescale the axes (drawn when Qt is idle)."""
        x = [i for i, _ in self.loss]
        self.raw_line.set_data(x, [v for _, v in self.loss])
        self.loss_line.set_data(x, self.smooth)
        self.dice_line.set_data([i for i, _ in self.dice], [v for _, v in self.dice])
        self.loss_ax.relim()
        self.loss_ax.autoscale_view()
        if x:
            self.loss_ax.set_xlim(0, max(x[-1], 1))
        self.dice_ax.set_ylim(0, 1)
        self.canvas.draw_idle()


def _mean_foreground_dice(dice: dict[str, float | None]) -> float | None:
    values = [v for k, v in dice.items() if v is not None and k.lower() != "background"]
    return float(np.mean(values)) if values else None


class FinetuneWidget(QWidget):
    """Fine-tune a model on the labels the user corrected.

    Attributes:
        image_picker, labels_picker: the image and the corrected labels.
        model_picker: the model to start from (the one that predicted the labels).
        job: progress bar, status and Cancel of the running fine-tuning.
        curves: the live loss / validation-Dice plot.
        new_model: the folder of the last model this widget saved, or None.
        trained: Qt signal with the new model folder (``str``).
    """

    trained = Signal(str)

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = viewer
        self.new_model: Path | None = None
        self.image_picker = LayerPicker(viewer, Image)
        self.labels_picker = LayerPicker(viewer, Labels)
        self.model_picker = ModelPicker()
        self.changed_line = QLabel("")
        self.changed_line.setWordWrap(True)
        self.iterations = QSpinBox()
        self.iterations.setRange(1, 100_000)
        self.iterations.setValue(100)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(5)
        self.lr.setRange(1e-5, 1.0)
        self.lr.setSingleStep(1e-4)
        self.lr.setValue(1e-3)
        self.lambda_scr = QDoubleSpinBox()
        self.lambda_ifd = QDoubleSpinBox()
        for spin in (self.lambda_scr, self.lambda_ifd):
            spin.setDecimals(3)
            spin.setRange(0.0, 1.0)
            spin.setSingleStep(0.005)
            spin.setValue(0.015)
        self.lambda_scr.setToolTip("SelfReg SCR weight (0: off); 0.015 in the paper")
        self.lambda_ifd.setToolTip("SelfReg IFD weight (0: off); 0.015 in the paper")
        self.freeze = QComboBox()
        self.freeze.addItems(FREEZE)
        self.freeze.setToolTip(
            "none: train everything; encoder: train the decoder only; "
            "stage:k: train encoder blocks from the k-th on"
        )
        self.corrected_weight = QDoubleSpinBox()
        self.corrected_weight.setRange(1.0, 100.0)
        self.corrected_weight.setValue(5.0)
        self.corrected_weight.setToolTip("Loss weight of the voxels you corrected (others: 1)")
        self.seconds = QSpinBox()
        self.seconds.setRange(0, 24 * 3600)
        self.seconds.setValue(60)
        self.seconds.setSpecialValueText("no limit")
        self.seconds.setSuffix(" s")
        self.augment = QCheckBox("augment")
        self.augment.setChecked(True)
        self.run_button = QPushButton("Fine-tune")
        self.run_button.clicked.connect(self.run)
        self.job = JobPanel(viewer)
        self.curves = _Curves()
        self.result_line = QLabel("")
        self.result_line.setWordWrap(True)
        self.segment_button = QPushButton("Segment with new model")
        self.segment_button.setEnabled(False)
        self.segment_button.clicked.connect(self.segment_with_new_model)
        self.job.lock_while_running(self.run_button, self.segment_button)
        self.job.finished.connect(
            lambda: self.segment_button.setEnabled(self.new_model is not None)
        )

        form = QFormLayout()
        form.addRow("Image", self.image_picker)
        form.addRow("Corrected labels", self.labels_picker)
        form.addRow("", self.changed_line)
        form.addRow("Start from", self.model_picker)
        form.addRow("Iterations", self.iterations)
        form.addRow("Learning rate", self.lr)
        form.addRow("λ SCR", self.lambda_scr)
        form.addRow("λ IFD", self.lambda_ifd)
        form.addRow("Freeze", self.freeze)
        form.addRow("Corrected weight", self.corrected_weight)
        form.addRow("Time limit", self.seconds)
        form.addRow("", self.augment)
        box = QVBoxLayout(self)
        box.addLayout(form)
        box.addWidget(self.run_button)
        box.addWidget(self.job)
        box.addWidget(self.curves)
        box.addWidget(self.result_line)
        box.addWidget(self.segment_button)
        box.addStretch(1)

        self._watched = None
        self.labels_picker.changed.connect(self._on_labels_changed)
        self._on_labels_changed()

    # ------------------------------------------------------------------ corrections
    def changed_mask(self) -> np.ndarray | None:
        """Voxels whose label differs from the prediction, or None when none is known."""
        layer = self.labels_picker.layer()
        if layer is None:
            return None
        prediction = layer.metadata.get(PREDICTION_KEY)
        if prediction is None or np.shape(prediction) != np.shape(layer.data):
            return None
        return np.asarray(layer.data) != prediction

    def _on_labels_changed(self) -> None:
        layer = self.labels_picker.layer()
        if self._watched is not None:
            for event in (self._watched.events.paint, self._watched.events.data):
                event.disconnect(self._count_changes)
        self._watched = layer
        if layer is not None:
            layer.events.paint.connect(self._count_changes)
            layer.events.data.connect(self._count_changes)
            model = layer.metadata.get(MODEL_KEY)
            if model and Path(model).is_dir():
                self.model_picker.select(model)
        self._count_changes()

    def _count_changes(self, event=None) -> None:
        layer = self.labels_picker.layer()
        if layer is None:
            self.changed_line.setText(
                "Segment an image first, correct its labels, then fine-tune."
            )
            return
        mask = self.changed_mask()
        if mask is None:
            self.changed_line.setText(
                "No prediction is stored with these labels: the corrected voxels will be "
                "found by predicting with the base model."
            )
            return
        n = int(mask.sum())
        self.changed_line.setText(
            f"{n:,} voxels corrected since the prediction ({100 * n / max(mask.size, 1):.2f} %)."
        )

    # ------------------------------------------------------------------ run
    def settings(self) -> dict[str, Any]:
        """Keyword arguments for ``FinetuneConfig`` from the form."""
        return {
            "iterations": int(self.iterations.value()),
            "lr": float(self.lr.value()),
            "lambda_scr": float(self.lambda_scr.value()),
            "lambda_ifd": float(self.lambda_ifd.value()),
            "freeze": self.freeze.currentText(),
            "corrected_weight": float(self.corrected_weight.value()),
            "seconds_budget": float(self.seconds.value()) or None,
            "augment": self.augment.isChecked(),
        }

    def run(self):
        """Fine-tune on copies of the chosen image and labels in a worker; returns the worker."""
        if self.job.busy:
            warn("A fine-tuning is already running; wait for it to finish or press Cancel.")
            return None
        image_layer = self.image_picker.layer()
        labels_layer = self.labels_picker.layer()
        if image_layer is None:
            user_error("Fine-tune needs an image layer: open a volume or a sample first.")
            return None
        if labels_layer is None:
            user_error("Fine-tune needs a labels layer: run Segment first, then correct it.")
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
        changed = self.changed_mask()
        import napari_selfreg.training.finetune  # noqa: F401 - torch in the GUI thread first

        self.curves.clear()
        self.result_line.setText("")
        self._image_layer = image_layer
        return self.job.start(
            finetune_job,
            model_path,
            np.array(image, copy=True),
            np.array(labels, copy=True),
            changed,
            self.settings(),
            on_return=self._on_trained,
            on_yield=self.curves.add,
            watch=[image_layer, labels_layer],
            keep_going=True,
            what="fine-tuning",
        )

    def _on_trained(self, path: Path) -> None:
        self.new_model = Path(path)
        announce_model(self.new_model)
        from ..modelfile import read_card

        card = read_card(self.new_model)
        dice = card.metrics.get("dice") if card.metrics else None
        score = _mean_foreground_dice(dice) if isinstance(dice, dict) else None
        parent = Path(card.parent).name if card.parent else "?"
        text = f"Saved {card.name} (fine-tuned from {parent})"
        if score is not None:
            text += f", Dice {score:.3f} on the reviewed voxels"
        self.result_line.setText(text + ". Segment lists it now.")
        self.result_line.setToolTip(str(self.new_model))
        self.segment_button.setEnabled(True)
        self.trained.emit(str(self.new_model))

    def segment_with_new_model(self):
        """Open Segment and re-segment the image with the new model (one click)."""
        if self.new_model is None:
            user_error("Fine-tune a model first.")
            return None
        _, segment = self.viewer.window.add_plugin_dock_widget("napari-selfreg", "Segment")
        image = getattr(self, "_image_layer", None)
        if image is not None and image not in self.viewer.layers:
            image = None
        return segment.segment_with(self.new_model, image)
