"""Shared pieces of the napari-selfreg dock widgets (Qt only; torch is never imported here).

Public API, kept small on purpose (Segment, Fine-tune and Inspect features use it):

- ``LayerPicker(viewer, layer_type)``: a combo box of the viewer's layers of one type
  (``napari.layers.Image`` or ``Labels``) that follows additions, removals and renames.
  ``.layer()`` is the chosen layer or None; ``.set_layer(layer)`` selects one;
  ``.changed`` (``Signal()``) fires when the choice changes.
- ``ModelPicker(none_label=None)``: the bundled and user models (``modelfile.list_models``)
  plus a "Load…" button for a model folder; with ``none_label`` a first entry means
  "no model". ``.model_path()`` is the chosen folder or None;
  ``.select(path)`` adds and selects a folder; ``.refresh()`` re-scans. Every picker
  re-scans when any widget calls ``announce_model(path)`` after saving a model.
- ``announce_model(path)``: tell every ``ModelPicker`` that a new model folder exists.
- ``JobPanel(viewer)``: a progress bar, a status line and a Cancel button that run one
  library generator at a time in a napari thread worker. ``start(job, *args,
  on_return=..., on_yield=..., watch=[layers], keep_going=False, what="segmentation")``
  starts it (and refuses a second job with a warning); removing a watched layer cancels
  the job (with ``keep_going``, it only says that the job goes on with its copies);
  ``cancel()`` quits at the generator's next yield; ``lock_while_running(*buttons)``
  disables buttons while a job runs; ``outcome`` is the last job's end
  (``"returned"``, ``"cancelled"`` or ``"failed"``). User errors (``ValueError``) become
  one-sentence error notifications; other exceptions go to napari's error
  notifications with their traceback. ``busy`` says whether a job runs; the Qt signal
  ``finished`` fires after every job, whatever its end (returned, cancelled, failed).
- ``layer_transform(layer)``: the ``scale``/``translate``/``rotate``/``shear``/``affine``
  keyword arguments that place a new layer exactly over ``layer``.
- ``layer_world_matrix(layer)``: the layer's data-to-world homogeneous matrix.
- ``layer_spacing(layer)``: voxel spacing in world units per array axis.
- ``labels_colormap(colors)``: a ``DirectLabelColormap`` mapping label i to ``colors[i]``
  (label 0 transparent).
- ``user_error(message)`` / ``warn(message)``: show a notification in the viewer.
- ``unwrap(obj)``: the napari object behind the ``PublicOnlyProxy`` napari hands to
  plugin widgets (needed for identity checks such as ``layer is other``).

Import torch (or the library module that imports it) in the GUI thread before starting a
job: two threads importing torch at the same time can leave it half-initialised.

Long jobs yield progress events; any object with ``done``/``total`` (or ``iteration``/
``total``) and ``message`` attributes drives the progress bar and the status line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import notification_manager, show_error, show_warning
from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import GeneratorWorker

from ..geometry import layer_world_matrix
from ..jobs import Progress, TimeLeft, format_seconds
from ._layout import WrappedLabel

__all__ = [
    "JobPanel",
    "LayerPicker",
    "ModelPicker",
    "announce_model",
    "labels_colormap",
    "layer_spacing",
    "layer_world_matrix",
    "unwrap",
    "layer_transform",
    "user_error",
    "warn",
]


class JobError(Exception):
    """A job failed for a reason that is not the user's (re-raised from RuntimeError, see ``_guard``)."""


def unwrap(obj: Any) -> Any:
    """The napari object behind a ``PublicOnlyProxy`` (napari wraps what plugin widgets get).

    Proxies are created afresh on every attribute access, so identity checks
    (``layer is other``) need the objects behind them.
    """
    return getattr(obj, "__wrapped__", obj)


def user_error(message: str) -> None:
    """Show one clear sentence as an error notification in the viewer."""
    show_error(message)


def warn(message: str) -> None:
    """Show a warning notification in the viewer."""
    show_warning(message)


# ----------------------------------------------------------------------------- layers


