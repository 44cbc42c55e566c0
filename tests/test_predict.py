"""The sliding-window predictor: tiling, exact stitching, shapes, streaming, cancel, OOM fallback."""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from napari_selfreg import models
from napari_selfreg.modelfile import ModelBundle, ModelCard
from napari_selfreg.predict import (
    Predictor,
    Progress,
    _NoAutocastPool,
    argmax_classes,
    count_flops,
    exact_max_pools,
    fold_batchnorm,
    gaussian_map,
    is_out_of_memory,
    iter_segment,
    next_fallback,
    segment,
    tile_positions,
    tile_starts,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Pointwise(nn.Module):
    """Logits ``[x, 0]``: a fixed function of each voxel, so softmax class 0 is sigmoid(x)."""

    def __init__(self, spatial_dims=3, num_classes=2):
        super().__init__()
        self.spatial_dims, self.num_classes, self.in_channels = spatial_dims, num_classes, 1
        self.scale = nn.Parameter(torch.ones(()))  # something for .to() to move

    def forward(self, x):
        zeros = [torch.zeros_like(x)] * (self.num_classes - 1)
        return torch.cat([x * self.scale, *zeros], dim=1)


def raw(net, **card_kw):
    """Bundle with identity normalisation, so the network sees the input values."""
    names = [f"class{i}" for i in range(net.num_classes)]
    card = ModelCard(
        name="t",
        architecture="unet3d",
        options={"num_classes": net.num_classes},
        class_names=names,
        normalization={"method": "none"},
        **card_kw,
    )
    return ModelBundle(network=net, card=card)


def ramp(shape, lo=-4.0, hi=4.0):
    n = int(np.prod(shape))
    return np.linspace(lo, hi, n, dtype=np.float32).reshape(shape)


def sigmoid(x):
    return 1 / (1 + np.exp(-x.astype(np.float64)))


def tiny_unet(spatial_dims=3, classes=3, seed=0):
    torch.manual_seed(seed)
    name = "unet3d" if spatial_dims == 3 else "unet2d"
    net = models.build(name, channels=(4, 8, 16), num_classes=classes, norm="batch")
    net.train()
    with torch.no_grad():  # BatchNorm running statistics away from 0 / 1
        net(torch.randn(2, 1, *(16,) * spatial_dims) * 2 + 1)
        net.head.weight *= 30  # sharp logits, so the labels take several classes
    return net.eval()


def drain(gen):
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            return events, stop.value


# ----------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("shape", "tile", "overlap"),
    [
        ((33, 34, 35), (16, 16, 16), 0.5),
        ((17, 5, 40), (8, 8, 13), 0.25),
        ((9, 9, 9), (16, 4, 9), 0.0),
    ],
)
def test_tiles_cover_every_voxel(shape, tile, overlap):
    tile = tuple(min(t, s) for t, s in zip(tile, shape, strict=True))
    hits = np.zeros(shape, int)
    for z, y, x in tile_positions(shape, tile, overlap):
        hits[z : z + tile[0], y : y + tile[1], x : x + tile[2]] += 1
    assert hits.min() >= 1
    for s, t in zip(shape, tile, strict=True):
        starts = tile_starts(s, t, overlap)
        assert starts[0] == 0 and starts[-1] == s - t
        steps = np.diff(starts)
        assert (steps >= 1).all() and (steps <= max(1, t * (1 - overlap)) + 1).all()


def test_tile_starts_small_and_exact():
    assert tile_starts(10, 16, 0.5) == [0]
    assert tile_starts(32, 16, 0.5) == [0, 8, 16]
    assert tile_starts(32, 16, 0.0) == [0, 16]


def test_gaussian_map():
    g = gaussian_map((7, 8, 1))
    assert g.shape == (7, 8, 1) and g.dtype == np.float32
    assert (g > 0).all() and g.max() == pytest.approx(1.0)
    assert np.allclose(g, g[::-1]) and np.allclose(g, g[:, ::-1])
    assert g[3, 3, 0] > g[0, 0, 0]


