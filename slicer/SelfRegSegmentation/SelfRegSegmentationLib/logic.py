"""What the SelfReg Segmentation module does, on MRML nodes and without Qt.

The class :class:`SelfRegSegmentationLogic` turns Slicer nodes into napari-selfreg's
arrays and back:

* :meth:`~SelfRegSegmentationLogic.segment`: a scalar volume node -> a segmentation
  node with one segment per foreground class of the model, in the volume's geometry;
* :meth:`~SelfRegSegmentationLogic.inspect`: block feature maps and Grad-CAM as scalar
  volume nodes aligned with the volume, and the redundancy statistics as a table node;
* :meth:`~SelfRegSegmentationLogic.finetune`: the segments as edited in Segment Editor
  -> corrected labels (or scribbles) -> a NEW model version.

The long jobs have generator forms (``iter_segment``, ``iter_inspect``,
``iter_finetune``) that yield napari-selfreg's ``jobs.Progress`` events and return
their result; :func:`run_job` drives one with a progress callback and a cancel check
(closing the generator cancels it, and a cancelled job adds no node). napari-selfreg
is imported on first use, so the module loads in Slicer before it is installed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import nodes

BACKGROUND = "background"
MODEL_ATTRIBUTE = "SelfReg.model"

# What the module installs into Slicer's Python on first use: torch (through SlicerPyTorch
# when it is there), napari-selfreg without its napari / Qt dependencies, and the
# libraries the segment / inspect / fine-tune code paths import.
PACKAGE = "napari-selfreg"
TORCH_REQUIREMENT = ">=2.2,<3"
RUNTIME_REQUIREMENTS = ("safetensors>=0.4", "nibabel>=5.0", "scipy>=1.10")
_IMPORT_NAMES = {"napari-selfreg": "napari_selfreg", "torch": "torch", "safetensors": "safetensors",
                 "nibabel": "nibabel", "scipy": "scipy"}  # fmt: skip


def missing_packages() -> list[str]:
    """The distributions (of torch, napari-selfreg and :data:`RUNTIME_REQUIREMENTS`) that
    cannot be imported here."""
    import importlib.util

    return [dist for dist, module in _IMPORT_NAMES.items() if importlib.util.find_spec(module) is None]  # fmt: skip


def describe(event) -> tuple[int, int, str]:
    """``(done, total, text)`` of a progress event, for a progress bar and its label."""
    done, total = int(getattr(event, "done", 0) or 0), int(getattr(event, "total", 0) or 0)
    stage, message = str(getattr(event, "stage", "")), str(getattr(event, "message", ""))
    losses = getattr(event, "losses", None)
    if not message and losses and "total" in losses:
        message = f"loss {losses['total']:.3f}"
    counter = f" {done}/{total}" if total else ""
    return done, total, f"{stage}{counter}" + (f": {message}" if message else "")


@dataclass
class Inspection:
    """Nodes made by :meth:`SelfRegSegmentationLogic.inspect`.

    Attributes:
        block: the block whose maps were made.
        features: scalar volume nodes of the block's top channels (highest energy first).
        channels: the channel index of each feature node.
        cam: the block's Grad-CAM (region grid, values in [0, 1]), or None.
        table: redundancy statistics, one row per block.
        origin: region start in IJK voxels; ``reduction``: the block's per-axis factor.
    """

    block: str
    features: list = field(default_factory=list)
    channels: list[int] = field(default_factory=list)
    cam: Any = None
    table: Any = None
    origin: tuple[int, ...] = ()
    reduction: tuple[int, ...] = ()
    notes: list[str] = field(default_factory=list)


def run_job(
    job: Generator,
    on_progress: Callable[[Any], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
):
    """Run a generator job to its end; returns its result, or None when ``cancelled()``
    became true (the job is closed at that step and cleans up after itself)."""
    while True:
        try:
            event = next(job)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(event)
        if cancelled is not None and cancelled():
            job.close()
            return None


def default_block(blocks: Sequence[str]) -> str:
    """The block shown first: the first encoder block (anatomy at first look)."""
    blocks = list(blocks)
    return next((b for b in blocks if b.startswith("enc")), blocks[min(1, len(blocks) - 1)])


def device_summary() -> tuple[str, str]:
    """One line on the device napari-selfreg will use, and the full report (tooltip)."""
    from napari_selfreg.device import device_report

    report = device_report()
    lines = report.splitlines()
    auto = next((ln for ln in lines if ln.startswith("auto choice")), lines[-1])
    cuda = next((ln for ln in lines if ln.startswith("CUDA")), "")
    return (f"{auto}; {cuda}" if cuda else auto), report


def model_choices() -> list[tuple[str, str]]:
    """``(label, folder)`` of the bundled and user models, for a picker."""
    from napari_selfreg.modelfile import list_models

    out = []
    for name, folder, card in list_models():
        classes = ", ".join(card.class_names[1:])
        out.append((f"{name} ({card.architecture}: {classes})", str(folder)))
    return out


class SelfRegSegmentationLogic:
    """Segment, inspect and fine-tune on MRML nodes with napari-selfreg models.

    Args:
        scene: the MRML scene new nodes go to; default: the input volume's scene.
    """

    def __init__(self, scene=None):
        self.scene = scene
        self._bundles: dict[str, Any] = {}

    # ------------------------------------------------------------------ helpers
    def load_bundle(self, model=None):
        """A loaded model (``ModelBundle``) from a bundle, folder, name or None (the
        bundled default); loaded once per folder."""
        from napari_selfreg.modelfile import ModelBundle, load_model, resolve_model_path

        if isinstance(model, ModelBundle):
            return model
        key = str(resolve_model_path(model))
        if key not in self._bundles:
            self._bundles[key] = load_model(key)
        return self._bundles[key]

    def _scene(self, node):
        scene = node.GetScene() if node is not None else None
        scene = scene or self.scene
        if scene is None:
            raise ValueError("the node is in no MRML scene; add it to a scene first")
        return scene

    @staticmethod
    def image_and_affine(volume_node) -> tuple[np.ndarray, np.ndarray]:
        """The volume as napari-selfreg sees it: ``(i, j, k)`` array and IJK-to-RAS affine
        in the scene (parent transforms applied: they say where the anatomy points). New
        nodes go under the volume's transform, so they are placed with the local matrix."""
        return nodes.volume_array(volume_node), nodes.ijk_to_world(volume_node)

    # ------------------------------------------------------------------ segment
    def iter_segment(self, volume_node, model=None, name: str | None = None, **options):
        """Generator form of :meth:`segment`: yields ``Progress``, returns the node."""
        from napari_selfreg.inference import Predictor

        scene = self._scene(volume_node)
        image, affine = self.image_and_affine(volume_node)
        bundle = self.load_bundle(model)
        predictor = Predictor(bundle, **options)
        result = yield from predictor.iter_segment(image, affine=affine)
        labels = np.asarray(result.labels)
        card = bundle.card
        names = list(card.class_names)
        colors = list(card.class_colors)
        node = nodes.new_segmentation(
            scene, name or f"{volume_node.GetName()} {card.name}", volume_node
        )
        local = nodes.ijk_to_ras(volume_node)  # the node sits under the volume's transform
        nodes.add_class_segments(node, labels, local, names, colors, range(1, len(names)))
        node.SetAttribute(MODEL_ATTRIBUTE, str(bundle.path or card.name))
        return node

    def segment(self, volume_node, model=None, name: str | None = None, **options):
        """Segment a scalar volume node; returns a new ``vtkMRMLSegmentationNode``.

        Args:
            volume_node: the volume, any orientation (oblique too): its voxels and
                IJK-to-RAS matrix go to the predictor, which reorients to the model's
                orientation itself and returns labels in the volume's order.
            model: model folder, name, ``ModelBundle`` or None (bundled default).
            name: the new node's name (default: volume and model names).
            **options: :class:`napari_selfreg.inference.Predictor` options (``tile``,
                ``overlap``, ``device``, ``precision``...).

        The node has one segment per foreground class of the model card (named and
        coloured from it, empty ones included) and the volume's geometry.
        """
        return run_job(self.iter_segment(volume_node, model, name, **options))

    # ------------------------------------------------------------------ inspect
    def iter_inspect(
        self,
        volume_node,
        model=None,
        block: str | None = None,
        region=None,
        top_k: int = 4,
        cam_class: int | None = None,
        cam: bool = True,
        device: str = "cpu",
        precision: str = "fp32",
    ):
        """Generator form of :meth:`inspect`: yields ``Progress``, returns an :class:`Inspection`."""
        from napari_selfreg.analysis import extract_features, grad_cam, redundancy_stats
        from napari_selfreg.analysis.statistics import top_channels
        from napari_selfreg.jobs import Progress

        scene = self._scene(volume_node)
        image, affine = self.image_and_affine(volume_node)
        bundle = self.load_bundle(model)
        total = 3 + int(cam)
        yield Progress(0, total, "features", f"{bundle.card.name}: features")
        fs = extract_features(bundle, image, region, None, device, precision, affine)
        block = block or default_block(list(fs.features))
        if block not in fs.features:
            raise ValueError(f"model {bundle.card.name!r} has no block {block!r}: {list(fs.features)}")  # fmt: skip
        yield Progress(1, total, "statistics", "redundancy statistics of every block")
        stats = redundancy_stats(fs)
        cams = None
        if cam:
            yield Progress(2, total, "grad-cam", f"Grad-CAM of {block}")
            cams = grad_cam(
                bundle, image, cam_class, [block], region, None, device, precision, affine
            )
        yield Progress(total - 1, total, "finish", "making the nodes")
        base = f"{volume_node.GetName()} {bundle.card.name}"
        reduction = tuple(int(r) for r in fs.reductions[block])
        result = Inspection(block, origin=tuple(fs.origin), reduction=reduction, notes=list(fs.notes))  # fmt: skip
        feature = fs.features[block]
        local = nodes.ijk_to_ras(volume_node)  # new volumes go under the volume's transform
        matrix = nodes.block_matrix(local, fs.origin, reduction)
        for c in top_channels(feature, top_k):
            result.channels.append(int(c))
            result.features.append(
                nodes.add_scalar_volume(
                    scene, f"{base} {block} channel {int(c)}", feature[int(c)], matrix, volume_node
                )
            )
        if cams is not None:
            cam_matrix = nodes.block_matrix(local, cams.origin, 1)
            result.cam = nodes.add_scalar_volume(
                scene, f"{base} {block} Grad-CAM", cams.maps[block], cam_matrix, volume_node
            )
            result.notes += [n for n in cams.notes if n not in result.notes]
        result.table = nodes.add_table(scene, f"{base} redundancy", stats_columns(stats, fs.reductions))  # fmt: skip
        yield Progress(total, total, "finish", "done")
        return result

    def inspect(self, volume_node, model=None, block: str | None = None, region=None, **options):
        """Feature maps, Grad-CAM and redundancy statistics of a model on a volume region.

        Args:
            volume_node: the scalar volume.
            model: model folder, name, ``ModelBundle`` or None (bundled default).
            block: the block whose maps become nodes (default: the first encoder block).
            region: IJK voxels to look at, as slices or a ``[start, stop]`` box in (i, j,
                k) order; default a centred box of the model's patch size.
            **options: ``top_k`` channels (4), ``cam_class`` (None: all foreground
                classes), ``cam`` (True), ``device`` ("cpu"), ``precision`` ("fp32").

        Returns:
            An :class:`Inspection`: scalar volume nodes whose voxels sit at the centre
            of the image voxels they cover, and a ``vtkMRMLTableNode`` (one row per block).
        """
        return run_job(self.iter_inspect(volume_node, model, block, region, **options))

    # ------------------------------------------------------------------ fine-tune
    def corrected_labels(
        self, volume_node, segmentation_node, class_names: Sequence[str], scribbles=False
    ) -> tuple[np.ndarray, list[str]]:
        """The segments as labels in the volume's grid, ``(i, j, k)`` order.

        A segment's value is the index of the class of the same name (exact, else
        ignoring case); segments of other names become new classes after the model's
        (returned in order). ``scribbles``: unpainted voxels are 0 and a segment named
        "background" is 255 (napari-selfreg's scribble background); otherwise voxels in
        no segment (and the "background" segment) are background, 0.
        """
        from napari_selfreg.training.config import SCRIBBLE_BACKGROUND

        known = list(class_names)
        folded = {n.strip().casefold(): i for i, n in reversed(list(enumerate(known)))}
        new: list[str] = []
        order: list[tuple[int, str, int]] = []  # (rank, segment id, value)
        for segment_id, name in nodes.segment_list(segmentation_node):
            if name in known:
                value = known.index(name)
            elif name.strip().casefold() in folded:
                value = folded[name.strip().casefold()]
            elif name.strip().casefold() == BACKGROUND:
                value = 0
            else:  # "lesion" and "Lesion " are one new class, named as first met
                folded_new = [n.strip().casefold() for n in new]
                if name.strip().casefold() not in folded_new:
                    new.append(name.strip())
                    folded_new.append(name.strip().casefold())
                value = len(known) + folded_new.index(name.strip().casefold())
            if value == 0:
                value = SCRIBBLE_BACKGROUND if scribbles else 0
                order.append((0, segment_id, value))  # background first: classes win overlaps
            else:
                order.append((1, segment_id, value))
        order.sort(key=lambda item: item[0])
        exported = nodes.export_segments(segmentation_node, [s for _, s, _ in order], volume_node)
        lut = np.array([0] + [v for _, _, v in order], dtype=np.int64)
        labels = lut[exported.astype(np.int64)]
        dtype = np.uint8 if lut.max() < 256 else np.uint16
        return np.asfortranarray(labels.astype(dtype)), new

    def iter_finetune(
        self,
        volume_node,
        segmentation_node,
        model=None,
        out=None,
        scribbles: bool = False,
        changed_mask=None,
        **config,
    ):
        """Generator form of :meth:`finetune`: yields progress events, returns the folder."""
        from napari_selfreg.training.config import FinetuneConfig
        from napari_selfreg.training.finetune import iter_finetune

        if model is None and segmentation_node is not None:
            model = segmentation_node.GetAttribute(MODEL_ATTRIBUTE) or None
        bundle = self.load_bundle(model)
        image, affine = self.image_and_affine(volume_node)
        labels, new = self.corrected_labels(
            volume_node, segmentation_node, bundle.card.class_names, scribbles
        )
        if new:
            config.setdefault("extend_classes", True)
            config.setdefault("new_class_names", new)
        cfg = FinetuneConfig(**{**config, "sparse": bool(scribbles)})
        if changed_mask is not None:
            changed_mask = np.asarray(changed_mask, dtype=bool)
        path = yield from iter_finetune(
            bundle, image, labels, changed_mask=changed_mask, config=cfg, out=out, affine=affine
        )
        return Path(path)

    def finetune(
        self,
        volume_node,
        segmentation_node,
        model=None,
        out=None,
        scribbles: bool = False,
        **config,
    ) -> Path:
        """Fine-tune a model on the segments as edited in Segment Editor.

        Args:
            volume_node: the scalar volume the segments belong to.
            segmentation_node: the corrected segmentation (segments named as the model's
                classes; other names become new classes), or scribbles.
            model: the base model (default: the one that made ``segmentation_node``,
                else the bundled default).
            out: the new model folder (default ``<user models>/<base>-ft``); an existing
                folder is never overwritten: ``-v2``, ``-v3``... are used instead.
            scribbles: the segments are scribbles: only painted voxels are known, and a
                segment named "background" marks background.
            **config: :class:`napari_selfreg.training.config.FinetuneConfig` fields
                (``iterations``, ``seconds_budget``, ``precision``, ``device``...) and
                ``changed_mask`` (bool ``(i, j, k)``; default: against the prediction).

        Returns:
            The folder of the new model version (its card names the base as parent).
        """
        return run_job(
            self.iter_finetune(volume_node, segmentation_node, model, out, scribbles, **config)
        )


def stats_columns(stats: dict, reductions: dict) -> dict[str, list]:
    """Table columns of per-block ``BlockStats``: the block, its reduction and every
    scalar field (``channels``, ``mean_abs_cos``, ``ifd``, ``scr``, ``effective_rank``)."""
    columns: dict[str, list] = {"block": list(stats)}
    columns["reduction"] = [int(max(reductions.get(b, (1,)))) for b in stats]
    for values in stats.values():
        for key, value in dataclasses.asdict(values).items():
            if np.ndim(value) == 0:
                columns.setdefault(key, []).append(
                    int(value) if isinstance(value, (int, np.integer)) else float(value)
                )
    return {k: v for k, v in columns.items() if len(v) == len(stats)}
