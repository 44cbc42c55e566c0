"""Feature inspector library: block features, redundancy statistics, PCA composite, Grad-CAM.

Everything here rests on one mechanism, ``network.forward_features(x) ->
(logits, OrderedDict of block outputs ending with "final")`` plus
``network.feature_info``. No Qt and no napari; torch is imported inside the
functions that need it, so the widget module stays light.

Arrays keep the image's axis order. A block's map of reduction ``r`` (per image
axis) computed on a region starting at voxel ``o`` sits in image space with
``scale = r * image_scale`` and ``translate = image_translate + image_linear @
(o + (r - 1) / 2)`` (:func:`block_placement`): feature voxel ``j`` covers the
image voxels ``o + r*j ... o + r*j + r - 1`` and sits at their centre.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .jobs import Progress, drain

CACHE_SIZE = 4
DEFAULT_PATCH = {2: 256, 3: 96}
_CACHE: OrderedDict[tuple, Any] = OrderedDict()


class InspectError(ValueError):
    """The image, region or model cannot be inspected (one clear sentence)."""


@dataclass
class FeatureSet:
    """Block outputs of one model on one image region.

    Attributes:
        model: model name.
        features: block name -> ``(C, *spatial)`` float32, in image axis order
            (a 2D model on a 3D image keeps a length-1 axis at the slice axis).
        logits: ``(K, *region_shape)`` float32.
        origin: region start (voxel index per image axis).
        shape: region shape in image voxels.
        reductions: block name -> per-axis down-sampling factor.
        notes: things the user should know (e.g. spacing mismatch).
    """

    model: str
    features: dict[str, np.ndarray]
    logits: np.ndarray
    origin: tuple[int, ...]
    shape: tuple[int, ...]
    reductions: dict[str, tuple[int, ...]]
    notes: list[str] = field(default_factory=list)
    stats_cache: dict = field(default_factory=dict, repr=False)

    def placement(self, block: str, scale=None, translate=None, linear=None):
        """``(scale, translate)`` of ``block``'s map for an image layer's transform."""
        return block_placement(self.origin, self.reductions[block], scale, translate, linear)


@dataclass
class BlockStats:
    """Redundancy statistics of one block (see ``shared/method.md``)."""

    channels: int
    mean_abs_cos: float
    ifd: float
    scr: float  # NaN for the teacher itself
    effective_rank: float
    channel_scores: np.ndarray
    similarity: np.ndarray  # (C, C) |cosine|


@dataclass
class CamSet:
    """Per-block Grad-CAM maps ``(*region_shape)`` in [0, 1] for one class (None: all)."""

    model: str
    maps: dict[str, np.ndarray]
    origin: tuple[int, ...]
    shape: tuple[int, ...]
    class_index: int | None
    mask_voxels: int
    notes: list[str] = field(default_factory=list)


@dataclass
class ModelInspection:
    """Everything the inspector shows for one model."""

    features: FeatureSet
    stats: dict[str, BlockStats]
    block: str
    top: np.ndarray  # channel indices, highest energy first
    pca: np.ndarray  # (*spatial, 3) in [0, 1]
    cams: CamSet | None = None


# ----------------------------------------------------------------- regions


def block_placement(origin, reduction, scale=None, translate=None, linear=None):
    """World ``(scale, translate)`` of a block map with the given reduction.

    Args:
        origin: region start in image voxels, per axis.
        reduction: int or per-axis down-sampling factor of the block.
        scale, translate: the image layer's; default 1 and 0.
        linear: the image's data-to-physical linear matrix (rotate @ shear @
            diag(scale)) when it is not just ``diag(scale)``.
    """
    origin = np.asarray(origin, dtype=float)
    r = np.broadcast_to(np.asarray(reduction, dtype=float), origin.shape)
    scale = np.ones_like(origin) if scale is None else np.asarray(scale, dtype=float)
    translate = np.zeros_like(origin) if translate is None else np.asarray(translate, float)
    lin = np.diag(scale) if linear is None else np.asarray(linear, dtype=float)
    return scale * r, translate + lin @ (origin + (r - 1) / 2)


def centred_region(shape: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    """A box of ``size`` (clipped to ``shape``) in the centre of ``shape``."""
    out = []
    for n, s in zip(shape, size, strict=True):
        s = max(1, min(int(s), int(n)))
        start = (int(n) - s) // 2
        out.append(slice(start, start + s))
    return tuple(out)


def box_region(lo, hi, shape: Sequence[int], thickness: Sequence[int]) -> tuple[slice, ...]:
    """Voxels of a box given in continuous data coordinates (voxel centres at integers).

    Axes where the box is thinner than ``thickness`` are widened around the
    box centre (e.g. a rectangle drawn on one slice gets a slab for a 3D model).

    Raises:
        InspectError: the box lies outside the image.
    """
    out = []
    for ax, n in enumerate(shape):
        a, b = sorted((float(lo[ax]), float(hi[ax])))
        start, stop = int(np.floor(a + 0.5)), int(np.floor(b + 0.5)) + 1
        want = min(int(thickness[ax]), int(n))
        if stop - start < want:
            start = (start + stop) // 2 - want // 2
            stop = start + want
            start, stop = max(0, min(start, n - want)), max(want, min(stop, n))
        start, stop = max(0, start), min(int(n), stop)
        if stop <= start:
            raise InspectError("the chosen box lies outside the image")
        out.append(slice(start, stop))
    return tuple(out)


def limit_region(region: Sequence[slice], max_voxels: int) -> tuple[slice, ...]:
    """Shrink ``region`` around its centre (same aspect) to at most ``max_voxels``."""
    sizes = np.array([s.stop - s.start for s in region], dtype=float)
    if sizes.prod() <= max_voxels:
        return tuple(region)
    big = sizes > 1
    f = (max_voxels / sizes.prod()) ** (1 / max(1, big.sum()))
    out = []
    for s, n, b in zip(region, sizes, big, strict=True):
        keep = max(1, int(n * f)) if b else int(n)
        start = s.start + (int(n) - keep) // 2
        out.append(slice(start, start + keep))
    return tuple(out)


def _as_region(region, shape: Sequence[int]) -> tuple[slice, ...]:
    """Normalise slices or a ``(2, ndim)`` ``[start, stop]`` box; clip; reject empty."""
    if region is None:
        raise InspectError("no region given")
    if not all(isinstance(s, slice) for s in region):
        start, stop = (np.asarray(v, dtype=int) for v in region)
        region = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
    if len(region) != len(shape):
        raise InspectError(f"the region has {len(region)} axes, the image {len(shape)}")
    out = []
    for s, n in zip(region, shape, strict=True):
        start, stop, _ = s.indices(int(n))
        if stop <= start:
            raise InspectError("the region is empty or outside the image")
        out.append(slice(start, stop))
    return tuple(out)


# -------------------------------------------------------------- statistics


def _gram(feature: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """``(C, C)`` float64 Gram matrix of the flattened channels, accumulated in chunks."""
    x = np.asarray(feature).reshape(feature.shape[0], -1)
    gram = np.zeros((x.shape[0], x.shape[0]))
    for i in range(0, x.shape[1], chunk):
        part = x[:, i : i + chunk].astype(np.float64)
        gram += part @ part.T
    return gram


def channel_similarity(feature: np.ndarray, gram: np.ndarray | None = None) -> np.ndarray:
    """``(C, C)`` |cosine similarity| of the flattened channel maps; diagonal 1.

    Args:
        feature: ``(C, *spatial)``.
        gram: its :func:`_gram`, when already computed.
    """
    gram = _gram(feature) if gram is None else gram
    norm = np.sqrt(np.clip(np.diag(gram), 0, None))
    sim = np.clip(np.abs(gram) / np.maximum(np.outer(norm, norm), 1e-30), 0.0, 1.0)
    np.fill_diagonal(sim, 1.0)
    return sim.astype(np.float32)


def effective_rank(feature: np.ndarray, gram: np.ndarray | None = None) -> float:
    """exp(entropy) of the normalised singular values of the ``C x N`` channel matrix (1..C)."""
    gram = _gram(feature) if gram is None else gram
    s = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None))
    if s.sum() <= 0:
        return 1.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def channel_scores(feature: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """IFD channel scores ``s_c``: mean of each channel map divided by its L2 norm."""
    x = np.asarray(feature, dtype=np.float32).reshape(feature.shape[0], -1)
    norm = np.maximum(np.linalg.norm(x, axis=1), eps)
    return (x.sum(axis=1) / norm / x.shape[1]).astype(np.float32)


def top_channels(feature: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` channels of highest energy (mean square), highest first."""
    x = np.asarray(feature, dtype=np.float32).reshape(feature.shape[0], -1)
    energy = np.mean(x.astype(np.float64) ** 2, axis=1)
    return np.argsort(-energy, kind="stable")[: max(1, int(k))]