def test_next_fallback_order():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    b, t, d, msg = next_fallback(4, (64, 64, 64), (16, 16, 16), gpu)
    assert (b, t, d) == (2, (64, 64, 64), gpu) and "batch 4 -> 2" in msg
    b, t, d, msg = next_fallback(1, (64, 64, 64), (16, 16, 16), gpu)
    assert b == 1 and t == (48, 48, 48) and d == gpu and "tile" in msg
    assert next_fallback(1, (20, 16, 16), (16, 16, 16), gpu)[1] == (16, 16, 16)
    b, t, d, msg = next_fallback(1, (16, 16, 16), (16, 16, 16), gpu)
    assert d == cpu and "CPU" in msg
    assert next_fallback(1, (16, 16, 16), (16, 16, 16), cpu) is None


def test_is_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 2147483648 bytes."))  # fmt: skip
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_fold_batchnorm_keeps_the_function():
    net = tiny_unet()
    x = torch.randn(1, 1, 19, 16, 17)
    pred = Predictor(net, device="cpu", precision="fp32")
    folded = pred.inference_network(torch.device("cpu"))[0]
    with torch.no_grad():
        ref = net(x)
        assert torch.allclose(folded(x), ref, atol=1e-4, rtol=1e-4)
    other = tiny_unet()
    assert fold_batchnorm(other) == 10  # 5 DoubleConvs x 2
    assert not any(isinstance(m, nn.BatchNorm3d) for m in other.modules())
    assert any(isinstance(m, nn.BatchNorm3d) for m in net.modules())  # the original is untouched


def test_max_pool_outside_autocast_is_exact():
    net = tiny_unet()
    x = torch.randn(1, 1, 16, 16, 16)
    fast = Predictor(net, device="cpu", precision="bf16").inference_network(
        torch.device("cpu"), torch.bfloat16
    )[0]
    plain = copy.deepcopy(fast)
    for parent in plain.modules():  # undo the wrapping: autocast's fp32 max pool again
        for name, child in parent.named_children():
            if isinstance(child, _NoAutocastPool):
                setattr(parent, name, child.pool)
    assert exact_max_pools(copy.deepcopy(plain)) == 2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fast(x), plain(x))


def test_count_flops_of_one_conv():
    conv = nn.Conv3d(3, 5, 3, padding=1, bias=False)
    assert count_flops(conv, (1, 3, 6, 7, 8)) == 2 * 27 * 3 * 5 * 6 * 7 * 8


# ----------------------------------------------------------------------------- exact stitching


@pytest.mark.parametrize(
    ("shape", "tile", "overlap", "gaussian", "slab"),
    [
        ((23, 19, 30), (8, 8, 8), 0.5, True, None),
        ((23, 19, 30), (7, 10, 9), 0.3, True, 12),
        ((11, 40, 13), (16, 16, 16), 0.0, False, None),
        ((20, 20, 20), (8, 6, 5), 0.75, False, 9),
    ],
)
def test_pointwise_model_reproduces_input(shape, tile, overlap, gaussian, slab):
    x = ramp(shape)
    pred = Predictor(
        raw(Pointwise()), tile=tile, overlap=overlap, gaussian=gaussian, slab_size=slab,
        batch_size=5, device="cpu", precision="fp32", probabilities=True, uncertainty=True,
    )  # fmt: skip
    result = pred.segment(x)
    assert result.labels.shape == shape and result.labels.dtype == np.uint8
    assert np.allclose(result.probabilities[0], sigmoid(x), atol=2e-6)
    assert np.array_equal(result.labels, (x < 0).astype(np.uint8))
    p = sigmoid(x)
    entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p)) / math.log(2)
    assert np.allclose(result.uncertainty, entropy, atol=1e-5)
    if slab is not None:
        assert result.info["slabs"] > 1


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_2d_pointwise_slice_by_slice(axis):
    x = ramp((9, 14, 11))
    result = segment(
        x, raw(Pointwise(2)), tile=(8, 6), axis=axis, device="cpu", precision="fp32",
        probabilities=True,
    )  # fmt: skip
    assert result.labels.shape == x.shape
    assert np.allclose(result.probabilities[0], sigmoid(x), atol=2e-6)


