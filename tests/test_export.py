"""Exports to bioimage.io and to MONAI bundles, checked offline with the ecosystems' own tools.

bioimage.io: ``bioimageio.core.test_model`` on the package. MONAI: ``verify_net_in_out`` and
the bundle's ``configs/inference.json`` run by ``monai.bundle.ConfigWorkflow`` on a NIfTI
volume, compared voxel by voxel with our ``Predictor``; the exported TorchScript is run
through our ``Predictor`` too. The model is tiny (unet3d, channels 4-8-16, 16^3 tiles); the
agreement checks use one trained for a few seconds, so its labels have structure.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import zipfile

import numpy as np
import pytest
import torch

from napari_selfreg import cli, export, io
from napari_selfreg.inference import Predictor
from napari_selfreg.modelfile import ModelBundle, ModelCard, load_model, save_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SPEC = {"method": "zscore", "foreground": "otsu"}
AFFINE = np.array([[-1.0, 0, 0, 10], [0, -1.0, 0, 20], [0, 0, 1.0, -5], [0, 0, 0, 1]])  # LPS


def three_classes(seed: int, shape=(24, 24, 24)) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random 3-class volume (40 / 30 / 30 %) with noisy class intensities."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.normal(size=shape), 2.0)
    labels = np.digitize(field, np.quantile(field, [0.4, 0.7])).astype(np.uint8)
    image = (labels + 0.35 * rng.normal(size=shape)) * 100 + 20
    return image.astype(np.float32), labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> ModelBundle:
    """The tiny unet3d trained 60 steps on one volume; card in RAS at 1 mm (so the bundle
    reorients and inverts), loaded back from its model folder."""
    from napari_selfreg import models
    from napari_selfreg.preprocess import normalize

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = models.build("unet3d", channels=(4, 8, 16), num_classes=3)
    image, labels = three_classes(0)
    x = torch.from_numpy(normalize(image, SPEC))[None, None]
    y = torch.from_numpy(labels.astype(np.int64))[None]
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    card = ModelCard(
        name="tiny-trained", architecture="unet3d",
        options={"channels": [4, 8, 16], "num_classes": 3, "in_channels": 1},
        class_names=["background", "outer", "inner"], normalization=SPEC,
        patch_size=[16, 16, 16], spacing=[1.0, 1.0, 1.0], orientation="RAS",
        keep_largest=[[1, 2]], description="tiny test model",
    )  # fmt: skip
    return load_model(save_model(net.eval(), card, tmp_path_factory.mktemp("m") / "tiny"))


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """``(folder, image, path)``: a 24^3 volume of another seed in LPS order, as NIfTI."""
    folder = tmp_path_factory.mktemp("scan")
    image, _ = three_classes(1)
    return folder, image, io.write_volume(folder / "vol.nii.gz", image, affine=AFFINE)


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory):
    return export.export_monai_bundle(trained, tmp_path_factory.mktemp("b") / "tiny_bundle")


def predict(model, **options) -> np.ndarray:
    image = three_classes(1)[0]
    options = {"tile": 16, "overlap": 0.25, "precision": "fp32", "device": "cpu", **options}
    return Predictor(model, **options).segment(image, affine=AFFINE).labels


def run_bundle(bundle, scan, out, configs=("inference.json",), **override) -> np.ndarray:
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=[str(bundle / "configs" / c) for c in configs],
        meta_file=str(bundle / "configs" / "metadata.json"), logging_file=False,
        workflow_type="infer", bundle_root=str(bundle), dataset_dir=str(scan[0]),
        output_dir=str(out), **override,
    )  # fmt: skip
    workflow.initialize()
    (written,) = workflow.run()[1]
    workflow.finalize()
    result = io.read_volume(out / "vol_seg.nii.gz")
    assert written == str(scan[2]) and np.allclose(result.affine, AFFINE)
    return np.asarray(result.data)


def test_bioimageio_package_passes_bioimageio_core(tiny_model, tmp_path):
    from bioimageio.core import test_model

    path = export.export_bioimageio(tiny_model, tmp_path / "tiny.zip")
    names = set(zipfile.ZipFile(path).namelist())
    assert {"rdf.yaml", "weights.pt", "weights_torchscript.pt", "test_input.npy",
            "test_output.npy", "cover.png", "README.md", "environment.yaml"} <= names  # fmt: skip
    with export.bioimageio_pydantic_fix():  # bioimageio.spec 0.5.12 under pydantic >= 2.14
        summary = test_model(path)
    details = [f"{d.status}: {d.name} {[e.msg for e in d.errors]}" for d in summary.details]
    assert summary.status == "passed", "\n".join(details)
    rdf = zipfile.ZipFile(path).read("rdf.yaml").decode()
    for text in ("format_version: 0.5", "BSD-3-Clause", "10.1007/978-3-031-72111-3_56",
                 "arxiv.org/abs/2206.00902", "import_from: napari_selfreg.models.unet",
                 "min: 4", "step: 4"):  # fmt: skip
        assert text in rdf, text
    with pytest.raises(FileExistsError, match="exists"):
        export.export_bioimageio(tiny_model, path)


def test_monai_bundle_files_and_verify_net_in_out(bundle, trained):
    from monai.bundle import verify_net_in_out

    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt",
                 "models/model.ts", "docs/README.md", "LICENSE"):  # fmt: skip
        assert (bundle / name).is_file(), name
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"]["2"] == "inner"
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [16, 16, 16]
    files = {"meta_file": str(bundle / "configs" / "metadata.json"),
             "config_file": str(bundle / "configs" / "inference.json")}  # fmt: skip
    for net_id in ("network_def", "network_ts"):
        verify_net_in_out(net_id=net_id, device="cpu", bundle_root=str(bundle), **files)
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    reference = trained.network.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    assert "MONAI Label" in (bundle / "docs" / "README.md").read_text()


def test_monai_bundle_runs_like_our_predictor(bundle, trained, scan, tmp_path):
    # the pipeline (load, RAS, normalise, tiles, argmax, back to LPS, save) with equal
    # weights per tile: identical; MONAI's Gaussian floors its weights at 1e-3 (ours 1e-6),
    # which moves a few tile-border voxels of this weak tiny model
    flat = run_bundle(bundle, scan, tmp_path / "flat", **{"inferer#mode": "constant"})
    assert (flat == predict(trained, gaussian=False)).mean() >= 0.999
    ours = predict(trained)
    labels = run_bundle(bundle, scan, tmp_path / "pt")
    agreement = (labels == ours).mean()
    print(f"MONAI bundle vs Predictor (Gaussian): {agreement:.4f}")
    assert agreement >= 0.98 and len(np.unique(ours)) == 3
    ts = run_bundle(bundle, scan, tmp_path / "ts", ("inference.json", "inference_torchscript.json"))  # fmt: skip
    assert (ts == labels).mean() >= 0.999


def test_the_bundle_of_a_2d_model_segments_volumes_slice_by_slice(scan, tmp_path):
    """MONAI's SliceInferer along the first axis of the card's orientation, as ours does."""
    from napari_selfreg import models

    torch.manual_seed(0)
    net = models.build("unet2d", channels=(4, 8, 16), num_classes=3).eval()
    card = ModelCard(
        name="tiny-2d", architecture="unet2d",
        options={"channels": [4, 8, 16], "num_classes": 3, "in_channels": 1},
        class_names=["background", "outer", "inner"], normalization=SPEC,
        patch_size=[16, 16], orientation="RAS",
    )  # fmt: skip
    model = load_model(save_model(net, card, tmp_path / "tiny-2d"))
    config = json.loads((export.export_monai_bundle(model, tmp_path / "b2d") / "configs" / "inference.json").read_text())  # fmt: skip
    assert (
        config["inferer"]["_target_"] == "SliceInferer" and config["inferer"]["spatial_dim"] == 0
    )
    labels = run_bundle(tmp_path / "b2d", scan, tmp_path / "out", **{"inferer#mode": "constant"})
    ours = predict(model, gaussian=False, tile=(16, 16))
    assert labels.shape == ours.shape and (labels == ours).mean() >= 0.999


class Scripted(torch.nn.Module):
    """A TorchScript module as our predictor's network (attributes it reads); the scripted
    module is kept out of the module tree (the predictor copies the network to the meta
    device to count FLOPs, which TorchScript modules refuse)."""

    def __init__(self, scripted, card):
        super().__init__()
        object.__setattr__(self, "scripted", scripted)
        self.spatial_dims, self.num_classes, self.in_channels = 3, card.num_classes, 1

    def forward(self, x):
        return self.scripted(x)


def test_torchscript_in_our_predictor(bundle, trained):
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"))
    wrapped = ModelBundle(network=Scripted(scripted, trained.card), card=trained.card)
    ours = predict(trained)
    assert (predict(wrapped, fold_bn=False) == ours).mean() >= 0.999
    odd = torch.randn(1, 1, 13, 18, 11)  # any size: padded to multiples of 4 and cropped
    with torch.no_grad():
        assert torch.allclose(scripted(odd), trained.network(odd), atol=1e-4)


def test_cli_export(tiny_model, tmp_path, capsys):
    def run(*argv):
        code = cli.main(["export", *map(str, argv)])
        return code, *capsys.readouterr()

    code, out, _ = run("tiny", "--format", "monai-bundle", "-o", tmp_path / "b")
    assert code == 0 and (tmp_path / "b" / "models" / "model.ts").is_file() and "bundle" in out
    code, out, _ = run(tiny_model, "--format", "bioimageio", "-o", tmp_path / "t.zip")
    assert code == 0 and zipfile.is_zipfile(tmp_path / "t.zip")
    for argv in (("tiny", "--format", "bioimageio", "-o", tmp_path / "t.zip"),
                 ("tiny", "--format", "monai-bundle", "-o", tmp_path / "b"),
                 ("nope", "--format", "monai-bundle", "-o", tmp_path / "c"),
                 ("tiny", "--format", "bioimageio", "-o", tmp_path / "t.tar"),
                 ("tiny", "--format", "monai-bundle", "-o", tmp_path / "b.zip")):  # fmt: skip
        code, _, err = run(*argv)
        assert code == 2 and err.startswith("napari-selfreg: error: ") and err.count("\n") == 1
    assert "exists; pass --overwrite" in run("tiny", "--format", "bioimageio", "-o", tmp_path / "t.zip")[2]  # fmt: skip
    assert run("tiny", "--format", "bioimageio", "-o", tmp_path / "t.zip", "--overwrite")[0] == 0
    before = (tmp_path / "b" / "models" / "model.pt").stat().st_mtime_ns
    assert run("tiny", "--format", "monai-bundle", "-o", tmp_path / "b", "--overwrite")[0] == 0
    assert (tmp_path / "b" / "models" / "model.pt").stat().st_mtime_ns != before
    (tmp_path / "plain").mkdir()
    code, _, err = run("tiny", "--format", "monai-bundle", "-o", tmp_path / "plain", "--overwrite")
    assert code == 2 and "not a MONAI bundle" in err
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as archive:  # the user's own archive
        archive.writestr("holiday.jpg", b"...")
    code, _, err = run("tiny", "--format", "bioimageio", "-o", tmp_path / "photos.zip", "--overwrite")  # fmt: skip
    assert code == 2 and "not a bioimage.io model package" in err
    assert zipfile.ZipFile(tmp_path / "photos.zip").namelist() == ["holiday.jpg"]
    assert not (tmp_path / "b.zip").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".selfreg-")]


def test_without_bioimageio_spec_the_export_says_what_to_install(tiny_model, tmp_path, capsys, monkeypatch):  # fmt: skip
    monkeypatch.setitem(sys.modules, "bioimageio.spec.model.v0_5", None)  # not installed
    code = cli.main(["export", str(tiny_model), "--format", "bioimageio", "-o", str(tmp_path / "m.zip")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'napari-selfreg[export]'" in err and err.count("\n") == 1
    assert not (tmp_path / "m.zip").exists()


def test_a_full_disk_during_an_export_is_one_sentence(tiny_model, tmp_path, capsys, monkeypatch):  # fmt: skip
    import collections

    from napari_selfreg import files

    def full(*args, **kwargs):  # what torch's writer raises when the disk fills
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda _: usage(10**6, 10**6 - 6112, 6112))
    code = cli.main(["export", str(tiny_model), "--format", "monai-bundle", "-o", str(tmp_path / "b")])  # fmt: skip
    err = capsys.readouterr().err
    assert (
        code == 2 and "No space left on device (6,112 bytes free)" in err and err.count("\n") == 1
    )
    assert [p.name for p in tmp_path.iterdir()] == ["selfreg-home"]  # nothing left behind
    monkeypatch.setattr(files.shutil, "disk_usage", lambda _: usage(10**9, 0, 10**9))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # room left: not the disk
        cli.main(["export", str(tiny_model), "--format", "monai-bundle", "-o", str(tmp_path / "b")])  # fmt: skip


def test_a_folder_that_appears_during_a_bundle_export_is_kept(tiny_model, tmp_path, monkeypatch):
    target = tmp_path / "b"
    readme = export.readme

    def meanwhile(*args, **kwargs):  # another program makes the folder while we write
        target.mkdir(exist_ok=True)
        (target / "notes.txt").write_text("the user's")
        return readme(*args, **kwargs)

    monkeypatch.setattr(export, "readme", meanwhile)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        export.export_monai_bundle(tiny_model, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    with pytest.raises(FileExistsError, match="not a MONAI bundle"):  # not even with it
        export.export_monai_bundle(tiny_model, target, overwrite=True)
    assert (target / "notes.txt").read_text() == "the user's"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".selfreg-")]


def test_normalize_channels_keeps_monai_metadata():
    from monai.data import MetaTensor

    image = MetaTensor(torch.rand(1, 8, 8, 8) * 50, affine=torch.diag(torch.tensor([2.0, 2, 2, 1])))  # fmt: skip
    out = export.normalize_channels(image, SPEC)
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, image.affine)
    from napari_selfreg.preprocess import normalize

    assert np.allclose(out.numpy()[0], normalize(image.numpy()[0], SPEC))


def test_brain_card_test_patch_comes_from_mni152(trained):
    card = dataclasses.replace(trained.card, name="brain-tiny", class_names=["background", "grey matter", "white matter"])  # fmt: skip
    patch = export.example_patch(card, trained.network)
    assert patch.shape == (1, 16, 16, 16) and export.is_brain_model(card)
    assert abs(float(patch.std()) - 1) < 1  # normalised over the whole template


def test_monai_keep_largest_transform_equals_our_post_processing():
    """The bundle's ``KeepLargestConnectedComponentd`` does what the predictor's
    ``keep_largest`` does (the union of a group's classes, 26-connected)."""
    from monai.transforms import KeepLargestConnectedComponent
    from scipy import ndimage

    from napari_selfreg.inference.outputs import keep_largest_pieces

    rng = np.random.default_rng(0)
    labels = ndimage.zoom(rng.integers(0, 4, (6, 6, 6)), 4, order=0).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.02] = 1  # specks: pieces of their own
    ours = labels.copy()
    removed = keep_largest_pieces(ours, [[1, 2]])
    monai = KeepLargestConnectedComponent(applied_labels=[1, 2], independent=False, connectivity=3)
    theirs = np.asarray(monai(torch.from_numpy(labels[None])))[0]
    assert removed > 0 and np.array_equal(ours, theirs)
