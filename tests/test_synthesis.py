"""Synthetic training scans: head label maps, rendered subjects, training patches."""

import dataclasses
import functools

import numpy as np
import pytest
import torch

from napari_selfreg.training import heads as H
from napari_selfreg.training import synthesis as S
from napari_selfreg.training.workers import WorkerPatches


@pytest.fixture(scope="module")
def head():
    """One training head (a few seconds)."""
    return H.make_head(np.random.default_rng(0))


def test_head_has_every_layer_around_the_template_brain(head):
    anat = H.load_anatomy()
    assert head.shape == H.FRAME_SHAPE and head.dtype == np.uint8
    np.testing.assert_array_equal(head == H.BRAIN, anat.brain)
    counts = np.bincount(head.ravel(), minlength=len(H.TISSUES))
    for code in (H.CSF, H.BONE, H.MARROW, H.FAT, H.SKIN, H.MUSCLE, H.EYE, H.MUCOSA, H.CORD):
        assert counts[code] > 1000, H.TISSUES[code]
    # the brain is enclosed: CSF right outside it, then bone, and air only far away
    d = anat.distance
    shell = (d > 0) & (d <= 1)
    assert np.mean(head[shell] == H.CSF) > 0.8
    assert np.mean(head[(d > 0) & (d <= 8)] == H.AIR) < 0.01
    # a head of the held-out geometry differs
    other = H.make_head(np.random.default_rng(0), H.TEST_HEAD)
    assert np.mean(other != head) > 0.02


def plain_subject(rng, **changes):
    """A T1 subject without artefacts or deformation (exact tissue intensities)."""
    subject = S.draw_subject(rng, S.SynthSettings(contrast=(1, 0, 0, 0), template=0.0))
    fixed = {
        "matrix": np.eye(3), "shift": np.zeros(3), "elastic": torch.zeros(1, 3, 2, 2, 2),
        "stds": np.zeros(13), "brain_stds": np.zeros(3), "bias": None, "gamma": 1.0, "noise": 0.0,
        "blur": (0.0, 0.0, 0.0), "resolution": (1.0, 1.0, 1.0), "real_t1": False,
        "stripped": False, "fov_origin": np.array([-60.0, -80.0, -60.0]), "fov_shape": (48, 56, 40),
    }  # fmt: skip
    return dataclasses.replace(subject, **{**fixed, **changes})


def test_render_gives_tissue_labels_only_in_the_brain_and_contrast_per_tissue(head):
    subject = plain_subject(np.random.default_rng(1))
    gen = torch.Generator().manual_seed(0)
    image, labels = S.render(subject, head, (0, 0, 0), subject.fov_shape, gen)
    assert image.shape == labels.shape == subject.fov_shape
    assert set(np.unique(labels.numpy())) <= {0, 1, 2}
    pts = S.template_points(subject, (0, 0, 0), subject.fov_shape)
    codes = S._codes_at(torch.from_numpy(head), pts)
    assert not labels[codes != H.BRAIN].any()  # nothing outside the brain is tissue
    wm = image[labels == 2].mean()
    gm = image[labels == 1].mean()
    assert wm > gm  # T1: white matter brighter than grey matter
    for code in (H.BONE, H.FAT, H.CSF):
        voxels = image[codes == code]
        if voxels.numel():
            np.testing.assert_allclose(voxels.numpy(), subject.means[code], atol=1e-5)


def test_skull_stripped_subject_has_only_air_outside_the_brain(head):
    subject = plain_subject(np.random.default_rng(2), stripped=True)
    image, labels = S.render(subject, head, (0, 0, 0), subject.fov_shape, torch.Generator())
    codes = S._codes_at(
        torch.from_numpy(head), S.template_points(subject, (0, 0, 0), subject.fov_shape)
    )
    assert torch.allclose(image[codes != H.BRAIN], torch.tensor(float(subject.means[H.AIR])))


def test_deformation_moves_image_and_labels_together(head):
    rng = np.random.default_rng(3)
    subject = plain_subject(
        rng, matrix=S._rotation(rng, 15), elastic=torch.randn(1, 3, 5, 5, 5) * 3
    )
    image, labels = S.render(subject, head, (0, 0, 0), subject.fov_shape, torch.Generator())
    # the mean intensity under each label is still the tissue's (brain rendered from the maps)
    assert image[labels == 2].mean() > image[labels == 1].mean()
    straight = plain_subject(rng)
    _, labels0 = S.render(straight, head, (0, 0, 0), straight.fov_shape, torch.Generator())
    assert (labels != labels0).float().mean() > 0.01


def test_patches_are_normalised_seeded_and_hold_tissue(head):
    spec = {"method": "zscore", "foreground": "otsu"}

    def patches(seed):
        return S.SyntheticPatches(
            (24, 24, 24), np.random.default_rng(seed), spec, heads=[head]
        ).sample(3)

    image, labels, weight = patches(5)
    assert image.shape == (3, 1, 24, 24, 24) and image.dtype == np.float32
    assert labels.shape == (3, 24, 24, 24) and labels.dtype == np.int64
    assert weight.shape == labels.shape and np.all(weight == 1)
    assert set(np.unique(labels)) <= {0, 1, 2} and (labels > 0).any()
    assert np.isfinite(image).all() and -10 < image.mean() < 10
    again = patches(5)
    np.testing.assert_array_equal(image, again[0])
    np.testing.assert_array_equal(labels, again[1])
    assert not np.array_equal(image, patches(6)[0])


def test_worker_patches_are_seeded_and_shaped_like_the_in_process_ones(head):
    spec = {"method": "zscore", "foreground": "otsu"}

    def first_batch(seed):
        factory = functools.partial(S.SyntheticPatches, (24, 24, 24), normalization=spec, heads=[head])  # fmt: skip
        source = WorkerPatches(factory, np.random.default_rng(seed), 2, 1)
        return source, source.sample(2)

    source, (image, labels, weight) = first_batch(5)
    assert image.shape == (2, 1, 24, 24, 24) and image.dtype == np.float32
    assert labels.shape == (2, 24, 24, 24) and labels.dtype == np.int64
    assert weight.shape == labels.shape and set(np.unique(labels)) <= {0, 1, 2}
    with pytest.raises(ValueError, match="batch size"):
        source.sample(3)
    np.testing.assert_array_equal(image, first_batch(5)[1][0])
    assert not np.array_equal(image, first_batch(6)[1][0])


@pytest.mark.slow
def test_held_out_scan_and_degraded_resolution():
    image, labels, affine = S.held_out_scan("t2", seed=3)
    assert image.shape == labels.shape == (184, 248, 275)
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), 1.0)
    assert image[labels == 2].mean() < image[labels == 1].mean()  # T2: white matter darker
    folded, folded_labels, _ = S.held_out_scan("t2", seed=3, deform_mm=3.0)  # other folding
    overlap = 2 * ((folded_labels == 1) & (labels == 1)).sum() / ((folded_labels == 1).sum() + (labels == 1).sum())  # fmt: skip
    assert 0.6 < overlap < 0.95  # grey matter elsewhere, the same brain
    assert abs(int((folded_labels > 0).sum()) / int((labels > 0).sum()) - 1) < 0.1
    low, low_labels, low_affine = S.degrade_resolution(image, labels, affine, (1.0, 1.0, 3.0))
    assert low.shape == low_labels.shape == (184, 248, 92)
    np.testing.assert_allclose(
        np.linalg.norm(low_affine[:3, :3], axis=0), (1.0, 1.0, 3.0), rtol=0.01
    )