def test_2d_image_with_2d_model():
    x = ramp((21, 30))
    result = segment(x, raw(Pointwise(2)), tile=16, device="cpu", probabilities=True)
    assert result.labels.shape == (21, 30) and result.probabilities.shape == (2, 21, 30)
    assert np.allclose(result.probabilities[0], sigmoid(x), atol=2e-6)


# ----------------------------------------------------------------------------- real networks


def test_unet_single_tile_equals_direct_network():
    from napari_selfreg.preprocess import normalize

    net = tiny_unet()
    image = np.random.default_rng(1).normal(3, 2, (13, 17, 15)).astype(np.float32)
    result = segment(image, net, tile=32, device="cpu", precision="fp32", probabilities=True)
    x = torch.from_numpy(normalize(image, {"method": "zscore"}))[None, None]
    with torch.no_grad():
        ref = torch.softmax(net(x), 1)[0].numpy()
    assert result.labels.shape == image.shape and result.labels.dtype == np.uint8
    assert np.allclose(result.probabilities, ref, atol=1e-4)
    assert len(np.unique(result.labels)) > 1


@pytest.mark.parametrize("axis", [0, 2])
def test_2d_unet_slice_wise_equals_direct_network(axis):
    from napari_selfreg.preprocess import normalize

    net = tiny_unet(2)
    image = np.random.default_rng(2).normal(size=(6, 15, 13)).astype(np.float32)
    result = segment(image, net, tile=32, axis=axis, device="cpu", precision="fp32",
                     probabilities=True)  # fmt: skip
    norm = normalize(image, {"method": "zscore"})
    slices = torch.from_numpy(np.moveaxis(norm, axis, 0).copy())[:, None]
    with torch.no_grad():
        ref = np.moveaxis(torch.softmax(net(slices), 1).numpy(), 0, axis + 1)
    assert result.labels.shape == image.shape
    assert np.allclose(result.probabilities, ref, atol=1e-4)


def test_unet_odd_shapes_bf16_and_progress():
    net = tiny_unet()
    image = np.random.default_rng(3).normal(size=(19, 23, 21)).astype(np.float32)
    pred = Predictor(net, tile=16, overlap=0.5, batch_size=3, device="cpu", precision="bf16")
    events, result = drain(pred.iter_segment(image))
    assert result.labels.shape == image.shape and result.labels.dtype == np.uint8
    assert result.info["precision"] == "bf16" and result.info["tile"] == [16, 16, 16]
    tiles = [e for e in events if e.stage == "tiles"]
    n = len(tile_positions(image.shape, (16, 16, 16), 0.5))
    assert result.info["tiles"] == n == 8  # 2 per axis: 19..23 voxels, step <= 8
    assert len(tiles) == math.ceil(n / 3) and tiles[-1].done == tiles[-1].total == n
    assert events[0].stage == "prepare" and events[-1].stage == "finish"
    assert all(isinstance(e, Progress) for e in events)
    assert result.info["gflop"] > 0 and result.info["bn_folded"] == 10
    stages = result.info["stages"]  # where the time went: every stage, adding up
    assert set(stages) == {"prepare", "network setup", "read", "network", "stitch", "postprocess", "finish", "other"}  # fmt: skip
    assert min(stages.values()) >= -0.01 and stages["network"] > 0
    assert sum(stages.values()) == pytest.approx(result.info["seconds"], abs=0.01)
    fp32 = segment(image, net, tile=16, batch_size=3, device="cpu", precision="fp32")
    assert (fp32.labels == result.labels).mean() > 0.97