def pca_rgb(feature: np.ndarray) -> np.ndarray:
    """First three principal components over channels as RGB in [0, 1], ``(*spatial, 3)``.

    Each component is centred, its sign fixed (largest loading positive) and
    stretched between its 1st and 99th percentiles.
    """
    c = feature.shape[0]
    x = np.asarray(feature, dtype=np.float32).reshape(c, -1)
    x = x - x.mean(axis=1, keepdims=True)
    cov = (x @ x.T).astype(np.float64) / max(1, x.shape[1])
    _, vecs = np.linalg.eigh(cov)
    vecs = vecs[:, ::-1][:, :3]
    vecs *= np.sign(vecs[np.abs(vecs).argmax(axis=0), range(vecs.shape[1])])
    rgb = np.zeros((3, x.shape[1]), dtype=np.float32)
    proj = vecs.T.astype(np.float32) @ x
    step = max(1, proj.shape[1] // 200_000)
    for i, comp in enumerate(proj):
        lo, hi = np.percentile(comp[::step], [1, 99])
        if hi > lo:
            rgb[i] = np.clip((comp - lo) / (hi - lo), 0, 1)
    return np.moveaxis(rgb.reshape(3, *feature.shape[1:]), 0, -1)


def block_stats(feature: np.ndarray, teacher: np.ndarray | None, generator=None, draws=4):
    """:class:`BlockStats` of one ``(C, *spatial)`` block; SCR against ``teacher`` (None: NaN)."""
    import torch
    import torch.nn.functional as F

    from .selfreg import ifd_loss, scr_loss

    gram = _gram(feature)
    sim = channel_similarity(feature, gram)
    c = sim.shape[0]
    off = float((sim.sum() - c) / (c * (c - 1))) if c > 1 else 0.0
    f = torch.from_numpy(np.ascontiguousarray(feature, dtype=np.float32))[None]
    scr = float("nan")
    if teacher is not None:
        t = torch.from_numpy(np.ascontiguousarray(teacher, dtype=np.float32))[None]
        f_s, t_s = _drop_unit_axes(f, t)
        pool = F.adaptive_avg_pool2d if f_s.ndim == 4 else F.adaptive_avg_pool3d
        t_s = pool(t_s, f_s.shape[2:])  # once; scr_loss's own pooling is then the identity
        scr = float(np.mean([float(scr_loss(f_s, t_s, generator)) for _ in range(draws)]))
    return BlockStats(
        channels=c,
        mean_abs_cos=off,
        ifd=float(ifd_loss(f)),
        scr=scr,
        effective_rank=effective_rank(feature, gram),
        channel_scores=channel_scores(feature),
        similarity=sim,
    )


def _drop_unit_axes(f, t):
    """Squeeze spatial axes that are 1 in both (a 2D model's slice axis) for pooling."""
    axes = [i for i in range(2, f.ndim) if f.shape[i] == 1 and t.shape[i] == 1]
    if f.ndim - len(axes) >= 4:
        for i in reversed(axes):
            f, t = f.squeeze(i), t.squeeze(i)
    return f, t


def redundancy_stats(features, generator=None, draws: int = 4) -> dict[str, BlockStats]:
    """Per-block statistics of a :class:`FeatureSet` or a name -> ``(C, *S)`` mapping.

    SCR is measured against the ``final`` block (the SelfReg teacher),
    averaged over ``draws`` random pairings from ``generator`` (default seeded 0).
    """
    import torch

    feats = features.features if isinstance(features, FeatureSet) else features
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    teacher = feats.get("final")
    return {
        name: block_stats(f, None if name == "final" else teacher, generator, draws)
        for name, f in feats.items()
    }


# ------------------------------------------------------------ model passes


def _prepare(bundle, image, region, spacing):
    """Checked, normalised model input ``(1, C_in, *S)`` (float32 numpy) and its geometry."""
    net, card = bundle.network, bundle.card
    image = np.asarray(image)
    n_in = card.in_channels
    if n_in > 1 and (image.ndim < 3 or image.shape[0] != n_in):
        raise InspectError(f"this model needs {n_in} channels on the first image axis")
    if n_in == 1 and np.iscomplexobj(image):
        raise InspectError("complex images cannot be inspected")
    spatial = image.shape[1:] if n_in > 1 else image.shape
    sd = int(net.spatial_dims)
    if len(spatial) not in (2, 3):
        raise InspectError(f"the image has {len(spatial)} spatial axes; 2 or 3 are supported")
    if sd == 3 and len(spatial) == 2:
        raise InspectError(f"model {card.name!r} is 3D and the image is 2D; choose a 2D model")
    if region is None:
        patch = card.patch_size or [DEFAULT_PATCH[sd]] * sd
        if len(spatial) == 3 and sd == 2:
            patch = [1, *patch]
        region = centred_region(spatial, patch)
    region = _as_region(region, spatial)
    shape = tuple(s.stop - s.start for s in region)
    squeeze = None
    if sd == 2 and len(spatial) == 3:
        thin = [i for i, n in enumerate(shape) if n == 1]
        if not thin:
            raise InspectError("a 2D model on a 3D image needs a region one slice thick")
        squeeze = thin[0]
    notes = []
    if spacing is not None and card.spacing is not None:
        sp = np.asarray(spacing, float)[-len(card.spacing) :]
        if not np.allclose(sp, card.spacing, rtol=0.25):
            notes.append(
                f"image spacing {' x '.join(f'{v:g}' for v in np.round(sp, 2))} differs "
                f"from the model's {' x '.join(f'{float(v):g}' for v in card.spacing)}; "
                "features may be off"
            )
    return image, region, shape, squeeze, notes


def _input_tensor(bundle, image, region, squeeze, device):
    """Crop normalised with the whole image's statistics (per channel): ``(1, C_in, *S)``."""
    import torch

    from .preprocess import apply_normalization, normalization_stats

    spec = bundle.card.normalization
    channels = image if bundle.card.in_channels > 1 else image[None]
    crop = np.stack(
        [apply_normalization(ch[region], normalization_stats(ch, spec)) for ch in channels]
    )
    if squeeze is not None:
        crop = crop.squeeze(squeeze + 1)
    return torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None].to(device)


