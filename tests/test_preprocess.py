"""Intensity normalisation (all methods, NaN/Inf, dtypes, blockwise) and resampling."""

import numpy as np
import pytest

from napari_selfreg import preprocess as pp


def _body(shape=(20, 22, 18), seed=0):
    """Zero background with a N(100, 10) block inside."""
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, np.float32)
    inner = image[4:-4, 5:-5, 3:-3]
    inner[...] = rng.normal(100, 10, inner.shape)
    return image


def test_zscore_uses_nonzero_foreground_by_default():
    image = _body()
    out, stats = pp.normalize(image, {"method": "zscore"}, return_stats=True)
    fg = image != 0
    assert out.dtype == np.float32 and out.shape == image.shape
    assert abs(out[fg].mean()) < 1e-4 and abs(out[fg].std() - 1) < 1e-4
    assert stats.foreground_fraction == pytest.approx(fg.mean())
    everything = pp.normalize(image, {"method": "zscore", "foreground": "all"})
    assert abs(everything.mean()) < 1e-4 and abs(everything.std() - 1) < 1e-4
    # no zeros in the image: "nonzero" is the whole image
    shifted = image + 5
    assert np.allclose(pp.normalize(shifted, {"method": "zscore"}), everything, atol=1e-5)


def test_zscore_otsu_and_mask():
    rng = np.random.default_rng(1)
    image = rng.normal(10, 1, (30, 30)).astype(np.float32)
    image[10:20, 10:20] = rng.normal(200, 5, (10, 10))
    out = pp.normalize(image, {"method": "zscore", "foreground": "otsu"})
    bright = np.zeros_like(image, bool)
    bright[10:20, 10:20] = True
    assert abs(out[bright].mean()) < 1e-3 and abs(out[bright].std() - 1) < 1e-3
    masked = pp.normalize(image, {"method": "zscore"}, mask=bright)
    assert np.allclose(masked, out, atol=1e-5)
    with pytest.raises(ValueError, match="mask shape"):
        pp.normalize(image, {"method": "zscore"}, mask=bright[:5])
    with pytest.raises(ValueError, match="nonzero, otsu, all"):
        pp.normalize(image, {"method": "zscore", "foreground": "brain"})


def test_ct_window_and_percentile():
    image = np.linspace(-1000, 1000, 2001).reshape(3, 667, 1).astype(np.int16)
    out = pp.normalize(image, {"method": "ct_window", "low": -160, "high": 240})
    assert out.min() == -1 and out.max() == 1
    assert out.flat[np.argmin(np.abs(image.ravel() - 40))] == pytest.approx(0, abs=1e-6)
    z = pp.normalize(
        image, {"method": "ct_window", "low": -100, "high": 100, "mean": 0, "std": 50}
    )
    assert z.min() == -2 and z.max() == 2
    with pytest.raises(ValueError, match="'low' and 'high'"):
        pp.normalize(image, {"method": "ct_window"})
    with pytest.raises(ValueError, match="high > low"):
        pp.normalize(image, {"method": "ct_window", "low": 10, "high": 10})

    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, 10000)
    x[:10] = 1e6  # outliers are clipped away
    out, stats = pp.normalize(x, {"method": "percentile", "low": 1, "high": 99}, return_stats=True)
    lo, hi = np.percentile(x[x != 0], [1, 99])
    assert stats.low == pytest.approx(lo) and stats.high == pytest.approx(hi)
    assert np.abs(out).max() < 4 and abs(out.mean()) < 1e-3 and abs(out.std() - 1) < 1e-3
    same = pp.normalize(x, {"method": "percentile", "p_low": 1, "p_high": 99})
    assert np.array_equal(out, same)
    with pytest.raises(ValueError, match="percentiles"):
        pp.normalize(x, {"method": "percentile", "low": 90, "high": 10})


def test_none_and_unknown_method():
    image = np.arange(12, dtype=np.int64).reshape(3, 4)
    out = pp.normalize(image, {"method": "none"})
    assert out.dtype == np.float32 and np.array_equal(out, image)
    with pytest.raises(ValueError, match=r"zscore, ct_window, percentile, none"):
        pp.normalize(image, {"method": "minmax"})


@pytest.mark.parametrize("method", ["zscore", "percentile", "none"])
def test_nan_and_inf_are_replaced_and_counted(method):
    image = _body()
    image[5, 6, 4] = np.nan
    image[6, 6, 4] = np.inf
    image[7, 6, 4] = -np.inf
    out, stats = pp.normalize(image, {"method": method}, return_stats=True)
    assert np.isfinite(out).all()
    assert stats.nonfinite == 3
    finite_fg = image[np.isfinite(image) & (image != 0)]
    if method != "none":
        assert stats.fill == pytest.approx(finite_fg.min())
    expected = (np.clip(stats.fill, stats.low, stats.high) - stats.shift) / stats.scale
    assert out[5, 6, 4] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("value", [0, 5, -3.25, 1e6])
