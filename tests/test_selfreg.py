"""SCR, IFD, the grouped SelfReg loss and the segmentation loss against plain re-computations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_selfreg import models
from napari_selfreg.selfreg import (
    SegmentationLoss,
    SelfRegLoss,
    ifd_loss,
    pooled_teachers,
    scr_loss,
    selfreg_loss,
)


def ifd_numpy(f: np.ndarray) -> float:
    """IFD written from method.md with numpy loops, independent of the torch code."""
    f = f.astype(np.float64)
    b, c = f.shape[:2]
    flat = f.reshape(b, c, -1)
    scores = np.zeros(c)
    for ci in range(c):
        for bi in range(b):
            v = flat[bi, ci]
            scores[ci] += (v / max(np.sqrt((v * v).sum()), 1e-12)).mean()
    scores /= b
    order = sorted(range(c), key=lambda i: -scores[i])
    half = c // 2
    top = flat[:, order[:half]]
    bottom = flat[:, order[half : 2 * half]]
    return float(((top - bottom) ** 2).mean())


@pytest.mark.parametrize("shape", [(2, 7, 5, 9), (3, 6, 4, 7, 5), (1, 5, 3, 11)])
def test_ifd_matches_independent_computation(shape):
    rng = np.random.default_rng(1)
    f = rng.normal(size=shape).astype(np.float32) + rng.normal(
        size=(1, shape[1]) + (1,) * (len(shape) - 2)
    )
    f = f.astype(np.float32)
    got = ifd_loss(torch.from_numpy(f)).item()
    assert got == pytest.approx(ifd_numpy(f), rel=1e-5, abs=1e-6)


def test_ifd_gradient_reaches_both_halves():
    torch.manual_seed(0)
    f = torch.randn(2, 8, 6, 5, 4, requires_grad=True)
    ifd_loss(f).backward()
    per_channel = f.grad.abs().sum(dim=(0, 2, 3, 4))
    assert (per_channel > 0).all()  # top and bottom halves both get gradient


def test_ifd_single_channel_is_zero():
    assert ifd_loss(torch.randn(2, 1, 4, 4)).item() == 0.0


def scr_expectation(student: np.ndarray, pooled: np.ndarray) -> float:
    """Exact mean of SCR over uniformly random pairings.

    With K = min(Cs, Ct), each chosen pair (a, b) is uniform over all Cs x Ct pairs,
    so E[SCR] = mean over all (a, b) of mean((S_a - T_b)^2).
    """
    s = student.astype(np.float64)
    t = pooled.astype(np.float64)
    total = 0.0
    for a in range(s.shape[1]):
        for b in range(t.shape[1]):
            total += ((s[:, a] - t[:, b]) ** 2).mean()
    return total / (s.shape[1] * t.shape[1])


@pytest.mark.parametrize(
    "s_shape,t_shape",
    [
        ((2, 6, 4, 5), (2, 4, 8, 10)),
        ((1, 3, 3, 4, 5), (1, 5, 6, 8, 10)),
        ((2, 4, 3, 7), (2, 4, 3, 7)),
    ],
)
def test_scr_mean_matches_expectation(s_shape, t_shape):
    rng = np.random.default_rng(2)
    s = torch.from_numpy(rng.normal(size=s_shape).astype(np.float32))
    t = torch.from_numpy((rng.normal(size=t_shape) + 0.5).astype(np.float32))
    pool = (
        torch.nn.functional.adaptive_avg_pool2d
        if s.ndim == 4
        else torch.nn.functional.adaptive_avg_pool3d
    )
    expected = scr_expectation(s.numpy(), pool(t, s.shape[2:]).numpy())
    gen = torch.Generator().manual_seed(0)
    draws = [scr_loss(s, t, gen).item() for _ in range(3000)]
    assert np.mean(draws) == pytest.approx(expected, rel=0.01)


def test_scr_pools_to_non_square_student_size():
    # The official code pools to (H, H); a non-square student must see (H, W).
    s = torch.zeros(1, 2, 3, 7)
    t = torch.arange(2 * 6 * 14, dtype=torch.float32).reshape(1, 2, 6, 14)
    loss = scr_loss(s, t, torch.Generator().manual_seed(0))
    pooled = torch.nn.functional.adaptive_avg_pool2d(t, (3, 7))
    assert loss.item() == pytest.approx(pooled.pow(2).mean().item(), rel=1e-6)


def test_scr_sends_no_gradient_into_teacher():
    s = torch.randn(2, 4, 5, 6, requires_grad=True)
    t = torch.randn(2, 3, 10, 12, requires_grad=True)
    scr_loss(s, t).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_scr_is_reproducible_with_seeded_generator():
    s, t = torch.randn(2, 16, 4, 4), torch.randn(2, 8, 8, 8)
    a = [scr_loss(s, t, torch.Generator().manual_seed(5)).item() for _ in range(2)]
    b = [scr_loss(s, t, g).item() for g in [torch.Generator().manual_seed(6)]]
    assert a[0] == a[1]
    assert b[0] != a[0]


def test_selfreg_loss_groups_like_official_code():
    torch.manual_seed(0)
    model = models.build("unet3d", channels=(4, 8, 16, 16))
    _, feats = model.forward_features(torch.randn(2, 1, 16, 16, 16))
    groups = models.selfreg_groups(model)
    total, terms = selfreg_loss(
        feats, 0.015, 0.02, torch.Generator().manual_seed(3), groups=groups
    )
    enc = ["enc1", "enc2", "bottleneck"]
    dec = ["dec2", "dec1"]
    ifd = np.mean([ifd_loss(feats[n]).item() for n in enc]) + np.mean(
        [ifd_loss(feats[n]).item() for n in dec]
    )
    gen = torch.Generator().manual_seed(3)
    scr_each = {}
    for name in feats:  # same draw order as selfreg_loss: students in feature order
        if groups[name][1] is not None:
            scr_each[name] = scr_loss(feats[name], feats["final"], gen).item()
    scr = np.mean(list(scr_each.values()))
    assert sorted(k for k in terms if k.startswith("ifd/")) == sorted(
        f"ifd/{n}" for n in enc + dec
    )
    assert "ifd/stem" not in terms and "scr/final" not in terms
    assert terms["ifd"].item() == pytest.approx(ifd, rel=1e-5)
    assert terms["scr"].item() == pytest.approx(scr, rel=1e-5)
    assert total.item() == pytest.approx(0.015 * scr + 0.02 * ifd, rel=1e-5)
    # default groups follow the same naming convention
    total_default, _ = selfreg_loss(feats, 0.015, 0.02, torch.Generator().manual_seed(3))
    assert total_default.item() == pytest.approx(total.item(), rel=1e-6)


def selfreg_autograd(feats, groups, generator, lambda_scr, lambda_ifd):
    """SelfReg from method.md in plain torch ops (gathers, adaptive pooling), the same
    random draws in the same order as ``selfreg_loss``; torch autograd differentiates it."""
    teacher = feats["final"].detach().float()
    ifd_groups, scr_groups = {}, {}
    for name, f in feats.items():
        ifd_group, scr_group = groups.get(name, (None, None))
        if name == "final" or (ifd_group is None and scr_group is None):
            continue
        c = f.shape[1]
        if ifd_group is not None:
            scores = torch.nn.functional.normalize(f.detach().flatten(2), dim=2).mean((0, 2))
            order = torch.argsort(scores, descending=True, stable=True)
            half = c // 2
            g = f[:, order]
            ifd = (g[:, :half] - g[:, half : 2 * half]).pow(2).mean() if half else f.sum() * 0
            ifd_groups.setdefault(ifd_group, []).append(ifd)
        if scr_group is not None:
            k = min(c, teacher.shape[1])
            a = torch.randperm(c, generator=generator)[:k]
            b = torch.randperm(teacher.shape[1], generator=generator)[:k]
            pool = F.adaptive_avg_pool2d if f.ndim == 4 else F.adaptive_avg_pool3d
            target = pool(teacher, f.shape[2:])[:, b]
            scr_groups.setdefault(scr_group, []).append((f[:, a] - target).pow(2).mean())
    scr = sum(torch.stack(v).mean() for v in scr_groups.values())
    ifd = sum(torch.stack(v).mean() for v in ifd_groups.values())
    return lambda_scr * scr + lambda_ifd * ifd


@pytest.mark.parametrize("dims", [2, 3])
def test_selfreg_loss_values_and_gradients_match_plain_autograd(dims):
    """The one-node forward/backward of all students against torch autograd through
    the formulas: odd channel counts, a one-channel block (IFD 0), a student with more
    channels than the teacher, one without SCR, non-square sizes, and a channels-last
    feature next to channels-first ones."""
    torch.manual_seed(1)
    size = (12, 10, 8)[:dims] if dims == 3 else (12, 10)
    shapes = {"enc1": (7, 2), "enc2": (1, 2), "bottleneck": (9, 4), "dec1": (5, 2)}
    feats = {
        name: torch.randn(2, c, *(s // r for s in size), dtype=torch.float64).float()
        for name, (c, r) in shapes.items()
    }
    feats["final"] = torch.randn(2, 6, *size)
    last = torch.channels_last if dims == 2 else torch.channels_last_3d
    feats["enc1"] = feats["enc1"].contiguous(memory_format=last)
    groups = {"enc1": ("encoder", "all"), "enc2": ("encoder", "all"),
              "bottleneck": ("encoder", None), "dec1": ("decoder", "all"), "final": (None, None)}  # fmt: skip
    ours_in = {k: v.clone().requires_grad_(k != "final") for k, v in feats.items()}
    plain_in = {k: v.clone().requires_grad_(k != "final") for k, v in feats.items()}
    total, _ = selfreg_loss(ours_in, 0.015, 0.02, torch.Generator().manual_seed(4), groups)
    expected = selfreg_autograd(plain_in, groups, torch.Generator().manual_seed(4), 0.015, 0.02)
    total.backward()
    expected.backward()
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    for name in shapes:
        torch.testing.assert_close(ours_in[name].grad, plain_in[name].grad, rtol=1e-4, atol=1e-9)
    assert ours_in["enc2"].grad.abs().sum() > 0  # SCR still reaches the one-channel block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selfreg_loss_inside_autocast_matches_outside(dtype):
    """Inside bf16 autocast (where losses are usually computed) the values and the
    gradients are those computed outside it, in float32 on the given features, with
    the backward run inside autocast too; a frozen block gets no gradient."""
    torch.manual_seed(2)
    shapes = {"enc1": (6, 8), "bottleneck": (8, 4), "dec1": (4, 8), "final": (4, 16)}
    feats = {k: torch.randn(2, c, s, s).to(dtype) for k, (c, s) in shapes.items()}

    def run(inside: bool):
        leaves = {k: v.clone().requires_grad_(k in ("enc1", "dec1")) for k, v in feats.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
            total, terms = selfreg_loss(leaves, generator=torch.Generator().manual_seed(0))
            total.backward()
        return total, terms, leaves

    (total_out, terms_out, out), (total_in, terms_in, inside) = run(False), run(True)
    assert total_in.dtype == torch.float32
    assert total_in.item() == pytest.approx(total_out.item(), rel=1e-6)
    for name, value in terms_out.items():
        assert terms_in[name].item() == pytest.approx(value.item(), rel=1e-6), name
    for name in ("enc1", "dec1"):
        assert inside[name].grad.dtype == dtype
        torch.testing.assert_close(inside[name].grad, out[name].grad)
    assert inside["bottleneck"].grad is None and terms_in["ifd/bottleneck"] > 0


def test_pooled_teachers_equal_pooling_the_full_teacher():
    """Sizes pooled from an intermediate (12x8x8 -> 6x4x4 -> 3x2x2) or, when no exact
    intermediate exists (5x3x3), from the teacher itself."""
    teacher = torch.randn(2, 3, 12, 8, 8, requires_grad=True).to(torch.bfloat16)
    sizes = [(6, 4, 4), (3, 2, 2), (5, 3, 3), (6, 4, 4), (12, 8, 8)]
    pooled = pooled_teachers(teacher, sizes)
    assert sorted(pooled) == sorted(set(sizes))
    for size, value in pooled.items():
        direct = torch.nn.functional.adaptive_avg_pool3d(teacher.detach().float(), size)
        assert value.dtype == torch.float32 and not value.requires_grad
        assert torch.allclose(value, direct, atol=1e-6), size


def test_selfreg_loss_needs_teacher():
    with pytest.raises(KeyError, match="final"):
        selfreg_loss({"enc1": torch.randn(1, 2, 3, 3)})


def _dice_loss_numpy(probs, target, k, include_background):
    dices = []
    for c in range(0 if include_background else 1, k):
        p = probs[:, c]
        g = (target == c).astype(np.float64)
        dices.append((2 * (p * g).sum() + 1e-5) / (p.sum() + g.sum() + 1e-5))
    return 1 - np.mean(dices)


@pytest.mark.parametrize("ndim", [2, 3])
def test_segmentation_loss_matches_plain_computation(ndim):
    rng = np.random.default_rng(3)
    shape = (2, 4, *([5, 7, 6][:ndim]))
    logits = rng.normal(size=shape)
    target = rng.integers(0, 4, size=(shape[0], *shape[2:]))
    loss = SegmentationLoss(ce_weight=0.3, dice_weight=0.7)
    total, parts = loss(torch.tensor(logits, dtype=torch.float32), torch.tensor(target))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ce = -np.mean(np.log(np.take_along_axis(probs, target[:, None], 1)))
    dice = _dice_loss_numpy(probs, target, 4, include_background=False)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["dice"].item() == pytest.approx(dice, rel=1e-5)
    assert total.item() == pytest.approx(0.3 * ce + 0.7 * dice, rel=1e-5)


def test_segmentation_loss_voxel_weights_ignore_voxels():
    logits = torch.randn(1, 3, 4, 4)
    target = torch.randint(0, 3, (1, 4, 4))
    weight = torch.zeros(1, 4, 4)
    weight[:, :2] = 1
    loss = SegmentationLoss()
    weighted, _ = loss(logits, target, weight)
    cropped, _ = loss(logits[..., :2, :], target[:, :2])
    assert weighted.item() == pytest.approx(cropped.item(), rel=1e-5)


def test_selfreg_module_switches_off():
    model = models.build("unet2d", channels=(4, 8, 8))
    x, y = torch.randn(2, 1, 16, 16), torch.randint(0, 2, (2, 16, 16))
    logits, feats = model.forward_features(x)
    off, parts_off = SelfRegLoss(lambda_scr=0, lambda_ifd=0)(logits, feats, y)
    on, parts_on = SelfRegLoss(groups=models.selfreg_groups(model))(logits, feats, y)
    assert "scr" not in parts_off and "scr" in parts_on
    assert on.item() > off.item()
    assert parts_on["seg"].item() == pytest.approx(off.item())
    on.backward()


def test_our_decorrelation_pushes_channels_apart_where_ifd_pulls_them_together():
    """IFD as published raises channel similarity; the decorrelation term lowers it."""
    from napari_selfreg.selfreg import decorrelation_loss, ifd_loss

    def similarity(f):
        x = f.transpose(0, 1).reshape(f.shape[1], -1)
        x = x / x.norm(dim=1, keepdim=True)
        c = (x @ x.T).abs()
        return float((c.sum() - c.diagonal().sum()) / (c.numel() - c.shape[0]))

    torch.manual_seed(0)
    start = torch.randn(2, 8, 6, 6, 6) + torch.randn(2, 1, 6, 6, 6)  # correlated channels
    results = {}
    for name, loss in (("ifd", ifd_loss), ("decor", decorrelation_loss)):
        f = start.clone().requires_grad_(True)
        opt = torch.optim.SGD([f], lr=0.5)
        for _ in range(60):
            opt.zero_grad()
            loss(f).backward()
            opt.step()
        results[name] = similarity(f.detach())
    before = similarity(start)
    assert results["ifd"] > before > results["decor"]
    assert float(decorrelation_loss(torch.randn(1, 1, 4, 4, 4))) == 0.0


def test_squared_dice_over_all_classes_as_the_authors_compute_it():
    from napari_selfreg.selfreg import SegmentationLoss

    torch.manual_seed(1)
    logits, target = torch.randn(2, 3, 5, 5), torch.randint(0, 3, (2, 5, 5))
    _, parts = SegmentationLoss(0.0, 1.0, include_background=True, squared=True)(logits, target)
    p = logits.softmax(1)
    g = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float()
    dice = (2 * (p * g).sum((0, 2, 3)) + 1e-5) / ((p * p).sum((0, 2, 3)) + g.sum((0, 2, 3)) + 1e-5)
    torch.testing.assert_close(parts["dice"], 1 - dice.mean())


def test_presets_and_missu_official_level_weights():
    from napari_selfreg import models
    from napari_selfreg.training.config import PRESETS, TrainConfig

    cfg = TrainConfig(**PRESETS["official-acdc"])
    assert (cfg.ce_weight, cfg.dice_weight, cfg.dice_squared, cfg.lambda_ifd) == (
        0.3,
        0.7,
        True,
        0.1,
    )
    net = models.build("missu3d", channels=[4, 8, 16, 16], blocks=[1, 1, 1, 1], embed_dim=16,
                       num_layers=1, num_heads=2, mlp_dim=16, img_size=16, kd_weights="official")  # fmt: skip
    assert list(net.kd_weights) == [0.5, 2.0, 8.0]
    import inspect

    from napari_selfreg.models.swin_unet import SwinUNet

    assert inspect.signature(SwinUNet).parameters["drop_path"].default == 0.2  # the authors' value
