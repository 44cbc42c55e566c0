"""Swin-UNet 2D: shapes at any size, masked shifted windows, SelfReg features, training, files."""

import json

import pytest
import torch

from napari_selfreg import models
from napari_selfreg.modelfile import ModelCard, load_model, save_model
from napari_selfreg.models.swin_unet import SwinBlock
from napari_selfreg.selfreg import SegmentationLoss, selfreg_loss

# Tiny models: one torch thread (conftest) avoids OpenMP waits on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"embed_dim": 12, "num_heads": [1, 2, 2, 4], "window_size": 4, "drop_path": 0.0}


@pytest.fixture(scope="module")
def default_model():
    torch.manual_seed(0)
    return models.build("swin_unet2d", in_channels=1, num_classes=9).eval()


def test_default_is_swin_t_lite(default_model):
    params = sum(p.numel() for p in default_model.parameters())
    assert 27.0e6 < params < 27.3e6  # Swin-Unet reports 27.17 M
    students = [f for f in default_model.feature_info if f.ifd_group is not None]
    assert len(students) == 14
    assert [f.name for f in students][:3] == ["enc1_1", "enc1_2", "enc2_1"]
    groups = models.selfreg_groups(default_model)
    assert groups["enc1_1"] == ("encoder_first", "first")
    assert groups["bottleneck_2"] == ("encoder_last", "last")
    assert groups["dec3_1"] == ("decoder_first", "first")
    assert groups["dec1_2"] == ("decoder_last", "last")
    assert groups["final"] == (None, None)
    final = default_model.feature_info[-1]
    assert (final.name, final.channels, final.reduction) == ("final", 96, 1)


@pytest.mark.parametrize("size", [(224, 224), (160, 192), (97, 131)])
def test_default_model_any_size(default_model, size):
    x = torch.randn(1, 1, *size)
    with torch.no_grad():
        logits, feats = default_model.forward_features(x)
    assert logits.shape == (1, 9, *size)
    assert list(feats) == [f.name for f in default_model.feature_info]
    assert feats["final"].shape == (1, 96, *size)
    for info in default_model.feature_info:
        expected = (1, info.channels, *(-(-s // info.reduction) for s in size))
        assert tuple(feats[info.name].shape) == expected, info
    assert feats["bottleneck_1"].shape[1] == 768 and feats["enc1_1"].shape[1] == 96
    total, terms = selfreg_loss(feats, groups=models.selfreg_groups(default_model))
    assert torch.isfinite(total) and total > 0
    assert sum(k.startswith("scr/") for k in terms) == 14


def _reference_attention(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """Brute force: every valid token attends to the valid tokens of its window and region."""
    _, h, w, c = x.shape
    ws, attn = block.window_size, block.attn
    shift = block.shift if max(h, w) > ws else 0
    hp, wp = h + (-h) % ws, w + (-w) % ws
    rr, cc = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    r, c_ = (rr - shift) % hp, (cc - shift) % wp  # positions on the rolled, padded grid

    def region(pos, size):
        return torch.where(pos < size - ws, 0, torch.where(pos < size - shift, 1, 2))

    win = (r // ws) * 1000 + c_ // ws
    reg = region(r, hp) * 3 + region(c_, wp) if shift else torch.zeros_like(r)
    key = (win * 10 + reg).flatten()
    allowed = key[:, None] == key[None, :]
    local = torch.stack([(r % ws).flatten(), (c_ % ws).flatten()], 1)
    delta = local[:, None] - local[None, :] + ws - 1
    bias = attn.relative_position_bias_table[delta[..., 0] * (2 * ws - 1) + delta[..., 1]]
    tokens = block.norm1(x).reshape(-1, c)
    heads = attn.num_heads
    q, k, v = attn.qkv(tokens).view(-1, 3, heads, c // heads).permute(1, 2, 0, 3)
    logits = (q * attn.scale) @ k.transpose(1, 2) + bias.permute(2, 0, 1)
    logits = logits.masked_fill(~allowed, float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(-1, c)
    return attn.proj(out).view(1, h, w, c)


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("size", [(8, 12), (7, 10), (3, 9), (5, 5), (3, 4)])
def test_window_attention_matches_brute_force(shifted, size):
    torch.manual_seed(1)
    block = SwinBlock(8, 2, 4, shifted, 2.0, True, 0.0).eval()
    x = torch.randn(1, *size, 8)
    with torch.no_grad():
        got = block(x)
        ref = x + _reference_attention(block, x)
        ref = ref + block.mlp(block.norm2(ref))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_tiny_model_shapes_gradients_and_bad_options():
    torch.manual_seed(0)
    model = models.build("swin_unet2d", in_channels=2, num_classes=3, **TINY)
    x = torch.randn(2, 2, 64, 96)
    logits, feats = model.forward_features(x)
    assert logits.shape == (2, 3, 64, 96)
    # Features lie on the path to the logits (Grad-CAM takes gradients w.r.t. them).
    grads = torch.autograd.grad(logits[:, 1].sum(), [feats["enc2_1"], feats["dec1_2"]])
    assert all(g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="divisible"):
        models.build("swin_unet2d", embed_dim=10, num_heads=[3, 3, 3, 3])
    with pytest.raises(ValueError, match="depths"):
        models.build("swin_unet2d", depths=[2], num_heads=[1])


def _blob_batch(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, labels = [], []
    for _ in range(n):
        cy, cx = torch.randint(8, size - 8, (2,), generator=g)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < 36
        images.append(disc.float() + 0.3 * torch.randn(size, size, generator=g))
        labels.append(disc.long())
    return torch.stack(images)[:, None], torch.stack(labels)


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = models.build("swin_unet2d", num_classes=2, **TINY).train()
    x, y = _blob_batch()
    seg = SegmentationLoss()
    groups = models.selfreg_groups(model)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(12):
        logits, feats = model.forward_features(x)
        reg, _ = selfreg_loss(feats, generator=gen, groups=groups)
        loss = seg(logits, y)[0] + reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_options_are_json_and_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    options = json.loads(json.dumps({"in_channels": 1, "num_classes": 2, **TINY}))
    model = models.build("swin_unet2d", **options).eval()
    assert model.state_dict().keys() == models.build("swin_unet2d", **options).state_dict().keys()
    card = ModelCard("swin", "swin_unet2d", options, ["background", "disc"], patch_size=[64, 64])
    bundle = load_model(save_model(model, card, tmp_path / "swin"))
    x = torch.randn(1, 1, 50, 70)
    with torch.no_grad():
        assert torch.equal(bundle.network(x), model(x))