@pytest.mark.parametrize("method", ["zscore", "percentile"])
def test_constant_image_gives_zeros(value, method):
    image = np.full((7, 9, 5), value, dtype=np.float64)
    out = pp.normalize(image, {"method": method})
    assert np.array_equal(out, np.zeros(image.shape, np.float32))
    nan_only = np.full((4, 4), np.nan)
    assert np.array_equal(pp.normalize(nan_only, {"method": method}), np.zeros((4, 4)))


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int16, np.int64, np.float16, np.float64])
def test_any_numeric_dtype(dtype):
    rng = np.random.default_rng(3)
    image = rng.random((9, 10, 11))
    image = (image > 0.5 if dtype is bool else image * 200).astype(dtype)
    out = pp.normalize(image, {"method": "zscore", "foreground": "all"})
    assert out.dtype == np.float32 and out.shape == image.shape and np.isfinite(out).all()
    assert abs(out.mean()) < 1e-3 and abs(out.std() - 1) < 1e-2


def test_blockwise_matches_whole_and_subsampled_stats(monkeypatch):
    image = _body((40, 36, 30), seed=4) + np.linspace(0, 5, 30, dtype=np.float32)
    spec = {"method": "zscore"}
    whole, stats = pp.normalize(image, spec, return_stats=True)
    blocks = [pp.apply_normalization(image[i : i + 7], stats) for i in range(0, 40, 7)]
    assert np.array_equal(np.concatenate(blocks), whole)
    monkeypatch.setattr(pp, "MAX_STAT_SAMPLES", 2000)  # forces the strided subsample
    sub = pp.normalization_stats(image, spec)
    assert sub.shift == pytest.approx(stats.shift, rel=0.05)
    assert sub.scale == pytest.approx(stats.scale, rel=0.1)


def test_resample_spacing_and_back_to_exact_shape():
    rng = np.random.default_rng(5)
    image = rng.random((17, 23, 9)).astype(np.float32)
    spacing, target = (1.0, 0.7, 2.5), (1.3, 1.3, 1.3)
    down = pp.resample(image, spacing, target)
    assert down.shape == pp.resampled_shape(image.shape, spacing, target) == (13, 12, 17)
    assert down.dtype == np.float32
    assert np.array_equal(pp.resample(image, spacing, spacing), image)  # same grid
    back = pp.resample(down, target, spacing, shape=image.shape)
    assert back.shape == image.shape
    labels = (image > 0.5).astype(np.uint8) * 3
    lab = pp.resample(labels, spacing, target, order=0)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 3}
    assert pp.resample(labels, spacing, target, order=0, shape=(5, 6, 7)).shape == (5, 6, 7)
    for shape in [(30, 11, 20), (1, 40, 3)]:
        assert pp.resample_to_shape(image, shape).shape == shape
        assert pp.resample_to_shape(labels, shape, order=0).dtype == np.uint8
    with pytest.raises(ValueError, match="spacing"):
        pp.resample(image, (1.0, 1.0), 1.0)
    with pytest.raises(ValueError, match="order"):
        pp.resample_to_shape(image, (5, 5, 5), order=5)


@pytest.mark.parametrize("nd", [2, 3])
def test_resample_grid_matches_resampled_affine(nd):
    # a linear ramp is reproduced exactly by linear interpolation, so the sampled
    # value tells which input position each output voxel came from
    shape = (21, 16, 11)[:nd]
    spacing, target = (0.8, 1.5, 2.0)[:nd], (1.1, 1.0, 0.9)[:nd]
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    affine = np.eye(4)
    affine[:3, :3] = [[0, 0.9, 0.1], [-1.2, 0, 0.0], [0.0, 0.3, 1.1]]
    affine[:3, 3] = [5, -7, 2]
    out_shape = pp.resampled_shape(shape, spacing, target)
    ratio = np.array(target) / np.array(spacing)
    new_affine = pp.resampled_affine(affine, shape, out_shape, ratio=ratio)
    out = [pp.resample(g, spacing, target) for g in grids]
    jj = np.array([1, 2, 3][:nd])  # an interior output voxel
    src = [o[tuple(jj)] for o in out]  # input index it sampled
    world_new = new_affine @ np.r_[jj, np.zeros(3 - nd), 1]
    world_old = affine @ np.r_[src, np.zeros(3 - nd), 1]
    assert np.allclose(world_new, world_old, atol=1e-4)
    assert np.allclose(np.linalg.norm((new_affine[:3, :nd]), axis=0), np.linalg.norm(affine[:3, :nd], axis=0) * ratio)  # fmt: skip
    # resample_to_shape and its affine (default ratio in/out)
    to = (7, 9, 5)[:nd]
    out = [pp.resample_to_shape(g, to) for g in grids]
    src = [o[tuple(jj)] for o in out]
    world_new = pp.resampled_affine(affine, shape, to) @ np.r_[jj, np.zeros(3 - nd), 1]
    assert np.allclose(world_new, affine @ np.r_[src, np.zeros(3 - nd), 1], atol=1e-4)
