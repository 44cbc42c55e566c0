"""The npe2 plugin shell: manifest, reader, writers, sample data, widgets docking.

GUI tests need a display: ``xvfb-run -a pytest tests/test_napari_plugin.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_selfreg._reader import META_KEY, _looks_like_labels, napari_get_reader
from napari_selfreg.geometry import layer_ras_affine, layer_world_matrix

PLUGIN = "napari-selfreg"
AFFINE = np.array(
    [
        [0.0, 0.0, 2.0, -30.0],
        [-1.5, 0.0, 0.0, 40.0],
        [0.0, 1.2, 0.1, -5.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _same_placement(layer, file_affine: np.ndarray, file_data: np.ndarray) -> None:
    """Every file voxel sits at its file-affine world position in the layer, with its value."""
    axes = layer.metadata[META_KEY]["axes"] if META_KEY in layer.metadata else (0, 1, 2)
    rng = np.random.default_rng(0)
    matrix = layer_ras_affine(layer)
    for index in rng.integers(0, file_data.shape, size=(10, 3)):
        layer_index = index[list(axes)]
        np.testing.assert_allclose(
            matrix @ [*layer_index, 1], file_affine @ [*index, 1], atol=1e-5
        )
        assert np.asarray(layer.data)[tuple(layer_index)] == file_data[tuple(index)]


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _dicom_series(folder: Path, n: int = 4) -> Path:
    """A tiny axial DICOM series (n slices of 6 x 5) written with pydicom."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    series = generate_uid()
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        from pydicom.dataset import FileDataset

        ds = FileDataset(str(folder / f"s{i}"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.Modality = "CT"
        ds.Rows, ds.Columns = 6, 5
        ds.PixelSpacing = [0.8, 0.7]
        ds.SliceThickness = 2.0
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * i]
        ds.InstanceNumber = i + 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = (np.arange(30, dtype=np.int16).reshape(6, 5) + 100 * i).tobytes()
        ds.save_as(str(folder / f"s{i}"), enforce_file_format=True)  # no .dcm suffix
    return folder


# ----------------------------------------------------------------------------- manifest


def test_npe2_validate_with_imports():
    npe2 = shutil.which("npe2", path=os.path.dirname(sys.executable))
    assert npe2, "npe2 is not installed next to this python"
    proc = subprocess.run(
        [npe2, "validate", PLUGIN, "--imports"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "valid" in (proc.stdout + proc.stderr).lower()


def test_manifest_contributions():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest(PLUGIN)
    assert manifest.name == PLUGIN
    contrib = manifest.contributions
    assert {c.id for c in contrib.commands} >= {
        f"{PLUGIN}.get_reader",
        f"{PLUGIN}.segment_widget",
        f"{PLUGIN}.inspect_widget",
        f"{PLUGIN}.finetune_widget",
    }
    assert all(c.id.startswith(f"{PLUGIN}.") for c in contrib.commands)
    assert [w.display_name for w in contrib.widgets] == [
        "Segment",
        "Inspect features",
        "Fine-tune",
    ]
    assert {s.key for s in contrib.sample_data} == {"mni152", "phantom"}
    assert contrib.readers[0].accepts_directories
    from napari_selfreg.io import READ_SUFFIXES

    assert set(contrib.readers[0].filename_patterns) == {f"*{s}" for s in READ_SUFFIXES}
    assert {tuple(w.layer_types) for w in contrib.writers} == {("labels",), ("image",)}


def test_reader_sample_writer_import_without_torch(tmp_path):
    """napari starts fast: the reader, writer and sample modules never import torch."""
    path = _nifti(tmp_path / "scan.nii.gz", np.zeros((4, 5, 6), np.float32))
    code = f"""
import sys, json
import napari_selfreg._reader as r, napari_selfreg._writer as w, napari_selfreg._sample_data as s
layers = r.napari_get_reader({str(path)!r})({str(path)!r})
sample = s.phantom()
print(json.dumps({{"torch": "torch" in sys.modules, "layers": len(layers), "sample": len(sample)}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"torch": False, "layers": 1, "sample": 2}


# ----------------------------------------------------------------------------- reader


@pytest.mark.parametrize("name", ["notes.txt", "scan.png", "missing.nii.gz"])
def test_reader_returns_none_for_paths_it_does_not_take(tmp_path, name):
    path = tmp_path / name
    if name != "missing.nii.gz":
        path.write_text("not a volume")
    assert napari_get_reader(str(path)) is None


def test_reader_returns_none_for_folders_and_lists_it_does_not_take(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    assert napari_get_reader(str(tmp_path)) is None
    assert napari_get_reader([str(tmp_path / "a.nii"), str(tmp_path / "b.nii")]) is None
    assert napari_get_reader(12345) is None


def test_reader_nifti_gives_data_and_world_placement(tmp_path):
    from napari.layers import Layer

    data = np.random.default_rng(0).normal(size=(7, 6, 5)).astype(np.float32)
    path = _nifti(tmp_path / "scan.nii.gz", data)
    reader = napari_get_reader(str(path))
    assert reader is not None
    [(layer_data, kwargs, layer_type)] = reader(str(path))
    assert layer_type == "image"
    assert kwargs["name"] == "scan"
    stored = kwargs["metadata"][META_KEY]
    np.testing.assert_allclose(stored["affine"], AFFINE)
    # shown in the display frame (superior, posterior, left): the file's axis 1 runs
    # superior, axis 0 posterior (its -1.5 mm runs anterior to posterior), axis 2 left
    assert stored["axes"] == (1, 0, 2) and stored["frame"] == "SPL"
    assert np.shape(layer_data) == (6, 7, 5) and kwargs["axis_labels"] == ("S", "P", "L")
    _same_placement(Layer.create(layer_data, kwargs, layer_type), AFFINE, data)


def test_reader_opens_integer_label_files_as_labels(tmp_path):
    labels = np.zeros((5, 5, 5), np.uint8)
    labels[1:3, 1:4, 2:4] = 2
    path = _nifti(tmp_path / "case_seg.nii.gz", labels, np.diag([0.5, 0.5, 2.0, 1.0]))
    [(data, _, layer_type)] = napari_get_reader(str(path))(str(path))
    assert layer_type == "labels"
    np.testing.assert_array_equal(np.asarray(data), labels.transpose(2, 1, 0))  # axial first


@pytest.mark.parametrize(
    ("name", "labels"),
    [("sub-01_dseg", True), ("aparc+aseg", True), ("brain_mask", True), ("liver-seg2", True),
     ("wmparc", True), ("Labels", True), ("brainmask", False), ("sub-01_T1w_masked", False),
     ("t1", False)],
)  # fmt: skip
def test_the_file_name_decides_labels_by_whole_words(name, labels):
    assert _looks_like_labels(np.zeros(3, np.uint8), name) is labels
    assert _looks_like_labels(np.zeros(3, np.float32), name) is False


def test_reader_opens_each_volume_of_a_4d_file(tmp_path):
    echoes = np.stack([np.full((6, 7, 5), k, np.float32) for k in range(3)], axis=-1)
    path = _nifti(tmp_path / "multi_echo.nii.gz", echoes)
    layers = napari_get_reader(str(path))(str(path))
    assert [kw["name"] for _, kw, _ in layers] == [f"multi_echo [{k}]" for k in range(3)]
    for k, (data, kwargs, kind) in enumerate(layers):
        assert (
            kind == "image"
            and sorted(np.shape(data)) == [5, 6, 7]
            and np.all(np.asarray(data) == k)
        )
        assert kwargs["metadata"][META_KEY]["metadata"]["channel"] == k
    series = _nifti(tmp_path / "bold.nii.gz", np.zeros((4, 4, 3, 20), np.float32))
    with pytest.warns(UserWarning, match=r"holds 20 volumes; opened the first.*--channel K"):
        [(data, kwargs, _)] = napari_get_reader(str(series))(str(series))
    assert kwargs["name"] == "bold [0]"


@pytest.mark.parametrize("plane", ["axial", "coronal"])
def test_a_single_slice_is_written_back_where_it_was(tmp_path, plane):
    """A 2D layer shows only its in-plane placement; the file's 3D affine is written back."""
    from napari.layers import Image, Labels

    from napari_selfreg._writer import write_labels

    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    if plane == "coronal":  # the slice's rows run along S, its one voxel along A
        affine[:3, :3] = [[0.8, 0, 0], [0, 0, 2.5], [0, 0.9, 0]]
    affine[:3, 3] = [-10.0, 20.0, 30.0]
    path = _nifti(tmp_path / f"{plane}.nii.gz", np.arange(120, dtype=np.int16).reshape(10, 12, 1), affine)  # fmt: skip
    [(data, kwargs, _)] = napari_get_reader(str(path))(str(path))
    image = Image(data, **kwargs)
    labels = Labels((np.asarray(data) > 50).astype(np.uint8), metadata=image.metadata, **{k: getattr(image, k) for k in ("scale", "translate", "rotate", "shear", "affine")})  # fmt: skip
    [out] = write_labels(str(tmp_path / "labels.nii.gz"), labels.data, labels.as_layer_data_tuple()[1])  # fmt: skip
    back = nib.load(out)
    assert back.shape == (10, 12, 1) and np.allclose(back.affine, affine)


def test_reader_takes_dicom_folders(tmp_path):
    folder = _dicom_series(tmp_path / "series")
    reader = napari_get_reader(str(folder))
    assert reader is not None
    [(data, kwargs, layer_type)] = reader(str(folder))
    assert layer_type == "image"
    assert sorted(np.shape(data)) == [4, 5, 6]
    spacing = sorted(kwargs["metadata"][META_KEY]["spacing"])
    np.testing.assert_allclose(spacing, [0.7, 0.8, 2.0], atol=1e-5)


# ----------------------------------------------------------------------------- in a viewer


@pytest.mark.gui
def test_open_and_save_round_trip_through_napari(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    data = np.random.default_rng(1).normal(size=(9, 8, 7)).astype(np.float32)
    src = _nifti(tmp_path / "scan.nii.gz", data)
    [image] = viewer.open(str(src), plugin=PLUGIN)
    _same_placement(image, AFFINE, data)
    viewer.dims.ndisplay = 3
    viewer.dims.ndisplay = 2  # napari can slice it in both modes

    out = tmp_path / "saved_image.nii.gz"
    image.save(str(out), plugin=PLUGIN)
    back = nib.load(str(out))
    assert back.shape == data.shape
    np.testing.assert_allclose(back.affine, AFFINE, atol=1e-6)
    np.testing.assert_allclose(back.get_fdata(), data, atol=1e-5)

    from napari_selfreg.widgets._common import layer_transform

    layer_labels = (np.asarray(image.data) > 0).astype(np.uint8) + (np.asarray(image.data) > 1)
    layer = viewer.add_labels(
        layer_labels, name="mask", metadata=dict(image.metadata), **layer_transform(image)
    )
    labels = (data > 0).astype(np.uint8) + (data > 1)  # the same labels in file order
    out = tmp_path / "saved_labels.nii.gz"
    layer.save(str(out), plugin=PLUGIN)
    back = nib.load(str(out))
    assert back.shape == labels.shape
    np.testing.assert_allclose(back.affine, AFFINE, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels)

    [again] = viewer.open(str(out), plugin=PLUGIN)
    assert again._type_string == "labels"
    _same_placement(again, AFFINE, labels)

    # a layer made in napari (no file metadata): its placement becomes the affine
    placed = viewer.add_labels(labels, scale=(2.0, 1.0, 0.5), translate=(10.0, -4.0, 3.0))
    out = tmp_path / "placed.nii"
    placed.save(str(out), plugin=PLUGIN)
    back = nib.load(str(out))
    np.testing.assert_allclose(np.diag(back.affine), [2.0, 1.0, 0.5, 1.0])
    np.testing.assert_allclose(back.affine[:3, 3], [10.0, -4.0, 3.0])
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels)


@pytest.mark.gui
def test_samples_open(make_napari_viewer):
    from napari_selfreg.data import SAMPLES

    viewer = make_napari_viewer()
    for key in ("phantom", "mni152"):
        viewer.layers.clear()
        viewer.open_sample(PLUGIN, key)
        _check_sample(viewer, key, SAMPLES)


def _check_sample(viewer, key, SAMPLES):
    image, labels = viewer.layers
    assert image._type_string == "image" and labels._type_string == "labels"
    assert image.data.shape == labels.data.shape and image.data.ndim == 3
    assert set(np.unique(labels.data)) <= set(range(len(SAMPLES[key].class_names)))
    np.testing.assert_allclose(layer_world_matrix(image), layer_world_matrix(labels))
    axes = image.metadata[META_KEY]["axes"]
    file_affine = np.asarray(image.metadata[META_KEY]["affine"])
    np.testing.assert_allclose(
        layer_ras_affine(image)[:, :3], file_affine[:, list(axes)], atol=1e-6
    )
    assert image.axis_labels == ("S", "P", "L")  # axial slices, radiological view
    assert list(labels.features["class"]) == SAMPLES[key].class_names


@pytest.mark.gui
def test_every_manifest_widget_docks(make_napari_viewer, selfreg_home, qtbot):
    from npe2 import PluginManager

    viewer = make_napari_viewer()
    manifest = PluginManager.instance().get_manifest(PLUGIN)
    classes = {c.id: c.python_name.rpartition(":")[2] for c in manifest.contributions.commands}
    for contribution in manifest.contributions.widgets:
        dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, contribution.display_name)
        assert dock.inner_widget() is widget
        assert type(widget).__name__ == classes[contribution.command]
        again = viewer.window.add_plugin_dock_widget(PLUGIN, contribution.display_name)
        assert again[1] is widget  # docking twice reuses the open widget
        # Inspect starts loading the selected model in a thread: let it finish
        # inside the test, not during interpreter exit.
        loaders = getattr(widget, "_loaders", {})
        qtbot.waitUntil(lambda loaders=loaders: not loaders, timeout=30000)