class LayerPicker(QComboBox):
    """A combo box of the viewer's layers of one type, kept in sync with the layer list."""

    changed = Signal()

    def __init__(self, viewer, layer_type: type, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._viewer = viewer
        self._type = layer_type
        self._layers: list[Any] = []
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        events = viewer.layers.events
        for event in (events.inserted, events.removed, events.moved, events.reordered):
            event.connect(self._refresh)
        self.currentIndexChanged.connect(lambda _i: self.changed.emit())
        self._refresh()

    def layer(self):
        """The chosen layer, or None when the viewer has no layer of this type."""
        i = self.currentIndex()
        return self._layers[i] if 0 <= i < len(self._layers) else None

    def set_layer(self, layer) -> None:
        """Select ``layer`` (ignored when it is not in the list)."""
        self._refresh()
        layer = unwrap(layer)
        for i, candidate in enumerate(self._layers):
            if candidate is layer:
                self.setCurrentIndex(i)

    def _refresh(self, event=None) -> None:
        current = self.layer()
        layers = [unwrap(lay) for lay in self._viewer.layers if isinstance(lay, self._type)]
        for layer in layers:
            if layer not in self._layers:
                layer.events.name.connect(self._refresh)
        self.blockSignals(True)
        self.clear()
        self._layers = layers
        for layer in layers:
            self.addItem(layer.name)
        index = next((i for i, lay in enumerate(layers) if lay is current), None)
        if index is None and layers:
            # prefer the selected layer, else the newest one
            active = unwrap(self._viewer.layers.selection.active)
            index = next((i for i, lay in enumerate(layers) if lay is active), len(layers) - 1)
        if index is not None:
            self.setCurrentIndex(index)
        self.blockSignals(False)
        if self.layer() is not current:
            self.changed.emit()


def layer_transform(layer) -> dict[str, Any]:
    """Keyword arguments that put a new layer of the same shape exactly over ``layer``."""
    return {
        "scale": np.array(layer.scale, dtype=float),
        "translate": np.array(layer.translate, dtype=float),
        "rotate": np.array(layer.rotate, dtype=float),
        "shear": np.array(layer.shear, dtype=float),
        "affine": np.array(layer.affine.affine_matrix, dtype=float),
    }


def layer_spacing(layer) -> tuple[float, ...]:
    """Voxel spacing per array axis: column norms of the layer's data-to-world matrix."""
    linear = layer_world_matrix(layer)[:-1, :-1]
    return tuple(float(v) for v in np.linalg.norm(linear, axis=0))


NEW_CLASS_COLORS = 16  # labels after the model's classes with a colour of their own


def labels_colormap(colors: Iterable[str]):
    """``DirectLabelColormap`` for ``colors[i]`` = colour of label i; label 0 is transparent.

    The labels a user may paint as new classes get the colours a fine-tune will give
    them (:func:`~napari_selfreg.modelfile.colors_after`); any other value is white,
    so no stroke is invisible."""
    from napari.utils.colormaps import DirectLabelColormap

    from ..modelfile import colors_after

    colors = list(colors)
    colors += colors_after(colors, NEW_CLASS_COLORS)
    color_dict: dict[int | None, Any] = {None: "white", 0: "transparent"}
    for i, color in enumerate(colors):
        if i > 0:
            color_dict[i] = color
    return DirectLabelColormap(color_dict=color_dict)


# ----------------------------------------------------------------------------- models


class _ModelRegistry(QObject):
    """One Qt signal shared by all model pickers: a new model folder was saved."""

    model_added = Signal(str)


_REGISTRY: _ModelRegistry | None = None


def _registry() -> _ModelRegistry:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _ModelRegistry()
    return _REGISTRY


def announce_model(path: str | Path) -> None:
    """Tell every open :class:`ModelPicker` that the model folder ``path`` exists now."""
    _registry().model_added.emit(str(path))


class ModelPicker(QWidget):
    """Bundled and user models in a combo box, plus "Load…" for any model folder.

    With ``none_label`` the first entry is that label and means "no model" (an
    optional second model).
    """

    changed = Signal()

    def __init__(self, parent: QWidget | None = None, none_label: str | None = None) -> None:
        super().__init__(parent)
        self._none_label = none_label
        self.combo = QComboBox()
        self.combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
        )
        self.combo.setMinimumContentsLength(14)
        self.load_button = QPushButton("Load…")
        self.load_button.setToolTip("Add a model folder (model.json + model.safetensors)")
        self.load_button.clicked.connect(self._browse)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.combo, 1)
        row.addWidget(self.load_button)
        self._extra: list[Path] = []  # folders loaded by hand
        self.combo.currentIndexChanged.connect(lambda _i: self.changed.emit())
        _registry().model_added.connect(self._on_model_added)
        self.refresh()

    def model_path(self) -> Path | None:
        """The chosen model folder, or None when there is no model."""
        data = self.combo.currentData()
        return Path(data) if data else None

    def model_paths(self) -> list[Path]:
        """All listed model folders, in list order."""
        items = [self.combo.itemData(i) for i in range(self.combo.count())]
        return [Path(item) for item in items if item]

    def select(self, path: str | Path) -> None:
        """Add ``path`` to the list if needed and select it; a folder without a valid
        model card is refused with a message."""
        from ..modelfile import read_card

        path = Path(path)
        if path not in self.model_paths() and path not in self._extra:
            try:
                read_card(path)
            except ValueError as err:
                user_error(str(err))
                return
            self._extra.append(path)
        self.refresh(select=path)

    def refresh(self, select: str | Path | None = None) -> None:
        """Re-scan bundled and user models; keep the current choice unless ``select`` is given."""
        from ..modelfile import BUNDLED_DIR, list_models, read_card

        keep = Path(select) if select is not None else self.model_path()
        entries: list[tuple[str, Path, str]] = []
        for name, folder, card in list_models():
            label = f"{name} (bundled)" if folder.parent == BUNDLED_DIR else name
            entries.append((label, folder, _card_tooltip(card, folder)))
        listed = {e[1].resolve() for e in entries}
        for folder in self._extra:
            if folder.resolve() in listed:
                continue
            try:
                card = read_card(folder)
            except ValueError:
                continue
            entries.append((f"{card.name} (file)", folder, _card_tooltip(card, folder)))
        self.combo.blockSignals(True)
        self.combo.clear()
        first = 0
        if self._none_label is not None:
            self.combo.addItem(self._none_label, None)
            first = 1
        for label, folder, tip in entries:
            self.combo.addItem(label, str(folder))
            self.combo.setItemData(self.combo.count() - 1, tip, Qt.ItemDataRole.ToolTipRole)
        index = -1
        if keep is not None:
            index = next(
                (i for i, e in enumerate(entries) if e[1].resolve() == keep.resolve()), -1
            )
        if index >= 0:
            self.combo.setCurrentIndex(first + index)
        else:
            self.combo.setCurrentIndex(0 if self.combo.count() else -1)
        self.combo.blockSignals(False)
        self.changed.emit()

    def _on_model_added(self, path: str) -> None:
        with contextlib.suppress(RuntimeError):  # this picker's Qt object is gone
            self.refresh()

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a model folder")
        if folder:
            self.select(folder)


