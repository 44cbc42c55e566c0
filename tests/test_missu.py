"""MISSU 3D: shapes at any size, channel-KL distillation, training-only parts, files."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_selfreg import models
from napari_selfreg.distill import channel_kl, distillation_loss, level_pairs
from napari_selfreg.modelfile import ModelCard, load_model, save_model
from napari_selfreg.selfreg import SegmentationLoss, selfreg_loss

# Tiny models: one torch thread (conftest) avoids OpenMP waits on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {
    "channels": [4, 8, 8, 16], "blocks": [1, 1, 1, 1], "embed_dim": 16, "num_layers": 1,
    "num_heads": 2, "mlp_dim": 16, "img_size": [16, 16, 16],
}  # fmt: skip


@pytest.fixture(scope="module")
def default_model():
    torch.manual_seed(0)
    return models.build("missu3d", in_channels=1, num_classes=4).eval()


def test_default_size_and_features(default_model):
    params = sum(p.numel() for p in default_model.parameters())
    assert 19.5e6 < params < 20.5e6  # about 20 M in the paper
    assert default_model.pos_embed.shape == (1, 512, 16, 16, 16)  # sized from the 128^3 tile
    assert not hasattr(default_model, "lmsf")
    names = [f.name for f in default_model.feature_info]
    assert names == ["enc1", "enc2", "enc3", "bottleneck", "dec3", "dec2", "dec1", "final"]
    groups = models.selfreg_groups(default_model)
    assert groups["enc2"] == groups["bottleneck"] == ("encoder", "all")
    assert groups["dec3"] == groups["dec2"] == ("decoder", "all")
    assert groups["enc1"] == groups["dec1"] == groups["final"] == (None, None)


@pytest.mark.parametrize("size", [(48, 64, 80), (40, 40, 40), (37, 41, 43)])
def test_default_model_any_size(default_model, size):
    x = torch.randn(1, 1, *size)
    with torch.no_grad():
        logits, feats = default_model.forward_features(x)
    assert logits.shape == (1, 4, *size)
    assert list(feats) == [f.name for f in default_model.feature_info]
    assert feats["final"].shape == (1, 16, *size)
    for info in default_model.feature_info:
        expected = (1, info.channels, *(-(-s // info.reduction) for s in size))
        assert tuple(feats[info.name].shape) == expected, info
    total, _ = selfreg_loss(feats, groups=models.selfreg_groups(default_model))
    assert torch.isfinite(total)


def test_dropout_only_while_training():
    torch.manual_seed(0)
    model = models.build("missu3d", **{**TINY, "dropout": 0.5})
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.allclose(model(x), model(x))


def test_positional_embedding_is_interpolated_for_other_grids():
    torch.manual_seed(0)
    model = models.build("missu3d", **{**TINY, "img_size": [16, 24, 32]}).eval()
    assert model.pos_embed.shape[2:] == (2, 3, 4)
    tokens = torch.randn(1, 16, 3, 5, 4)
    with torch.no_grad():
        got = model.transform(tokens)
        model.pos_embed.copy_(torch.ones_like(model.pos_embed))  # interpolates to ones
        flat = model.transformer((tokens + 1).flatten(2).transpose(1, 2))
        ones = model.transform(tokens)
    torch.testing.assert_close(ones, flat.transpose(1, 2).reshape(1, 16, 3, 5, 4))
    assert not torch.allclose(got, ones)


def _numpy_kl(student, teacher, tau):
    s, t = student.double().numpy() / tau, teacher.double().numpy() / tau
    p = np.exp(t - t.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    log_q = s - s.max(1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
    return tau**2 * (p * (np.log(p) - log_q)).sum(1).mean()


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_channel_kl_matches_independent_computations(tau):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 3, 4, 6, generator=g, requires_grad=True)
    teacher = torch.randn(2, 5, 3, 4, 6, generator=g, requires_grad=True)
    got = channel_kl(student, teacher, tau)
    flat = lambda t: t.movedim(1, -1).reshape(-1, 5) / tau  # noqa: E731  (voxels, channels)
    ref = F.kl_div(flat(student).log_softmax(1), flat(teacher).softmax(1), reduction="batchmean")
    torch.testing.assert_close(got, ref * tau**2)
    assert abs(got.item() - _numpy_kl(student.detach(), teacher.detach(), tau)) < 1e-5
    got.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0  # teacher detached
    assert channel_kl(student, student, tau).abs() < 1e-6
    # 2D features and a teacher at another resolution (average-pooled to the student's).
    s2, t2 = torch.randn(1, 3, 4, 4, generator=g), torch.randn(1, 3, 8, 8, generator=g)
    pooled = F.avg_pool2d(t2, 2)
    assert abs(channel_kl(s2, t2).item() - _numpy_kl(s2, pooled, 1.0)) < 1e-5


def test_distillation_loss_weights_levels_explicitly():
    g = torch.Generator().manual_seed(1)
    feats = {
        "enc1": torch.randn(1, 4, 8, 8, 8, generator=g),
        "enc2": torch.randn(1, 8, 4, 4, 4, generator=g),
        "dec2": torch.randn(1, 8, 4, 4, 4, generator=g),
        "dec1": torch.randn(1, 4, 8, 8, 8, generator=g),
    }
    pairs = level_pairs(feats)
    assert pairs == [("enc2", "dec2"), ("enc1", "dec1")]
    total, terms = distillation_loss(feats, pairs, [0.25, 3.0], tau=1.0)
    k2 = _numpy_kl(feats["dec2"], feats["enc2"], 1.0)
    k1 = _numpy_kl(feats["dec1"], feats["enc1"], 1.0)
    assert abs(total.item() - (0.25 * k2 + 3.0 * k1)) < 1e-5
    assert abs(terms["kd/dec1"].item() - k1) < 1e-5
    other = torch.randn(1, 4, 8, 8, 8, generator=g)
    total2, _ = distillation_loss(feats, pairs, [0.0, 1.0], teachers={"enc1": other})
    assert abs(total2.item() - _numpy_kl(feats["dec1"], other, 1.0)) < 1e-5
    with pytest.raises(ValueError, match="weights"):
        distillation_loss(feats, pairs, [1.0])


def _blob_batch(n=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size)] * 3, indexing="ij"))
    images, labels = [], []
    for _ in range(n):
        centre = torch.randint(5, size - 5, (3, 1, 1, 1), generator=g)
        ball = ((grid - centre) ** 2).sum(0) < 16
        images.append(ball.float() + 0.3 * torch.randn(size, size, size, generator=g))
        labels.append(ball.long())
    return torch.stack(images)[:, None], torch.stack(labels)


def test_training_losses_and_lmsf_gradient():
    torch.manual_seed(0)
    model = models.build("missu3d", num_classes=2, training_modules=True, **TINY).train()
    x, y = _blob_batch()
    _, feats = model.forward_features(x)
    losses = model.training_losses(feats, y)
    assert set(losses) == {"kd", "lmsf_aux"} and all(v > 0 for v in losses.values())
    lmsf = list(model.lmsf.parameters())
    kd_grads = torch.autograd.grad(losses["kd"], lmsf, retain_graph=True, allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in kd_grads)  # the KL teacher is detached
    aux_grads = torch.autograd.grad(losses["lmsf_aux"], lmsf)
    assert sum(g.abs().sum() for g in aux_grads) > 0  # LMSF learns through its auxiliary head
    plain = models.build("missu3d", num_classes=2, **TINY)
    assert set(plain.training_losses(plain.forward_features(x)[1], y)) == {"kd"}


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = models.build("missu3d", num_classes=2, training_modules=True, **TINY).train()
    x, y = _blob_batch()
    seg = SegmentationLoss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        logits, feats = model.forward_features(x)
        loss = seg(logits, y)[0] + sum(model.training_losses(feats, y).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_deploy_strips_training_parts_and_keeps_outputs(tmp_path):
    torch.manual_seed(0)
    options = {"in_channels": 1, "num_classes": 2, **TINY, "training_modules": True}
    trained = models.build("missu3d", **options)
    trained.train()
    trained(torch.randn(1, 1, 16, 16, 16))
    trained.eval()
    deployed = models.deploy(trained)
    assert not any(k.startswith(("lmsf", "aux_heads")) for k in deployed.state_dict())
    assert deployed.options["training_modules"] is False
    # The card's options are the deployed ones; they rebuild the same network.
    card_options = json.loads(json.dumps({"in_channels": 1, "num_classes": 2, **deployed.options}))
    rebuilt = models.build("missu3d", **card_options).eval()
    plain = models.build("missu3d", **{**options, "training_modules": False})
    n_params = sum(p.numel() for p in deployed.parameters())
    assert n_params == sum(p.numel() for p in rebuilt.parameters())
    assert n_params == sum(p.numel() for p in plain.parameters())
    assert n_params < sum(p.numel() for p in trained.parameters())
    rebuilt.load_state_dict(deployed.state_dict(), strict=True)
    x = torch.randn(1, 1, 19, 21, 17)
    with torch.no_grad():
        reference = trained(x)
        assert torch.equal(deployed(x), reference)
        assert torch.equal(rebuilt(x), reference)
    assert models.deploy(rebuilt) is rebuilt
    card = ModelCard("missu", "missu3d", card_options, ["background", "ball"], patch_size=[16] * 3)
    bundle = load_model(save_model(deployed, card, tmp_path / "missu"))
    assert not hasattr(bundle.network, "lmsf")
    with torch.no_grad():
        assert torch.equal(bundle.network(x), reference)


def test_bad_options_raise_value_errors():
    with pytest.raises(ValueError, match="kd_weights"):
        models.build("missu3d", **{**TINY, "kd_weights": [1.0]})
    with pytest.raises(ValueError, match="divisible"):
        models.build("missu3d", **{**TINY, "num_heads": 3})
    with pytest.raises(ValueError, match="temperature"):
        channel_kl(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), tau=0.0)