def test_input_checks():
    net3, net2 = tiny_unet(), tiny_unet(2)
    with pytest.raises(ValueError, match="3D model needs a 3D volume"):
        segment(np.zeros((20, 20)), net3, device="cpu")
    with pytest.raises(ValueError, match="2D model.*one layer per volume"):
        segment(np.zeros((2, 8, 8, 8)), net2, device="cpu")
    with pytest.raises(ValueError, match="3D model.*one time point, echo or channel"):
        segment(np.zeros((2, 8, 8, 8)), net3, device="cpu")
    with pytest.raises(ValueError, match="use a 2D model"):
        segment(np.zeros((1, 8, 8)), net3, device="cpu")
    with pytest.raises(ValueError, match="real number"):
        segment(np.zeros((8, 8, 8), complex), net3, device="cpu")
    with pytest.raises(ValueError, match="overlap"):
        Predictor(net3, overlap=1.0, device="cpu")
    with pytest.raises(ValueError, match="tile of 3"):
        Predictor(net3, tile=(16, 16), device="cpu")
    with pytest.raises(ValueError, match="mask shape"):
        segment(np.zeros((8, 8, 8)), net3, mask=np.ones((8, 8, 7), bool), device="cpu")
    with pytest.raises(ValueError, match="spacing"):
        segment(np.zeros((8, 8, 8)), net3, spacing=(1, 1), device="cpu")


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int16, np.int64, np.float64])
def test_any_dtype_and_non_finite_values(dtype):
    rng = np.random.default_rng(4)
    image = (rng.normal(size=(12, 13, 14)) * 50).astype(dtype)
    if dtype == np.float64:
        image[0, 0, :3] = [np.nan, np.inf, -np.inf]
    result = segment(image, tiny_unet(), tile=16, device="cpu", uncertainty=True)
    assert result.labels.shape == image.shape
    assert np.isfinite(result.uncertainty).all()
    assert (result.uncertainty >= 0).all() and (result.uncertainty <= 1).all()


@pytest.mark.parametrize("k", [1, 3, 300])
def test_argmax_classes_equals_torch_argmax_ties_included(k):
    torch.manual_seed(k)
    scores = torch.randint(-3, 4, (k, 6, 7, 8)).float()  # small integers: many ties
    labels = argmax_classes(scores)
    assert labels.dtype == (torch.uint8 if k <= 256 else torch.int32)
    assert torch.equal(labels.long(), scores.argmax(0))


def test_many_classes_give_uint16():
    result = segment(ramp((5, 6, 7)), raw(Pointwise(num_classes=300)), tile=8, device="cpu")
    assert result.labels.dtype == np.uint16


def test_mask_skips_tiles_and_zeroes_labels():
    x = ramp((16, 24, 24), -4, -1)  # everything class 0 without the mask ... (sigmoid > .5)
    mask = np.zeros(x.shape, bool)
    mask[:, :8, :8] = True
    pred = Predictor(raw(Pointwise()), tile=8, overlap=0.0, device="cpu", probabilities=True)
    full, masked = pred.segment(-x), pred.segment(-x, mask=mask)  # -x > 0: class 0 everywhere
    assert masked.info["tiles"] < full.info["tiles"]
    assert np.array_equal(masked.labels[mask], full.labels[mask])
    full1 = Predictor(raw(Pointwise()), tile=8, overlap=0.0, device="cpu").segment(x)
    assert (full1.labels == 1).all()
    masked1 = Predictor(raw(Pointwise()), tile=8, overlap=0.0, device="cpu").segment(x, mask=mask)
    assert (masked1.labels[mask] == 1).all() and (masked1.labels[~mask] == 0).all()


def test_card_keep_largest_drops_the_smaller_pieces_of_a_class_group():
    image = np.ones((16, 24, 24), np.float32)  # class 0 where positive, 1 where negative
    image[2:10, 2:12, 2:12] = -1  # the large piece
    image[12:15, 18:22, 18:22] = -1  # a small piece apart
    image[9, 11, 12] = -1  # touching the large piece diagonally only: 26-connected, kept
    both = Predictor(raw(Pointwise()), tile=8, overlap=0.0, device="cpu").segment(image)
    assert both.labels.sum() == 8 * 10 * 10 + 3 * 4 * 4 + 1 and "keep_largest" not in both.info
    bundle = raw(Pointwise(), keep_largest=[[1]])
    kept = Predictor(bundle, tile=8, overlap=0.0, device="cpu").segment(image)
    assert kept.labels.sum() == 8 * 10 * 10 + 1 and kept.labels[12:15, 18:22, 18:22].max() == 0
    assert kept.info["keep_largest"] == {"groups": [[1]], "voxels_removed": 3 * 4 * 4}
    off = Predictor(bundle, tile=8, overlap=0.0, device="cpu", keep_largest=False).segment(image)
    np.testing.assert_array_equal(off.labels, both.labels)
    slab = Predictor(bundle, tile=8, overlap=0.0, device="cpu").segment(image[8:14])
    assert slab.info["keep_largest"]["skipped"] == "a slab of 6 voxels"  # thinner than a tile
    np.testing.assert_array_equal(slab.labels, both.labels[8:14])  # both pieces stay
    with pytest.raises(ValueError, match="beyond"):
        raw(Pointwise(), keep_largest=[[2]])


