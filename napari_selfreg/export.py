"""Export a model to bioimage.io (:func:`export_bioimageio`: a spec 0.5 zip with state-dict
and TorchScript weights, test tensors, cover and README from the model card) and to MONAI
(:func:`export_monai_bundle`: a bundle folder with metadata, an inference config, ``model.pt``
and ``model.ts``). See docs/exports.md. Outputs are written under a temporary name beside the
target and renamed into place; an existing output is replaced only with ``overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

AUTHORS = "the napari-selfreg developers"
LICENSE = "BSD-3-Clause"
REFERENCES = (  # (text, doi, url)
    ("Zhu W. et al. SelfReg-UNet: Self-Regularized UNet for Medical Image Segmentation. "
     "MICCAI 2024.", "10.1007/978-3-031-72111-3_56", "https://arxiv.org/abs/2406.14896"),
    ("Wang N. et al. MISSU: 3D Medical Image Segmentation via Self-distilling TransUNet. "
     "IEEE Transactions on Medical Imaging, 2023.", None, "https://arxiv.org/abs/2206.00902"),
)  # fmt: skip
AXES = ("z", "y", "x")


class PadToMultiple(nn.Module):
    """TorchScript-able wrapper: pads the spatial axes at their end (replicate) to a multiple
    of ``divisor``, runs ``core`` (the network traced at such a size) and crops back."""

    def __init__(self, core: nn.Module, divisor: int, spatial_dims: int, in_channels: int, num_classes: int):  # fmt: skip
        super().__init__()
        self.core = core
        self.divisor, self.spatial_dims = int(divisor), int(spatial_dims)
        self.in_channels, self.num_classes = int(in_channels), int(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes: list[int] = []
        pads: list[int] = []
        for i in range(2, x.dim()):
            sizes.append(x.shape[i])
            pads = [0, (self.divisor - x.shape[i] % self.divisor) % self.divisor] + pads
        if sum(pads) > 0:
            x = F.pad(x, pads, mode="replicate")
        y = self.core(x)
        for i in range(len(sizes)):
            y = y.narrow(i + 2, 0, sizes[i])
        return y


def _load(model) -> tuple[Any, nn.Module]:
    """Card and inference network (eval, float32) of a ``ModelBundle``, a model name or folder."""
    from .modelfile import ModelBundle, load_model
    from .models import deploy

    bundle = model if isinstance(model, ModelBundle) else load_model(model)
    return bundle.card, deploy(bundle.network).float().eval()


def _divisor(net: nn.Module) -> int:
    return int(getattr(net, "divisor", 16))


def _patch(card, net: nn.Module) -> list[int]:
    """The card's patch (64 per axis without one), rounded up to multiples of the divisor."""
    nd, d = int(getattr(net, "spatial_dims", 3)), _divisor(net)
    return [max(d, -(-int(s) // d) * d) for s in list(card.patch_size or [64] * nd)[-nd:]]


def is_brain_model(card) -> bool:
    """Whether the card describes brain MRI (its test data then come from MNI152)."""
    text = f"{card.name} {card.description}".lower()
    return "brain" in text or any("matter" in c.lower() for c in card.class_names)


def example_patch(card, net: nn.Module, image: np.ndarray | None = None) -> np.ndarray:
    """A normalised test patch ``(C, *patch)`` float32 from the centre of ``image`` (normalised
    as a whole first, as the predictor does; default: MNI152 for brain models, else a phantom)."""
    from .data import load_mni152, make_phantom
    from .preprocess import normalize

    patch, nc = _patch(card, net), card.in_channels
    if image is None and is_brain_model(card) and len(patch) == 3:
        image = load_mni152()[0]
    elif image is None:
        image = make_phantom([max(s, 8) for s in patch], num_classes=3, seed=0)[0]
    image = np.asarray(image, dtype=np.float32)
    channels = list(image) if image.ndim == len(patch) + 1 else [image] * nc
    out = []
    for ch in channels[:nc]:
        ch = normalize(ch, card.normalization)
        ch = np.pad(ch, [(0, max(0, p - s)) for p, s in zip(patch, ch.shape, strict=True)], mode="edge")  # fmt: skip
        start = [(s - p) // 2 for s, p in zip(ch.shape, patch, strict=True)]
        out.append(ch[tuple(slice(a, a + p) for a, p in zip(start, patch, strict=True))])
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


def torchscript(net: nn.Module, patch: list[int]) -> tuple[torch.jit.ScriptModule, bool]:
    """TorchScript of ``net`` (traced at ``patch``, multiples of its divisor, where its own
    padding does nothing; wrapped in :class:`PadToMultiple`) and whether it takes any size
    (checked against the network at a size that is no multiple; else ``patch`` only)."""
    d, nc = _divisor(net), int(getattr(net, "in_channels", 1))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, nc, *patch, generator=gen)
    other = torch.randn(1, nc, patch[0] + d + (d > 1), *patch[1:], generator=gen)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the shape checks
        core = torch.jit.trace(net, x, check_trace=False)
        k = int(getattr(net, "num_classes", 0)) or int(net(x).shape[1])
        script = torch.jit.script(PadToMultiple(core, d, len(patch), nc, k))
        if not torch.allclose(script(x), net(x), rtol=1e-4, atol=1e-4):
            raise ValueError("the TorchScript copy of this network does not reproduce it")
        try:
            generic = bool(torch.allclose(script(other), net(other), rtol=1e-4, atol=1e-4))
        except RuntimeError:
            generic = False
    return script, generic


def normalize_channels(image, spec: dict):
    """The card's normalisation of a channels-first image (numpy, torch or MONAI MetaTensor;
    type and metadata are kept). MONAI bundles call it through ``Lambdad``."""
    from .preprocess import normalize

    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    result = np.stack([normalize(ch, spec) for ch in array]).astype(np.float32)
    if not isinstance(image, torch.Tensor):
        return result
    out = image.to(torch.float32).clone()
    out.copy_(torch.from_numpy(result))
    return out


def _png(path: Path, rgb: np.ndarray) -> None:
    """Write an ``(H, W, 3)`` uint8 image as PNG (zlib only)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # fmt: skip

    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))
    head = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def cover_image(image: np.ndarray, labels: np.ndarray, colors: list[str]) -> np.ndarray:
    """A 2:1 RGB cover: the middle slice along the last axis (axial in RAS) and the same slice
    with the labels overlaid in the card's colours; at least 256 pixels high."""
    if image.ndim == 3:
        image, labels = image[:, :, image.shape[2] // 2], labels[:, :, labels.shape[2] // 2]
    image, labels = np.flipud(image.T), np.flipud(labels.T)  # second axis (anterior) up
    lo, hi = np.percentile(image, [1, 99])
    grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)[..., None].repeat(3, axis=-1)
    palette = np.array([[int(c[i : i + 2], 16) / 255 for i in (1, 3, 5)] for c in colors])
    over, fg = grey.copy(), labels > 0
    over[fg] = 0.45 * grey[fg] + 0.55 * palette[labels[fg]]
    both = np.concatenate([grey, over], axis=1)
    scale = max(1, -(-256 // both.shape[0]))
    return (both.repeat(scale, axis=0).repeat(scale, axis=1) * 255).round().astype(np.uint8)


def normalization_text(spec: dict) -> str:
    """The card's normalisation spec in words."""
    method = spec.get("method", "zscore")
    if method == "zscore":
        fg = spec.get("foreground", "nonzero")
        where = {"otsu": "voxels above the Otsu threshold", "nonzero": "non-zero voxels"}.get(fg, "voxels")  # fmt: skip
        return f"z-score with the mean and standard deviation of the {where} of the whole volume"  # fmt: skip
    if method == "ct_window":
        return f"CT window: clip to [{spec.get('low')}, {spec.get('high')}] HU, scale to [-1, 1] (or z-score with the spec's mean and std)"  # fmt: skip
    if method == "percentile":
        return f"clip to the {spec.get('low', 0.5)}-{spec.get('high', 99.5)} percentiles of the foreground, then z-score"  # fmt: skip
    return "none (raw intensities)"


def training_text(card) -> tuple[str, str]:
    """The card's training data and split (``card.training``), as two lines of text."""
    data, split = card.training.get("data") or {}, card.training.get("split") or {}
    names = ", ".join(map(str, data.get("names", []))) or "not recorded in the model card"

    def part(s) -> str:
        if not isinstance(s, dict):
            return str(s)
        return f"{s.get('case')} (axis {s.get('axis')}, slices {s.get('start')}-{s.get('stop')})"

    parts = [f"{k}: " + ", ".join(map(part, v)) for k, v in split.items() if isinstance(v, list)]
    return names, "; ".join(parts) or "not recorded in the model card"


def readme(card, net: nn.Module, fmt: str) -> str:
    """Markdown documentation from the model card (``fmt``: ``bioimageio`` or ``monai``)."""
    data, split = training_text(card)
    pairs = enumerate(zip(card.class_names, card.class_colors, strict=True))
    dice = card.metrics.get("dice") or card.metrics.get("patch_dice") or {}
    scores = [f"- Dice {k}: {v:.3f}" for k, v in dice.items() if isinstance(v, (int, float))]
    route = {
        "bioimageio": "Run it with `bioimageio predict`, in bioimage.io consumers that take 3D PyTorch models, or with napari-selfreg (`napari-selfreg segment`).",
        "monai": "This bundle is the route to 3D Slicer: put this folder into the `model/` folder of MONAI Label's `monaibundle` app, start `monailabel start_server --app monaibundle --studies DATA --conf models FOLDER_NAME` and segment from Slicer's MONAI Label module; or run it with MONAI: `python -m monai.bundle run --config_file configs/inference.json --bundle_root . --dataset_dir IN --output_dir OUT`. It needs napari-selfreg installed (network and normalisation).",
    }[fmt]  # fmt: skip
    lines = [
        f"# {card.name}", "", card.description or "A napari-selfreg segmentation model.", "",
        f"`{card.architecture}` ({sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters), {card.in_channels} input channel(s), {card.num_classes} classes; exported from napari-selfreg (SelfReg-UNet / MISSU training). {route}",
        "", "## Classes", "", "| label | class | colour |", "|---|---|---|", *(f"| {i} | {n} | `{c}` |" for i, (n, c) in pairs),
        "", "## Input", "",
        f"- Normalisation, to be applied **before** the network: {normalization_text(card.normalization)} (napari-selfreg spec `{json.dumps(card.normalization)}`, `napari_selfreg.preprocess.normalize`).",
        f"- Voxel spacing {card.spacing or 'any'} mm; array axes in {card.orientation or 'stored'} order.",
        f"- Spatial sizes: multiples of {_divisor(net)}; sliding windows of {_patch(card, net)} voxels.",
        "", "## Training", "", f"- Data: {data}", f"- Split: {split}",
        "", "## Validation", "", *(scores or ["No validation metrics are recorded in the model card."]),
        "", "## Limits", "",
        f"{card.description or 'See the model card.'} Anatomy, contrasts, resolutions or pathology unlike the training data are outside what was validated; a research tool, not for clinical use.",
        "", "## Cite", "", *(f"- {text}" for text, _, _ in REFERENCES), "", f"Licence: {LICENSE}.", "",
    ]  # fmt: skip
    return "\n".join(lines)


def _target(path, overwrite: bool, kind: str) -> Path:
    """Check that ``path`` may be written; clear temporaries left by dead processes."""
    from .files import clear_stale

    path = Path(path).expanduser()
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"output {path} exists; pass --overwrite to replace it")
        if kind == "zip" and not _is_model_package(path):
            raise FileExistsError(f"output {path} is not a bioimage.io model package; it is not replaced")  # fmt: skip
        if kind == "bundle" and not (path / "configs" / "metadata.json").is_file():
            raise FileExistsError(f"output {path} is not a MONAI bundle; it is not replaced")
    if kind == "bundle" and path.suffix.lower() in (".zip", ".gz", ".tar"):
        raise ValueError(f"a MONAI bundle is written as a folder, not {path.name}; give a folder name")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(path.parent)
    return path


def _is_model_package(path: Path) -> bool:
    """A zip file holding an ``rdf.yaml`` (what ``--overwrite`` may replace)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return "rdf.yaml" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _stage(path: Path) -> Path:
    from .files import temporary_path

    (stage := temporary_path(path, "export", keep_suffix=False)).mkdir()
    return stage


def _check_architecture(card, net: nn.Module) -> dict[str, Any]:
    """``callable``, ``import_from`` and ``kwargs`` rebuilding ``net`` from its card (its state
    dict is loaded strictly into a fresh build to prove it)."""
    from . import models

    try:
        models.build(card.architecture, **card.options).load_state_dict(net.state_dict())
    except RuntimeError as err:
        raise ValueError(f"the network does not rebuild from its card: {err}") from err
    builder = models._REGISTRY[card.architecture]
    return {"callable": builder.__name__, "import_from": builder.__module__, "kwargs": _jsonable(card.options)}  # fmt: skip


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _identifier(name: str) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in name).strip("_") or "class"
    return out if out[0].isalpha() else f"c_{out}"


def _title(name: str) -> str:
    """A bioimage.io name: ASCII letters, digits and ``_+- ()``, 5 to 64 characters."""
    title = "".join(c if c.isascii() and (c.isalnum() or c in "_+- ()") else " " for c in name)
    title = " ".join(title.split())
    return (title if len(title) >= 5 else f"{title} napari-selfreg model".strip())[:64]


def _short(text: str, limit: int = 512) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rsplit(" ", 1)[0] + "..."


def export_bioimageio(model, out_zip, *, overwrite: bool = False, image=None) -> Path:
    """Write a bioimage.io model package (spec 0.5) of ``model`` (a ``ModelBundle``, model
    name or folder; None: the default) to ``out_zip``; returns its path. ``image``: the volume
    the test patch is cut from (:func:`example_patch`).

    Raises:
        ValueError: unknown model, not a ``.zip`` name, a network TorchScript cannot copy.
        FileExistsError: ``out_zip`` exists and ``overwrite`` is False (or it is no file).
    """
    try:
        import bioimageio.spec.model.v0_5 as bio
        from bioimageio.spec import save_bioimageio_package
    except ImportError as err:
        raise ValueError("the bioimage.io export needs the bioimageio.spec package: pip install 'napari-selfreg[export]'") from err  # fmt: skip
    import tifffile

    from . import __version__
    from .files import publish

    if Path(out_zip).suffix.lower() != ".zip":
        raise ValueError(f"a bioimage.io package is a .zip file, not {Path(out_zip).name}")
    card, net = _load(model)
    target = _target(out_zip, overwrite, "zip")
    patch, d = _patch(card, net), _divisor(net)
    script, generic = torchscript(net, patch)
    architecture = _check_architecture(card, net)
    x = example_patch(card, net, image)
    with torch.no_grad():
        y = net(torch.from_numpy(x)[None]).numpy().astype(np.float32)
    norm, (data, split) = normalization_text(card.normalization), training_text(card)
    stage = _stage(target)
    try:
        np.save(stage / "test_input.npy", x[None])
        np.save(stage / "test_output.npy", y)
        tifffile.imwrite(stage / "sample_input.tif", x[0] if x.shape[0] == 1 else x)
        tifffile.imwrite(stage / "sample_output.tif", y[0])
        torch.save(net.state_dict(), stage / "weights.pt")
        script.save(str(stage / "weights_torchscript.pt"))
        _png(stage / "cover.png", cover_image(x[0], y[0].argmax(0), card.class_colors))
        (stage / "README.md").write_text(readme(card, net, "bioimageio"))
        (stage / "environment.yaml").write_text(
            "name: napari-selfreg\nchannels:\n  - conda-forge\n  - nodefaults\ndependencies:\n"
            f"  - python>=3.10\n  - pip\n  - pip:\n    - napari-selfreg>={__version__}\n"
            f"    - torch>={torch.__version__.split('+')[0]}\n"
        )

        def file(name: str):
            return bio.FileDescr(source=stage / name)

        unit = "millimeter" if card.spacing else None
        size = [bio.ParameterizedSize(min=d, step=d) if generic else s for s in patch]
        axes_in = [bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier(f"channel{i}") for i in range(card.in_channels)])]  # fmt: skip
        axes_out = [bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier(_identifier(n)) for n in card.class_names])]  # fmt: skip
        for a, s in zip(AXES[-len(patch) :], size, strict=True):
            axes_in.append(bio.SpaceInputAxis(id=bio.AxisId(a), size=s, unit=unit))
            ref = bio.SizeReference(tensor_id=bio.TensorId("image"), axis_id=bio.AxisId(a))
            axes_out.append(bio.SpaceOutputAxis(id=bio.AxisId(a), size=ref, unit=unit))
        version = bio.Version(torch.__version__.split("+")[0])
        card_data = _jsonable({k: v for k, v in card.to_dict().items() if k != "training"})
        comment = f"traced at {patch}; pads to multiples of {d}" if generic else f"traced at {patch}: takes that size only"  # fmt: skip
        with bioimageio_pydantic_fix():  # bioimageio.spec 0.5.12 under pydantic >= 2.14
            descr = bio.ModelDescr(
                name=_title(card.name),
                description=_short(f"{card.description} Input: a {card.in_channels}-channel volume normalised beforehand ({norm}). Output: logits of {card.num_classes} classes."),
                authors=[bio.Author(name=AUTHORS)],
                cite=[bio.CiteEntry(text=t, doi=bio.Doi(doi) if doi else None, url=bio.HttpUrl(url)) for t, doi, url in REFERENCES],
                license=bio.LicenseId(LICENSE),
                documentation=file("README.md"),
                covers=[file("cover.png")],
                tags=["napari-selfreg", "segmentation", f"{len(patch)}d", card.architecture, "pytorch", "selfreg-unet", *(["brain", "mri"] if is_brain_model(card) else [])],
                inputs=[bio.InputTensorDescr(
                    id=bio.TensorId("image"), axes=axes_in, preprocessing=[],
                    description=_short(f"normalised beforehand: napari-selfreg spec {json.dumps(card.normalization)}; sizes multiples of {d}", 128),
                    test_tensor=file("test_input.npy"), sample_tensor=file("sample_input.tif"),
                    data=bio.IntervalOrRatioDataDescr(type="float32"))],
                outputs=[bio.OutputTensorDescr(
                    id=bio.TensorId("logits"), axes=axes_out, description="class logits (argmax: labels)",
                    test_tensor=file("test_output.npy"), sample_tensor=file("sample_output.tif"),
                    data=bio.IntervalOrRatioDataDescr(type="float32"))],
                weights=bio.WeightsDescr(
                    pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
                        source=stage / "weights.pt", architecture=bio.ArchitectureFromLibraryDescr(**architecture),
                        pytorch_version=version, dependencies=file("environment.yaml")),
                    torchscript=bio.TorchscriptWeightsDescr(
                        source=stage / "weights_torchscript.pt", pytorch_version=version,
                        parent="pytorch_state_dict", comment=comment)),
                config=bio.Config(
                    bioimageio=bio.BioimageioConfig(
                        architecture_type=card.architecture[:32], task="semantic segmentation",
                        target_structure=list(card.class_names[1:]), modality="MRI" if is_brain_model(card) else None,
                        model_parameter_count=sum(p.numel() for p in net.parameters()),
                        training=bio.TrainingDetails(training_preprocessing=norm, training_data=data, split=split,
                                                     config=_jsonable(card.training.get("config", {})))),
                    napari_selfreg=card_data),
            )  # fmt: skip
            save_bioimageio_package(descr, output_path=stage / "package.zip")
        publish(stage / "package.zip", target, overwrite=overwrite)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


@contextlib.contextmanager
def bioimageio_pydantic_fix():
    """Let bioimage.io's description classes serialise under pydantic >= 2.14: bioimageio.spec
    0.5.12 passes ``SerializationInfo`` as the index key of three wrap serializers' handler,
    which older pydantic ignored and 2.14 refuses (``TypeError``: no model can be packaged or
    tested). Within this context they call the handler with the value only."""
    import types

    import pydantic
    from bioimageio.spec._internal import io_packaging
    from bioimageio.spec._internal import validated_string_with_inner_node as inner
    from bioimageio.spec.model import v0_4

    if tuple(int(p) for p in pydantic.VERSION.split(".")[:2]) < (2, 14):
        yield
        return
    funcs = [io_packaging.package_file_descr_serializer, v0_4.package_weights,
             inner.ValidatedStringWithInnerNode._serialize]  # fmt: skip
    funcs = [f for f in (getattr(f, "__func__", f) for f in funcs)
             if f.__code__.co_argcount == 3 and not f.__kwdefaults__]  # fmt: skip
    saved = [(f, f.__code__, f.__kwdefaults__) for f in funcs]
    for f in funcs:
        original = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__)
        f.__code__ = _value_only_handler.__code__
        f.__kwdefaults__ = {"_original": original}
    try:
        yield
    finally:
        for f, code, kwdefaults in saved:
            f.__code__, f.__kwdefaults__ = code, kwdefaults


def _value_only_handler(value, handler, info, *, _original=None):
    return _original(value, lambda v, _key=None: handler(v), info)


# ----------------------------------------------------------------------------- MONAI


def monai_inference_config(card, net: nn.Module) -> dict[str, Any]:
    """``configs/inference.json``, run by ``monai.bundle`` (``ConfigWorkflow``, ``run``) without
    pytorch-ignite; MONAI Label reads its ``network_def``, ``preprocessing``, ``inferer`` and
    ``postprocessing``. The normalisation is napari-selfreg's own (``normalize_channels``)."""
    spatial = card.orientation or card.spacing
    nd = int(getattr(net, "spatial_dims", 3))
    window = {"_target_": "SlidingWindowInferer", "roi_size": _patch(card, net), "sw_batch_size": 4, "overlap": 0.25,
              "mode": "gaussian", "sigma_scale": 0.125, "padding_mode": "replicate"}  # fmt: skip
    pre = [
        {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        *([{"_target_": "Orientationd", "keys": "image", "axcodes": card.orientation}] if card.orientation else []),
        {"_target_": "Lambdad", "keys": "image", "func": "$lambda x: selfreg_export.normalize_channels(x, @normalization)"},
        *([{"_target_": "Spacingd", "keys": "image", "pixdim": list(card.spacing), "mode": "bilinear"}] if card.spacing else []),
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
    ]  # fmt: skip
    post = [
        *([{"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image", "nearest_interp": False, "to_tensor": True}] if spatial else []),
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        *({"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": list(group), "independent": False, "connectivity": 3}
          for group in card.keep_largest or []),  # the card's keep_largest, as our predictor does
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg", "output_ext": ".nii.gz",
         "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False, "print_log": False},
    ]  # fmt: skip
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch", "$import napari_selfreg.export as selfreg_export"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/data'",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "normalization": dict(card.normalization),
        "network_def": {"_target_": "napari_selfreg.models.build", "name": card.architecture, **card.options},
        "network": "$@network_def.to(@device).eval()",
        "network_ts": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device)",
        "load_weights": "$@network.load_state_dict(torch.load(@bundle_root + '/models/model.pt', map_location=@device, weights_only=True))",
        "preprocessing": {"_target_": "Compose", "transforms": pre},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False, "num_workers": 0},
        "image_inferer": window,  # an image of the network's own dimension
        # MONAI Label runs "inferer": a 2D network segments volumes slice by slice along
        # their first axis (in the card's orientation), as our predictor does
        "inferer": window if nd == 3 else {**window, "_target_": "SliceInferer", "spatial_dim": 0},
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "predict": "$torch.no_grad()(lambda image: (@inferer if image.ndim == 5 else @image_inferer)(image.to(@device), @network))",
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@load_weights",  # returns the segmented files
                "$[@postprocessing(item)['pred'].meta['filename_or_obj'] for batch in @dataloader for item in "
                "monai.data.decollate_batch({'image': batch['image'], 'pred': @predict(batch['image'])})]"],
    }  # fmt: skip


# merged over inference.json (a second --config_file), it runs models/model.ts instead
TORCHSCRIPT_CONFIG = {"network": "$@network_ts.eval()", "load_weights": "$None"}


def monai_metadata(card, net: nn.Module) -> dict[str, Any]:
    """``configs/metadata.json`` in MONAI's bundle metadata schema."""
    import importlib.metadata as md

    from . import __version__

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return ""

    patch, (data, split) = _patch(card, net), training_text(card)
    classes = {str(i): n for i, n in enumerate(card.class_names)}
    tensor = {"type": "image", "dtype": "float32", "value_range": [], "is_patch_data": True, "spatial_shape": patch}  # fmt: skip
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported from napari-selfreg {__version__} (model {card.name})"},
        "monai_version": version("monai") or "1.3.0",
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"napari-selfreg": __version__, "nibabel": version("nibabel")},
        "supported_apps": {},
        "name": card.name,
        "task": f"{len(patch)}D segmentation of {', '.join(card.class_names[1:])}",
        "description": card.description,
        "authors": AUTHORS,
        "copyright": f"Copyright (c) 2026, {AUTHORS}",
        "license": LICENSE,
        "data_source": f"{data}; split: {split}",
        "data_type": "nibabel",
        "image_classes": f"{card.in_channels} channel(s), normalised by the config: {normalization_text(card.normalization)}",
        "label_classes": ", ".join(f"{k}: {n}" for k, n in classes.items()),
        "pred_classes": ", ".join(f"{k}: {n}" for k, n in classes.items()),
        "eval_metrics": _jsonable(card.metrics.get("dice") or card.metrics),
        "intended_use": "research; not for clinical use",
        "references": [f"{t} {('https://doi.org/' + d) if d else u}" for t, d, u in REFERENCES],
        "network_data_format": {
            "inputs": {"image": {**tensor, "format": "magnitude", "modality": "MR" if is_brain_model(card) else "unknown",
                                 "num_channels": card.in_channels, "channel_def": {str(i): f"image {i}" for i in range(card.in_channels)}}},
            "outputs": {"pred": {**tensor, "format": "segmentation", "num_channels": card.num_classes, "channel_def": classes}},
        },
    }  # fmt: skip