def _card_tooltip(card, folder: Path) -> str:
    lines = [str(folder), f"{card.architecture}, classes: {', '.join(card.class_names)}"]
    if card.parent:
        lines.append(f"fine-tuned from {card.parent}")
    if card.description:
        lines.append(card.description)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- jobs


def _guard(generator: Generator) -> Generator:
    """Run ``generator`` and return its value, turning RuntimeError into :class:`JobError`.

    superqt treats a RuntimeError raised by the generator as "the worker object was
    deleted" and then never emits ``finished``; torch reports most failures as
    RuntimeError, so without this a failed job would leave the widget busy forever.
    """
    try:
        result = yield from generator
    except RuntimeError as err:
        raise JobError(f"{type(err).__name__}: {err}") from err
    return result


class JobPanel(QWidget):
    """Progress bar, status line and Cancel button for one background job at a time."""

    finished = Signal()

    def __init__(self, viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._viewer = viewer
        self.worker = None
        self._generator: Generator | None = None  # the running job's generator
        self.outcome = ""  # "running", "returned", "cancelled" or "failed"
        self._what = "job"
        self._watch: list[Any] = []
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        self.status = WrappedLabel()
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(lambda: self.cancel())
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.progress, 1)
        row.addWidget(self.cancel_button)
        box = QVBoxLayout(self)
        box.setContentsMargins(0, 0, 0, 0)
        box.addLayout(row)
        box.addWidget(self.status)
        self._buttons: list[QPushButton] = []
        viewer.layers.events.removed.connect(self._on_layer_removed)

    @property
    def busy(self) -> bool:
        """True while a job runs."""
        return self.worker is not None

    def refuse_if_busy(self, what: str) -> bool:
        """Warn and return True while a job runs (the check every widget makes first)."""
        if self.worker is None:
            return False
        warn(f"A {what} is already running; wait for it to finish or press Cancel.")
        return True

    def lock_while_running(self, *buttons: QPushButton) -> None:
        """Disable ``buttons`` while a job runs."""
        self._buttons.extend(buttons)

    def start(
        self,
        job: Callable[..., Generator],
        *args: Any,
        on_return: Callable[[Any], None],
        on_yield: Callable[[Any], None] | None = None,
        watch: Iterable[Any] = (),
        keep_going: bool = False,
        what: str = "job",
    ) -> GeneratorWorker | None:
        """Run the generator function ``job(*args)`` in a worker thread.

        Args:
            job: generator function; it yields progress events and returns the result.
            *args: its arguments (pass copies of layer data, never the layers).
            on_return: called in the GUI thread with the returned value.
            on_yield: called in the GUI thread with every yielded event.
            watch: layers whose removal cancels the job (or, with ``keep_going``, is
                only reported: the job works on copies and finishes).
            keep_going: do not cancel when a watched layer is removed.
            what: the job's name in messages (e.g. ``"segmentation"``).

        Returns:
            The started worker, or None when another job is still running.
        """
        if self.refuse_if_busy(self._what):
            return None
        self._what = what
        self._watch = [unwrap(layer) for layer in watch]
        self._keep_going = keep_going
        self._cancel_reason = ""
        self._time_left = TimeLeft()
        self.outcome = "running"
        self._generator = job(*args)
        worker = create_worker(
            _guard,
            self._generator,
            _worker_class=GeneratorWorker,
            _ignore_errors=True,
            _start_thread=False,
        )
        worker.yielded.connect(self._on_yield)
        if on_yield is not None:
            worker.yielded.connect(on_yield)
        worker.returned.connect(self._on_returned)
        worker.returned.connect(on_return)
        worker.errored.connect(self._on_error)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.destroyed.connect(worker.quit)  # the dock was closed: stop at the next yield
        self.progress.setRange(0, 0)  # busy until the first event says how much
        self.status.setText(f"{what.capitalize()} starting…")
        self.cancel_button.setEnabled(True)
        for button in self._buttons:
            button.setEnabled(False)
        worker.start()
        return worker

    def cancel(self, reason: str = "") -> None:
        """Ask the running job to stop at its next yield (no result is added)."""
        if self.worker is None:
            return
        self._cancel_reason = reason
        self.status.setText(f"Cancelling the {self._what}…")
        self.cancel_button.setEnabled(False)
        self.worker.quit()

    def _on_yield(self, event: Any) -> None:
        if not isinstance(event, Progress):
            return
        if event.total > 0:
            self.progress.setRange(0, event.total)
            self.progress.setValue(min(event.done, event.total))
        text = event.message or (
            f"{event.stage} {event.done} / {event.total}" if event.total else ""
        )
        left = self._time_left.update(event)
        if left is not None and event.done < event.total:
            text += f" · about {format_seconds(left)} left"
        if text:
            self.status.setText(text)

    def _on_returned(self, _result: Any) -> None:
        self.outcome = "returned"
        self.status.setText(f"{self._what.capitalize()} done.")

    def _on_error(self, exc: BaseException) -> None:
        self.outcome = "failed"
        if isinstance(exc, ValueError):
            self.status.setText(f"Failed: {exc}")
            user_error(str(exc))
        else:
            self.status.setText(f"The {self._what} failed: {exc}")
            notification_manager.receive_error(type(exc), exc, exc.__traceback__)

    def _on_aborted(self) -> None:
        self.outcome = "cancelled"
        text = f"The {self._what} was cancelled; nothing was added."
        if self._cancel_reason:
            text = f"{self._cancel_reason}: the {self._what} was cancelled; nothing was added."
            warn(text)
        self.status.setText(text)

    def _on_finished(self) -> None:
        if self.outcome == "cancelled" and self._generator is not None:
            # superqt stops asking a cancelled job for more, but leaves it suspended: close
            # it, so its cleanup runs (temporary folders) and its buffers are freed now
            try:
                self._generator.close()
            except Exception as err:  # noqa: BLE001 - the job is over either way
                warn(f"cleaning up the cancelled {self._what} failed: {err}")
        self._generator = None
        self.worker = None
        self._watch = []
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if self.outcome == "returned" else 0)
        self.cancel_button.setEnabled(False)
        for button in self._buttons:
            button.setEnabled(True)
        self.finished.emit()

    def _on_layer_removed(self, event) -> None:
        layer = unwrap(event.value)
        if self.worker is None or not any(layer is watched for watched in self._watch):
            return
        if self._keep_going:
            warn(
                f"Layer {layer.name!r} was closed; the {self._what} goes on with the copy "
                "taken when it started."
            )
        else:
            self.cancel(f"Layer {layer.name!r} was closed while the {self._what} ran")
