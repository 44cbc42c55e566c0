"""The 3D Slicer module's logic (slicer/SelfRegSegmentation) on Slicer's own MRML libraries.

``slicer-core`` is the PyPI wheel of 3D Slicer's core libraries without Qt: the MRML
scene and nodes, storage nodes (ITK readers) and the segmentations logic. Volumes are
read by Slicer's ``vtkMRMLVolumeArchetypeStorageNode``; ``slicer.mrmlScene`` and the
``slicer.modules`` logics that the Slicer application provides are set up here so that
``slicer.util``'s segment helpers run as they do in Slicer. The Qt widget is not tested
(it needs the Slicer application).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REASON = "slicer-core (3D Slicer's MRML libraries; pip install slicer-core, Python 3.11) is not installed"  # fmt: skip
slicer = pytest.importorskip("slicer", reason=REASON)
if not hasattr(slicer, "vtkMRMLScene"):  # the repository's slicer/ folder as a namespace package
    pytest.skip(REASON, allow_module_level=True)

import slicer.util  # noqa: E402
import torch  # noqa: E402

from napari_selfreg import cli, io  # noqa: E402
from napari_selfreg.analysis import extract_features, redundancy_stats  # noqa: E402
from napari_selfreg.data import make_phantom  # noqa: E402
from napari_selfreg.modelfile import load_model, read_card, save_model  # noqa: E402

LIB = Path(__file__).resolve().parents[1] / "slicer" / "SelfRegSegmentation" / "SelfRegSegmentationLib"  # fmt: skip


def _import_lib():
    """The module's Qt-free package, imported from its folder as Slicer does."""
    if "SelfRegSegmentationLib" in sys.modules:
        return sys.modules["SelfRegSegmentationLib"]
    spec = importlib.util.spec_from_file_location(
        "SelfRegSegmentationLib", LIB / "__init__.py", submodule_search_locations=[str(LIB)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


lib = _import_lib()
nodes = sys.modules["SelfRegSegmentationLib.nodes"]
SelfRegSegmentationLogic = lib.SelfRegSegmentationLogic

SHAPE = (24, 28, 26)
TILE = ["--tile", "16", "--device", "cpu", "--precision", "fp32"]
OPTIONS = {"tile": 16, "device": "cpu", "precision": "fp32"}
REGION = (slice(2, 18), slice(4, 20), slice(3, 19))  # (i, j, k) voxels: 16^3


def _affine(kind: str) -> np.ndarray:
    """Anisotropic voxels, axis-aligned and flipped (LAS: a left-handed grid, which ITK
    stores with K reversed), or oblique: axes permuted (i -> A, j -> S, k -> R) and
    rotated 20 degrees about S."""
    a = np.eye(4)
    if kind == "axis-aligned":
        a[:3, :3] = np.diag([-1.2, 0.9, 1.5])
    else:
        t = np.deg2rad(20)
        rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
        a[:3, :3] = rot @ np.array([[0, 0, 1.5], [1.2, 0, 0], [0, 0.9, 0]])
    a[:3, 3] = [-10.0, 5.0, 3.0]
    return a


@pytest.fixture
def scene(monkeypatch):
    """A scene set up as the Slicer application does (default colour tables), published
    as ``slicer.mrmlScene`` with the segmentations and volumes logics in ``slicer.modules``."""
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(scene)
    modules = SimpleNamespace(
        segmentations=SimpleNamespace(logic=lambda: segmentations),
        volumes=SimpleNamespace(logic=lambda: volumes),
    )
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "modules", modules, raising=False)
    yield scene
    scene.Clear(True)


@pytest.fixture
def ras_model(tiny_model):
    """The tiny model with a random head (it predicts all three classes on the phantom
    when untrained) and a card orientation ``RAS``, so the predictor reorients volumes."""
    bundle = load_model(tiny_model)
    head = bundle.network.head
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator))
        head.bias.zero_()
    card = dataclasses.replace(bundle.card, name="tiny-ras", orientation="RAS")
    return save_model(bundle.network, card)


def write_scan(folder: Path, kind: str) -> Path:
    image, _ = make_phantom(SHAPE, 3, seed=0)
    return io.write_volume(folder / f"scan-{kind}.nii.gz", image.astype(np.float32), affine=_affine(kind))  # fmt: skip


def read_with_slicer(scene, path: Path):
    """A scalar volume node read by Slicer's own storage node (ITK's NIfTI reader)."""
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(volume)
    volume.SetAndObserveStorageNodeID(storage.GetID())
    return volume


