"""The ``napari-selfreg`` command line, called in-process (and once as the console script)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_selfreg import cli, io

AFFINE = np.array(
    [[-2.0, 0, 0, 30], [0, 2.0, 0, -20], [0, 0, 1.5, 5], [0, 0, 0, 1]]
)  # voxel = 6 mm^3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def scan(tmp_path):
    """A 20 x 24 x 22 volume with an oblique-free, flipped affine, written as NIfTI."""
    rng = np.random.default_rng(0)
    data = rng.normal(100, 20, (20, 24, 22)).astype(np.float32)
    return io.write_volume(tmp_path / "scan.nii.gz", data, affine=AFFINE)


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])  # noqa
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, text):
    assert code == 2
    assert err.startswith("napari-selfreg: error: ") and err.count("\n") == 1, err
    assert text in err and "Traceback" not in err


def test_segment_one_file(tiny_model, scan, tmp_path, capsys):
    out = tmp_path / "out" / "seg.nii.gz"
    code, stdout, _ = run(capsys, "segment", scan, "-o", out, "--model", tiny_model,
                          "--tile", 16, 16, 16, "--quiet")  # fmt: skip
    assert code == 0
    labels = io.read_volume(out)
    assert labels.shape == (20, 24, 22) and labels.data.dtype == np.uint8
    assert np.array_equal(labels.affine, io.read_volume(scan).affine)
    assert f"wrote labels {out}" in stdout
    counts = np.bincount(labels.data.ravel(), minlength=3)
    table = stdout[stdout.index("  class") :].splitlines()
    assert table[0].split() == ["class", "voxels", "ml", "%", "of", "labelled"]
    for line, name, n in zip(table[1:], ["background", "outer", "inner"], counts, strict=True):
        assert line.split()[:3] == [name, str(n), f"{n * 6 / 1000:.2f}"]


def test_segment_crops_to_the_nonzero_box_unless_told_not_to(tiny_model, tmp_path, capsys):
    data = np.zeros((40, 24, 22), np.float32)  # a brain-extracted scan: zeros around
    data[4:26] = np.random.default_rng(0).normal(100, 20, (22, 24, 22))
    scan = io.write_volume(tmp_path / "stripped.nii.gz", data, affine=AFFINE)
    labels = {}
    for flag in ([], ["--no-crop"]):
        out = tmp_path / f"seg{len(flag)}.nii.gz"
        code, *_ = run(capsys, "segment", scan, "-o", out, "--model", tiny_model,
                       "--tile", 16, 16, 16, "--quiet", *flag)  # fmt: skip
        assert code == 0
        labels[bool(flag)] = io.read_volume(out).data
    assert (labels[False][26:] == 0).all() and (labels[False][:4] == 0).all()
    assert labels[True].shape == labels[False].shape == data.shape


def test_segment_folder_with_probabilities(tiny_model, scan, tmp_path, capsys):
    data = io.read_volume(scan).data
    io.write_volume(tmp_path / "second.nii", data[::-1].copy(), affine=AFFINE)
    io.write_labels(tmp_path / "old_labels.nii.gz", np.zeros(data.shape, np.uint8), affine=AFFINE)
    nib.save(nib.Nifti1Pair(data, AFFINE), tmp_path / "pair.hdr")  # pair.hdr + pair.img: one input
    out = tmp_path / "results"
    code, stdout, _ = run(capsys, "segment", tmp_path, "-o", out, "--model", tiny_model,
                          "--probabilities", "--uncertainty", "--tile", 16, "--quiet")  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "pair_labels.nii.gz",
        "pair_probabilities.nii.gz",
        "pair_uncertainty.nii.gz",
        "scan_labels.nii.gz",
        "scan_probabilities.nii.gz",
        "scan_uncertainty.nii.gz",
        "second_labels.nii.gz",
        "second_probabilities.nii.gz",
        "second_uncertainty.nii.gz",
    ]  # old_labels.nii.gz (an output of an earlier run) was not segmented
    probs = io.read_volume(out / "scan_probabilities.nii.gz", channel=1)
    assert probs.shape == data.shape
    assert stdout.count("wrote labels") == 3


def test_segment_ranks_the_slices_to_correct_next(tiny_model, scan, tmp_path, capsys):
    ranking = tmp_path / "next.json"
    code, stdout, _ = run(capsys, "segment", scan, "-o", tmp_path / "s.nii.gz", "--model", tiny_model,
                          "--rank-slices", ranking, "--rank-top", 3, "--quiet")  # fmt: skip
    assert code == 0 and f"wrote slice ranking {ranking}" in stdout
    axes = json.loads(ranking.read_text())["inputs"][str(scan)]
    assert sorted(axes) == ["axis 0", "axis 1", "axis 2"]
    top = axes["axis 2"]
    assert len(top) == 3 and top[0]["score"] == 1.0 and top[0]["score"] >= top[1]["score"]
    assert all(0 <= row["slice"] < 22 for row in top)


def test_ranked_slices_are_spread_out(tiny_model, tmp_path, capsys):
    from scipy import ndimage

    rng = np.random.default_rng(1)
    smooth = ndimage.gaussian_filter(rng.normal(size=(60, 60, 60)), 4).astype(np.float32)
    scan = io.write_volume(tmp_path / "smooth.nii.gz", smooth * 50 + 100, affine=AFFINE)
    ranking = tmp_path / "next.json"
    code, _, _ = run(capsys, "segment", scan, "-o", tmp_path / "s.nii.gz", "--model", tiny_model,
                     "--rank-slices", ranking, "--rank-top", 5, "--quiet")  # fmt: skip
    assert code == 0
    for rows in json.loads(ranking.read_text())["inputs"][str(scan)].values():
        slices = [row["slice"] for row in rows]
        gaps = [abs(i - j) for k, i in enumerate(slices) for j in slices[:k]]
        assert len(slices) == 5 and min(gaps) >= 3, slices  # a twentieth of 60 slices


def test_never_overwrites_an_input(tiny_model, scan, capsys):
    before = scan.read_bytes()
    code, _, err = run(capsys, "segment", scan, "-o", scan, "--model", tiny_model, "--overwrite")
    assert_one_line_error(code, err, "is one of the inputs")
    assert scan.read_bytes() == before


def test_existing_output_needs_overwrite(tiny_model, scan, tmp_path, capsys):
    out = tmp_path / "seg.nii"
    out.write_bytes(b"keep me")
    args = ["segment", scan, "-o", out, "--model", tiny_model, "--tile", 16, "--quiet"]
    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, "--overwrite")
    assert out.read_bytes() == b"keep me"
    assert run(capsys, *args, "--overwrite")[0] == 0
    assert io.read_volume(out).shape == (20, 24, 22)


def test_user_errors_are_one_line(tiny_model, scan, tmp_path, capsys, selfreg_home, monkeypatch):
    code, _, err = run(capsys, "segment", tmp_path / "missing.nii", "-o", tmp_path / "x.nii.gz")
    assert_one_line_error(code, err, "does not exist")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti file")
    code, _, err = run(capsys, "segment", bad, "-o", tmp_path / "x.nii.gz", "--model", tiny_model)
    assert_one_line_error(code, err, "bad.nii.gz")
    # a copy of the package without its bundled default model
    monkeypatch.setattr("napari_selfreg.modelfile.BUNDLED_DIR", tmp_path / "no-bundled-models")
    code, _, err = run(capsys, "segment", scan, "-o", tmp_path / "x.nii.gz")
    assert_one_line_error(code, err, "--model")
    code, _, err = run(capsys, "segment", scan, "-o", tmp_path / "x.nii.gz", "--model",
                       tiny_model, "--device", "tpu")  # fmt: skip
    assert_one_line_error(code, err, "unknown device 'tpu'")
    code, _, err = run(capsys, "segment", scan, "-o", tmp_path / "x.nii.gz", "--model",
                       tiny_model, "--tile", 16, 16)  # fmt: skip
    assert_one_line_error(code, err, "tile of 3")
    code, _, err = run(capsys, "sample", "nonsense", "-o", tmp_path)
    assert_one_line_error(code, err, "unknown sample 'nonsense'")
    code, _, err = run(
        capsys, "segment", scan, tmp_path / "scan.nii.gz", "-o", tmp_path / "y.nii.gz"
    )
    assert_one_line_error(code, err, "output folder")
    code, _, err = run(capsys, "segment", scan, "-o", tmp_path / "seg.nrrd", "--model", tiny_model)
    assert_one_line_error(code, err, "written as .nii or .nii.gz files")
    assert not (tmp_path / "seg.nrrd").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "segment", str(tmp_path / "missing.nii"), "-o", "x.nii.gz"])


def test_ctrl_c_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_info", interrupted)
    code, _, err = run(capsys, "info")
    assert code == 130 and err == "napari-selfreg: interrupted\n"


def test_ctrl_c_in_a_folder_run_leaves_no_empty_output_folder(tiny_model, scan, tmp_path, monkeypatch, capsys):  # fmt: skip
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "segment_one", interrupted)
    out = tmp_path / "new" / "out"
    code, _, _ = run(capsys, "segment", scan.parent, "-o", out, "--model", tiny_model, "--quiet")
    assert code == 130 and not (tmp_path / "new").exists()


def test_a_run_stopped_between_an_inputs_files_is_redone_by_skip_existing(tiny_model, tmp_path, monkeypatch, capsys):  # fmt: skip
    from napari_selfreg import io as nio

    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a", "b"):
        nio.write_volume(scans / f"{name}.nii.gz", np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32), affine=AFFINE)  # fmt: skip
    write_volume = nio.write_volume

    def stopped(path, *args, **kwargs):  # Ctrl-C while b's probabilities are written
        if "b_" in Path(path).name:
            write_volume(path, *args, **kwargs)
            raise KeyboardInterrupt
        return write_volume(path, *args, **kwargs)

    monkeypatch.setattr(nio, "write_volume", stopped)
    ranking = tmp_path / "next.json"
    argv = ["segment", scans, "-o", tmp_path / "out", "--model", tiny_model, "--probabilities", "--rank-slices", ranking, "--quiet"]  # fmt: skip
    assert run(capsys, *argv)[0] == 130
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "b_labels.nii.gz" not in names  # b is not marked done
    assert list(json.loads(ranking.read_text())["inputs"]) == [str(scans / "a.nii.gz")]  # kept
    monkeypatch.setattr(nio, "write_volume", write_volume)
    code, out, err = run(capsys, *argv, "--skip-existing")
    assert code == 0, err
    assert "skipping" in out and "b_labels.nii.gz" in out
    assert len(json.loads(ranking.read_text())["inputs"]) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a_labels.nii.gz", "a_probabilities.nii.gz", "b_labels.nii.gz", "b_probabilities.nii.gz"]  # fmt: skip


def test_a_tiff_stack_takes_the_orientation_the_user_states(tiny_model, tmp_path, capsys):
    import tifffile

    from napari_selfreg.geometry import affine_from_codes, axis_codes
    from napari_selfreg.modelfile import load_model, read_card, save_model

    oriented = tmp_path / "oriented"  # the tiny model, trained in RAS
    bundle = load_model(tiny_model)
    save_model(bundle.network, dataclasses.replace(read_card(tiny_model), orientation="RAS"), oriented)  # fmt: skip
    stack = np.random.default_rng(3).normal(100, 20, (18, 20, 22)).astype(np.float32)
    stack[:9, :, :11] += 300  # structure that a turn of the axes moves
    tifffile.imwrite(tmp_path / "axial.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    base = ["segment", "--model", oriented, "--quiet", "--overwrite", "--probabilities"]
    code, _, err = run(capsys, *base, tmp_path / "axial.tif", "-o", tmp_path / "as_model.nii.gz")
    assert code == 0 and "carries no patient orientation" in err and "--orientation" in err
    code, _, err = run(capsys, *base, tmp_path / "axial.tif", "-o", tmp_path / "spl.nii.gz", "--orientation", "spl")  # fmt: skip
    assert code == 0 and "orientation" not in err
    written = nib.load(tmp_path / "spl.nii.gz")
    assert axis_codes(written.affine) == "SPL"  # the labels carry the stated axes
    io.write_volume(tmp_path / "spl_src.nii.gz", stack, affine=affine_from_codes("SPL", (1, 1, 1)))  # fmt: skip
    run(capsys, *base, tmp_path / "spl_src.nii.gz", "-o", tmp_path / "same.nii.gz")

    def probabilities(name):
        return nib.load(tmp_path / f"{name}_probabilities.nii.gz").get_fdata()

    same = probabilities("same")
    assert np.array_equal(probabilities("spl"), same)  # as a NIfTI stored that way
    assert not np.allclose(probabilities("as_model"), same, atol=1e-3)  # the axes matter
    with pytest.raises(SystemExit) as refused:  # argparse refuses it before any work
        cli.main([*map(str, base), str(tmp_path / "axial.tif"), "-o", str(tmp_path / "x.nii.gz"), "--orientation", "RRA"])  # fmt: skip
    assert (
        refused.value.code == 2
        and "invalid orientation_codes value: 'RRA'" in capsys.readouterr().err
    )


def test_one_line_messages():
    assert (
        cli.one_line(PermissionError(13, "Permission denied", "/x/y")) == "Permission denied: /x/y"
    )
    assert cli.one_line(ValueError("two\n lines")) == "two lines"
    assert cli.one_line(MemoryError()) == "out of memory"


def test_info_models_and_sample(tiny_model, tmp_path, capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0 and f"torch {torch.__version__}" in out and "CPU bf16" in out
    code, out, _ = run(capsys, "models", "--json")
    rows = json.loads(out)
    names = [r["name"] for r in rows]
    assert code == 0 and names == ["brain-tissue-unet3d", "brain-tissue-unet3d-v1", "tiny"]
    assert rows[2]["classes"] == ["background", "outer", "inner"] and rows[2]["source"] == "user"
    assert rows[0]["source"] == rows[1]["source"] == "bundled"
    code, out, _ = run(capsys, "models")
    assert "tiny  (user, unet3d, 3 classes)" in out
    code, out, _ = run(capsys, "sample", "phantom", "-o", tmp_path / "samples")
    assert code == 0
    written = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert written == ["phantom_image.nii.gz", "phantom_labels.nii.gz"]
    assert f"wrote {tmp_path / 'samples' / 'phantom_image.nii.gz'}" in out
    edited = tmp_path / "samples" / "phantom_labels.nii.gz"
    edited.write_bytes(b"the user's own labels")  # a file of that name is never replaced
    code, out, _ = run(capsys, "sample", "phantom", "-o", tmp_path / "samples")
    assert code == 0 and f"kept the existing {edited}" in out
    assert edited.read_bytes() == b"the user's own labels"


def test_training_commands_are_registered_when_installed():
    parser = cli.build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)
    assert {"segment", "info", "models", "sample"} <= commands
    try:
        import napari_selfreg.training.cli  # noqa: F401
    except ModuleNotFoundError:
        assert not commands & {"train", "finetune"}
    else:
        assert {"train", "finetune"} <= commands


def test_console_script(tmp_path):
    """The installed entry point runs main() and turns a user error into one line + status 2."""
    script = Path(sys.executable).parent / "napari-selfreg"
    missing = tmp_path / "no.nii"
    done = subprocess.run([str(script), "segment", str(missing), "-o", "x.nii.gz"],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"napari-selfreg: error: input {missing} does not exist"]


def test_headless_demo_reruns_write_new_files(tmp_path, monkeypatch):
    """Running the main command again keeps the first result (a new name each time)."""
    from napari_selfreg import cli, demo

    calls = []

    def fake_segment(argv):
        out = Path(argv[argv.index("-o") + 1])
        out.write_bytes(b"labels")  # what the real command leaves behind
        calls.append(out.name)
        return 0

    monkeypatch.setattr(cli, "main", fake_segment)
    assert demo.run_headless(tmp_path) == 0 and demo.run_headless(tmp_path) == 0
    assert demo.run_headless(tmp_path) == 0
    assert calls == ["mni152_segmentation.nii.gz", "mni152_segmentation-2.nii.gz",
                     "mni152_segmentation-3.nii.gz"]  # fmt: skip


def test_a_minc2_file_segments(tiny_model, tmp_path, capsys):
    import nibabel

    minc2 = Path(nibabel.__file__).parent / "tests" / "data" / "minc2_1_scale.mnc"
    out = tmp_path / "minc_labels.nii.gz"
    code, stdout, _ = run(capsys, "segment", minc2, "-o", out, "--model", tiny_model, "--quiet")
    assert code == 0 and io.read_volume(out).shape == (10, 20, 20)


def test_segment_help_says_what_the_default_model_expects_from_its_card(capsys):
    from napari_selfreg.modelfile import read_card, resolve_model_path

    card = read_card(resolve_model_path(None))
    with pytest.raises(SystemExit):
        cli.main(["segment", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"The default model: {card.name}, {' '.join(card.description.split())}" in help_text
    assert "brain-tissue-unet3d-v1" in help_text  # no line break inside a model name