def export_monai_bundle(model, out_dir, *, overwrite: bool = False) -> Path:
    """Write a MONAI bundle folder of ``model`` (a ``ModelBundle``, model name or folder; None:
    the default) to ``out_dir``; returns its path. ``overwrite`` replaces a bundle, never
    another folder.

    Raises:
        ValueError: unknown model, a network TorchScript cannot copy.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False (or it is no bundle).
    """
    from .files import temporary_path

    card, net = _load(model)
    target = _target(out_dir, overwrite, "bundle")
    script, _ = torchscript(net, _patch(card, net))
    _check_architecture(card, net)
    stage = _stage(target)
    try:
        for sub in ("configs", "models", "docs"):
            (stage / sub).mkdir()
        configs = {
            "metadata.json": monai_metadata(card, net),
            "inference.json": monai_inference_config(card, net),
            "inference_torchscript.json": TORCHSCRIPT_CONFIG,
        }
        for name, content in configs.items():
            (stage / "configs" / name).write_text(json.dumps(content, indent=2) + "\n")
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        torch.save(state, stage / "models" / "model.pt")
        script.save(str(stage / "models" / "model.ts"))
        (stage / "docs" / "README.md").write_text(readme(card, net, "monai"))
        (stage / "LICENSE").write_text(_license_text())
        if not target.exists():
            os.rename(stage, target)  # fails if a non-empty folder appeared meanwhile
            return target
        _target(target, overwrite, "bundle")  # again: a folder may have appeared meanwhile
        old = temporary_path(target, "old", keep_suffix=False)
        os.rename(target, old)
        try:
            os.rename(stage, target)
        except OSError:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def _license_text() -> str:
    """napari-selfreg's LICENSE: from the source tree, else from the installed metadata."""
    import importlib.metadata as md

    source = Path(__file__).resolve().parent.parent / "LICENSE"
    if source.is_file():
        return source.read_text()
    with contextlib.suppress(md.PackageNotFoundError):
        dist = md.distribution("napari-selfreg")
        if text := dist.read_text("licenses/LICENSE") or dist.read_text("LICENSE"):
            return text
    return f"{LICENSE} (https://spdx.org/licenses/{LICENSE}.html), {AUTHORS}\n"