def segment_labels(segmentation, volume, class_names) -> np.ndarray:
    """The segments as one (i, j, k) label array, read with ``slicer.util``."""
    labels = np.zeros(nodes.dimensions(volume), dtype=np.uint8)
    for c, name in enumerate(class_names[1:], start=1):
        segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
        assert segment_id, f"no segment named {name!r}"
        kji = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
        labels[kji.transpose(2, 1, 0) > 0] = c
    return labels


def in_file_grid(array: np.ndarray, matrix: np.ndarray, affine: np.ndarray, shape) -> np.ndarray:
    """``array`` on a Slicer volume's grid (IJK-to-RAS ``matrix``) resampled, without
    interpolation, to a file's grid (``affine``, ``shape``). The grids must be the same
    voxels up to a signed axis permutation: ITK reverses K of a left-handed NIfTI."""
    t = np.linalg.inv(matrix) @ affine  # file (i, j, k) -> Slicer (i, j, k)
    perm, offset = np.round(t[:3, :3]), np.round(t[:3, 3])
    np.testing.assert_allclose(t[:3, :3], perm, atol=1e-4)
    np.testing.assert_allclose(t[:3, 3], offset, atol=1e-3)
    assert sorted(np.abs(perm).sum(0)) == [1, 1, 1] and sorted(np.abs(perm).sum(1)) == [1, 1, 1]
    index = perm @ np.indices(shape).reshape(3, -1) + offset[:, None]
    i, j, k = index.astype(int)
    return array[i, j, k].reshape(shape)


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        digest.update(p.name.encode() + (p.read_bytes() if p.is_file() else b""))
    return digest.hexdigest()


@pytest.mark.parametrize("kind", ["axis-aligned", "oblique"])
def test_segment_equals_the_cli_voxel_for_voxel_in_the_volume_geometry(
    scene, ras_model, tmp_path, kind
):
    path = write_scan(tmp_path, kind)
    out = tmp_path / "cli_labels.nii.gz"
    assert cli.main(["segment", str(path), "-o", str(out), "--model", str(ras_model), "--quiet", *TILE]) == 0  # fmt: skip
    expected = io.read_volume(out).data
    assert len(np.unique(expected)) == 3  # a comparison that can fail

    volume = read_with_slicer(scene, path)
    matrix = nodes.ijk_to_ras(volume)
    segmentation = SelfRegSegmentationLogic().segment(volume, ras_model, **OPTIONS)

    card = read_card(ras_model)
    assert [name for _, name in nodes.segment_list(segmentation)] == card.class_names[1:]
    labels = segment_labels(segmentation, volume, card.class_names)
    affine = io.read_volume(out).affine
    np.testing.assert_array_equal(in_file_grid(labels, matrix, affine, expected.shape), expected)
    for segment_id, name in nodes.segment_list(segmentation):
        color = segmentation.GetSegmentation().GetSegment(segment_id).GetColor()
        want = nodes.hex_to_rgb(card.class_colors[card.class_names.index(name)])
        np.testing.assert_allclose(color, want, atol=1e-6)

    # geometry: the reference image geometry and the stored labelmap are the volume's
    assert segmentation.GetNodeReference(
        slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    ) is volume  # fmt: skip
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    reference = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(
        segmentation.GetSegmentation().GetConversionParameter(name), reference
    )
    stored = slicer.vtkOrientedImageData()
    segmentation.GetBinaryLabelmapRepresentation(nodes.segment_list(segmentation)[0][0], stored)
    for image in (reference, stored):
        world = nodes.array_to_matrix(np.eye(4))
        image.GetImageToWorldMatrix(world)
        np.testing.assert_allclose(nodes.matrix_to_array(world), matrix, rtol=0, atol=1e-9)
        assert tuple(image.GetDimensions()) == nodes.dimensions(volume) == SHAPE
        assert tuple(image.GetExtent()) == (0, SHAPE[0] - 1, 0, SHAPE[1] - 1, 0, SHAPE[2] - 1)