# ----------------------------------------------------------------------------- cropping


def _in_a_zero_volume(shape, box, seed=0):
    image = np.zeros(shape, np.float32)
    inner = tuple(b.stop - b.start for b in box)
    image[box] = np.random.default_rng(seed).normal(3, 2, inner).astype(np.float32)
    return image


@pytest.mark.parametrize("slab", [None, 20])
def test_crop_to_nonzero_equals_segmenting_the_box(slab):
    box = (slice(5, 30), slice(8, 34), slice(3, 27))
    image = _in_a_zero_volume((40, 36, 44), box)
    options = {"tile": 16, "overlap": 0.25, "device": "cpu", "precision": "fp32", "slab_size": slab,
                   "probabilities": True, "uncertainty": True}  # fmt: skip
    bundle = raw(tiny_unet())  # no normalisation: the box alone gives the same input
    cropped = Predictor(bundle, **options).segment(image)
    assert cropped.info["nonzero_box"] == [[5, 30], [8, 34], [3, 27]]
    alone = Predictor(bundle, crop_to_nonzero=False, **options).segment(image[box])
    assert np.array_equal(cropped.labels[box], alone.labels)
    assert np.allclose(cropped.probabilities[(slice(None), *box)], alone.probabilities, atol=1e-6)
    assert len(np.unique(alone.labels)) > 1
    outside = np.ones(image.shape, bool)
    outside[box] = False  # no tile there: background, certain
    assert (cropped.labels[outside] == 0).all()
    assert cropped.probabilities[0][outside].min() > 1 - 1e-6
    assert cropped.uncertainty[outside].max() < 1e-6
    full = Predictor(bundle, crop_to_nonzero=False, **options).segment(image)
    assert full.info["nonzero_box"] is None and cropped.info["tiles"] < full.info["tiles"]


@pytest.mark.parametrize(
    ("model", "kw"),
    [(Pointwise(), {"spacing": (1.0, 1.5, 2.0)}), (Pointwise(2), {"axis": 1})],
    ids=["resampled", "2d-model"],
)
def test_crop_with_resampling_and_2d_models(model, kw):
    box = (slice(4, 20), slice(10, 31), slice(2, 14))
    x = _in_a_zero_volume((26, 33, 30), box, seed=1)
    x[box] -= 3  # both classes inside the box
    spacing = kw.pop("spacing", None)
    bundle = raw(model, spacing=[2.0, 2.0, 2.0]) if spacing else raw(model)
    options = dict(tile=8, device="cpu", precision="fp32", probabilities=True, **kw)
    cropped = Predictor(bundle, **options).segment(x, spacing=spacing)
    full = Predictor(bundle, crop_to_nonzero=False, **options).segment(x, spacing=spacing)
    assert cropped.info["nonzero_box"] is not None and cropped.info["tiles"] < full.info["tiles"]
    assert cropped.labels.shape == x.shape
    assert np.array_equal(cropped.labels, full.labels)  # a pointwise model: tiles do not matter
    assert np.allclose(cropped.probabilities[(slice(None), *box)], full.probabilities[(slice(None), *box)], atol=1e-5)  # fmt: skip
    assert np.allclose(cropped.probabilities.sum(0), 1, atol=1e-5)


def test_no_crop_for_a_volume_without_zeros_or_streamed(tmp_path):
    x = ramp((20, 20, 20), 1, 2)
    result = Predictor(raw(Pointwise()), tile=8, device="cpu").segment(x)
    assert result.info["nonzero_box"] is None


