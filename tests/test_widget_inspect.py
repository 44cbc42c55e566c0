"""Inspect features dock widget in a real napari viewer (run under xvfb-run)."""

import time

import numpy as np
import pytest
import torch

from napari_selfreg import analysis, models
from napari_selfreg.modelfile import ModelCard, load_model, save_model
from napari_selfreg.widgets.inspect import CENTRED, InspectWidget

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("one_torch_thread")]


def _image(shape, seed=0):
    try:
        from napari_selfreg.data import make_phantom
    except ImportError:
        make_phantom = None
    if make_phantom is not None:
        return np.asarray(make_phantom(shape, seed=seed)[0], dtype=np.float32)
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    img = sum(np.exp(-sum((g - c) ** 2 for g, c in zip(grids, rng.uniform(-0.5, 0.5, 3), strict=True)) / 0.05)
              for _ in range(3))  # fmt: skip
    return (100 + 50 * img + rng.normal(0, 2, shape)).astype(np.float32)


def _save(name, dims=3, seed=0):
    torch.manual_seed(seed)
    arch = f"unet{dims}d"
    net = models.build(arch, channels=(4, 8, 16))
    with torch.no_grad():
        net.head.bias[1] += 0.5  # some voxels predicted as "blob"
    card = ModelCard(name, arch, {"channels": [4, 8, 16]}, ["background", "blob"])
    return save_model(net, card)


@pytest.fixture
def env(make_napari_viewer, qtbot, tmp_path, monkeypatch, messages):
    """A viewer, the widget, a tiny saved model, and the messages the widget shows."""
    monkeypatch.setenv("NAPARI_SELFREG_HOME", str(tmp_path))
    analysis.clear_cache()
    path = _save("tiny")
    viewer = make_napari_viewer()
    widget = InspectWidget(viewer)
    qtbot.addWidget(widget)
    widget.model_picker.select(path)
    qtbot.waitUntil(lambda: widget.block_combo.count() > 0, timeout=60000)
    # the default model the dock opened with loads too: let it finish, so that its
    # "ready" comes before the test, not in the middle of it
    qtbot.waitUntil(lambda: not widget._loaders, timeout=60000)
    yield viewer, widget, messages
    if widget.job.busy:
        widget.cancel()
        _wait_done(qtbot, widget)
    qtbot.waitUntil(lambda: not widget._loaders, timeout=60000)
    from qtpy.QtCore import QThreadPool

    # workers run in Qt's global pool (as many threads as cores): let this test's finish
    # before the next test needs a thread for its model loader
    assert QThreadPool.globalInstance().waitForDone(60000)


def _wait_done(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.job.busy, timeout=30000)


def _slow_stats(monkeypatch, seconds=0.3):
    """Each block's statistics take ``seconds`` longer (patched where the job calls them)."""
    from napari_selfreg.analysis import inspection

    block_stats = inspection.block_stats

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return block_stats(*args, **kwargs)

    monkeypatch.setattr(inspection, "block_stats", slow)


