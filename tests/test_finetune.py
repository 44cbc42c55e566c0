"""Fine-tuning on corrected labels: it helps, it never touches the base model, bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_selfreg import models
from napari_selfreg.data import make_phantom, make_phantom_set
from napari_selfreg.modelfile import ModelCard, ModelFileError, load_model, save_model
from napari_selfreg.predict import Predictor
from napari_selfreg.training import (
    FinetuneConfig,
    LabelError,
    TrainConfig,
    TrainingError,
    case_from_arrays,
    iter_finetune,
    train,
)
from napari_selfreg.training.config import FINETUNE_ITERATIONS, LATER_ROUND_UNREVIEWED_WEIGHT
from napari_selfreg.training.datasets import number_new_classes
from napari_selfreg.training.finetune import (
    CORRECTED,
    NEW_CLASS_LOGIT_OFFSET,
    REVIEWED,
    edit_axis,
    encoder_stages,
    extend_classes,
    finetune,
    freezer,
    loss_weights,
    probe_new_classes,
    reviewed_region,
)
from napari_selfreg.training.grid import to_model_grid

pytestmark = pytest.mark.usefixtures("one_torch_thread", "selfreg_home")

SHAPE = (40, 40, 40)


def dice(pred, truth, c):
    p, t = pred == c, truth == c
    return 2 * (p & t).sum() / max(p.sum() + t.sum(), 1)


def segment(path, image):
    return Predictor(load_model(path), device="cpu", precision="fp32").segment(image).labels


@pytest.fixture(scope="module")
def mislabelling_base(tmp_path_factory):
    """A small model trained on phantoms whose class 3 was labelled background."""
    torch.set_num_threads(1)
    cases = []
    for i, (image, labels) in enumerate(make_phantom_set(3, SHAPE, 4, seed=1)):
        labels = labels.copy()
        labels[labels == 3] = 0
        cases.append(case_from_arrays(image, labels, name=f"p{i}"))
    config = TrainConfig(
        arch="unet3d", arch_options={"channels": [8, 16, 32]}, num_classes=4,
        patch_size=(24, 24, 24), batch_size=2, iterations=80, lr=3e-3,
        val_fraction=0, val_every=1000, precision="fp32", seed=0,
    )  # fmt: skip
    return train(config, cases, tmp_path_factory.mktemp("base") / "base")


def tiny_base(tmp_path, num_classes=3, **card_kw):
    torch.manual_seed(0)
    net = models.build("unet3d", 1, num_classes, channels=(4, 8, 16))
    card = ModelCard(
        name="tiny", architecture="unet3d",
        options={"channels": [4, 8, 16], "in_channels": 1, "num_classes": num_classes},
        class_names=["background"] + [f"c{i}" for i in range(1, num_classes)],
        patch_size=[16, 16, 16], **card_kw,
    )  # fmt: skip
    return save_model(net, card, tmp_path / "tiny")


def test_finetune_on_a_few_corrected_slices_helps_the_untouched_ones(mislabelling_base, tmp_path):
    image, truth = make_phantom(SHAPE, 4, seed=100)
    pred = segment(mislabelling_base, image)
    slices = [z for z in range(SHAPE[0]) if (truth[z] == 3).any()]
    touched = slices[len(slices) // 4 :: max(1, len(slices) // 4)][:3]
    corrected = pred.copy()
    corrected[touched] = truth[touched]  # the user fixes three slices
    untouched = np.ones(SHAPE[0], bool)
    untouched[touched] = False
    before = dice(pred[untouched], truth[untouched], 3)
    config = FinetuneConfig(iterations=30, seconds_budget=60, precision="fp32")
    events = []
    new = finetune(mislabelling_base, image, corrected, corrected != pred, config, tmp_path / "ft",
                   callback=events.append)  # fmt: skip
    after = dice(segment(new, image)[untouched], truth[untouched], 3)
    assert after >= before + 0.05, (before, after)
    # validation = the fit to the reviewed slices: every 6 steps, for the widget's curve
    validations = [e for e in events if e.kind == "validation"]
    assert [e.iteration for e in validations] == [6, 12, 18, 24, 30]
    assert validations[-1].dice["class 3"] > validations[0].dice["class 3"]
    assert "(best so far)" in validations[0].message  # the round keeps its last weights
    assert not any("kept" in e.message for e in validations)
    card = load_model(new).card  # the last weights, measured on the reviewed patches
    assert "dice" not in card.metrics  # no whole-volume segmentation: it costs the round's time
    assert set(card.metrics["patch_dice"]) == set(card.class_names)
    assert 0 < card.metrics["patch_mean_dice"] <= 1
    # the base model on the same voxels, before the first step: the round helped there
    assert card.metrics["base_patch_mean_dice"] < card.metrics["patch_mean_dice"]
    assert any(e.kind == "message" and "the base model" in e.message for e in events)
    assert card.training["iterations_done"] == 30


def test_finetune_writes_a_new_version_and_leaves_the_base_alone(tmp_path):
    base = tiny_base(tmp_path)
    files = {p.name: p.read_bytes() for p in base.iterdir()}
    image, labels = make_phantom((16, 16, 16), 3, seed=0)
    pred = segment(base, image)
    config = FinetuneConfig(iterations=2, precision="fp32")
    events = []
    first = finetune(base, image, labels, config=config, callback=events.append)
    second = finetune(base, image, labels, config=config)
    assert first.name == "tiny-ft" and second.name == "tiny-ft-v2"
    assert {p.name: p.read_bytes() for p in base.iterdir()} == files
    card = load_model(first).card
    assert card.parent == str(base.resolve())
    assert card.training["finetune"]["corrected_voxels"] == int((labels != pred).sum())
    assert card.training["finetune"]["iterations"] == card.training["iterations_done"] == 2
    assert events[-1].kind == "done" and events[-1].model_path == first
    assert sorted(p.name for p in first.parent.iterdir()) == ["tiny-ft", "tiny-ft-v2"]


def test_a_user_models_child_names_its_parent_by_name(selfreg_home, tmp_path):
    from napari_selfreg.modelfile import model_lineage, user_models_dir

    base = tiny_base(user_models_dir())
    image, labels = make_phantom((16, 16, 16), 3, seed=0)
    tuned = finetune(base, image, labels, config=FinetuneConfig(iterations=1, precision="fp32"))
    assert load_model(tuned).card.parent == "tiny"  # found by name after the folder moves
    assert model_lineage(tuned) == ["tiny", load_model(tuned).card.name]


def test_a_refused_output_name_leaves_no_temporary_folder(tmp_path):
    base = tiny_base(tmp_path)
    image, labels = make_phantom((16, 16, 16), 3, seed=0)
    with pytest.raises(TrainingError, match="cannot be a folder name"):
        finetune(base, image, labels, config=FinetuneConfig(iterations=1), out=tmp_path / "tab\there")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["selfreg-home", "tiny"]


def test_labels_equal_to_the_prediction_are_refused(tmp_path):
    base = tiny_base(tmp_path)
    image, _ = make_phantom((16, 16, 16), 3, seed=0)
    pred = segment(base, image)
    with pytest.raises(LabelError, match="no voxel was corrected"):
        finetune(base, image, pred, None, FinetuneConfig(iterations=1))


def test_unknown_label_values_need_a_remap_or_extension(tmp_path):
    base = tiny_base(tmp_path, keep_largest=[[1, 2]])
    image, labels = make_phantom((16, 16, 16), 4, seed=0)  # class 3 is new to the model
    changed = labels == 3
    with pytest.raises(LabelError, match=r"value\(s\) 3 .*label map.*extend"):
        finetune(base, image, labels, changed, FinetuneConfig(iterations=1))
    remapped = finetune(base, image, labels, changed, FinetuneConfig(iterations=1, label_map={3: 2}))  # fmt: skip
    assert load_model(remapped).card.num_classes == 3
    extended = finetune(base, image, labels, changed, FinetuneConfig(iterations=1, extend_classes=True))  # fmt: skip
    card = load_model(extended).card
    assert card.num_classes == 4 and card.class_names[-1] == "class 3"
    assert len(card.class_colors) == 4
    assert card.keep_largest == [[1, 2]]  # the parent's post-processing goes with it
    far = np.where(labels == 3, 7, labels)  # a value far above the model's classes
    cfg = FinetuneConfig(iterations=1, extend_classes=True, new_class_names=["scalp"])
    card = load_model(finetune(base, image, far, changed, cfg, tmp_path / "far")).card
    assert card.num_classes == 4 and card.class_names[-1] == "scalp"  # class 3, painted 7
    assert card.training["finetune"]["new_class_values"] == {"scalp": 7}
    cfg.new_class_names = ["scalp", "lesion"]
    with pytest.raises(
        LabelError, match=r"2 names for new classes \(scalp, lesion\) .* 1 value\(s\) .* \(7\)"
    ):
        finetune(base, image, far, changed, cfg, tmp_path / "two")


def test_new_label_values_are_numbered_after_the_known_classes():
    labels = np.array([0, 1, 9, 2, 5, 9])
    renumbered, added = number_new_classes(labels, 3, ["lesion"])
    np.testing.assert_array_equal(renumbered, [0, 1, 4, 2, 3, 4])
    assert added == [(5, "lesion"), (9, "class 9")]
    same, none = number_new_classes(np.array([0, 2]), 3, ["unused"])
    assert none == [] and same.tolist() == [0, 2]


def test_extend_classes_keeps_predictions_and_starts_new_classes_below_background():
    torch.manual_seed(0)
    net = models.build("unet3d", 1, 3, channels=(4, 8, 16)).eval()
    big = extend_classes(net, {"channels": [4, 8, 16]}, "unet3d", 5).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        old, new = net(x), big(x)
    assert torch.allclose(new[:, :3], old, atol=1e-5)
    for c in (3, 4):  # background's logit, lowered by the offset
        assert torch.allclose(new[:, c], old[:, 0] - NEW_CLASS_LOGIT_OFFSET, atol=1e-4)
    assert torch.equal(new.argmax(1), old.argmax(1))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_a_linear_probe_fits_the_new_class_rows_first(device):
    """The probe runs on ``device`` and leaves the network where it was."""
    torch.manual_seed(0)
    base = models.build("unet3d", 1, 3, channels=(8, 16, 32)).eval()
    image, truth = make_phantom(SHAPE, 4, seed=100)
    slices = [z for z in range(SHAPE[0]) if (truth[z] == 3).sum() > 20][::4][:2]
    weight = np.zeros(SHAPE, np.float32)
    weight[slices] = 1  # class 3 painted on two reviewed slices, the rest unknown
    case = case_from_arrays(image, truth, name="c", normalization={"method": "zscore"}, weight=weight)  # fmt: skip
    net = extend_classes(base, {"channels": [8, 16, 32]}, "unet3d", 4).eval()
    x = torch.from_numpy(case.image)[None]
    untouched = np.ones(SHAPE, bool)
    untouched[slices] = False
    new = (truth == 3) & untouched
    with torch.no_grad():
        before = net(x)[0]
    assert not (before.argmax(0) == 3).any()  # extend_classes alone: the class starts absent
    recall = probe_new_classes(net, case, 3, (24, 24, 24), device=torch.device(device))
    assert set(recall) == {3} and recall[3] > 0.2, recall
    assert next(net.parameters()).device.type == "cpu"
    with torch.no_grad():
        after = net(x)[0]
    found = after.argmax(0).numpy() == 3
    assert found[new].mean() > 0.2  # on slices nobody painted, before any training step
    precision = found[truth == 3].sum() / found.sum()
    assert precision > 3 * (truth == 3).mean()  # where the class is, not anywhere
    assert torch.equal(after[:3], before[:3])  # the old rows are untouched


def test_freeze_encoder_and_stages(tmp_path):
    torch.manual_seed(0)
    net = models.build("unet3d", 1, 3, channels=(4, 8, 16))
    stages = encoder_stages(net, (16, 16, 16))
    assert len(stages) == 3  # stem, enc1, bottleneck
    named = {id(p): n for n, p in net.named_parameters()}
    assert all(named[id(p)].startswith("stem.") for p in stages[0])
    assert all(named[id(p)].startswith("down.1.") for p in stages[2])
    base = tiny_base(tmp_path)
    image, labels = make_phantom((16, 16, 16), 3, seed=0)
    before = load_model(base).network.state_dict()
    for freeze, frozen in (("encoder", ("stem.", "down.")), ("stage:1", ("stem.",))):
        cfg = FinetuneConfig(iterations=3, freeze=freeze, precision="fp32", lr=1e-2)
        after = load_model(finetune(base, image, labels, config=cfg)).network.state_dict()
        for key, value in after.items():
            same = torch.equal(value, before[key])
            if key.startswith(frozen) and not key.endswith("num_batches_tracked"):
                assert same, (freeze, key)  # weights and BatchNorm statistics
            elif key.startswith(("up.", "head.")) and key.endswith("weight"):
                assert not same, (freeze, key)
    with pytest.raises(ValueError, match="out of range"):
        finetune(base, image, labels, config=FinetuneConfig(iterations=1, freeze="stage:9"))


def test_batchnorm_statistics_are_estimated_anew_through_the_final_weights(tmp_path):
    bundle = load_model(tiny_base(tmp_path))
    for module in bundle.network.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.num_batches_tracked.fill_(50)  # a trained base's count
            module.running_mean.fill_(7.0)
    base = save_model(bundle.network, bundle.card, tmp_path / "trained-base")
    image, labels = make_phantom((16, 16, 16), 3, seed=0)
    states = {}
    for mode in ("recompute", "ema"):
        cfg = FinetuneConfig(iterations=3, batchnorm=mode, batchnorm_batches=4, precision="fp32")  # fmt: skip
        states[mode] = load_model(finetune(base, image, labels, config=cfg, out=tmp_path / mode)).network.state_dict()  # fmt: skip
    for key, value in states["recompute"].items():
        if key.endswith("num_batches_tracked"):  # 4 batches averaged, nothing of the base left
            assert int(value) == 4 and 51 <= int(states["ema"][key]) <= 53, key
        elif key.endswith("running_mean"):  # ema: 0.9^3 of the base's 7 is left
            assert torch.all(value.abs() < 3) and torch.all(states["ema"][key] > 4), key
    with pytest.raises(ValueError, match="unknown batchnorm"):
        FinetuneConfig(batchnorm="frozen")


def test_frozen_batchnorm_uses_its_running_statistics_in_training():
    torch.manual_seed(0)
    net = models.build("unet3d", 1, 3, channels=(4, 8, 16))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    freezer("encoder", (16, 16, 16))(net)
    x = torch.randn(2, 1, 16, 16, 16)
    net.eval()
    with torch.no_grad():
        deployed = net.forward_features(x)[1]
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trained = net.forward_features(x)[1]
    # the frozen encoder computes what the deployed model computes; the decoder does not
    assert torch.allclose(trained["bottleneck"], deployed["bottleneck"], atol=1e-6)
    assert not torch.allclose(trained["final"], deployed["final"], atol=1e-3)
    after = net.state_dict()
    for key in before:
        if key.startswith(("stem.", "down.")):
            assert torch.equal(before[key], after[key]), key


def test_reviewed_slices_are_truth_and_the_rest_unknown():
    changed = np.zeros((10, 6, 6), bool)
    changed[2, 1:3, 1:3] = True
    changed[7, 4, 4] = True
    assert edit_axis(changed) == 0
    region = reviewed_region(changed)
    assert region[2].all() and region[7].all() and not region[[0, 1, 3, 4, 5, 6, 8, 9]].any()
    w = loss_weights(changed, region, 3.0, 0.0)
    assert w[2, 1, 1] == 3.0 and w[2, 5, 5] == 1.0 and w[7, 0, 0] == 1.0 and w[4, 0, 0] == 0.0
    assert loss_weights(changed, region, 3.0, 0.25)[4, 0, 0] == 0.25  # the old behaviour, opt-in
    # the plane the user painted in wins over the guess; earlier rounds are kept
    along_y = reviewed_region(changed, axis=1, reviewed=np.eye(10, 6, dtype=bool)[:, :, None] & np.ones(6, bool))  # fmt: skip
    assert along_y[:, 1].all() and along_y[:, 4].all() and along_y[0, 0].all()
    spread = np.zeros((6, 6, 6), bool)
    spread[np.arange(6), np.arange(6), np.arange(6)] = True
    assert edit_axis(spread) is None
    np.testing.assert_array_equal(reviewed_region(spread), spread)  # only what changed
    assert reviewed_region(np.eye(4, dtype=bool)).all()  # 2D: the whole image was seen


def test_unreviewed_labels_do_not_change_what_is_learned(tmp_path):
    base = tiny_base(tmp_path)
    image, labels = make_phantom((16, 20, 18), 3, seed=0)
    changed = np.zeros(labels.shape, bool)
    changed[5, 3:9, 4:10] = True
    other = labels.copy()
    other[8:] = 2  # garbage in slices nobody reviewed
    cfg = FinetuneConfig(iterations=3, seconds_budget=None, precision="fp32", augment=False)
    a = finetune(base, image, labels, changed, cfg, tmp_path / "a")
    b = finetune(base, image, other, changed, cfg, tmp_path / "b")
    wa, wb = load_model(a).network.state_dict(), load_model(b).network.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # with the old behaviour (unreviewed voxels weighted) they do
    old = FinetuneConfig(iterations=3, seconds_budget=None, precision="fp32", augment=False, unreviewed_weight=0.25)  # fmt: skip
    c = finetune(base, image, labels, changed, old, tmp_path / "c")
    d = finetune(base, image, other, changed, old, tmp_path / "d")
    wc, wd = load_model(c).network.state_dict(), load_model(d).network.state_dict()
    assert not all(torch.equal(wc[k], wd[k]) for k in wc)


def test_corrections_of_earlier_rounds_stay_corrections(tmp_path):
    base = tiny_base(tmp_path)
    image, labels = make_phantom((16, 20, 18), 3, seed=0)
    first, second = np.zeros(labels.shape, bool), np.zeros(labels.shape, bool)
    first[5, 3:9, 4:10] = True
    second[12, 2:6, 2:6] = True
    cfg = FinetuneConfig(iterations=3, seconds_budget=None, precision="fp32", augment=False)
    maps = []
    finetune(base, image, labels, first, cfg, tmp_path / "r1", on_reviewed=maps.append)
    np.testing.assert_array_equal(maps[0] == CORRECTED, first)
    assert (maps[0] == REVIEWED).sum() == 20 * 18 - first.sum()  # the rest of slice 5
    two = finetune(base, image, labels, second, cfg, tmp_path / "r2", reviewed=maps[0], on_reviewed=maps.append)  # fmt: skip
    np.testing.assert_array_equal(maps[1] == CORRECTED, first | second)
    np.testing.assert_array_equal(maps[1] != 0, np.isin(np.arange(16), [5, 12])[:, None, None] & np.ones(labels.shape, bool))  # fmt: skip
    assert load_model(two).card.training["finetune"]["corrected_voxels"] == (first | second).sum()
    # a plain mask of reviewed voxels (any value but 0) carries no corrections: it learns otherwise
    plain = finetune(base, image, labels, second, cfg, tmp_path / "m", reviewed=np.where(maps[0] != 0, 255, 0))  # fmt: skip
    assert load_model(plain).card.training["finetune"]["corrected_voxels"] == second.sum()
    w2, wm = load_model(two).network.state_dict(), load_model(plain).network.state_dict()
    assert not all(torch.equal(w2[k], wm[k]) for k in w2)


def test_a_later_round_keeps_the_last_prediction_where_nobody_looked(tmp_path):
    base = tiny_base(tmp_path)
    image, labels = make_phantom((16, 20, 18), 3, seed=0)
    changed = np.zeros(labels.shape, bool)
    changed[5, 3:9, 4:10] = True
    cfg = FinetuneConfig(iterations=2, seconds_budget=None, precision="fp32", augment=False)
    maps = []
    one = finetune(base, image, labels, changed, cfg, tmp_path / "r1", on_reviewed=maps.append)
    assert load_model(one).card.training["finetune"]["unreviewed_weight"] == 0.0
    other = labels.copy()
    other[[8, 9, 10, 14, 15]] = 2  # another prediction in slices nobody reviewed
    again = np.zeros(labels.shape, bool)
    again[12, 2:6, 2:6] = True
    runs = {}
    for name, lab, weight in (("a", labels, None), ("b", other, None), ("c", labels, 0.0), ("d", other, 0.0)):  # fmt: skip
        later = dataclasses.replace(cfg, unreviewed_weight=weight)
        runs[name] = finetune(one, image, lab, again, later, tmp_path / name, reviewed=maps[0])
    record = load_model(runs["a"]).card.training["finetune"]
    assert record["unreviewed_weight"] == LATER_ROUND_UNREVIEWED_WEIGHT > 0
    weights = {k: load_model(v).network.state_dict() for k, v in runs.items()}
    assert not all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert all(torch.equal(weights["c"][k], weights["d"][k]) for k in weights["c"])
    # scribbles have no prediction to keep: unpainted voxels stay unknown in every round
    assert FinetuneConfig(sparse=True).unreviewed_weight_for(later_round=True) == 0.0
    with pytest.raises(TrainingError, match="unpainted voxels unknown"):
        FinetuneConfig(sparse=True, unreviewed_weight=0.1)


def test_scribbles_learn_only_what_is_painted_and_name_new_classes(tmp_path):
    base = tiny_base(tmp_path)
    image, truth = make_phantom((16, 20, 18), 3, seed=1)
    scribbles = np.zeros(truth.shape, np.uint8)
    scribbles[8, 2:6, 2:6] = 255  # background
    z1, z2 = (int(np.argmax((truth == c).sum(axis=(1, 2)))) for c in (1, 2))
    scribbles[z1][truth[z1] == 1] = 1
    scribbles[z2][truth[z2] == 2] = 3  # a class the model lacks
    seen = []
    cfg = FinetuneConfig(iterations=2, precision="fp32", sparse=True, extend_classes=True, new_class_names=["lesion"])  # fmt: skip
    new = finetune(base, image, scribbles, None, cfg, tmp_path / "s", on_reviewed=seen.append)
    card = load_model(new).card
    assert card.class_names == ["background", "c1", "c2", "lesion"]
    assert len(card.class_colors) == 4 and card.class_colors[3].startswith("#")
    np.testing.assert_array_equal(seen[0], np.where(scribbles != 0, CORRECTED, 0))
    record = card.training["finetune"]
    assert record["painted_voxels"] == record["reviewed_voxels"] == int((scribbles != 0).sum())
    with pytest.raises(LabelError, match="scribbles are empty"):
        finetune(base, image, np.zeros_like(scribbles), None, cfg, tmp_path / "e")
    # a review map's unpainted voxels would be learnt as background: refused
    with pytest.raises(LabelError, match="scribbles take no review map"):
        finetune(new, image, scribbles, None, cfg, tmp_path / "r", reviewed=seen[0] | 1)


def test_volume_reaches_the_model_orientation_and_spacing():
    card = ModelCard(name="m", architecture="unet3d", options={"num_classes": 2}, class_names=["a", "b"],
                     spacing=[1.0, 1.0, 1.0], orientation="RAS")  # fmt: skip
    image = np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5)
    affine = np.array(
        [[0, 0, -1.0, 0], [2.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]]
    )  # stored P, S, L at 2 mm along P
    out, info = to_model_grid(card, affine, {"image": (image, 1), "mask": (image > 50, 0)})
    assert info["reoriented"] == {"stored": "ASL", "model": "RAS"}
    assert info["resampled"]["from"] == [1.0, 2.0, 1.0]
    assert out["image"].shape == (5, 8, 6) and out["mask"].dtype == bool
    same, none = to_model_grid(card, None, {"image": (image, 1)})
    assert same["image"] is not None and none == {}


def test_cancel_writes_no_model_and_cleans_up(tmp_path):
    base = tiny_base(tmp_path)
    image, labels = make_phantom((16, 16, 16), 3, seed=0)
    gen = iter_finetune(
        base, image, labels, config=FinetuneConfig(iterations=50), out=tmp_path / "x"
    )
    for event in gen:
        if event.stage == "iteration" and event.done == 2:
            break
    gen.close()
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "selfreg-home",
        "tiny",
    ]  # no temp folders


def test_cancel_during_the_first_whole_volume_prediction(tmp_path):
    base = tiny_base(tmp_path)
    image, labels = make_phantom((16, 16, 16), 3, seed=0)
    gen = iter_finetune(
        base, image, labels, config=FinetuneConfig(iterations=50), out=tmp_path / "x"
    )
    stages = [next(gen).stage for _ in range(2)]
    assert stages == ["prepare", "tiles"]  # the base model's prediction, tile by tile
    gen.close()
    assert not (tmp_path / "x").exists()


def test_a_model_file_that_is_not_ours(tmp_path):
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "model.json").write_text('{"some": "other tool"}')
    (bogus / "model.safetensors").write_bytes(b"\x00" * 16)
    image, labels = make_phantom((16, 16, 16), 3, seed=0)
    with pytest.raises(ModelFileError, match="not a napari-selfreg model"):
        finetune(bogus, image, labels, config=FinetuneConfig(iterations=1))


def test_steps_default_to_the_device():
    assert FinetuneConfig().iterations is None
    assert FinetuneConfig().iterations_for("cpu") == FINETUNE_ITERATIONS["cpu"] == 100
    assert FinetuneConfig().iterations_for("cuda") == FINETUNE_ITERATIONS["cuda"] == 300
    assert FinetuneConfig().iterations_for("mps") == 100  # a device without its own default
    assert FinetuneConfig(iterations=7).iterations_for("cuda") == 7
    with pytest.raises(TrainingError, match="at least 1"):
        FinetuneConfig(iterations=0)


def test_learning_rate_defaults_to_the_kind_of_labels():
    assert FinetuneConfig().learning_rate == pytest.approx(1e-3)
    assert FinetuneConfig(sparse=True).learning_rate == pytest.approx(3e-4)
    assert FinetuneConfig(sparse=True, lr=5e-3).learning_rate == pytest.approx(5e-3)
    with pytest.raises(TrainingError, match="learning rate"):
        FinetuneConfig(lr=0.0)