# ----------------------------------------------------------------------------- resampling


def test_resampling_to_model_spacing_and_back():
    x = ramp((15, 22, 19))
    bundle = raw(Pointwise(), spacing=[2.0, 2.0, 2.0])
    pred = Predictor(bundle, tile=8, device="cpu", probabilities=True)
    result = pred.segment(x, spacing=(1.0, 1.0, 1.5))
    assert result.labels.shape == x.shape and result.probabilities.shape == (2, *x.shape)
    assert result.info["resampled_to"] == [2.0, 2.0, 2.0]
    assert result.info["model_shape"] == [8, 11, 14]
    assert np.allclose(result.probabilities.sum(0), 1, atol=1e-5)
    # a smooth ramp survives the round trip: the class boundary moves by at most a voxel
    assert (result.labels == (x < 0)).mean() > 0.97
    same = pred.segment(x, spacing=(2.0, 2.0, 2.0))
    assert same.info["resampled_to"] is None
    assert np.allclose(same.probabilities[0], sigmoid(x), atol=2e-6)


def test_2d_model_resamples_in_plane_only():
    bundle = raw(Pointwise(2), spacing=[1.0, 1.0])
    result = segment(ramp((4, 10, 12)), bundle, tile=8, axis=0, spacing=(3.0, 0.5, 0.5))
    assert result.info["resampled_to"] == [3.0, 1.0, 1.0]
    assert result.info["model_shape"] == [4, 5, 6]
    assert result.labels.shape == (4, 10, 12)


def test_a_2d_model_trained_on_volumes_segments_a_2d_image():
    bundle = raw(Pointwise(2), spacing=[3.0, 1.0, 1.0])  # train records the volumes' grid
    result = segment(ramp((10, 12)), bundle, tile=8, spacing=(0.5, 0.5))
    assert result.info["resampled_to"] == [1.0, 1.0]  # the slices' in-plane spacing
    assert result.labels.shape == (10, 12)


# ----------------------------------------------------------------------------- OOM fallback


class OOMAbove(nn.Module):
    """Wraps a network and raises CUDA's OOM error for batches or tiles above a limit."""

    def __init__(self, net, max_batch=None, max_side=None):
        super().__init__()
        self.net, self.max_batch, self.max_side = net, max_batch, max_side
        self.spatial_dims, self.num_classes, self.in_channels = 3, net.num_classes, 1
        self.divisor = net.divisor

    def forward(self, x):
        if self.max_batch is not None and x.shape[0] > self.max_batch:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.max_side is not None and max(x.shape[2:]) > self.max_side:
            raise RuntimeError("CUDA error: out of memory")
        return self.net(x)


def test_oom_halves_the_batch_then_the_tile():
    net = tiny_unet()
    image = np.random.default_rng(5).normal(size=(20, 21, 22)).astype(np.float32)
    opts = {"device": "cpu", "precision": "fp32", "probabilities": True}
    ref = segment(image, net, tile=16, batch_size=1, **opts)
    events, result = drain(
        iter_segment(image, OOMAbove(net, max_batch=1), tile=16, batch_size=4, **opts)
    )
    assert result.info["fallbacks"] == [
        "out of memory: tile batch 4 -> 2",
        "out of memory: tile batch 2 -> 1",
    ]
    assert [e.message for e in events if e.stage == "fallback"] == result.info["fallbacks"]
    assert result.info["batch_size"] == 1
    assert np.allclose(result.probabilities, ref.probabilities, atol=1e-5)

    small = segment(image, OOMAbove(net, max_side=16), tile=24, batch_size=1, **opts)
    assert small.info["tile"] == [16, 16, 16]
    assert small.info["fallbacks"] == ["out of memory: tile [20, 21, 22] -> [16, 16, 16]"]
    assert np.array_equal(small.labels, ref.labels)
    with pytest.raises(MemoryError, match="single"):
        segment(image, OOMAbove(net, max_side=8), tile=16, **opts)


# ----------------------------------------------------------------------------- streaming


