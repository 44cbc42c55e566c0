"""Model passes of the inspector: block features and per-block Grad-CAM, cached per image and region."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .regions import InspectError, _as_region, block_placement, centred_region

CACHE_SIZE = 4
DEFAULT_PATCH = {2: 256, 3: 96}
_CACHE: OrderedDict[tuple, Any] = OrderedDict()


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
class CamSet:
    """Per-block Grad-CAM maps ``(*region_shape)`` in [0, 1] for one class (None: all)."""

    model: str
    maps: dict[str, np.ndarray]
    origin: tuple[int, ...]
    shape: tuple[int, ...]
    class_index: int | None
    mask_voxels: int
    notes: list[str] = field(default_factory=list)


def _prepare(bundle, image, region, spacing, affine=None):
    """The checked image, its region and geometry, and how to reorient the region to the
    model's orientation (``None``: as stored)."""
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
    turn = None
    if affine is not None and getattr(card, "orientation", None) and squeeze is None and len(spatial) == 3:  # fmt: skip
        from ..geometry import reorientation, spacing_from_affine

        turn = reorientation(affine, card.orientation)
        spacing = turn.spacing(spacing or spacing_from_affine(affine))
        turn = None if turn.identity else turn
    if spacing is not None and card.spacing is not None:
        from ..inference.inputs import target_spacing  # the predictor's rule, 2D models too

        target = target_spacing(card, spacing, 0 if squeeze is None else squeeze)
        if target is not None and not np.allclose(spacing, target, rtol=0.25):
            notes.append(
                f"image spacing {' x '.join(f'{v:g}' for v in np.round(spacing, 2))} differs "
                f"from the model's {' x '.join(f'{float(v):g}' for v in target)}; "
                "features may be off"
            )
    return image, region, shape, squeeze, notes, turn


def _input_tensor(bundle, image, region, squeeze, device, turn=None):
    """Crop normalised with the whole image's statistics (per channel), in the model's
    orientation: ``(1, C_in, *S)``."""
    import torch

    from ..preprocess import apply_normalization, normalization_stats

    spec = bundle.card.normalization
    channels = image if bundle.card.in_channels > 1 else image[None]
    crop = np.stack(
        [apply_normalization(ch[region], normalization_stats(ch, spec)) for ch in channels]
    )
    if squeeze is not None:
        crop = crop.squeeze(squeeze + 1)
    if turn is not None:
        crop = turn.apply(crop, lead=1)
    return torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None].to(device)


def _device_and_dtype(device, precision):
    from ..device import resolve_device, resolve_precision

    dev = resolve_device(device)
    return dev, resolve_precision(precision, dev)


def _unsqueeze(a: np.ndarray, squeeze: int | None) -> np.ndarray:
    return a if squeeze is None else np.expand_dims(a, squeeze + 1)


def _stored(a: np.ndarray, turn, lead: int = 1) -> np.ndarray:
    """A map in the model's orientation back in the image's stored order."""
    return a if turn is None else np.ascontiguousarray(turn.undo(a, lead=lead))


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
    bundle, image, region=None, spacing=None, device="cpu", precision="fp32", affine=None
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
        affine: the image's voxel-to-world matrix: the region is brought to the model's
            orientation (its card's) and the maps back to the image's order.
    """
    import torch

    from ..device import autocast

    image, region, shape, squeeze, notes, turn = _prepare(bundle, image, region, spacing, affine)
    device, dtype = _device_and_dtype(device, precision)
    key = ("features", _model_key(bundle), _image_key(image), _region_key(region), dtype)
    key += (turn, tuple(notes))  # the notes (spacing) travel with the cached result

    def compute() -> FeatureSet:
        net = bundle.network.to(device).eval()
        x = _input_tensor(bundle, image, region, squeeze, device, turn)
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
                k: _stored(_unsqueeze(v[0].float().cpu().numpy(), squeeze), turn)
                for k, v in feats.items()
            },
            logits=_stored(_unsqueeze(logits[0].float().cpu().numpy(), squeeze), turn),
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
    affine=None,
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

    from ..device import autocast
    from ..models.layers import pad_to_multiple

    image, region, shape, squeeze, notes, turn = _prepare(bundle, image, region, spacing, affine)
    net = bundle.network
    k = bundle.card.num_classes
    if class_index is not None and not 0 <= int(class_index) < k:
        raise InspectError(f"class {class_index} does not exist; the model has {k} classes")
    device, dtype = _device_and_dtype(device, precision)
    names = tuple(blocks) if blocks is not None else tuple(f.name for f in net.feature_info)
    key = ("cam", _model_key(bundle), _image_key(image), _region_key(region), dtype)
    key += (class_index, names, turn, tuple(notes))

    def compute() -> CamSet:
        net.to(device).eval()
        x = _input_tensor(bundle, image, region, squeeze, device, turn)
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
            cam = _unsqueeze(cam.cpu().numpy()[None], squeeze)[0].astype(np.float32)
            maps[name] = _stored(cam, turn, lead=0)
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
