"""The training module: data, split, patches, augmentation, the loop, checkpoints, bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_selfreg import models
from napari_selfreg.data import make_phantom
from napari_selfreg.modelfile import ModelFileError, load_model
from napari_selfreg.predict import Predictor
from napari_selfreg.training import (
    CheckpointError,
    LabelError,
    NonFiniteLossError,
    TrainConfig,
    TrainingError,
    case_from_arrays,
    checkpoint_dir,
    iter_train,
    load_folder,
)
from napari_selfreg.training.augment import Augmenter
from napari_selfreg.training.checkpoint import flatten_optimizer, unflatten_optimizer
from napari_selfreg.training.datasets import PatchSampler, apply_split, make_split
from napari_selfreg.training.loop import Trainer, poly_lr
from napari_selfreg.training.metrics import unlearnt

pytestmark = pytest.mark.usefixtures("one_torch_thread", "selfreg_home")


def tiny_config(**kw) -> TrainConfig:
    base = {
        "arch": "unet3d",
        "arch_options": {"channels": [4, 8, 16]},
        "patch_size": (16, 16, 16),
        "iterations": 4,
        "val_every": 2,
        "batch_size": 1,
        "val_patches": 2,
        "precision": "fp32",
        "seed": 0,
    }
    base.update(kw)
    return TrainConfig(**base)


def phantom_cases(n=3, shape=(20, 20, 20), classes=3):
    cases = []
    for i in range(n):
        image, labels = make_phantom(shape, classes, seed=i)
        cases.append(case_from_arrays(image, labels, name=f"case{i}"))
    return cases


def test_cases_of_other_orientations_and_spacings_are_brought_to_one_grid(tmp_path):
    """Two cases stored RAS at 1 mm, one stored with x flipped and 2 mm slices: the model
    learns in RAS at 1 mm, the card says so, and the odd case is flipped and resampled."""
    from napari_selfreg.training.grid import case_to_grid, data_grid

    image, labels = make_phantom((20, 20, 20), 3, seed=0)
    image = image + np.arange(20, dtype=np.float32)[:, None, None] * 10  # rises along x
    flipped = np.diag([-1.0, 1.0, 2.0, 1.0])
    odd = case_from_arrays(image[::-1, :, ::2].copy(), labels[::-1, :, ::2].copy(), name="odd", affine=flipped)  # fmt: skip
    assert data_grid([np.eye(4), np.eye(4), flipped]) == ("RAS", [1.0, 1.0, 1.0])
    assert data_grid([np.eye(4), None]) == (None, None)
    brought = case_to_grid(odd, "RAS", [1.0, 1.0, 1.0])
    assert brought.shape == (20, 20, 20) and brought.affine is None
    assert (brought.labels == labels).mean() > 0.9  # back in place (z detail halved)
    assert np.all(np.diff(brought.image[0].mean(axis=(1, 2))) > 0)  # flipped back: x rises
    cases = [case_from_arrays(image, labels, name=f"ras{i}", affine=np.eye(4)) for i in range(2)]
    _, path = drain(iter_train(tiny_config(iterations=2), [*cases, odd], tmp_path / "m"))
    card = load_model(path).card
    assert card.orientation == "RAS" and card.spacing == [1.0, 1.0, 1.0]


def drain(gen):
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            return events, stop.value


def write_pair(folder, name, image, labels, affine=None, label_affine=None):
    affine = np.eye(4) if affine is None else affine
    (folder / "images").mkdir(exist_ok=True)
    (folder / "labels").mkdir(exist_ok=True)
    nib.save(
        nib.Nifti1Image(image.astype(np.float32), affine), folder / "images" / f"{name}.nii.gz"
    )
    lab_affine = affine if label_affine is None else label_affine
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), lab_affine), folder / "labels" / f"{name}.nii.gz")  # fmt: skip


# ------------------------------------------------------------------------ data


def test_load_folder_pairs_by_name(tmp_path):
    for i in (2, 0, 1):
        write_pair(tmp_path, f"s{i}", *make_phantom((12, 14, 16), 3, seed=i))
    cases = load_folder(tmp_path / "images", tmp_path / "labels")
    assert [c.name for c in cases] == ["s0", "s1", "s2"]
    image, labels = make_phantom((12, 14, 16), 3, seed=1)
    assert cases[1].image.shape == (1, 12, 14, 16)
    np.testing.assert_array_equal(cases[1].labels, labels)
    assert abs(float(cases[1].image.mean())) < 0.5  # normalised


def test_load_folder_rejects_unmatched_shape_and_affine(tmp_path):
    image, labels = make_phantom((12, 12, 12), 3, seed=0)
    write_pair(tmp_path, "a", image, labels)
    (tmp_path / "images" / "extra.nii.gz").write_bytes((tmp_path / "images" / "a.nii.gz").read_bytes())  # fmt: skip
    with pytest.raises(TrainingError, match="no labels for 1 image"):
        load_folder(tmp_path / "images", tmp_path / "labels")
    (tmp_path / "images" / "extra.nii.gz").unlink()
    write_pair(tmp_path, "b", image, labels[:, :, :10])
    with pytest.raises(LabelError, match="differ in shape"):
        load_folder(tmp_path / "images", tmp_path / "labels")
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    write_pair(tmp_path, "b", image, labels, label_affine=shifted)
    with pytest.raises(LabelError, match="different affines"):
        load_folder(tmp_path / "images", tmp_path / "labels")


def test_labels_must_be_class_indices():
    image = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(LabelError, match="negative"):
        case_from_arrays(image, -np.ones((8, 8, 8), np.int16))
    with pytest.raises(LabelError, match="whole numbers"):
        case_from_arrays(image, np.full((8, 8, 8), 0.5))
    remapped = case_from_arrays(image, np.full((8, 8, 8), 10), label_map={10: 1})
    assert set(np.unique(remapped.labels)) == {1}


def test_split_is_seeded_and_single_case_gives_a_slab():
    cases = phantom_cases(5, (12, 12, 12))
    split = make_split(cases, 0.2, seed=3)
    assert split == make_split(cases, 0.2, seed=3)
    assert len(split["val"]) == 1 and len(split["train"]) == 4
    train_cases, val_cases = apply_split(cases, split)
    assert {c.name for c in train_cases}.isdisjoint(c.name for c in val_cases)
    one = [case_from_arrays(*make_phantom((12, 20, 12), 3, seed=0), name="one")]
    slab = make_split(one, 0.25, seed=0)
    tr, va = apply_split(one, slab)
    assert slab["val"][0]["axis"] == 1
    assert tr[0].shape == (12, 15, 12) and va[0].shape == (12, 5, 12)
    with pytest.raises(TrainingError, match="not in the data"):
        apply_split(cases, {"train": ["nope"], "val": []})


# --------------------------------------------------------------------- patches


def test_unlearnt_names_foreground_classes_under_half():
    dice = {"background": 0.1, "grey matter": 0.18, "white matter": 0.5, "lesion": None}
    assert unlearnt(dice) == ["grey matter (0.18)"]
    assert unlearnt({"background": 0.9, "a": 0.9}) == []


def test_patch_sampler_oversamples_classes_and_focus():
    image, labels = make_phantom((20, 20, 20), 4, seed=0)
    focus = np.zeros(labels.shape, bool)
    focus[2, 3, 4] = True
    case = case_from_arrays(image, labels, focus)
    rng = np.random.default_rng(0)
    sampler = PatchSampler([case], (6, 6, 6), 3, fg_fraction=1.0, rng=rng)
    _, lab, weight = sampler.sample(24)
    assert all((p > 0).any() for p in lab)  # every patch holds a labelled voxel
    assert weight.min() == 1.0
    rare = min(range(1, 4), key=lambda c: (labels == c).sum())
    assert sum((p == rare).any() for p in lab) >= 3  # classes drawn uniformly
    focused = PatchSampler([case], (4, 4, 4), 3, fg_fraction=0, focus_fraction=1.0, rng=rng)
    img, _, _ = focused.sample(8)
    assert all(np.isclose(p, case.image[0, 2, 3, 4]).any() for p in img[:, 0])


def test_patch_sampler_pads_small_volumes_and_slices_for_2d():
    case = case_from_arrays(*make_phantom((10, 12, 14), 3, seed=1))
    rng = np.random.default_rng(0)
    img, lab, weight = PatchSampler([case], (16, 16, 16), 3, rng=rng).sample(2)
    assert img.shape == (2, 1, 16, 16, 16)
    assert weight.sum() == 2 * 10 * 12 * 14  # padding is ignored by the loss
    img2, lab2, _ = PatchSampler([case], (8, 8), 2, slice_axis=0, rng=rng).sample(3)
    assert img2.shape == (3, 1, 8, 8) and lab2.shape == (3, 8, 8)
    with pytest.raises(TrainingError, match="axes"):
        PatchSampler([case], (8, 8), 3, rng=rng)


def test_augmenter_keeps_shapes_classes_and_is_seeded():
    _, labels = make_phantom((16, 16, 16), 3, seed=0)
    image = torch.randn(2, 1, 16, 16, 16)
    lab = torch.from_numpy(np.stack([labels, labels])).long()
    weight = torch.ones(2, 16, 16, 16)
    outs = []
    for _ in range(2):
        aug = Augmenter(3, torch.Generator().manual_seed(5))
        aug.s.affine = aug.s.bias = aug.s.gamma = aug.s.noise = 1.0
        outs.append(aug(image, lab, weight))
    (x, y, w), (x2, y2, _) = outs
    assert x.shape == image.shape and y.shape == lab.shape and w.shape == weight.shape
    assert set(torch.unique(y).tolist()) <= {0, 1, 2}
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, image)
    assert torch.isfinite(x).all() and w.min() >= 0 and w.max() <= 1


# ------------------------------------------------------------------------ loop


def test_train_writes_a_model_that_the_predictor_uses(tmp_path):
    cases = phantom_cases()
    out = tmp_path / "m"
    events, path = drain(iter_train(tiny_config(), cases, out))
    assert path == out and (out / "model.safetensors").is_file()
    kinds = [e.kind for e in events]
    assert kinds.count("iteration") == 4 and kinds.count("validation") == 2 and kinds[-1] == "done"
    first = next(e for e in events if e.kind == "iteration")
    assert {"total", "ce", "dice", "scr", "ifd"} <= set(first.losses)
    assert first.losses["scr"] > 0 and first.losses["ifd"] > 0
    val = next(e for e in events if e.kind == "validation")
    assert set(val.dice) == {"background", "class 1", "class 2"}
    assert val.message.endswith("(best; kept)")  # keep="best": these weights are saved
    bundle = load_model(out)
    card = bundle.card
    assert card.training["config"]["lambda_scr"] == 0.015
    assert card.training["split"] == make_split(cases, 0.2, seed=0)  # saved with the model
    assert card.training["data"]["cases"] == 2
    assert set(card.metrics["dice"]) == {"background", "class 1", "class 2"}
    assert card.metrics["validation"] == "whole volumes through the predictor"
    labels = Predictor(bundle, device="cpu").segment(cases[0].raw).labels
    assert labels.shape == cases[0].shape
    assert (checkpoint_dir(out) / "last" / "optimizer.safetensors").is_file()


def test_selfreg_can_be_switched_off_and_sgd_works(tmp_path):
    cfg = tiny_config(lambda_scr=0, lambda_ifd=0, optimizer="sgd", iterations=2, val_fraction=0)
    events, path = drain(iter_train(cfg, phantom_cases(2), tmp_path / "plain"))
    losses = next(e for e in events if e.kind == "iteration").losses
    assert "scr" not in losses and "ifd" not in losses
    assert load_model(path).card.training["split"]["val"] == []


def test_model_training_losses_are_added_and_logged(tmp_path):
    options = {"channels": [4, 8, 8, 16], "embed_dim": 16, "num_layers": 1, "num_heads": 2,
               "mlp_dim": 16, "img_size": [16, 16, 16], "training_modules": True}  # fmt: skip
    cfg = tiny_config(arch="missu3d", arch_options=options, iterations=2, val_fraction=0)
    events, path = drain(iter_train(cfg, phantom_cases(2), tmp_path / "missu"))
    losses = next(e for e in events if e.kind == "iteration").losses
    assert losses["kd"] > 0 and losses["lmsf_aux"] > 0
    bundle = load_model(path)  # the deployed network: no LMSF teachers
    assert bundle.card.options["training_modules"] is False
    assert not any(k.startswith("lmsf.") for k in bundle.network.state_dict())


def test_early_stopping_and_best_checkpoint(tmp_path):
    frozen = {"channels": [4, 8, 16], "norm": "instance"}  # no running statistics either
    cfg = tiny_config(arch_options=frozen, iterations=20, val_every=1, patience=2, lr=0.0)
    events, path = drain(iter_train(cfg, phantom_cases(), tmp_path / "m"))
    assert [e.kind for e in events].count("validation") == 3
    assert "early stop" in events[-1].message and events[-1].iteration == 3
    card = load_model(path).card
    assert card.training["best_iteration"] == 1  # the first validation stays the best
    assert [h["iteration"] for h in card.training["history"]] == [1, 2, 3]


def test_optimizer_state_round_trips_without_pickle():
    net = models.build("unet3d", channels=(4, 8), num_classes=2)
    for opt in (torch.optim.AdamW(net.parameters()), torch.optim.SGD(net.parameters(), 0.1, 0.9)):
        net(torch.randn(1, 1, 8, 8, 8)).sum().backward()
        opt.step()
        tensors, meta = flatten_optimizer(opt.state_dict())
        meta = json.loads(json.dumps(meta))
        restored = unflatten_optimizer(tensors, meta)
        fresh = type(opt)(net.parameters(), lr=1.0)
        fresh.load_state_dict(restored)
        for a, b in zip(opt.state.values(), fresh.state.values(), strict=True):
            for key in a:
                assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key]))


def test_cancel_keeps_checkpoints_and_resume_continues(tmp_path):
    cases = phantom_cases()
    out = tmp_path / "m"
    gen = iter_train(tiny_config(iterations=6), cases, out)
    for event in gen:
        if event.kind == "iteration" and event.iteration == 3:
            break
    gen.close()  # what worker.quit() does: stop at a yield
    last = checkpoint_dir(out) / "last"
    assert not out.exists()
    state = json.loads((last / "trainer.json").read_text())
    assert state["iteration"] == 2
    assert load_model(last).card.training["iterations_done"] == 2
    events, path = drain(iter_train(tiny_config(iterations=6), cases, out, resume=True))
    its = [e.iteration for e in events if e.kind == "iteration"]
    assert its == [3, 4, 5, 6]
    assert "resumed at iteration 2" in events[0].message
    card = load_model(path).card
    assert card.training["iterations_done"] == 6
    assert card.training["split"] == state["split"]  # the split is reused, not redrawn


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="nothing to resume"):
        drain(iter_train(tiny_config(), phantom_cases(2), tmp_path / "m", resume=True))


# ------------------------------------------------------------------- bad input


def test_unknown_label_values_say_how_to_fix(tmp_path):
    with pytest.raises(LabelError, match=r"value\(s\) 2 .*label map.*extend"):
        drain(iter_train(tiny_config(num_classes=2), phantom_cases(2), tmp_path / "m"))


def test_no_labelled_voxels(tmp_path):
    case = case_from_arrays(np.random.rand(12, 12, 12), np.zeros((12, 12, 12), np.uint8))
    with pytest.raises(LabelError, match="no labelled voxels"):
        drain(iter_train(tiny_config(), [case], tmp_path / "m"))


def test_output_that_exists_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(TrainingError, match="never overwritten"):
        iter_train(tiny_config(), phantom_cases(2), tmp_path / "m").send(None)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = models.build("unet3d", 1, 3, channels=(4, 8, 16))
    calls = {"n": 0}
    forward = net.forward_features

    def poisoned(x):
        calls["n"] += 1
        logits, feats = forward(x)
        if net.training and calls["n"] >= 4:
            logits = logits * float("nan")
        return logits, feats

    net.forward_features = poisoned
    out = tmp_path / "m"
    gen = iter_train(tiny_config(iterations=6, val_fraction=0), phantom_cases(2), out, network=net)
    events = []
    with pytest.raises(NonFiniteLossError, match="NaN or infinite at iteration 4.*iteration 2"):
        for event in gen:
            events.append(event)
    assert "NaN" in events[-1].message
    last = checkpoint_dir(out) / "last"
    good = load_model(last).network
    assert all(torch.isfinite(p).all() for p in good.parameters())
    assert not out.exists()


def test_full_disk_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    out = tmp_path / "m"
    gen = iter_train(tiny_config(iterations=6, val_fraction=0), phantom_cases(2), out)
    for event in gen:
        if event.kind == "checkpoint":
            break
    last = checkpoint_dir(out) / "last"
    before = (last / "model.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CheckpointError, match="No space left on device.*intact"):
        for _ in gen:
            pass
    assert (last / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in checkpoint_dir(out).iterdir()) == ["last"]  # no temp folders


def test_full_disk_when_writing_the_model_then_resume_finishes(tmp_path, monkeypatch):
    from napari_selfreg.training import loop

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    out = tmp_path / "m"
    cases = phantom_cases(2)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "save_model", full)
        with pytest.raises(CheckpointError, match="could not write the model.*--resume"):
            drain(iter_train(tiny_config(val_fraction=0), cases, out))
    assert not out.exists()
    events, path = drain(iter_train(tiny_config(val_fraction=0), cases, out, resume=True))
    assert path == out and load_model(out).card.training["iterations_done"] == 4
    assert [e.kind for e in events] == ["message", "done"]  # nothing left to train


def test_resume_from_a_folder_that_is_not_ours(tmp_path):
    out = tmp_path / "m"
    last = checkpoint_dir(out) / "last"
    last.mkdir(parents=True)
    (last / "trainer.json").write_text("{}")
    (last / "model.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(TrainingError, match="cannot resume"):
        drain(iter_train(tiny_config(), phantom_cases(2), out, resume=True))
    with pytest.raises(ModelFileError):
        load_model(last)


def test_learning_rate_anneals_to_the_time_budget_when_asked():
    def progress(**kw):
        return lambda it, seconds: Trainer._progress(SimpleNamespace(config=tiny_config(**kw)), it, seconds)  # fmt: skip

    by_steps = progress(iterations=100, max_seconds=60.0)
    by_time = progress(iterations=100, max_seconds=60.0, anneal_to_budget=True)
    assert by_steps(10, 45.0) == by_time(10, 0.0) == pytest.approx(0.1)
    assert by_time(10, 45.0) == pytest.approx(0.75)  # time ends this run first
    assert by_time(90, 6.0) == pytest.approx(0.9)  # the steps do
    assert poly_lr(1e-3, 0.75, 1.0) == pytest.approx(2.5e-4)
    assert poly_lr(1e-3, 1.5, 0.9) == 0.0
    assert poly_lr(1e-3, 0.5, 0.0, cooldown=0.3) == pytest.approx(1e-3)  # before the cooldown
    assert poly_lr(1e-3, 0.85, 0.0, cooldown=0.3) == pytest.approx(5e-4)  # halfway down
    assert poly_lr(1e-3, 1.0, 0.0, cooldown=0.3) == 0.0