def test_no_image_layer_and_broken_model_are_clear_errors(env, qtbot, tmp_path):
    viewer, widget, messages = env
    assert widget.run() is None
    assert messages == [("error", "Add an image layer first: there is nothing to inspect.")]
    assert not widget.job.busy and widget.run_button.isEnabled()
    assert "image layer" in widget.status.text()
    not_json = tmp_path / "elsewhere" / "not-json"
    not_json.mkdir(parents=True)
    (not_json / "model.json").write_text("{not json")
    widget.add_model(not_json)  # refused at once: no card
    assert messages[1][0] == "error" and "not valid JSON" in messages[1][1]
    assert widget.model_picker.combo.currentText() == "tiny"
    broken = tmp_path / "elsewhere" / "broken"  # a valid card, weights cut short
    save_model_path = _save("broken")
    save_model_path.rename(broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    widget.add_model(broken)
    qtbot.waitUntil(lambda: len(messages) == 3, timeout=20000)
    assert messages[2][0] == "error" and "cannot load model broken" in messages[2][1]
    viewer.add_image(np.zeros((8, 8, 8), np.float32), name="vol")
    assert widget.run() is None  # the chosen model failed to load: the same message again
    assert messages[3] == messages[2] and not widget.job.busy


def test_around_the_slice_takes_the_nearest_slice_of_a_thinner_image(env):
    """The slider can stand beyond a thin image (another layer is deeper): no error."""
    viewer, widget, messages = env
    viewer.add_image(_image((40, 24, 24)), name="deep")
    thin = viewer.add_image(_image((24, 24, 24), seed=1)[:5], name="thin")
    viewer.dims.ndisplay = 2
    viewer.dims.set_point(0, 30.0)
    region, _ = widget._region(thin, load_model(widget.model_picker.model_path()))
    assert 0 <= region[0].start < region[0].stop <= 5


def test_bad_images_are_refused(env):
    viewer, widget, messages = env
    photo = viewer.add_image(np.zeros((20, 20, 3), np.uint8), rgb=True, name="photo")
    widget.image_picker.set_layer(photo)
    assert widget.run() is None
    flat = viewer.add_image(np.zeros((20, 20), np.float32), name="flat")
    widget.image_picker.set_layer(flat)
    assert widget.run() is None
    assert [k for k, _ in messages] == ["error", "error"]
    assert "RGB image 'photo'" in messages[0][1]
    assert "is 3D and image 'flat' is 2D" in messages[1][1]
    assert not widget.job.busy and len(viewer.layers) == 2


def test_run_adds_aligned_layers_and_plots(env, qtbot):
    viewer, widget, messages = env
    image = viewer.add_image(_image((20, 24, 22)), name="ct", scale=(2.0, 1.0, 0.5),
                             translate=(5.0, -3.0, 1.0))  # fmt: skip
    widget.image_picker.set_layer(image)
    assert widget.model_picker.combo.currentText() == "tiny"
    assert [widget.block_combo.itemText(i) for i in range(widget.block_combo.count())] == [
        "stem", "enc1", "bottleneck", "dec1", "final"]  # fmt: skip
    widget.block_combo.setCurrentText("enc1")
    widget.region_combo.setCurrentIndex(widget.region_combo.findData(CENTRED))
    widget.topk_spin.setValue(2)
    widget.class_combo.setCurrentText("blob")

    widget.run_button.click()
    assert not widget.run_button.isEnabled()
    assert widget.run() is None  # pressing Run twice does nothing harmful
    assert messages[-1][0] == "warning" and "already running" in messages[-1][1]
    _wait_done(qtbot, widget)
    assert widget.run_button.isEnabled() and widget.job.outcome == "returned"
    assert not [m for m in messages if m[0] == "error"], messages

    names = [layer.name for layer in viewer.layers]
    channels = [n for n in names if n.startswith("features/tiny/enc1/ch")]
    assert len(channels) == 2
    pca = viewer.layers["features/tiny/enc1/PCA"]
    cam = viewer.layers["grad-cam/tiny/enc1/class blob"]
    assert pca.rgb and pca.data.shape == (10, 12, 11, 3)
    assert cam.colormap.name == "turbo" and cam.blending == "additive" and cam.opacity == 0.5
    assert cam.data.shape == (20, 24, 22) and cam.data.max() == pytest.approx(1.0)
    # a feature voxel sits at the centre of the 2x2x2 image voxels it covers
    for j in [(0, 0, 0), (3, 5, 7)]:
        covered = [np.add(np.multiply(j, 2), d) for d in np.ndindex(2, 2, 2)]
        centre = np.mean([image.data_to_world(v) for v in covered], axis=0)
        np.testing.assert_allclose(pca.data_to_world(j), centre)
        np.testing.assert_allclose(viewer.layers[channels[0]].data_to_world(j), centre)
    np.testing.assert_allclose(cam.data_to_world((4, 4, 4)), image.data_to_world((4, 4, 4)))

    # plots: the heatmap of enc1 and four bar charts with one bar per block
    axes = widget.figure.axes
    heat = axes[0].get_images()[0].get_array()
    assert heat.shape == (8, 8)
    stats = widget._results[0].stats
    np.testing.assert_allclose(heat, stats["enc1"].similarity)
    bars = [ax for ax in axes if ax.patches]
    assert len(bars) == 5
    heights = [p.get_height() for p in bars[3].patches]
    np.testing.assert_allclose(heights, [s.effective_rank for s in stats.values()])
    widget.block_combo.setCurrentText("bottleneck")  # redraws from the last result
    assert widget.figure.axes[0].get_images()[0].get_array().shape == (16, 16)


def test_cancel_stops_the_job_and_adds_nothing(env, qtbot, monkeypatch):
    viewer, widget, messages = env
    viewer.add_image(_image((16, 16, 16)), name="vol")
    _slow_stats(monkeypatch, 1.5)  # a busy CI machine must not finish the job before the click
    widget.run()
    qtbot.waitUntil(lambda: widget.job.progress.value() >= 1, timeout=20000)
    widget.job.cancel_button.click()
    _wait_done(qtbot, widget)
    assert widget.status.text() == "The feature inspection was cancelled; nothing was added."
    assert widget.job.outcome == "cancelled"
    assert [layer.name for layer in viewer.layers] == ["vol"]
    assert widget.run_button.isEnabled() and not widget.job.cancel_button.isEnabled()


def test_closing_the_image_while_running_loses_nothing(env, qtbot, monkeypatch):
    viewer, widget, messages = env
    viewer.add_image(_image((16, 16, 16)), name="vol", scale=(3, 1, 1))
    _slow_stats(monkeypatch, 0.1)
    widget.run()
    qtbot.waitUntil(lambda: widget.job.progress.value() >= 1, timeout=20000)
    viewer.layers.remove("vol")
    _wait_done(qtbot, widget)
    assert widget.job.outcome == "returned"
    assert not [m for m in messages if m[0] == "error"], messages
    # the defaults: the first encoder block, around the current slice, said in the dock
    pca = viewer.layers["features/tiny/enc1/PCA"]
    np.testing.assert_allclose(pca.scale, [6, 2, 2])  # still aligned with the removed image
    assert widget.status.text().startswith("done: region 16 x 16 x 16 voxels")
    assert not [m for m in messages if "reduced" in m[1]], messages  # a note, not a warning


def test_compare_two_models_on_a_box(env, qtbot):
    viewer, widget, messages = env
    viewer.add_image(_image((12, 40, 36)), name="vol")
    other = _save("other", seed=1)
    widget.add_model(other, compare=True)
    qtbot.waitUntil(lambda: str(other) in widget._bundles, timeout=20000)
    viewer.dims.set_point(0, 6)
    viewer.add_shapes([[[6, 8, 4], [6, 8, 20], [6, 27, 20], [6, 27, 4]]], name="roi")
    widget.region_combo.setCurrentIndex(widget.region_combo.findData("roi"))
    widget.block_combo.setCurrentText("final")
    widget.class_combo.setCurrentText("off")
    widget.run()
    _wait_done(qtbot, widget)
    assert not [m for m in messages if m[0] == "error"], messages
    a = viewer.layers["features/tiny/final/PCA"]
    b = viewer.layers["features/other/final/PCA"]
    # the rectangle (rows 8..27, columns 4..20) on slice 6, as a slab of the default patch
    assert a.data.shape == (12, 20, 17, 3) and b.data.shape == a.data.shape
    np.testing.assert_allclose(a.translate, [0, 8, 4])
    assert not [n for n in viewer.layers if n.name.startswith("grad-cam")]
    heatmaps = [ax for ax in widget.figure.axes if ax.get_images()]
    assert [ax.get_title().split("\n")[0] for ax in heatmaps] == ["tiny", "other"]
    legend = widget.figure.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["tiny", "other"]
    bars = [ax for ax in widget.figure.axes if ax.patches]
    assert len(bars) == 5 and all(len(ax.patches) == 2 * 5 for ax in bars)


def test_the_status_line_after_a_run_is_not_clipped(env, qtbot):
    viewer, widget, _ = env
    viewer.add_image(_image((40, 40, 40)), name="ct")
    window = viewer.window._qt_window
    window.show()
    window.resize(1500, 1000)  # the rows and the plot are taller than the dock: it scrolls
    _, docked = viewer.window.add_plugin_dock_widget("napari-selfreg", "Inspect features")
    qtbot.waitUntil(lambda: not docked._loaders, timeout=60000)
    docked.model_picker.select(widget.model_picker.model_path())
    qtbot.waitUntil(lambda: not docked._loaders, timeout=60000)
    docked.region_combo.setCurrentIndex(docked.region_combo.findData(CENTRED))
    docked.run()
    _wait_done(qtbot, docked)
    qtbot.wait(300)
    status = docked.status
    assert status.text().startswith("done: region")
    assert status.heightForWidth(status.width()) > 2 * status.fontMetrics().height()
    assert status.height() >= status.heightForWidth(status.width())
