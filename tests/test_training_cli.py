"""``napari-selfreg train`` / ``finetune``: models that ``segment --model`` uses, user errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_selfreg.cli import main
from napari_selfreg.modelfile import load_model, read_card
from napari_selfreg.training.metrics import unlearnt

pytestmark = pytest.mark.usefixtures("one_torch_thread", "selfreg_home")

TINY = ["--arch", "unet3d", "--channels", "4", "8", "16", "--patch", "16", "16", "16",
        "--batch-size", "1", "--precision", "fp32", "--threads", "1"]  # fmt: skip


@pytest.fixture
def folders(phantom_folders):
    return phantom_folders


def test_train_then_segment_then_finetune(folders, capsys):
    model = folders / "model"
    args = ["train", "--images", str(folders / "images"), "--labels", str(folders / "labels"),
            "--out", str(model), "--iterations", "3", "--val-every", "3", *TINY]  # fmt: skip
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(model)
    assert "scr " in err and "ifd " in err and "ce " in err  # the progress shows the loss terms
    assert "validation Dice" in err
    assert {p.name for p in model.iterdir()} == {"model.safetensors", "model.json"}

    image = folders / "images" / "c0.nii.gz"
    seg = folders / "seg.nii.gz"
    assert main(["segment", str(image), "-o", str(seg), "--model", str(model), "--quiet"]) == 0
    assert nib.load(seg).shape == (20, 20, 20)
    capsys.readouterr()

    base_files = {p.name: p.read_bytes() for p in model.iterdir()}
    new = folders / "model-ft"
    args = ["finetune", "--model", str(model), "--image", str(image),
            "--labels", str(folders / "labels" / "c0.nii.gz"), "--out", str(new),
            "--iterations", "2", "--precision", "fp32", "--threads", "1",
            "--save-reviewed", str(folders / "review1.nii.gz")]  # fmt: skip
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(new)
    assert "finetune" in err and "total " in err and "wrote the review map" in err
    low = unlearnt(read_card(new).metrics["patch_dice"])  # named in one line, if any
    assert ("not learnt yet on the voxels you reviewed" in err) == bool(low)
    assert all(name in err for name in low)
    scores = read_card(new).metrics  # the base model on the same voxels, and the round
    lowered = scores["patch_mean_dice"] < scores["base_patch_mean_dice"] - 0.005
    assert ("the round lowered the Dice on the voxels you reviewed" in err) == lowered
    assert {p.name: p.read_bytes() for p in model.iterdir()} == base_files
    assert load_model(new).card.parent == str(model)
    # round 2 from the new model: round 1's review map comes back, its corrections kept
    review1 = np.asarray(nib.load(folders / "review1.nii.gz").dataobj)
    assert set(np.unique(review1)) <= {0, 1, 2} and (review1 == 2).any()
    second = folders / "model-ft2"
    args[args.index("--model") + 1], args[args.index("--out") + 1] = str(new), str(second)
    args[-1] = str(folders / "review2.nii.gz")
    assert main([*args, "--reviewed", str(folders / "review1.nii.gz")]) == 0
    review2 = np.asarray(nib.load(folders / "review2.nii.gz").dataobj)
    assert (review2[review1 == 2] == 2).all() and (review2[review1 != 0] != 0).all()
    corrected = load_model(second).card.training["finetune"]["corrected_voxels"]
    assert corrected == int((review2 == 2).sum()) >= int((review1 == 2).sum())
    # a review map is never written over; one of another voxel grid is refused
    capsys.readouterr()
    args[args.index("--out") + 1] = str(folders / "model-ft3")
    assert main([*args, "--reviewed", str(folders / "review1.nii.gz")]) == 2
    assert "review2.nii.gz exists; give a new file name" in capsys.readouterr().err
    moved = nib.load(folders / "review1.nii.gz")
    shifted = moved.affine.copy()
    shifted[:3, 3] += 9.0  # 9 mm away
    nib.save(nib.Nifti1Image(np.asarray(moved.dataobj), shifted), folders / "moved.nii.gz")
    args[-1] = str(folders / "review3.nii.gz")
    assert main([*args, "--reviewed", str(folders / "moved.nii.gz")]) == 2
    assert "image and reviewed have different affines" in capsys.readouterr().err
    assert not (folders / "review3.nii.gz").exists() and not (folders / "model-ft3").exists()


def test_ctrl_c_says_whether_there_is_a_checkpoint_to_resume(folders, capsys, monkeypatch):
    from napari_selfreg.training import cli as training_cli

    def interrupted(job, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(training_cli, "_drain", interrupted)
    args = ["train", "--images", str(folders / "images"), "--labels", str(folders / "labels"),
            "--out", str(folders / "m"), "--iterations", "1", *TINY]  # fmt: skip
    assert main(args) == 130
    assert "before the first checkpoint; nothing to resume" in capsys.readouterr().err
    (folders / "m.checkpoints" / "last").mkdir(parents=True)
    assert main([*args, "--resume"]) == 130
    assert "continue with --resume" in capsys.readouterr().err


def test_an_interrupted_finetune_writes_no_review_map(folders, capsys, monkeypatch):
    from napari_selfreg.training import cli as training_cli

    def interrupted_in_training(job, *args):
        for event in job:
            if type(event).__name__ == "TrainEvent":  # the round is training: Ctrl-C
                job.close()
                raise KeyboardInterrupt

    model = folders / "model"
    assert main(["train", "--images", str(folders / "images"), "--labels", str(folders / "labels"),
                 "--out", str(model), "--iterations", "2", *TINY]) == 0  # fmt: skip
    monkeypatch.setattr(training_cli, "_drain", interrupted_in_training)
    review = folders / "review.nii.gz"
    args = ["finetune", "--model", str(model), "--image", str(folders / "images" / "c0.nii.gz"),
            "--labels", str(folders / "labels" / "c0.nii.gz"), "--out", str(folders / "ft"),
            "--iterations", "50", "--precision", "fp32", "--save-reviewed", str(review)]  # fmt: skip
    assert main(args) == 130
    assert not review.exists() and not (folders / "ft").exists()


def test_split_from_reuses_the_saved_split(folders):
    common = ["train", "--images", str(folders / "images"), "--labels", str(folders / "labels"),
              "--iterations", "1", "--quiet", *TINY]  # fmt: skip
    assert main([*common, "--out", str(folders / "a"), "--seed", "1"]) == 0
    assert main([*common, "--out", str(folders / "b"), "--seed", "2", "--split-from", str(folders / "a")]) == 0  # fmt: skip
    split_a = load_model(folders / "a").card.training["split"]
    assert split_a["val"] == ["c0"]  # seed 2 alone would hold out c2
    assert load_model(folders / "b").card.training["split"] == split_a


def test_train_reports_mismatched_labels_in_one_line(folders, capsys):
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 19), np.uint8), np.eye(4)), folders / "labels" / "c1.nii.gz")  # fmt: skip
    args = ["train", "--images", str(folders / "images"), "--labels", str(folders / "labels"),
            "--out", str(folders / "m"), *TINY]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("napari-selfreg: error: image and labels of c1 differ in shape")
    assert "\n" not in err and not (folders / "m").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--label-map", "1-2"], "bad --label-map"),
        (["--arch", "nonet"], "unknown architecture"),
        (["--patch", "16", "16"], "--patch needs 3 sizes"),
        (["--num-classes", "2"], r"value\(s\) 2"),
        (
            ["--arch-option", "chanels=[4, 8]"],
            r"unet3d has no option 'chanels'; its options: channels, norm",
        ),  # fmt: skip
        (["--arch-option", "norm"], "bad --arch-option 'norm'; write KEY=VALUE"),
        (["--arch-option", "norm=nonorm"], "cannot build unet3d .*unknown norm 'nonorm'"),
        (["--class-names", "bg,a"], r"2 class names \(bg, a\) for 3 classes"),
    ],
)
def test_train_user_errors(folders, capsys, extra, message):
    args = ["train", "--images", str(folders / "images"), "--labels", str(folders / "labels"),
            "--out", str(folders / "m"), "--iterations", "1", *TINY, *extra]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("napari-selfreg: error:")
    assert __import__("re").search(message, err)


def test_arch_options_switch_missu_lmsf_on(folders, capsys):
    """JSON values (lists, true) and plain text both reach the architecture."""
    model = folders / "missu"
    args = ["train", "--images", str(folders / "images"), "--labels", str(folders / "labels"),
            "--out", str(model), "--arch", "missu3d", "--iterations", "2", "--val-every", "2",
            "--patch", "16", "16", "16", "--batch-size", "1", "--precision", "fp32",
            "--threads", "1", "--arch-option", "channels=[4, 8, 8, 16]",
            "--arch-option", "blocks=[1, 1, 1, 1]", "--arch-option", "embed_dim=16",
            "--arch-option", "num_layers=1", "--arch-option", "num_heads=2",
            "--arch-option", "mlp_dim=16", "--arch-option", "img_size=16",
            "--arch-option", "training_modules=true"]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "kd " in err and "lmsf_aux " in err  # MISSU's own terms are trained and shown
    card = load_model(model).card
    assert card.training["config"]["arch_options"]["training_modules"] is True
    # the saved network is the deployed one: no LMSF, the other options as given
    assert card.options["training_modules"] is False and card.options["img_size"] == [16, 16, 16]
    assert card.options["embed_dim"] == 16 and card.options["channels"] == [4, 8, 8, 16]


def test_finetune_rejects_a_model_that_is_not_ours(folders, capsys):
    bogus = folders / "bogus"
    bogus.mkdir()
    (bogus / "model.json").write_text("[1, 2]")
    args = ["finetune", "--model", str(bogus), "--image", str(folders / "images" / "c0.nii.gz"),
            "--labels", str(folders / "labels" / "c0.nii.gz")]  # fmt: skip
    assert main(args) == 2
    assert "is not a napari-selfreg model card" in capsys.readouterr().err


def test_arch_option_values_python_spelling_and_duplicates():
    from napari_selfreg.training.cli import _arch_options
    from napari_selfreg.training.config import TrainingError

    opts = _arch_options(
        "missu3d", ["training_modules=False", "img_size=None", "dropout=0.1"], None
    )
    assert opts == {"training_modules": False, "img_size": None, "dropout": 0.1}
    assert _arch_options("unet3d", ["norm=instance"], [4, 8]) == {"channels": [4, 8], "norm": "instance"}  # fmt: skip
    with pytest.raises(TrainingError, match="channels is given twice"):
        _arch_options("unet3d", ["channels=[4, 8]"], [4, 8])
