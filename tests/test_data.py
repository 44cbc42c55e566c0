"""Phantoms, the MNI152 sample, the domain-shifted scan and the sample registry."""

import numpy as np
import pytest

from napari_selfreg import data, io


@pytest.mark.parametrize(
    ("shape", "k"),
    [((24, 24, 24), 4), ((19, 23, 30), 3), ((17, 26, 21), 6), ((33, 47), 4), ((40, 41), 2)],
)
def test_phantom_shapes_and_classes(shape, k):
    image, labels = data.make_phantom(shape, num_classes=k, seed=3)
    assert image.shape == labels.shape == shape
    assert image.dtype == np.float32 and labels.dtype == np.uint8
    assert np.isfinite(image).all()
    assert set(np.unique(labels)) == set(range(k))  # every class present


def test_phantom_is_deterministic():
    a = data.make_phantom((21, 18, 25), 4, seed=7)
    b = data.make_phantom((21, 18, 25), 4, seed=7)
    c = data.make_phantom((21, 18, 25), 4, seed=8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1]) and not np.array_equal(a[0], c[0])


def test_phantom_image_and_labels_agree_under_deformation():
    # without noise, bias, texture and blur every organ label holds exactly one intensity
    plain = {"noise": 0, "bias": 0, "texture": 0, "pv_sigma": 0}
    image, labels = data.make_phantom((30, 28, 26), 5, seed=1, **plain)
    means = []
    for c in range(1, 5):
        values = np.unique(image[labels == c])
        assert values.size == 1
        means.append(values[0])
    assert len(set(means)) == 4  # distinct class means
    flat, flat_labels = data.make_phantom((30, 28, 26), 5, seed=1, deform=0.0, **plain)
    assert not np.array_equal(flat_labels, labels)  # the deformation moves the shapes


def test_phantom_classes_have_distinct_texture_and_realistic_effects():
    image, labels = data.make_phantom((48, 48, 48), 4, seed=2, noise=0, bias=0, pv_sigma=0)
    stds = [float(image[labels == c].std()) for c in range(1, 4)]
    assert max(stds) > 1.5 * min(stds)  # class-specific texture amplitude
    noisy, same = data.make_phantom((48, 48, 48), 4, seed=2)
    assert np.array_equal(same, labels)  # effects change the image only
    assert np.abs(noisy - image).mean() > 0.01


def test_phantom_set_and_bad_arguments():
    cases = data.make_phantom_set(3, (16, 18, 20), num_classes=3, seed=5)
    again = data.make_phantom_set(3, (16, 18, 20), num_classes=3, seed=5)
    assert len(cases) == 3
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(cases, again, strict=True))
    assert not np.array_equal(cases[0][0], cases[1][0])
    bad = [((5, 30, 30), 3, "sides of at least 8"), ((20, 20, 20, 20), 3, "2 or 3 sides"),
           ((20, 20), 1, "in 2..255, got 1"), ((20, 20), 300, "in 2..255, got 300")]  # fmt: skip
    for shape, k, message in bad:
        with pytest.raises(ValueError, match=message):
            data.make_phantom(shape, k)


@pytest.fixture(scope="module")
def mni():
    return data.load_mni152(1)


def test_mni152(mni):
    image, labels, affine = mni
    assert image.shape == labels.shape == (197, 233, 189)
    assert image.dtype == np.float32 and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1, 2}
    assert affine.shape == (4, 4) and np.allclose(np.diag(affine)[:3], 1.0)
    assert 0.05 < (labels == 1).mean() < 0.3 and 0.05 < (labels == 2).mean() < 0.3
    # white matter is brighter than grey matter on T1
    assert image[labels == 2].mean() > image[labels == 1].mean()
    assert data.MNI152_CLASSES == ["background", "grey matter", "white matter"]
    assert len(data.MNI152_COLORS) == 3
    fresh = data.load_mni152(1)
    fresh[0][:] = 0  # callers get copies; the cache is untouched
    assert data.load_mni152(1)[0].max() > 0


def test_shifted_scan_resamples_with_exact_affine(mni):
    image, labels, affine = mni
    new_image, new_labels, new_affine = data.make_shifted_scan(image, labels, affine, spacing=1.3)
    assert new_image.shape == new_labels.shape == (152, 179, 145)
    assert new_image.dtype == np.float32 and new_labels.dtype == labels.dtype
    assert np.allclose(np.linalg.norm(new_affine[:3, :3], axis=0), 1.3)
    centre_old = affine @ np.r_[(np.array(image.shape) - 1) / 2, 1]
    centre_new = new_affine @ np.r_[(np.array(new_image.shape) - 1) / 2, 1]
    assert np.allclose(centre_old, centre_new)
    # nearest-neighbour labels sit where the new affine says they are
    rng = np.random.default_rng(0)
    idx = rng.integers(0, np.array(new_labels.shape), size=(2000, 3))
    world = new_affine @ np.c_[idx, np.ones(len(idx))].T
    old = np.rint(np.linalg.inv(affine) @ world)[:3].astype(int).T
    agree = new_labels[tuple(idx.T)] == labels[tuple(old.T)]
    assert agree.mean() > 0.99
    assert new_image.max() > 100  # other intensity units
    assert set(np.unique(new_labels)) == {0, 1, 2}


def test_samples_registry_and_write_sample(tmp_path):
    assert set(data.SAMPLES) == {"mni152", "phantom"}
    for sample in data.SAMPLES.values():
        assert len(sample.class_names) == len(sample.class_colors)
    image_path, labels_path = data.write_sample("phantom", tmp_path / "out")
    image = io.read_volume(image_path)
    labels = io.read_volume(labels_path)
    assert image.shape == labels.shape == (96, 112, 96)
    assert np.array_equal(image.affine, labels.affine)
    assert image.spacing == (1.0, 1.0, 1.0)
    assert labels.data.dtype == np.uint8 and set(np.unique(labels.data)) == {0, 1, 2, 3}
    ref_image, ref_labels, ref_affine = data.SAMPLES["phantom"].load()
    assert np.array_equal(image.data, ref_image) and np.array_equal(labels.data, ref_labels)
    assert np.array_equal(image.affine, ref_affine)
    with pytest.raises(ValueError, match="mni152, phantom"):
        data.write_sample("nope", tmp_path)