def _device_and_dtype(device, precision):
    from .device import resolve_device, resolve_precision

    dev = resolve_device(device)
    return dev, resolve_precision(precision, dev)


def _unsqueeze(a: np.ndarray, squeeze: int | None) -> np.ndarray:
    return a if squeeze is None else np.expand_dims(a, squeeze + 1)


def _model_key(bundle) -> tuple:
    params = [p.detach() for p in bundle.network.parameters()]
    checksum = float(sum(float(p.double().abs().sum()) for p in params))
    return (str(bundle.path), bundle.card.name, checksum)


def _image_key(image: np.ndarray) -> tuple:
    data = np.ascontiguousarray(image)
    digest = hashlib.blake2b(data.view(np.uint8).reshape(-1), digest_size=16).hexdigest()
    return (image.shape, image.dtype.str, digest)


def _cached(key, compute):
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = compute()
    _CACHE[key] = value
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def clear_cache() -> None:
    """Forget all cached features and Grad-CAM maps."""
    _CACHE.clear()


def _region_key(region) -> tuple:
    return tuple((s.start, s.stop) for s in region)


def extract_features(
    bundle, image, region=None, spacing=None, device="cpu", precision="fp32"
) -> FeatureSet:
    """Run ``forward_features`` once on a region of ``image``; cached.

    Args:
        bundle: a :class:`~napari_selfreg.modelfile.ModelBundle`.
        image: ``(*spatial)`` array, or ``(C_in, *spatial)`` for multi-channel models.
        region: tuple of slices or ``(2, ndim)`` ``[start, stop]`` box; default a
            centred crop of the model's patch size (whole image if smaller).
        spacing: image voxel spacing per axis (checked against the model card).
        device: ``cpu``, ``cuda`` or ``auto``.
        precision: ``fp32``, ``bf16``, ``fp16`` or ``auto`` (see ``device.resolve_precision``).
    """
    import torch

    from .device import autocast

    image, region, shape, squeeze, notes = _prepare(bundle, image, region, spacing)
    device, dtype = _device_and_dtype(device, precision)
    key = ("features", _model_key(bundle), _image_key(image), _region_key(region), dtype)

    def compute() -> FeatureSet:
        net = bundle.network.to(device).eval()
        x = _input_tensor(bundle, image, region, squeeze, device)
        with torch.inference_mode(), autocast(device, dtype):
            logits, feats = net.forward_features(x)
        red = {f.name: f.reduction for f in net.feature_info}
        reductions = {}
        for name in feats:
            r = [red[name]] * len(shape)
            if squeeze is not None:
                r[squeeze] = 1
            reductions[name] = tuple(r)
        return FeatureSet(
            model=bundle.card.name,
            features={
                k: _unsqueeze(v[0].float().cpu().numpy(), squeeze) for k, v in feats.items()
            },
            logits=_unsqueeze(logits[0].float().cpu().numpy(), squeeze),
            origin=tuple(s.start for s in region),
            shape=shape,
            reductions=reductions,
            notes=notes,
        )

    return _cached(key, compute)