def test_streaming_zarr_matches_in_memory(tmp_path):
    import zarr

    net = tiny_unet()
    image = np.random.default_rng(6).normal(10, 3, (40, 26, 23)).astype(np.float32)
    source = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=image.shape,
                             chunks=(8, 26, 23), dtype="f4")  # fmt: skip
    source[:] = image
    opts = {"tile": 16, "overlap": 0.5, "batch_size": 4, "device": "cpu", "precision": "fp32"}
    ref = segment(image, net, probabilities=True, **opts)
    assert ref.info["slabs"] == 1
    out = tmp_path / "labels.zarr"
    result = segment(source, net, out=out, slab_size=20, probabilities=True, **opts)
    assert result.info["streaming"] and result.info["slabs"] == 4
    assert np.array_equal(result.labels[:], ref.labels)  # same tiles, same sums: exact
    assert np.allclose(result.probabilities[:], ref.probabilities, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr", "labels.zarr"]
    assert zarr.open_group(str(out), mode="r")["labels"].dtype == np.uint8
    with pytest.raises(FileExistsError):
        segment(source, net, out=out, **opts)


def test_streaming_clips_a_lone_absurd_voxel_as_in_memory(tmp_path):
    import zarr

    from napari_selfreg import preprocess

    net = Pointwise()  # the probabilities show the normalised values
    bundle = ModelBundle(network=net, card=dataclasses.replace(raw(net).card, normalization={"method": "zscore", "foreground": "all"}))  # fmt: skip
    image = np.random.default_rng(7).normal(100, 10, (161, 160, 160)).astype(np.float32)
    assert image.size > preprocess.MAX_STAT_SAMPLES  # statistics from a subsample
    image[3, 5, 7] = 3e38  # one voxel the subsample misses
    source = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=image.shape,
                             chunks=(16, 160, 160), dtype="f4")  # fmt: skip
    source[:] = image
    opts = {"tile": 32, "overlap": 0, "device": "cpu", "precision": "fp32", "probabilities": True}
    ref = segment(image, bundle, **opts)
    result = segment(source, bundle, out=tmp_path / "out.zarr", slab_size=64, **opts)
    assert result.info["streaming"]
    assert any("clipped" in w for w in ref.info["warnings"])
    assert result.info["warnings"] == ref.info["warnings"]
    assert np.allclose(result.probabilities[:, 3, 5, 7], ref.probabilities[:, 3, 5, 7])


def test_streaming_dask_input_in_memory_output():
    import dask.array as da

    net = tiny_unet()
    image = np.random.default_rng(7).normal(size=(30, 18, 17)).astype(np.float32)
    opts = {"tile": 16, "device": "cpu", "precision": "fp32"}
    result = segment(da.from_array(image, chunks=(10, 18, 17)), net, slab_size=16, **opts)
    assert isinstance(result.labels, np.ndarray) and result.info["slabs"] > 1
    assert np.array_equal(result.labels, segment(image, net, **opts).labels)


def test_cancel_leaves_no_output(tmp_path):
    image = np.random.default_rng(8).normal(size=(32, 20, 20)).astype(np.float32)
    out = tmp_path / "cancelled.zarr"
    gen = iter_segment(image, tiny_unet(), tile=16, out=out, slab_size=16, device="cpu")
    events = [next(gen) for _ in range(4)]
    assert events[-1].stage == "tiles"
    assert any(tmp_path.iterdir())  # the temporary store exists while running
    gen.close()  # what worker.quit() does at a yield
    assert list(tmp_path.iterdir()) == []


def test_a_cpu_run_says_once_what_to_expect():
    net = models.build("unet3d", channels=(4, 8), num_classes=2)
    predictor = Predictor(ModelBundle(net, None), tile=16, precision="fp32")
    image = np.random.default_rng(0).normal(size=(40, 40, 40)).astype(np.float32)
    said = [e.message for e in _events(predictor.iter_segment(image)) if "no GPU" in e.message]
    assert len(said) == 1 and "a 40 x 40 x 40 volume takes about" in said[0]
    assert not [e for e in _events(predictor.iter_segment(image)) if "no GPU" in e.message]


def _events(job):
    events = []
    while True:
        try:
            events.append(next(job))
        except StopIteration:
            return events
