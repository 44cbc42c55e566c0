"""One contract test over every registered model, plus UNet specifics."""

import pytest
import torch

from napari_selfreg import models
from napari_selfreg.models.unet import UNet

# Small options per architecture so the contract runs in seconds; sizes are odd,
# non-square and non-cubic on purpose.
TINY = {
    "unet2d": {"channels": (4, 8, 16)},
    "unet3d": {"channels": (4, 8, 16)},
    "swin_unet2d": {"embed_dim": 12, "num_heads": (1, 2, 2, 4), "window_size": 4, "drop_path": 0.0},
    "missu3d": {"channels": (4, 8, 8, 16), "blocks": (1, 1, 1, 1), "embed_dim": 16,
                "num_layers": 1, "num_heads": 2, "mlp_dim": 16, "img_size": (16, 16, 16)},
}  # fmt: skip
SIZES = {2: [(37, 53), (64, 48)], 3: [(19, 23, 30), (16, 17, 18)]}


def _tiny(name):
    assert name in TINY, f"add small test options for {name!r} to TINY"
    return models.build(name, in_channels=2, num_classes=3, **TINY[name])


@pytest.mark.parametrize("name", models.available())
def test_model_contract(name):
    torch.manual_seed(0)
    model = _tiny(name).eval()
    assert model.spatial_dims in (2, 3)
    assert model.in_channels == 2 and model.num_classes == 3
    for size in SIZES[model.spatial_dims]:
        x = torch.randn(1, 2, *size)
        with torch.no_grad():
            logits, feats = model.forward_features(x)
            plain = model(x)
        assert logits.shape == (1, 3, *size)
        assert torch.equal(plain, logits)
        assert list(feats)[-1] == "final"
        assert feats["final"].shape[2:] == size
        assert [f.name for f in model.feature_info] == list(feats)
        for info in model.feature_info:
            t = feats[info.name]
            assert t.shape[1] == info.channels, info
            expected = tuple(-(-s // info.reduction) for s in size)
            assert tuple(t.shape[2:]) == expected, (info, t.shape)
            assert torch.isfinite(t).all()


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="unet3d"):
        models.build("nope")


def test_reference_2d_unet_matches_paper_size():
    model = models.build("unet2d", in_channels=1, num_classes=9)
    params = sum(p.numel() for p in model.parameters())
    assert 17.0e6 < params < 17.5e6  # about 17.3 M in the paper
    students = [f.name for f in model.feature_info if f.ifd_group is not None]
    assert students == ["enc1", "enc2", "enc3", "bottleneck", "dec3", "dec2", "dec1"]
    groups = models.selfreg_groups(model)
    assert groups["enc1"] == ("encoder", "all") and groups["dec1"] == ("decoder", "all")
    assert groups["final"] == (None, None)


@pytest.mark.parametrize("upsample", ["deconv", "interp"])
@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
def test_unet_options(upsample, norm):
    model = UNet(3, 1, 2, channels=(4, 8), norm=norm, upsample=upsample, act="gelu").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 9, 10, 11)).shape == (2, 2, 9, 10, 11)


def test_unet_bad_options():
    with pytest.raises(ValueError, match="norm"):
        UNet(3, channels=(4, 8), norm="weird")
    with pytest.raises(ValueError, match="spatial_dims"):
        UNet(4)
    with pytest.raises(ValueError, match="upsample"):
        UNet(2, channels=(4, 8), upsample="pixelshuffle")