def grad_cam(
    bundle,
    image,
    class_index: int | None = None,
    blocks: Sequence[str] | None = None,
    region=None,
    spacing=None,
    device="cpu",
    precision="fp32",
) -> CamSet:
    """Per-block Grad-CAM as in SelfReg-UNet's figures; cached.

    Target: the sum of class-``c`` logits inside the predicted class-``c`` mask
    (summed over the foreground classes when ``class_index`` is None; the whole
    region when the mask is empty). One backward pass gives the gradients of
    all blocks; per block ``cam = relu(sum_c mean(dY/dA_c) * A_c)``, upsampled
    (bi/trilinear) to the region and divided by its maximum.
    """
    import torch
    import torch.nn.functional as F

    from .device import autocast
    from .models.unet import pad_to_multiple

    image, region, shape, squeeze, notes = _prepare(bundle, image, region, spacing)
    net = bundle.network
    k = bundle.card.num_classes
    if class_index is not None and not 0 <= int(class_index) < k:
        raise InspectError(f"class {class_index} does not exist; the model has {k} classes")
    device, dtype = _device_and_dtype(device, precision)
    names = tuple(blocks) if blocks is not None else tuple(f.name for f in net.feature_info)
    key = ("cam", _model_key(bundle), _image_key(image), _region_key(region), dtype)
    key += (class_index, names)

    def compute() -> CamSet:
        net.to(device).eval()
        x = _input_tensor(bundle, image, region, squeeze, device)
        size = x.shape[2:]
        divisor = int(getattr(net, "divisor", max(f.reduction for f in net.feature_info)))
        x = pad_to_multiple(x, divisor).requires_grad_(True)
        with torch.enable_grad(), autocast(device, dtype):
            logits, feats = net.forward_features(x)
        missing = [n for n in names if n not in feats]
        if missing:
            raise InspectError(f"model has no block {missing[0]!r}")
        logits = logits[(..., *[slice(0, s) for s in size])].float()
        pred = logits.argmax(1)
        classes = [int(class_index)] if class_index is not None else list(range(1, k)) or [0]
        mask_voxels = int(sum(int((pred == c).sum()) for c in classes))
        if mask_voxels:
            target = sum((logits[:, c] * (pred == c)).sum() for c in classes)
        else:
            notes.append("no voxel is predicted as the chosen class; using the whole region")
            target = logits[:, classes].sum()
        grads = torch.autograd.grad(target, [feats[n] for n in names], allow_unused=True)
        mode = "bilinear" if x.ndim == 4 else "trilinear"
        maps = {}
        for name, g in zip(names, grads, strict=True):
            if g is None:  # a cropped view of the block, not the tensor the graph used
                raise InspectError(f"Grad-CAM cannot reach block {name!r} of this model")
            a = feats[name].detach().float()
            w = g.float().mean(dim=tuple(range(2, g.ndim)), keepdim=True)
            cam = torch.relu((w * a).sum(1, keepdim=True))
            r = tuple(int(n) // int(m) for n, m in zip(x.shape[2:], a.shape[2:], strict=True))
            if max(r) > 1:
                cam = F.interpolate(cam, scale_factor=r, mode=mode, align_corners=False)
            cam = cam[(0, 0, *[slice(0, s) for s in size])]
            top = float(cam.max())
            cam = cam / top if top > 0 else cam
            maps[name] = _unsqueeze(cam.cpu().numpy()[None], squeeze)[0].astype(np.float32)
        return CamSet(
            model=bundle.card.name,
            maps=maps,
            origin=tuple(s.start for s in region),
            shape=shape,
            class_index=class_index,
            mask_voxels=mask_voxels,
            notes=notes,
        )

    return _cached(key, compute)


# ------------------------------------------------------------ whole jobs


def iter_inspect(
    bundles: Sequence,
    image,
    block: str,
    region=None,
    spacing=None,
    top_k: int = 4,
    cam_class: int | None = None,
    cam: bool = True,
    device="cpu",
    precision="fp32",
    draws: int = 4,
) -> Generator[Any, None, list[ModelInspection]]:
    """Everything the inspector shows, for one or two models; yields ``jobs.Progress``.

    Returns (as ``StopIteration.value``) one :class:`ModelInspection` per bundle.
    Cancelling between yields leaves nothing half-done.
    """
    import torch

    steps = [len(b.network.feature_info) + 2 + int(cam) for b in bundles]
    total, done = sum(steps), 0
    results = []
    for bundle in bundles:
        name = bundle.card.name
        yield Progress(done, total, "features", f"{name}: features")
        fs = extract_features(bundle, image, region, spacing, device, precision)
        if block not in fs.features:
            raise InspectError(f"model {name!r} has no block {block!r}")
        done += 1
        generator = torch.Generator().manual_seed(0)
        stats = {}
        for bname, feature in fs.features.items():
            yield Progress(done, total, "statistics", f"{name}: statistics of {bname}")
            teacher = None if bname == "final" else fs.features.get("final")
            if (bname, draws) not in fs.stats_cache:
                fs.stats_cache[bname, draws] = block_stats(feature, teacher, generator, draws)
            stats[bname] = fs.stats_cache[bname, draws]
            done += 1
        yield Progress(done, total, "pca", f"{name}: top channels and PCA of {block}")
        feature = fs.features[block]
        result = ModelInspection(fs, stats, block, top_channels(feature, top_k), pca_rgb(feature))
        done += 1
        if cam:
            yield Progress(done, total, "grad-cam", f"{name}: Grad-CAM")
            result.cams = grad_cam(
                bundle, image, cam_class, None, region, spacing, device, precision
            )
            done += 1
        results.append(result)
    yield Progress(total, total, "finish", "done")
    return results


def inspect(bundles: Sequence, image, block: str, **kwargs) -> list[ModelInspection]:
    """Drain :func:`iter_inspect` and return its result."""
    return drain(iter_inspect(bundles, image, block, **kwargs))


def compare(
    bundle_a, bundle_b, image, region=None, **kwargs
) -> tuple[dict[str, BlockStats], dict[str, BlockStats]]:
    """Redundancy statistics of two models on the same image region (for side-by-side plots)."""
    out = []
    for bundle in (bundle_a, bundle_b):
        fs = extract_features(bundle, image, region, **kwargs)
        out.append(redundancy_stats(fs))
    return out[0], out[1]


def stats_table(stats: Mapping[str, BlockStats]) -> dict[str, list]:
    """Column-wise table (block, channels, mean |cos|, IFD, SCR, effective rank) for plots."""
    return {
        "block": list(stats),
        "channels": [s.channels for s in stats.values()],
        "mean_abs_cos": [s.mean_abs_cos for s in stats.values()],
        "ifd": [s.ifd for s in stats.values()],
        "scr": [s.scr for s in stats.values()],
        "effective_rank": [s.effective_rank for s in stats.values()],
    }
