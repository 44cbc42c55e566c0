"""Feature inspector library: features, placement, statistics, PCA, Grad-CAM, cache."""

import numpy as np
import pytest
import torch
from napari.utils.transforms import Affine

from napari_selfreg import analysis, models
from napari_selfreg.modelfile import ModelBundle, ModelCard
from napari_selfreg.selfreg import ifd_loss

# tiny convolutions on a busy 2-core machine: one torch thread (see conftest)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bundle(dims=3, seed=0, name="tiny", fg_bias=0.0, patch=None):
    torch.manual_seed(seed)
    arch = f"unet{dims}d"
    net = models.build(arch, channels=(4, 8, 16)).eval()
    with torch.no_grad():
        net.head.bias[1] += fg_bias
    card = ModelCard(name, arch, {"channels": [4, 8, 16]}, ["background", "blob"])
    card.patch_size = patch
    return ModelBundle(net, card)


def _image(shape, seed=0):
    """Smooth blobs on a ramp plus noise: structure the convolutions can see."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    img = 0.3 * grids[0]
    for _ in range(3):
        c = rng.uniform(-0.6, 0.6, len(shape))
        img += np.exp(-sum((g - ci) ** 2 for g, ci in zip(grids, c, strict=True)) / 0.05)
    return (100 + 50 * img + rng.normal(0, 2, shape)).astype(np.float32)


@pytest.fixture(autouse=True)
def _fresh_cache():
    analysis.clear_cache()
    yield
    analysis.clear_cache()


def test_extract_features_shapes_3d():
    bundle = _bundle()
    image = _image((30, 33, 35))
    fs = analysis.extract_features(bundle, image)
    infos = bundle.network.feature_info
    assert list(fs.features) == [f.name for f in infos]
    for info in infos:
        f = fs.features[info.name]
        assert f.dtype == np.float32
        assert f.shape == (info.channels, *[-(-n // info.reduction) for n in image.shape])
        assert fs.reductions[info.name] == (info.reduction,) * 3
    assert fs.logits.shape == (2, 30, 33, 35)
    assert fs.origin == (0, 0, 0) and fs.shape == image.shape  # smaller than the default patch


def test_default_region_is_centred_patch():
    bundle = _bundle(patch=[16, 16, 20])
    fs = analysis.extract_features(bundle, _image((30, 33, 35)))
    assert fs.shape == (16, 16, 20)
    assert fs.origin == (7, 8, 7)


def test_region_box_and_slices_agree():
    bundle = _bundle()
    image = _image((30, 33, 35))
    a = analysis.extract_features(bundle, image, region=(slice(3, 20), slice(5, 30), slice(1, 34)))
    b = analysis.extract_features(bundle, image, region=[(3, 5, 1), (20, 30, 34)])
    assert a is b  # same cache entry
    assert a.origin == (3, 5, 1) and a.shape == (17, 25, 33)
    assert a.features["enc1"].shape[1:] == (9, 13, 17)


@pytest.mark.parametrize("reduction", [1, 2, 4])
def test_block_placement_maps_feature_voxel_to_centre_of_its_image_voxels(reduction):
    origin = np.array([3, 5, 1])
    scale, translate = np.array([2.0, 1.0, 0.5]), np.array([10.0, -5.0, 3.0])
    rotate = Affine(rotate=30.0, ndim=3).rotate  # a rotation about the first axis
    image_tf = Affine(scale=scale, translate=translate, rotate=rotate)
    lin = image_tf.linear_matrix
    fscale, ftrans = analysis.block_placement(origin, reduction, scale, translate, lin)
    feature_tf = Affine(scale=fscale, translate=ftrans, rotate=rotate)
    for j in [np.zeros(3), np.array([2, 3, 4])]:
        covered = [origin + reduction * j + d for d in np.ndindex(*(reduction,) * 3)]
        centre = np.mean([image_tf(v) for v in covered], axis=0)
        np.testing.assert_allclose(feature_tf(j), centre, atol=1e-9)
    # without a rotation the plain scale/translate form is the same
    s, t = analysis.block_placement(origin, reduction, scale, translate)
    np.testing.assert_allclose(s, scale * reduction)
    np.testing.assert_allclose(t, translate + scale * (origin + (reduction - 1) / 2))


def test_featureset_placement_uses_per_axis_reduction_for_2d_model_on_3d_image():
    bundle = _bundle(dims=2)
    image = _image((6, 33, 28))
    fs = analysis.extract_features(bundle, image, region=(slice(2, 3), slice(0, 33), slice(4, 28)))
    assert fs.features["enc1"].shape == (8, 1, 17, 12)
    assert fs.reductions["enc1"] == (1, 2, 2)
    assert fs.logits.shape == (2, 1, 33, 24)
    scale, translate = fs.placement("enc1", scale=(3.0, 1.0, 1.0))
    np.testing.assert_allclose(scale, [3.0, 2.0, 2.0])
    np.testing.assert_allclose(translate, [6.0, 0.5, 4.5])


def test_bad_inputs_raise_inspect_error():
    b3, b2 = _bundle(3), _bundle(2)
    with pytest.raises(analysis.InspectError, match="3D"):
        analysis.extract_features(b3, _image((20, 20)))
    with pytest.raises(analysis.InspectError, match="one slice"):
        analysis.extract_features(
            b2, _image((8, 20, 20)), region=(slice(0, 2),) + (slice(None),) * 2
        )
    with pytest.raises(analysis.InspectError, match="empty"):
        analysis.extract_features(b3, _image((8, 20, 20)), region=(slice(30, 40),) * 3)
    with pytest.raises(analysis.InspectError, match="spatial axes"):
        analysis.extract_features(b3, np.zeros((2, 3, 8, 8, 8), np.float32))
    with pytest.raises(analysis.InspectError, match="class 5"):
        analysis.grad_cam(b3, _image((8, 20, 20)), class_index=5)


def test_channel_similarity():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 5, 6, 7)).astype(np.float32)
    feature = np.concatenate([base, -2 * base[:1], np.zeros((1, 5, 6, 7), np.float32)])
    sim = analysis.channel_similarity(feature)
    assert sim.shape == (5, 5)
    np.testing.assert_allclose(sim, sim.T, atol=1e-6)
    np.testing.assert_allclose(np.diag(sim), 1.0)
    assert sim.min() >= 0 and sim.max() <= 1
    assert sim[0, 3] == pytest.approx(1.0, abs=1e-5)  # a scaled, negated copy
    assert sim[4, :4].max() == 0  # a dead channel is similar to nothing
    x = base.reshape(3, -1).astype(np.float64)
    expected = abs(x[0] @ x[1]) / np.linalg.norm(x[0]) / np.linalg.norm(x[1])
    assert sim[0, 1] == pytest.approx(expected, abs=1e-5)


def test_effective_rank_bounds():
    rng = np.random.default_rng(1)
    one = rng.normal(size=(1, 200))
    rank1 = (rng.normal(size=(6, 1)) * one).reshape(6, 10, 20)
    assert analysis.effective_rank(rank1) == pytest.approx(1.0, abs=1e-3)
    q, _ = np.linalg.qr(rng.normal(size=(200, 6)))
    assert analysis.effective_rank(q.T.reshape(6, 10, 20)) == pytest.approx(6.0, abs=1e-6)
    r = analysis.effective_rank(rng.normal(size=(6, 10, 20)))
    assert 1.0 <= r <= 6.0


def test_top_channels_by_energy():
    rng = np.random.default_rng(2)
    feature = rng.normal(size=(5, 8, 8)) * np.array([1, 5, 0.1, 3, 2])[:, None, None]
    np.testing.assert_array_equal(analysis.top_channels(feature, 3), [1, 3, 4])
    assert len(analysis.top_channels(feature, 99)) == 5


def test_pca_rgb_shape_range_and_content():
    rng = np.random.default_rng(3)
    grid = np.linspace(0, 1, 12)
    ramp = np.broadcast_to(grid[:, None, None], (12, 10, 9))
    feature = np.stack([ramp, 2 * ramp, 0.1 * rng.normal(size=(12, 10, 9)), np.ones((12, 10, 9))])
    rgb = analysis.pca_rgb(feature.astype(np.float32))
    assert rgb.shape == (12, 10, 9, 3) and rgb.dtype == np.float32
    assert rgb.min() >= 0 and rgb.max() <= 1
    # the first component is the ramp (largest variance): it follows the first axis
    red = rgb[..., 0].mean(axis=(1, 2))
    assert abs(np.corrcoef(red, grid)[0, 1]) > 0.99
    two = analysis.pca_rgb(feature[:2].astype(np.float32))
    assert two.shape == (12, 10, 9, 3) and np.all(two[..., 2] == 0)


def test_redundancy_stats_match_the_losses_and_are_seeded():
    bundle = _bundle()
    fs = analysis.extract_features(bundle, _image((24, 25, 26)))
    stats = analysis.redundancy_stats(fs)
    assert list(stats) == list(fs.features)
    for name, s in stats.items():
        f = fs.features[name]
        assert s.channels == f.shape[0]
        assert 0 <= s.mean_abs_cos <= 1
        assert 1 <= s.effective_rank <= s.channels + 1e-6
        assert s.ifd == pytest.approx(float(ifd_loss(torch.from_numpy(f)[None])), rel=1e-5)
        assert s.channel_scores.shape == (s.channels,)
        assert (name == "final") == np.isnan(s.scr)
    sim = stats["enc1"].similarity
    c = sim.shape[0]
    assert stats["enc1"].mean_abs_cos == pytest.approx((sim.sum() - c) / (c * (c - 1)), rel=1e-5)
    again = analysis.redundancy_stats(fs)
    assert again["enc1"].scr == stats["enc1"].scr
    table = analysis.stats_table(stats)
    assert table["block"] == list(stats) and len(table["scr"]) == len(stats)


def test_grad_cam_maps_in_unit_range_of_region_shape():
    bundle = _bundle(fg_bias=0.5)
    image = _image((20, 22, 24))
    region = (slice(2, 18), slice(0, 21), slice(3, 24))
    cams = analysis.grad_cam(bundle, image, class_index=1, region=region)
    assert cams.mask_voxels > 0
    assert list(cams.maps) == [f.name for f in bundle.network.feature_info]
    for cam in cams.maps.values():
        assert cam.shape == (16, 21, 21) and cam.dtype == np.float32
        assert cam.min() >= 0 and cam.max() == pytest.approx(1.0)
        assert cam.std() > 1e-3  # not constant


def test_grad_cam_of_final_block_is_the_classifier_map():
    """For ``final`` (input of the 1x1 head) Grad-CAM reduces to relu(logit_c - bias_c)."""
    bundle = _bundle(fg_bias=0.3)
    image = _image((16, 18, 20))
    cams = analysis.grad_cam(bundle, image, class_index=1, blocks=["final"])
    fs = analysis.extract_features(bundle, image)
    head = bundle.network.head
    expected = np.maximum(fs.logits[1] - float(head.bias[1].detach()), 0)
    np.testing.assert_allclose(cams.maps["final"], expected / expected.max(), atol=1e-4)


def test_grad_cam_2d_and_all_classes():
    bundle = _bundle(dims=2, fg_bias=0.5)
    image = _image((37, 41))
    cams = analysis.grad_cam(bundle, image, class_index=None, blocks=["enc1", "bottleneck"])
    assert set(cams.maps) == {"enc1", "bottleneck"}
    assert cams.maps["bottleneck"].shape == (37, 41)
    assert cams.maps["bottleneck"].std() > 1e-3


def test_cache_avoids_recomputation():
    bundle = _bundle()
    calls = []
    forward = bundle.network.forward_features

    def counting(x):
        calls.append(x.shape)
        return forward(x)

    bundle.network.forward_features = counting
    image = _image((16, 17, 18))
    a = analysis.extract_features(bundle, image)
    b = analysis.extract_features(bundle, image.copy())
    assert a is b and len(calls) == 1
    analysis.extract_features(bundle, image, region=(slice(0, 8),) * 3)
    assert len(calls) == 2
    image[0, 0, 0] += 1
    analysis.extract_features(bundle, image)
    assert len(calls) == 3


def test_iter_inspect_progress_and_compare():
    a, b = _bundle(seed=0, name="plain"), _bundle(seed=1, name="selfreg")
    image = _image((20, 21, 22))
    gen = analysis.iter_inspect([a, b], image, "enc1", top_k=3, cam_class=1)
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            results = stop.value
            break
    dones = [e.done for e in events]
    assert dones == sorted(dones) and events[-1].done == events[-1].total
    assert [r.features.model for r in results] == ["plain", "selfreg"]
    for r in results:
        assert len(r.top) == 3 and r.pca.shape == (10, 11, 11, 3)
        assert r.cams is not None and r.cams.maps["enc1"].shape == image.shape
    sa, sb = analysis.compare(a, b, image)
    assert sa["enc1"].ifd == pytest.approx(results[0].stats["enc1"].ifd)
    assert sb["enc1"].effective_rank != sa["enc1"].effective_rank
    with pytest.raises(analysis.InspectError, match="no block"):
        analysis.inspect([a], image, "nope")


def test_region_helpers():
    assert analysis.centred_region((10, 20), (4, 30)) == (slice(3, 7), slice(0, 20))
    r = analysis.box_region((2.2, 4.6, 5.0), (7.4, 9.0, 5.0), (20, 20, 20), (1, 1, 6))
    assert r == (slice(2, 8), slice(5, 10), slice(2, 8))
    assert analysis.box_region((0, 0), (0, 0), (10, 10), (4, 4)) == (slice(0, 4), slice(0, 4))
    with pytest.raises(analysis.InspectError):
        analysis.box_region((30, 30), (40, 40), (10, 10), (1, 1))
    small = analysis.limit_region((slice(0, 100), slice(0, 100), slice(5, 6)), 400)
    assert [s.stop - s.start for s in small] == [20, 20, 1]
    assert small[0] == slice(40, 60)


TINY = {
    "unet2d": {"channels": (4, 8, 16)},
    "unet3d": {"channels": (4, 8, 16)},
    "swin_unet2d": {"embed_dim": 12, "num_heads": (1, 1, 2, 2), "window_size": 4},
    "missu3d": {"channels": (4, 8, 8, 16), "embed_dim": 16, "num_layers": 1, "num_heads": 2,
                "mlp_dim": 16, "img_size": (16, 16, 16)},
}  # fmt: skip


@pytest.mark.parametrize("arch", models.available())
def test_every_registered_model_can_be_inspected(arch):
    """Features, statistics and Grad-CAM reach every block of every architecture."""
    assert arch in TINY, f"add small options for {arch!r} to TINY"
    torch.manual_seed(0)
    net = models.build(arch, **TINY[arch]).eval()
    bundle = ModelBundle(net, ModelCard("m", arch, dict(TINY[arch]), ["background", "blob"]))
    image = _image((37, 45) if net.spatial_dims == 2 else (19, 21, 23))
    block = net.feature_info[1].name
    (result,) = analysis.inspect([bundle], image, block, top_k=2, cam_class=None)
    assert list(result.stats) == [f.name for f in net.feature_info]
    for info in net.feature_info:
        size = [-(-n // info.reduction) for n in image.shape]
        assert result.features.features[info.name].shape == (info.channels, *size)
        cam = result.cams.maps[info.name]
        assert cam.shape == image.shape and cam.min() >= 0 and cam.max() <= 1
    assert result.pca.shape[-1] == 3


def test_features_of_a_volume_in_another_stored_order_come_back_aligned():
    """The model sees its own orientation; the maps line up with the stored image."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    from napari_selfreg import analysis, models
    from napari_selfreg.modelfile import ModelBundle, ModelCard

    torch.manual_seed(0)
    net = models.build("unet3d", channels=(4, 8), num_classes=2).eval()
    card = ModelCard(name="o", architecture="unet3d", options={"channels": [4, 8], "num_classes": 2},
                     class_names=["bg", "a"], orientation="RAS")  # fmt: skip
    bundle = ModelBundle(net, card)
    ras = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    turn = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt("PSL"))
    stored = np.ascontiguousarray(apply_orientation(ras, turn))
    affine = inv_ornt_aff(turn, ras.shape)
    back = ornt_transform(axcodes2ornt("PSL"), axcodes2ornt("RAS"))
    a = analysis.extract_features(bundle, ras, affine=np.eye(4))
    b = analysis.extract_features(bundle, stored, affine=affine)
    for name in ("stem", "bottleneck", "final"):
        mapped = np.stack([apply_orientation(c, back) for c in b.features[name]])
        np.testing.assert_allclose(mapped, a.features[name], atol=1e-5)
    cam_a = analysis.grad_cam(bundle, ras, affine=np.eye(4))
    cam_b = analysis.grad_cam(bundle, stored, affine=affine)
    for name in ("stem", "bottleneck"):
        mapped = apply_orientation(cam_b.maps[name], back)
        np.testing.assert_allclose(mapped, cam_a.maps[name], atol=1e-5)


def test_spacing_notes_follow_the_predictors_rule_for_2d_models():
    bundle = _bundle(dims=2)
    bundle.card.spacing = [3.0, 1.0, 1.0]  # trained on volumes: the card holds their grid
    image = _image((24, 24))
    same = analysis.extract_features(bundle, image, spacing=(1.0, 1.0))
    assert not any("spacing" in n for n in same.notes)  # the slices' in-plane spacing
    other = analysis.extract_features(bundle, image, spacing=(2.0, 2.0))
    assert any("differs from the model's 1 x 1" in n for n in other.notes)
    bundle.card.spacing = [1.0, 1.0]
    thick = analysis.extract_features(bundle, _image((6, 24, 24)), region=(slice(2, 3), slice(None), slice(None)), spacing=(5.0, 1.0, 1.0))  # fmt: skip
    assert not any("spacing" in n for n in thick.notes)  # the slice thickness is not compared