def test_a_parent_transform_says_where_the_anatomy_points(scene, ras_model, tmp_path):
    """A volume stored mirrored and set right by a linear transform segments as the volume
    stored right does: the predictor reorients with the matrix in the scene."""
    right = read_with_slicer(scene, write_scan(tmp_path, "axis-aligned"))
    mirror = np.diag([-1.0, 1.0, 1.0, 1.0])  # x mirrored in RAS
    stored = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "mirrored")
    stored.SetAndObserveImageData(right.GetImageData())
    stored.SetIJKToRASMatrix(nodes.array_to_matrix(mirror @ nodes.ijk_to_ras(right)))
    fix = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "set right")
    fix.SetMatrixTransformToParent(nodes.array_to_matrix(mirror))
    stored.SetAndObserveTransformNodeID(fix.GetID())
    np.testing.assert_allclose(nodes.ijk_to_world(stored), nodes.ijk_to_ras(right))
    names = read_card(ras_model).class_names
    expected = segment_labels(SelfRegSegmentationLogic().segment(right, ras_model, **OPTIONS), right, names)  # fmt: skip
    segmentation = SelfRegSegmentationLogic().segment(stored, ras_model, **OPTIONS)
    labels = segment_labels(segmentation, stored, names)
    assert len(np.unique(expected)) == 3
    np.testing.assert_array_equal(labels, expected)


def test_a_cancelled_segmentation_adds_no_node(scene, tiny_model, tmp_path):
    volume = read_with_slicer(scene, write_scan(tmp_path, "oblique"))
    before = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    job = SelfRegSegmentationLogic().iter_segment(volume, tiny_model, **OPTIONS)
    events = []
    assert lib.run_job(job, events.append, cancelled=lambda: len(events) >= 2) is None
    assert events[0].stage == "prepare"
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before


def test_finetune_from_an_edited_segmentation_writes_a_new_model_version(
    scene, tiny_model, tmp_path
):
    volume = read_with_slicer(scene, write_scan(tmp_path, "axis-aligned"))
    logic = SelfRegSegmentationLogic()
    segmentation = logic.segment(volume, tiny_model, **OPTIONS)
    card = read_card(tiny_model)
    predicted = segment_labels(segmentation, volume, card.class_names)

    # the user paints a block of "inner" (as Segment Editor writes a segment)
    inner = segmentation.GetSegmentation().GetSegmentIdBySegmentName("inner")
    kji = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, inner, volume)
    kji[9:15, 10:16, 8:14] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(kji, segmentation, inner, volume)
    expected = predicted.copy()
    expected[8:14, 10:16, 9:15] = 2  # (i, j, k) of the KJI block above
    labels, new = logic.corrected_labels(volume, segmentation, card.class_names)
    assert new == [] and np.array_equal(labels, expected)

    base = folder_digest(tiny_model)
    config = {"iterations": 2, "seconds_budget": None, "precision": "fp32", "device": "cpu",
              "augment": False, "num_threads": 1}  # fmt: skip
    first = logic.finetune(
        volume, segmentation, out=tmp_path / "ft", **config
    )  # base: from the node
    second = logic.finetune(volume, segmentation, tiny_model, out=tmp_path / "ft", **config)
    assert (first.name, second.name) == ("ft", "ft-v2")  # never overwritten
    for path in (first, second):
        tuned = load_model(path)
        assert tuned.card.parent == tiny_model.name  # a user model, named
        assert tuned.card.class_names == card.class_names
    assert folder_digest(tiny_model) == base


def test_scribbles_with_background_and_a_new_class(scene, tiny_model, tmp_path):
    volume = read_with_slicer(scene, write_scan(tmp_path, "oblique"))
    segmentation = nodes.new_segmentation(scene, "scribbles", volume)
    painted = {
        "inner": (slice(3, 6), 2),
        "Background": (slice(0, 2), 255),
        "lesion": (slice(8, 10), 3),
        "Lesion ": (slice(11, 13), 3),
    }  # fmt: skip  (one new class, however it is written)
    expected = np.zeros(SHAPE, np.uint8)
    for name, (ks, value) in painted.items():
        segment_id = segmentation.GetSegmentation().AddEmptySegment(name, name)
        kji = np.zeros(SHAPE[::-1], np.uint8)
        kji[ks, 10:14, 10:14] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(kji, segmentation, segment_id, volume)
        expected[10:14, 10:14, ks] = value
    logic = SelfRegSegmentationLogic()
    labels, new = logic.corrected_labels(volume, segmentation, read_card(tiny_model).class_names, scribbles=True)  # fmt: skip
    assert new == ["lesion"] and np.array_equal(labels, expected)
    path = logic.finetune(volume, segmentation, tiny_model, tmp_path / "scribbled", scribbles=True,
                          iterations=1, seconds_budget=None, precision="fp32", device="cpu")  # fmt: skip
    card = load_model(path).card
    assert card.class_names == ["background", "outer", "inner", "lesion"]
    assert card.training["finetune"]["sparse"] is True