def test_features_carry_gradient_to_input():
    model = models.build("unet3d", channels=(4, 8, 16))
    x = torch.randn(1, 1, 12, 12, 12, requires_grad=True)
    _, feats = model.forward_features(x)
    feats["enc1"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_deploy_returns_model_without_training_parts():
    model = models.build("unet3d", channels=(4, 8))
    assert models.deploy(model) is model


def test_builders_without_a_class_annotation_are_not_refused(monkeypatch):
    """Third-party builders: options are checked against the builder's own signature,
    not at all when it takes **options and names no class."""
    from napari_selfreg import models as registry

    def loose(in_channels=1, num_classes=2, **options):
        return registry.build("unet3d", in_channels, num_classes, **options)

    def strict(in_channels=1, num_classes=2, channels=(4, 8)):
        return registry.build("unet3d", in_channels, num_classes, channels=channels)

    monkeypatch.setitem(registry._REGISTRY, "loose3d", loose)
    monkeypatch.setitem(registry._REGISTRY, "strict3d", strict)
    assert registry.architecture_options("loose3d") is None
    assert registry.build("loose3d", channels=(4, 8)).num_classes == 2
    assert registry.architecture_options("strict3d") == ["channels"]
    with pytest.raises(ValueError, match="strict3d has no option 'norm'"):
        registry.build("strict3d", norm="batch")


def _dirty_freed_memory(fill: float) -> None:
    """Leave freed blocks holding ``fill``: inside ``reuse_freed_memory`` (as the
    predictor and the trainer run) the next tensors reuse them as they are."""
    dirty = [torch.full((n,), fill) for n in (1 << 14, 1 << 16, 1 << 18, 1 << 20)]
    del dirty


def _bf16_weight_grad_on_dirty_memory(conv, x):
    """Weight gradient under CPU bf16 autocast after freed memory was filled with 1e3."""
    from napari_selfreg.device import reuse_freed_memory

    with reuse_freed_memory():
        _dirty_freed_memory(1e3)
        conv.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            conv(x).float().square().sum().backward()
    return conv.weight.grad.clone()


@pytest.mark.parametrize("kernel, depth", [(3, 2), (5, 3), (5, 4), (3, 8)])
def test_conv3d_weight_gradient_is_right_when_input_is_shallower_than_kernel(kernel, depth):
    # PyTorch's CPU bf16 weight gradient reads uninitialised memory at such depths
    # (16 channels: with 8 or fewer oneDNN takes another, correct kernel)
    from napari_selfreg.models.layers import Conv3d

    torch.manual_seed(0)
    conv = Conv3d(16, 16, kernel, padding=kernel // 2)
    x = torch.randn(2, 16, depth, 6, 6)
    conv(x).square().sum().backward()  # float32 reference
    reference = conv.weight.grad.clone()
    for _ in range(4):
        grad = _bf16_weight_grad_on_dirty_memory(conv, x)
        error = (grad - reference).abs().max() / reference.abs().max()
        assert error < 0.03, f"weight gradient off by {float(error):.3g} of its largest value"


@pytest.mark.parametrize("name", ["unet3d", "missu3d"])
def test_3d_models_use_the_guarded_conv3d(name):
    net = _tiny(name)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(type(m) is models.layers.Conv3d for m in convs)


@pytest.mark.parametrize("name", models.available())
def test_bf16_gradients_do_not_depend_on_old_memory(name):
    """Training gradients under CPU bf16 autocast are the same whatever the reused memory
    held before (these inputs put deep levels of the tiny 3D models at depth 2)."""
    from napari_selfreg.device import reuse_freed_memory

    torch.manual_seed(0)
    model = _tiny(name).train()
    for shape in [(64, 64)] if model.spatial_dims == 2 else [(8, 16, 16), (16, 16, 16)]:
        x = torch.randn(2, 2, *shape)
        y = torch.randint(0, 3, (2, *shape))
        runs = []
        with reuse_freed_memory():
            for fill in (0.0, 1e3, float("nan")):
                _dirty_freed_memory(fill)
                model.zero_grad(set_to_none=True)
                torch.manual_seed(1)  # the same dropout masks
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model(x)
                torch.nn.functional.cross_entropy(logits.float(), y).backward()
                runs.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})  # fmt: skip
        for pname, grad in runs[0].items():
            for other in runs[1:]:
                assert torch.equal(other[pname], grad), f"{shape}: gradient of {pname} depends on old memory"  # fmt: skip


def test_absurd_widths_are_refused_before_anything_is_allocated():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="M parameters, more than"):
        models.build("unet3d", channels=[4096, 8192, 16384])
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB
