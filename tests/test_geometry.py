"""Reorientation: arrays stored in any axis order reach the model's order and come back."""

import numpy as np
import pytest
import torch
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from napari_selfreg import models
from napari_selfreg.geometry import axis_codes, reorientation, spacing_from_affine
from napari_selfreg.modelfile import ModelBundle, ModelCard
from napari_selfreg.predict import Predictor

CODES = ["RAS", "PSL", "LIP", "ASR", "SLP", "LPS"]


def stored_as(volume: np.ndarray, codes: str, spacing=(1.0, 1.5, 2.0)):
    """``volume`` (RAS, per-axis ``spacing``) stored in another axis order, with its affine."""
    turn = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(codes))
    data = apply_orientation(volume, turn)
    affine = np.zeros((4, 4))
    affine[3, 3] = 1
    for ras_axis, (stored_axis, direction) in enumerate(turn):
        affine[ras_axis, int(stored_axis)] = direction * spacing[ras_axis]
    affine[:3, 3] = [-20.0, 13.0, 7.5]
    return data, affine


@pytest.mark.parametrize("codes", CODES)
def test_reorientation_matches_nibabel_and_undoes_itself(codes):
    volume = np.random.default_rng(0).random((5, 6, 7))
    data, affine = stored_as(volume, codes)
    assert axis_codes(affine) == codes
    turn = reorientation(affine, "RAS")
    reference = apply_orientation(
        data, ornt_transform(io_orientation(affine), axcodes2ornt("RAS"))
    )
    np.testing.assert_array_equal(turn.apply(data), reference)
    np.testing.assert_array_equal(turn.apply(data), volume)
    np.testing.assert_array_equal(turn.undo(turn.apply(data)), data)
    assert turn.spacing(spacing_from_affine(affine)) == pytest.approx((1.0, 1.5, 2.0))
    assert turn.identity == (codes == "RAS")
    stacked = np.stack([data, 2 * data])  # a leading channel axis stays in front
    np.testing.assert_array_equal(turn.apply(stacked, lead=1)[1], 2 * volume)
    tensor = torch.from_numpy(data.copy())
    np.testing.assert_array_equal(turn.apply(tensor).numpy(), volume)


def test_oblique_affine_takes_the_nearest_axis_order():
    angle = np.deg2rad(20)
    rot = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.array([[0, 0, -1.0], [1, 0, 0], [0, 1, 0]])  # stored A, S, L
    turn = reorientation(affine, "RAS")
    assert turn.source == "ASL"
    assert turn.order == (2, 0, 1) and turn.flip == (True, False, False)


def test_singular_affine_is_refused_with_a_sentence():
    with pytest.raises(ValueError, match="singular"):
        reorientation(np.diag([1.0, 0.0, 1.0, 1.0]), "RAS")


def oriented_bundle(orientation="RAS"):
    torch.manual_seed(0)
    net = models.build("unet3d", channels=(4, 8), num_classes=3).eval()
    card = ModelCard(
        name="oriented", architecture="unet3d",
        options={"channels": [4, 8], "num_classes": 3, "in_channels": 1},
        class_names=["bg", "a", "b"], patch_size=[16, 16, 16], orientation=orientation,
    )  # fmt: skip
    return ModelBundle(net, card)


@pytest.mark.parametrize("codes", ["PSL", "LIP", "SLP"])
def test_same_scan_in_any_stored_order_gets_the_same_labels(codes):
    volume = np.random.default_rng(1).normal(size=(20, 24, 18)).astype(np.float32)
    predictor = Predictor(
        oriented_bundle(), uncertainty=True, probabilities=True, precision="fp32"
    )
    ras, ras_affine = stored_as(volume, "RAS", spacing=(1.0, 1.0, 1.0))
    reference = predictor.segment(ras, affine=ras_affine)
    data, affine = stored_as(volume, codes, spacing=(1.0, 1.0, 1.0))
    mask = np.ones(data.shape, bool)
    result = predictor.segment(data, affine=affine, mask=mask)
    back = ornt_transform(io_orientation(affine), axcodes2ornt("RAS"))
    assert result.labels.shape == data.shape
    np.testing.assert_array_equal(apply_orientation(result.labels, back), reference.labels)
    np.testing.assert_allclose(apply_orientation(result.uncertainty, back), reference.uncertainty)
    probs = np.stack([apply_orientation(p, back) for p in result.probabilities])
    np.testing.assert_allclose(probs, reference.probabilities)
    assert result.info["orientation"] == {"stored": codes, "model": "RAS"}