def test_inspect_nodes_line_up_with_the_volume(scene, tiny_model, tmp_path):
    volume = read_with_slicer(scene, write_scan(tmp_path, "oblique"))
    affine = nodes.ijk_to_ras(volume)
    logic = SelfRegSegmentationLogic()
    origin = np.array([s.start for s in REGION])

    stem = logic.inspect(volume, tiny_model, block="stem", region=REGION, top_k=2)
    region_matrix = affine.copy()
    region_matrix[:3, 3] = (affine @ [*origin, 1])[:3]
    image, _ = logic.image_and_affine(volume)
    fs = extract_features(load_model(tiny_model), image, REGION, affine=affine)
    assert len(stem.features) == 2 and stem.cam is not None
    for node in [*stem.features, stem.cam]:
        np.testing.assert_allclose(nodes.ijk_to_ras(node), region_matrix, atol=1e-9)
        assert nodes.dimensions(node) == (16, 16, 16)
    for node, channel in zip(stem.features, stem.channels, strict=True):
        np.testing.assert_array_equal(nodes.volume_array(node), fs.features["stem"][channel])
    cam = nodes.volume_array(stem.cam)
    assert cam.min() >= 0 and cam.max() <= 1

    reduced = [b for b, r in fs.reductions.items() if max(r) > 1]
    assert reduced
    for block in reduced:
        result = logic.inspect(volume, tiny_model, block=block, region=REGION, top_k=1, cam=False)  # fmt: skip
        r = fs.reductions[block][0]
        assert nodes.dimensions(result.features[0]) == tuple(16 // r for _ in range(3))
        covered = np.stack(np.meshgrid(*[o + np.arange(r) for o in origin], indexing="ij"), -1)
        centre = (affine[:3, :3] @ covered.reshape(-1, 3).mean(0)) + affine[:3, 3]
        first = (nodes.ijk_to_ras(result.features[0]) @ [0, 0, 0, 1])[:3]
        np.testing.assert_allclose(first, centre, atol=1e-9)

    table = stem.table
    stats = redundancy_stats(fs)
    assert table.GetNumberOfRows() == len(stats)
    assert [table.GetCellText(i, 0) for i in range(len(stats))] == list(stats)
    for key in ("channels", "mean_abs_cos", "ifd", "effective_rank"):
        np.testing.assert_allclose(
            slicer.util.arrayFromTableColumn(table, key),
            [getattr(s, key) for s in stats.values()],
            rtol=1e-6,
        )


def test_cancelled_finetuning_writes_no_model(scene, tiny_model, tmp_path):
    volume = read_with_slicer(scene, write_scan(tmp_path, "axis-aligned"))
    segmentation = nodes.new_segmentation(scene, "edited", volume)
    mask = np.zeros(SHAPE, np.uint8)
    mask[8:14, 10:16, 9:15] = 1
    segmentation.AddSegmentFromBinaryLabelmapRepresentation(
        nodes.oriented_image(mask, nodes.ijk_to_ras(volume)), "inner", (0.2, 0.7, 0.3)
    )
    job = SelfRegSegmentationLogic().iter_finetune(
        volume, segmentation, tiny_model, tmp_path / "never", iterations=50,
        seconds_budget=None, precision="fp32", device="cpu",
    )  # fmt: skip
    texts = []
    result = lib.run_job(
        job,
        lambda event: texts.append(lib.logic.describe(event)[2]),
        cancelled=lambda: any(t.startswith("iteration 2/") for t in texts),
    )
    assert result is None and any(t.startswith("iteration 1/50") for t in texts)
    assert not (tmp_path / "never").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_the_packages_installed_into_slicer_are_the_projects_dependencies():
    import tomllib

    project = tomllib.loads((LIB.parents[2] / "pyproject.toml").read_text())["project"]
    dependencies = {d.replace(" ", "") for d in project["dependencies"]}
    assert set(lib.logic.RUNTIME_REQUIREMENTS) <= dependencies
    assert f"torch{lib.logic.TORCH_REQUIREMENT}" in dependencies
    assert project["name"] == lib.logic.PACKAGE


def test_the_module_self_test_needs_only_the_installed_packages(tmp_path):
    """The self-test (segment, inspect, fine-tune) in a fresh process in which napari-selfreg's
    other dependencies (napari, Qt, plotting, DICOM, TIFF, zarr...) cannot be imported:
    the module installs napari-selfreg without them."""
    import subprocess

    blocked = ["napari", "qtpy", "magicgui", "npe2", "superqt", "matplotlib", "dask", "zarr",
               "pydicom", "tifffile", "h5py", "nilearn", "skimage"]  # fmt: skip
    script = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"blocked: {{name}}", name=name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(LIB.parent)!r})
import torch
torch.set_num_threads(1)
import slicer
from SelfRegSegmentationLib.selftest import run_self_test
scene = slicer.vtkMRMLScene()
colors = slicer.vtkMRMLColorLogic()
colors.SetMRMLScene(scene)
result = run_self_test(scene, {str(tmp_path / "work")!r}, say=lambda text: None)
print("tuned", result["model"])
"""
    env = {**__import__("os").environ, "NAPARI_SELFREG_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"tuned {tmp_path / 'work' / 'selftest-tuned'}" in done.stdout


def test_the_widget_file_matches_its_ui_and_cmake_lists():
    """The Qt widget runs only inside Slicer; here its file is checked against the .ui
    (widget names, parameter names) and the CMake lists (every script and resource)."""
    import ast
    import re
    import xml.etree.ElementTree as ET

    module_dir = LIB.parent
    source = (module_dir / "SelfRegSegmentation.py").read_text()
    tree = ast.parse(source)
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui"
    }
    ui = ET.parse(module_dir / "Resources" / "UI" / "SelfRegSegmentation.ui").getroot()
    widgets = {w.get("name") for w in ui.iter("widget")}
    assert used <= widgets, used - widgets
    for name in ("modelComboBox", "deviceLabel", "segmentButton", "inspectButton", "finetuneButton", "progressBar", "cancelButton"):  # fmt: skip
        assert name in widgets
    bound = {
        p.find("string").text
        for p in ui.iter("property")
        if p.get("name") == "SlicerParameterName"
    }
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("ParameterNode"))  # fmt: skip
    fields = {n.target.id for n in wrapper.body if isinstance(n, ast.AnnAssign)}
    assert bound <= fields, bound - fields

    cmake = (module_dir / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "SelfRegSegmentation")  # fmt: skip
    listed = set(re.findall(r"^\s+(\S+\.(?:py|png|ui))\s*$", cmake, re.M))
    on_disk = {str(p.relative_to(module_dir)) for p in module_dir.rglob("*") if p.suffix in (".py", ".png", ".ui")}  # fmt: skip
    assert listed == on_disk
    top = (module_dir.parent / "CMakeLists.txt").read_text()
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):  # fmt: skip
        assert f"set(EXTENSION_{key} " in top
    assert not list(module_dir.parent.glob("*.py"))  # slicer/ stays invisible to `import slicer`


def test_the_module_file_imports_and_its_logic_subclass_segments(
    scene, tiny_model, tmp_path, monkeypatch
):
    """``SelfRegSegmentation.py`` with stand-ins for the two Qt-bound Slicer modules it
    imports (``ScriptedLoadableModule``, whose logic base calls ``super().__init__()`` as
    Slicer's does, and ``parameterNodeWrapper``): the module's logic class, a subclass of
    both, gets Slicer's scene and segments."""
    import types

    class Base:
        def __init__(self, parent=None):
            super().__init__()
            self.moduleName = type(self).__name__.removesuffix("Logic")

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    scripted.ScriptedLoadableModule = scripted.ScriptedLoadableModuleWidget = type("M", (), {})
    scripted.ScriptedLoadableModuleTest = type("T", (), {})
    scripted.ScriptedLoadableModuleLogic = Base
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper)
    spec = importlib.util.spec_from_file_location("SelfRegSegmentation", LIB.parent / "SelfRegSegmentation.py")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    logic = module.SelfRegSegmentationLogic()
    assert logic.moduleName == "SelfRegSegmentation" and logic.scene is scene
    assert isinstance(logic, SelfRegSegmentationLogic)
    volume = read_with_slicer(scene, write_scan(tmp_path, "oblique"))
    segmentation = logic.segment(volume, tiny_model, **OPTIONS)
    assert segmentation.GetScene() is scene
    assert module.dependenciesInstalled()
