"""Fine-tune dock widget in a real napari viewer (``xvfb-run -a pytest``)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from qtpy.QtCore import QPoint
from qtpy.QtWidgets import QLabel, QScrollArea, QScrollBar, QWidget

from napari_selfreg.device import resolve_device
from napari_selfreg.modelfile import read_card, resolve_model_path
from napari_selfreg.training import FinetuneConfig
from napari_selfreg.training.metrics import unlearnt
from napari_selfreg.widgets._curves import mean_foreground_dice
from napari_selfreg.widgets.finetune import REVIEWED_KEY
from napari_selfreg.widgets.segment import PREDICTION_KEY

pytestmark = pytest.mark.gui
WAIT_MS = 60_000
PLUGIN = "napari-selfreg"


@pytest.fixture
def segmented(make_napari_viewer, qtbot, tiny_model, phantom, messages):
    """A viewer with the phantom, docked Segment and Fine-tune widgets, and a prediction."""
    viewer = make_napari_viewer()
    image = viewer.add_image(phantom[0], name="phantom", scale=(1.0, 1.2, 0.8))
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    _, finetune = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    for widget in (segment, finetune):
        widget.model_picker.select(tiny_model)
    segment.device.setCurrentText("cpu")
    segment.precision.setCurrentText("fp32")
    segment.image_picker.set_layer(image)
    with qtbot.waitSignal(segment.segmented, timeout=WAIT_MS) as blocker:
        segment.run()
    qtbot.waitUntil(lambda: not segment.job.busy, timeout=WAIT_MS)
    labels = blocker.args[0]
    yield viewer, segment, finetune, image, labels, messages
    for widget in (segment, finetune):
        if widget.job.busy:
            widget.job.cancel()
            qtbot.waitUntil(lambda w=widget: not w.job.busy, timeout=WAIT_MS)


def _correct(labels, phantom_labels):
    """Paint the true labels into the centre, like a user fixing part of the prediction."""
    data = labels.data
    centre = (slice(4, 16), slice(5, 19), slice(4, 18))
    data[centre] = phantom_labels[centre]
    labels.refresh()
    labels.events.paint(value=[])
    return int((labels.data != labels.metadata[PREDICTION_KEY]).sum())


def test_finetune_two_iterations_lists_the_new_model(
    qtbot, segmented, phantom, tiny_model, tmp_path
):
    viewer, segment, finetune, image, labels, messages = segmented
    changed = _correct(labels, phantom[1])
    assert changed > 0
    assert f"{changed:,} voxels corrected" in finetune.changed_line.text()
    finetune.image_picker.set_layer(image)
    finetune.labels_picker.set_layer(labels)
    assert finetune.model_picker.model_path() == tiny_model
    device = resolve_device("auto").type  # the default fits the device the round runs on
    assert finetune.iterations.value() == FinetuneConfig().iterations_for(device)
    finetune.iterations.setValue(2)
    finetune.seconds.setValue(0)
    finetune.augment.setChecked(False)
    before = labels.data.copy()
    with qtbot.waitSignal(finetune.job.finished, timeout=WAIT_MS):
        worker = finetune.run()
        assert worker is not None
        labels.data[0, 0, 0] = 2  # the user keeps painting while it trains
    assert finetune.job.outcome == "returned", messages
    new = finetune.new_model
    assert new is not None and new.is_dir() and new != tiny_model
    card = read_card(new)
    assert card.parent and "tiny" in card.parent
    assert new in segment.model_picker.model_paths()  # Segment lists the new version
    assert new in finetune.model_picker.model_paths()
    before[0, 0, 0] = 2
    np.testing.assert_array_equal(labels.data, before)  # the user's layer is untouched
    assert finetune.curves.loss, "the loss curve stayed empty"
    # validation every iterations // 5 steps (here: both), Dice on the reviewed voxels
    assert [i for i, _ in finetune.curves.dice][:2] == [1, 2], finetune.curves.dice
    assert all(0 <= d <= 1 for _, d in finetune.curves.dice)
    assert finetune.segment_button.isEnabled()
    # a class the round has not learnt on the reviewed voxels is named, with what to do
    low = unlearnt(card.metrics["patch_dice"])
    assert ("Not learnt yet" in finetune.result_line.text()) == bool(low)
    base, after = card.metrics["base_patch_mean_dice"], card.metrics["patch_mean_dice"]
    assert f"the base model {base:.3f}" in finetune.result_line.text()
    assert ("Lower than before the round" in finetune.result_line.text()) == (after < base - 0.005)
    assert all(name in finetune.result_line.text() for name in low)

    with qtbot.waitSignal(segment.segmented, timeout=WAIT_MS) as blocker:
        finetune.segment_button.click()
    resegmented = blocker.args[0]
    assert resegmented.name == f"phantom [{card.name}]"
    assert resegmented.data.shape == image.data.shape
    assert segment.model_picker.model_path() == new
    assert labels in viewer.layers and len(viewer.layers) == 3
    # a class the round did not learn on the reviewed voxels, here put in its card
    weak = tmp_path / "weak"
    shutil.copytree(new, weak)
    data = json.loads((weak / "model.json").read_text())
    data["metrics"]["patch_dice"] = {"background": 0.9, card.class_names[1]: 0.18, card.class_names[2]: 0.8}  # fmt: skip
    (weak / "model.json").write_text(json.dumps(data))
    finetune._on_trained((weak, labels.metadata[REVIEWED_KEY]))
    text = finetune.result_line.text()
    assert f"Not learnt yet on the voxels you reviewed: {card.class_names[1]} (0.18)." in text
    assert card.class_names[2] not in text.split("Not learnt yet")[1]


def test_a_new_segment_result_becomes_the_labels_to_correct(qtbot, segmented, phantom):
    viewer, segment, finetune, image, labels, _ = segmented
    other = viewer.add_image(phantom[0][::-1].copy(), name="other")
    reference = viewer.add_labels(phantom[1], name="reference labels")
    finetune.image_picker.set_layer(other)
    finetune.labels_picker.set_layer(reference)
    finetune.mode.setCurrentText("scribbles")
    brushes = [finetune.brush.itemText(i) for i in range(finetune.brush.count())]
    assert brushes[0].startswith("background (")  # the mode's brushes
    segment.image_picker.set_layer(image)
    with qtbot.waitSignal(segment.segmented, timeout=WAIT_MS) as blocker:
        segment.run()
    qtbot.waitUntil(lambda: not segment.job.busy, timeout=WAIT_MS)
    assert finetune.labels_picker.layer() is blocker.args[0] is not labels
    assert finetune.image_picker.layer() is image
    assert finetune.mode.currentText() == "corrections"
    brushes = [finetune.brush.itemText(i) for i in range(finetune.brush.count())]
    assert not any(b.startswith("background") for b in brushes)
    finetune.model_picker.select(resolve_model_path("brain-tissue-unet3d"))  # brushes follow
    brushes = [finetune.brush.itemText(i) for i in range(finetune.brush.count())]
    assert brushes == ["grey matter (1)", "white matter (2)", "new class (3)"]
    viewer.add_labels(np.zeros_like(phantom[1]), name="a user's layer")
    assert finetune.labels_picker.layer() is blocker.args[0]  # only results are followed


def test_cancel_stops_finetuning(qtbot, segmented, phantom, selfreg_home):
    viewer, segment, finetune, image, labels, messages = segmented
    _correct(labels, phantom[1])
    finetune.labels_picker.set_layer(labels)
    finetune.iterations.setValue(10_000)
    finetune.seconds.setValue(0)

    def cancel_after_two(event):
        if getattr(event, "kind", "") == "iteration" and event.iteration >= 2:
            finetune.job.cancel()

    with qtbot.waitSignal(finetune.job.finished, timeout=WAIT_MS):
        finetune.run().yielded.connect(cancel_after_two)
    assert finetune.job.outcome == "cancelled"
    assert finetune.new_model is None
    # nothing left behind: the cancelled round's temporary folder is gone too
    assert sorted(p.name for p in (selfreg_home / "models").iterdir()) == ["tiny"]
    assert not finetune.segment_button.isEnabled()
    assert finetune.run_button.isEnabled()


def test_closing_the_labels_while_training_keeps_going(qtbot, segmented, phantom):
    viewer, segment, finetune, image, labels, messages = segmented
    _correct(labels, phantom[1])
    finetune.labels_picker.set_layer(labels)
    finetune.iterations.setValue(3)
    finetune.seconds.setValue(0)

    def close_labels(event):
        if getattr(event, "kind", "") == "iteration" and labels in viewer.layers:
            viewer.layers.remove(labels)

    with qtbot.waitSignal(finetune.job.finished, timeout=WAIT_MS):
        finetune.run().yielded.connect(close_labels)
    assert labels not in viewer.layers
    assert any(kind == "warning" and "goes on" in text for kind, text in messages)
    assert finetune.job.outcome == "returned"  # trained on the copy taken at the start
    assert finetune.new_model is not None and finetune.new_model.is_dir()


def test_bad_inputs_are_clear_messages(qtbot, segmented, tiny_model):
    viewer, segment, finetune, image, labels, messages = segmented
    other = viewer.add_labels(np.zeros((5, 6, 7), np.uint8), name="other")
    finetune.image_picker.set_layer(image)
    finetune.labels_picker.set_layer(other)
    assert finetune.run() is None
    assert messages[-1][0] == "error" and "shape" in messages[-1][1]
    assert not finetune.job.busy
    for layer in (other, labels):
        viewer.layers.remove(layer)
    assert finetune.run() is None
    assert "labels layer" in messages[-1][1]
    viewer.layers.remove(image)
    assert finetune.run() is None
    assert "image layer" in messages[-1][1]
    assert not finetune.job.busy and finetune.new_model is None
    # a model saved elsewhere is announced: every model list shows it
    from napari_selfreg.widgets._common import announce_model

    copy = tiny_model.parent / "tiny-copy"
    shutil.copytree(tiny_model, copy)
    assert copy not in segment.model_picker.model_paths()
    announce_model(copy)
    assert copy in segment.model_picker.model_paths()
    assert copy in finetune.model_picker.model_paths()


def test_rounds_keep_what_was_reviewed_and_list_slices_to_check(qtbot, segmented, phantom):
    viewer, segment, finetune, image, labels, messages = segmented
    from napari_selfreg.widgets.finetune import PAINT_AXES_KEY, REVIEWED_KEY
    from napari_selfreg.widgets.segment import SLICE_SCORES_KEY

    assert [len(s) for s in labels.metadata[SLICE_SCORES_KEY]] == list(labels.data.shape)
    finetune.labels_picker.set_layer(labels)
    viewer.dims.ndisplay = 2
    viewer.dims.order = (0, 1, 2)  # the slider runs along axis 0
    assert finetune.view_axis() == 0
    listed = [finetune.next_slices.item(i).text() for i in range(finetune.next_slices.count())]
    assert listed and all("along axis 0" in t for t in listed)
    finetune.next_slices.itemClicked.emit(finetune.next_slices.item(0))
    first = int(listed[0].split()[1])
    assert viewer.dims.current_step[0] == first
    # the user repaints two slices along axis 0 (the paint event records the axis)
    for z in (5, 12):
        viewer.dims.set_current_step(0, z)
        labels.data[z] = phantom[1][z]
        labels.events.paint(value=[])
    assert labels.metadata[PAINT_AXES_KEY] == [0]
    assert "along axis 0" in finetune.changed_line.text()
    finetune.iterations.setValue(2)
    finetune.seconds.setValue(0)
    with qtbot.waitSignal(finetune.job.finished, timeout=WAIT_MS):
        finetune.run()
    assert finetune.job.outcome == "returned", messages
    reviewed = labels.metadata[REVIEWED_KEY]
    assert reviewed[[5, 12]].all() and not reviewed[[0, 8, 19]].any()
    assert (reviewed == 2).any() and set(np.unique(reviewed)) <= {0, 1, 2}  # corrections kept
    assert "1. tiny-ft" in finetune.rounds.text() and "tiny → tiny-ft" in finetune.rounds.text()
    assert ", 2 steps, " in finetune.rounds.text()  # the steps the round took
    listed = [finetune.next_slices.item(i).text() for i in range(finetune.next_slices.count())]
    assert not any(t.startswith(("slice 5 ", "slice 12 ")) for t in listed)  # reviewed: skipped
    # round 2 starts from a layer that keeps the reviewed slices as the user left them
    with qtbot.waitSignal(segment.segmented, timeout=WAIT_MS) as blocker:
        finetune.segment_button.click()
    second = blocker.args[0]
    np.testing.assert_array_equal(second.data[[5, 12]], phantom[1][[5, 12]])
    np.testing.assert_array_equal(second.metadata[REVIEWED_KEY], reviewed)
    assert finetune.labels_picker.layer() is second
    assert "reviewed in earlier rounds stay truth" in finetune.changed_line.text()  # at once
    # painting slice 8 in round 2 adds it as reviewed; round 1's corrections stay corrections
    viewer.dims.set_current_step(0, 8)
    second.data[8] = phantom[1][8]
    second.events.paint(value=[])
    review = finetune.review_map(second)
    assert (review[8] == 1).all()
    assert "the rest keeps this layer's labels at weight 0.1" in finetune.changed_line.text()
    np.testing.assert_array_equal(review[[5, 12]], reviewed[[5, 12]])


def test_painted_slices_and_check_next_follow_axes_that_run_backwards(qtbot, segmented):
    """The reader's display frame runs world axes 1 and 2 against the array: the slice
    recorded as reviewed and the slice a click goes to are array slices, not slider steps."""
    viewer, segment, finetune, image, labels, messages = segmented
    from napari_selfreg.widgets.finetune import _TARGET, PAINT_SLICES_KEY
    from napari_selfreg.widgets.segment import SLICE_SCORES_KEY

    flipped = viewer.add_labels(
        np.array(labels.data), name="flipped", affine=np.diag([1.0, -1.0, 1.0, 1.0]),
        metadata={SLICE_SCORES_KEY: labels.metadata[SLICE_SCORES_KEY]},
    )  # fmt: skip
    finetune.labels_picker.set_layer(flipped)
    viewer.dims.ndisplay = 2
    viewer.dims.order = (1, 0, 2)  # the slider runs along axis 1
    assert finetune.view_axis() == 1
    viewer.dims.set_point(1, -5.0)  # world -5 is array slice 5 of this layer
    flipped.events.paint(value=[])
    assert flipped.metadata[PAINT_SLICES_KEY] == {1: [5]}
    assert finetune.review_map(flipped)[:, 5].all() and not finetune.review_map(flipped)[:, 14].any()  # fmt: skip
    finetune.update_next_slices()
    item = finetune.next_slices.item(0)
    axis, index = item.data(_TARGET)
    finetune.next_slices.itemClicked.emit(item)
    assert axis == 1 and round(flipped.world_to_data(viewer.dims.point)[1]) == index


def test_scribbles_train_on_painted_voxels_only(qtbot, segmented, phantom):
    viewer, segment, finetune, image, labels, messages = segmented
    finetune.image_picker.set_layer(image)
    scribbles = finetune.new_scribble_layer()
    assert finetune.mode.currentText() == "scribbles"
    assert finetune.labels_picker.layer() is scribbles and not scribbles.data.any()
    assert scribbles.selected_label == 255  # the brush starts on background
    assert "paint background with label 255" in finetune.changed_line.text()
    assert finetune.lr.value() == pytest.approx(3e-4)  # the scribbles' learning rate
    truth = phantom[1]
    scribbles.data[10][truth[10] == 0] = 255
    scribbles.data[10][truth[10] == 1] = 1
    scribbles.events.paint(value=[])
    finetune.iterations.setValue(2)
    finetune.seconds.setValue(0)
    with qtbot.waitSignal(finetune.job.finished, timeout=WAIT_MS):
        finetune.run()
    assert finetune.job.outcome == "returned", messages
    card = read_card(finetune.new_model)
    painted = int((scribbles.data != 0).sum())
    assert card.training["finetune"]["painted_voxels"] == painted
    assert card.training["finetune"]["sparse"] is True
    assert card.training["finetune"]["lr"] == pytest.approx(3e-4)
    finetune.mode.setCurrentText("corrections")
    assert finetune.lr.value() == pytest.approx(1e-3)


def test_a_full_dock_scrolls_instead_of_clipping_lines(qtbot, segmented, phantom):
    viewer, segment, finetune, image, labels, messages = segmented
    _correct(labels, phantom[1])
    line = finetune.changed_line
    assert "voxels corrected" in line.text()
    window = viewer.window._qt_window
    window.tabifyDockWidget(segment.parent(), finetune.parent())  # one place, two tabs
    window.show()
    window.resize(1400, 420)  # shorter than the docks' rows (the window stops at its minimum)
    qtbot.waitUntil(window.isVisible, timeout=WAIT_MS)
    for widget in (segment, finetune):
        widget.parent().raise_()
        qtbot.waitUntil(widget.isVisible, timeout=WAIT_MS)
        qtbot.wait(200)
        rows = [w for w in widget.findChildren(QLabel) if w.isVisible() and w.text()]
        assert rows
        for row in rows:  # every line is as tall as its wrapped text needs
            assert row.height() >= row.heightForWidth(row.width()), row.text()
        for part in widget.findChildren(QWidget):  # and nothing sticks out on the right
            if part.isVisible() and not isinstance(part, QScrollBar):
                right = part.mapTo(widget, QPoint(part.width(), 0)).x()
                assert right <= widget.width(), (type(part).__name__, right, widget.width())
        scroll = widget.findChild(QScrollArea)
        assert scroll.verticalScrollBar().isVisible()  # the rows are taller than the window
        assert not scroll.horizontalScrollBar().isVisible()
    assert line.height() >= line.heightForWidth(line.width()) > line.fontMetrics().height()


def test_the_curve_plots_the_mean_dice_of_the_classes_after_background():
    dice = {"background": 0.99, "grey matter": 0.5, "lesion": None, "white matter": 0.7}
    assert mean_foreground_dice(dice) == pytest.approx(0.6)
    assert mean_foreground_dice({"background": 0.99, "lesion": None}) is None


def test_docks_in_one_column_each_show_a_few_rows(qtbot, segmented):
    from napari_selfreg.widgets._layout import MIN_DOCK_HEIGHT

    viewer, segment, finetune, *_ = segmented
    window = viewer.window._qt_window
    window.show()
    window.resize(1500, 950)
    for widget in (segment, finetune):
        qtbot.waitUntil(widget.isVisible, timeout=WAIT_MS)
    qtbot.wait(300)
    for widget in (segment, finetune):  # the first dock is not squeezed to two rows
        scroll = widget.findChild(QScrollArea)
        wanted = min(MIN_DOCK_HEIGHT, scroll.widget().sizeHint().height())
        assert scroll.height() >= wanted, (type(widget).__name__, scroll.height())