def test_models_without_an_orientation_see_the_array_as_stored():
    volume = np.random.default_rng(2).normal(size=(16, 20, 18)).astype(np.float32)
    data, affine = stored_as(volume, "PSL", spacing=(1.0, 1.0, 1.0))
    plain = Predictor(oriented_bundle(None), precision="fp32")
    np.testing.assert_array_equal(
        plain.segment(data, affine=affine).labels, plain.segment(data).labels
    )


def test_streaming_into_zarr_refuses_a_reorientation(tmp_path):
    volume = np.zeros((16, 16, 16), np.float32)
    data, affine = stored_as(volume, "PSL", spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="stored PSL and the model works in RAS"):
        Predictor(oriented_bundle()).segment(data, affine=affine, out=tmp_path / "o.zarr")


def test_slice_scores_come_in_the_stored_order_and_rank_uncertain_slices():
    from napari_selfreg.review import rank_slices, reviewed_slices, slice_scores

    volume = np.random.default_rng(3).normal(size=(20, 24, 18)).astype(np.float32)
    data, affine = stored_as(volume, "PSL", spacing=(1.0, 1.0, 1.0))
    result = Predictor(oriented_bundle(), slice_scores=True, precision="fp32").segment(
        data, affine=affine
    )
    assert result.uncertainty is None and len(result.slice_scores) == 3
    assert [len(s) for s in result.slice_scores] == list(data.shape)
    full = Predictor(oriented_bundle(), uncertainty=True, precision="fp32").segment(
        data, affine=affine
    )
    for axis, scores in enumerate(slice_scores(full.uncertainty)):
        np.testing.assert_allclose(result.slice_scores[axis], scores, rtol=1e-6)
    ranked = rank_slices([0.0, 2.0, 5.0, 1.0], exclude=[2], top=2)
    assert ranked == [(1, 1.0), (3, 0.5)]
    scores = [0.0, 1.0, 9.0, 8.0, 7.0, 2.0, 6.0, 0.5]  # neighbours of a peak score high too
    assert [i for i, _ in rank_slices(scores, spacing=2)] == [2, 4, 6]
    assert [i for i, _ in rank_slices(scores, exclude=[3], spacing=2)] == [6, 1]
    assert [i for i, _ in rank_slices([np.nan, 2.0, 1.0])] == [1, 2]  # a NaN score is left out
    reviewed = np.zeros((4, 3, 3), bool)
    reviewed[2, 1, 1] = True
    assert reviewed_slices(reviewed, 0) == [2] and reviewed_slices(None, 0) == []


def test_world_matrix_is_napari_s_data_to_world_transform():
    from napari.utils.transforms import Affine

    from napari_selfreg.geometry import world_matrix

    rng = np.random.default_rng(4)
    for n in (2, 3):
        scale, translate = rng.uniform(0.5, 2, n), rng.normal(size=n)
        rotate = Affine(rotate=25.0 if n == 2 else (10.0, 20.0, 30.0), ndim=n).rotate
        shear = rng.normal(0, 0.1, n * (n - 1) // 2)
        outer = np.eye(n + 1)
        outer[:n, :n] = np.linalg.qr(rng.normal(size=(n, n)))[0]
        napari = (
            Affine(affine_matrix=outer).affine_matrix
            @ Affine(scale=scale, translate=translate, rotate=rotate, shear=shear).affine_matrix
        )
        np.testing.assert_allclose(world_matrix(scale, translate, rotate, shear, outer), napari, atol=1e-12)  # fmt: skip
