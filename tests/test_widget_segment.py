"""Segment dock widget in a real napari viewer (``xvfb-run -a pytest``)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_selfreg.modelfile import read_card
from napari_selfreg.widgets._common import layer_world_matrix
from napari_selfreg.widgets.segment import MODEL_KEY, PREDICTION_KEY, SegmentWidget

pytestmark = pytest.mark.gui
WAIT_MS = 30_000


@pytest.fixture
def setup(make_napari_viewer, qtbot, tiny_model, phantom, messages):
    """A viewer with the phantom image (anisotropic, shifted), the Segment widget, the tiny model."""
    viewer = make_napari_viewer()
    image, _ = phantom
    layer = viewer.add_image(
        image, name="phantom", scale=(2.0, 1.0, 1.5), translate=(5.0, -3.0, 7.0)
    )
    widget = SegmentWidget(viewer)
    qtbot.addWidget(widget)
    widget.model_picker.select(tiny_model)
    widget.device.setCurrentText("cpu")
    widget.precision.setCurrentText("fp32")
    yield viewer, widget, layer, messages
    if widget.job.busy:
        widget.job.cancel()
        qtbot.waitUntil(lambda: not widget.job.busy, timeout=WAIT_MS)


def _run_and_wait(qtbot, widget):
    with qtbot.waitSignal(widget.job.finished, timeout=WAIT_MS):
        worker = widget.run()
        assert worker is not None
    return worker


def test_segment_adds_aligned_coloured_labels(qtbot, setup, tiny_model):
    viewer, widget, image, messages = setup
    assert widget.model_picker.model_path() == tiny_model
    card = read_card(tiny_model)
    widget.extra.setCurrentText("uncertainty")
    _run_and_wait(qtbot, widget)
    assert widget.job.outcome == "returned", messages
    labels = viewer.layers["phantom [tiny]"]
    assert labels._type_string == "labels"
    assert labels.name == "phantom [tiny]"
    assert labels.data.shape == image.data.shape
    assert labels.data.dtype == np.uint8
    np.testing.assert_allclose(labels.scale, image.scale)
    np.testing.assert_allclose(labels.translate, image.translate)
    np.testing.assert_allclose(layer_world_matrix(labels), layer_world_matrix(image))
    for value, color in enumerate(card.class_colors[1:], start=1):
        expected = np.array([int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)])
        np.testing.assert_allclose(labels.colormap.map(value)[:3], expected, atol=1e-6)
    # a new class painted on (the next value, or any) is visible, in a colour of its own
    known = {tuple(labels.colormap.map(v)) for v in range(1, card.num_classes)}
    for value in (card.num_classes, card.num_classes + 1, 200):
        rgba = tuple(labels.colormap.map(value))
        assert rgba[3] == 1.0 and rgba not in known
    assert list(labels.features["class"]) == card.class_names
    np.testing.assert_array_equal(labels.metadata[PREDICTION_KEY], labels.data)
    assert labels.metadata[PREDICTION_KEY] is not labels.data
    assert labels.metadata[MODEL_KEY] == str(tiny_model)
    unc = viewer.layers["phantom [tiny] uncertainty"]
    assert unc.data.shape == image.data.shape
    assert float(unc.data.min()) >= 0.0 and float(unc.data.max()) <= 1.0
    np.testing.assert_allclose(layer_world_matrix(unc), layer_world_matrix(image))
    names = ["phantom", "phantom [tiny] uncertainty", "phantom [tiny]"]
    assert [lay.name for lay in viewer.layers] == names  # the image is untouched
    assert not [m for m in messages if m[0] == "error"]


def test_a_volume_without_orientation_is_named_for_a_model_that_expects_one(qtbot, setup, tmp_path):  # fmt: skip
    from napari_selfreg._reader import read_layers
    from napari_selfreg.io import write_volume
    from napari_selfreg.modelfile import resolve_model_path

    viewer, widget, image, messages = setup
    oriented = resolve_model_path(None)  # the bundled default: trained in a known orientation
    assert read_card(oriented).orientation
    widget._note_unknown_orientation(image, oriented, 3)  # a plain array added in napari
    assert messages[-1][0] == "warning" and "carries no patient orientation" in messages[-1][1]
    count = len(messages)
    path = write_volume(tmp_path / "scan.nii.gz", np.asarray(image.data, np.float32), affine=np.eye(4))  # fmt: skip
    [(data, kwargs, _)] = read_layers(str(path))
    opened = viewer.add_image(data, **kwargs)
    widget._note_unknown_orientation(opened, oriented, 3)  # opened from NIfTI by the reader
    widget._note_unknown_orientation(image, widget.model_picker.model_path(), 3)  # no orientation
    assert len(messages) == count


def test_segment_extra_uncertainty_layer(qtbot, setup):
    viewer, widget, image, _ = setup
    widget.extra.setCurrentText("uncertainty")
    _run_and_wait(qtbot, widget)
    unc = viewer.layers["phantom [tiny] uncertainty"]
    assert unc.data.shape == image.data.shape
    assert float(unc.data.min()) >= 0.0 and float(unc.data.max()) <= 1.0
    np.testing.assert_allclose(unc.scale, image.scale)


def test_cancel_stops_a_running_job_and_adds_nothing(qtbot, setup, phantom):
    viewer, widget, _, _ = setup
    big = np.tile(phantom[0], (3, 3, 3))  # 60 x 72 x 66 voxels
    viewer.add_image(big, name="big")
    widget.image_picker.set_layer(viewer.layers["big"])
    widget.tile.setValue(8)
    widget.overlap.setValue(0.5)  # thousands of tiles: seconds of work
    seen = []

    def cancel_on_first_tile(event):
        seen.append(event)
        if getattr(event, "stage", "") == "tiles":
            widget.job.cancel()

    with qtbot.waitSignal(widget.job.finished, timeout=WAIT_MS):
        worker = widget.run()
        worker.yielded.connect(cancel_on_first_tile)
    assert widget.job.outcome == "cancelled"
    assert seen[-1].done < seen[-1].total  # it stopped long before the end
    assert [lay.name for lay in viewer.layers] == ["phantom", "big"]
    assert widget.run_button.isEnabled()


def test_bad_inputs_are_clear_messages(qtbot, setup):
    viewer, widget, image, messages = setup
    # no image layer
    viewer.layers.remove(image)
    assert widget.run() is None
    assert messages[-1][0] == "error" and "image layer" in messages[-1][1]
    # an RGB image
    rgb = viewer.add_image(np.zeros((16, 16, 3), np.uint8), name="photo", rgb=True)
    widget.image_picker.set_layer(rgb)
    assert widget.run() is None
    assert messages[-1][0] == "error" and "RGB" in messages[-1][1]
    # a 2D image with a 3D model: the predictor's one-sentence error, no traceback
    flat = viewer.add_image(np.random.default_rng(0).normal(size=(24, 24)).astype(np.float32))
    widget.image_picker.set_layer(flat)
    _run_and_wait(qtbot, widget)
    assert widget.job.outcome == "failed" and not widget.job.busy
    assert messages[-1][0] == "error" and "3D" in messages[-1][1]
    assert "Traceback" not in messages[-1][1]
    # Run pressed twice: one job, one warning
    widget.image_picker.set_layer(viewer.add_image(image.data, name="again"))
    with qtbot.waitSignal(widget.job.finished, timeout=WAIT_MS):
        first = widget.run()
        assert not widget.run_button.isEnabled()
        second = widget.run()
    assert first is not None and second is None
    assert any(kind == "warning" and "already running" in text for kind, text in messages)
    assert [lay.name for lay in viewer.layers] == ["photo", "Image", "again", "again [tiny]"]
    assert widget.run_button.isEnabled()


def test_closing_the_image_while_running_cancels(qtbot, setup, phantom):
    viewer, widget, _, messages = setup
    big = viewer.add_image(np.tile(phantom[0], (3, 3, 3)), name="big")
    widget.image_picker.set_layer(big)
    widget.tile.setValue(8)
    widget.overlap.setValue(0.5)

    def close_on_first_tile(event):
        if getattr(event, "stage", "") == "tiles" and "big" in viewer.layers:
            viewer.layers.remove(big)

    with qtbot.waitSignal(widget.job.finished, timeout=WAIT_MS):
        widget.run().yielded.connect(close_on_first_tile)
    assert widget.job.outcome == "cancelled"
    assert any(kind == "warning" and "'big' was closed" in text for kind, text in messages)
    assert [lay.name for lay in viewer.layers] == ["phantom"]


def test_closing_the_dock_while_running_still_delivers(
    make_napari_viewer, qtbot, tiny_model, phantom
):
    """Closing the panel is not Cancel: the worker finishes and the labels arrive."""
    viewer = make_napari_viewer()
    viewer.add_image(phantom[0], name="phantom")
    dock, widget = viewer.window.add_plugin_dock_widget("napari-selfreg", "Segment")
    widget.model_picker.select(tiny_model)
    worker = widget.run()
    ended = []
    worker.aborted.connect(lambda: ended.append("aborted"))
    worker.returned.connect(lambda _r: ended.append("returned"))
    with qtbot.waitSignal(worker.finished, timeout=WAIT_MS):
        viewer.window.remove_dock_widget(dock)
    assert ended == ["returned"]
    assert [lay.name for lay in viewer.layers] == ["phantom", "phantom [tiny]"]


def test_the_class_volume_table_shows_and_copies_the_result(qtbot, setup):
    from qtpy.QtWidgets import QApplication

    viewer, widget, _, _ = setup
    assert not widget.volumes.isVisibleTo(widget)
    _run_and_wait(qtbot, widget)
    labels = viewer.layers["phantom [tiny]"]
    counts = np.bincount(np.asarray(labels.data).ravel(), minlength=3)
    names = labels.metadata["selfreg_class_names"]
    assert widget.volumes.isVisibleTo(widget) and widget.volumes.rowCount() == len(names)
    voxel_ml = 2.0 * 1.0 * 1.5 / 1000  # the layer's scale
    for i, name in enumerate(names):
        assert widget.volumes.item(i, 0).text() == name
        assert widget.volumes.item(i, 1).text() == str(counts[i])
        assert widget.volumes.item(i, 2).text() == f"{counts[i] * voxel_ml:.2f}"
    text = widget.copy_volumes()
    assert QApplication.clipboard().text() == text
    lines = text.splitlines()
    assert lines[0].split("\t") == ["class", "voxels", "ml", "% of labelled"]
    labelled = max(1, counts[1:].sum())
    for line, n in zip(lines[2:], counts[1:], strict=True):
        assert line.split("\t")[3] == f"{100 * n / labelled:.1f}"
