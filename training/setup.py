"""How a training run gets ready: the set-up steps of :class:`~napari_selfreg.training.loop.Trainer`.

Each step is a method of :class:`SetupMixin`, run in order by :meth:`SetupMixin.setup`:
resume (the checkpoint must match the settings), classes, split, network, optimiser,
sampling. :meth:`SetupMixin.check_run_folder` refuses to start over an interrupted
run unless told to.
"""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from napari_selfreg import models
from napari_selfreg.device import resolve_device, resolve_precision
from napari_selfreg.selfreg import SegmentationLoss, SelfRegLoss

from . import distributed
from .augment import Augmenter
from .checkpoint import STATE_FILE, read_checkpoint, recover
from .config import LabelError, TrainingError
from .datasets import PatchSampler, apply_split, make_split
from .evaluate import PatchValidation
from .grid import case_to_grid, data_grid

# settings a resumed run may change; any other change is refused (see _resume)
RESUMABLE_SETTINGS = {"arch_options", "iterations", "max_seconds", "val_every", "val_patches",
                      "volume_metrics", "keep", "patience", "num_threads", "device", "precision",
                      "description", "split"}  # fmt: skip


class _TrainStep(nn.Module):
    """What DDP wraps: logits, features and the model's own extra losses in one forward."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, target: torch.Tensor):
        logits, features = self.net.forward_features(x)
        extra = {}
        if hasattr(self.net, "training_losses"):
            extra = dict(self.net.training_losses(features, target))
        return logits, features, extra


def check_classes(
    labels: list[np.ndarray],
    num_classes: int,
    what: str = "the model",
    require_foreground: bool = True,
) -> None:
    """Raise :class:`LabelError` for label values >= ``num_classes`` or (when
    ``require_foreground``) no labelled voxel."""
    found = sorted({int(v) for lab in labels for v in np.unique(lab)})
    unknown = [v for v in found if v >= num_classes]
    if unknown:
        raise LabelError(
            f"labels contain value(s) {', '.join(map(str, unknown))} that {what} does not "
            f"know (it has {num_classes} classes, 0-{num_classes - 1}); remap them with a "
            "label map (e.g. --label-map 5:1) or add classes (extend_classes / --extend-classes)"
        )
    if require_foreground and all(v == 0 for v in found):
        raise LabelError(
            "the labels contain no labelled voxels (everything is 0 = background); "
            "label at least one structure"
        )


class SetupMixin:
    """Set-up methods of the trainer; they read and fill the trainer's attributes."""

    config: Any

    def setup(self) -> None:
        """Every step before the first iteration, in order."""
        cfg = self.config
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.dist, self.device = distributed.setup(resolve_device(cfg.device))
        self.amp = resolve_precision(cfg.precision, self.device)
        self.state: dict[str, Any] = {
            "iteration": 0, "seconds": 0.0, "best_score": -1.0, "best_iteration": None,
            "bad_validations": 0, "history": [],
        }  # fmt: skip
        resumed = self._resume() if self.resume else None
        self._setup_grid()
        self._setup_classes()
        self._setup_split()
        self._setup_network(resumed)
        self._setup_optimizer(resumed)
        self._setup_sampling()

    def check_run_folder(self, main: bool = True) -> None:
        """Refuse to start over a run that was interrupted, unless told to (``restart``).
        Only the main process (the lock holder) repairs or clears the folder: under
        torchrun the others must not touch a folder another run may hold."""
        last = self.ckpt / "last"
        for name in ("last", "best") if main else ():
            recover(self.ckpt / name)
        if self.resume or not (last / STATE_FILE).is_file():
            return
        if self.restart:
            for name in ("last", "best") if main else ():
                shutil.rmtree(self.ckpt / name, ignore_errors=True)
            return
        raise TrainingError(
            f"{self.ckpt} holds an interrupted run (iteration {self._checkpoint_iteration()}); "
            "pass --resume to continue it or --restart to start over"
        )

    def _resume(self):
        """The checkpoint to continue from: ``(bundle, optimizer state)``; it must match
        the settings (architecture and options)."""
        cfg = self.config
        bundle, state, optim_state = read_checkpoint(self.ckpt / "last")
        arch = self.base_card.architecture if self.base_card else cfg.arch
        if bundle.card.architecture != arch:
            raise TrainingError(
                f"the checkpoint in {self.ckpt} is a {bundle.card.architecture}, "
                f"not a {arch}; resume with the same --arch"
            )
        saved = {k: v for k, v in bundle.card.options.items() if k not in ("in_channels", "num_classes")}  # fmt: skip
        changed = {k: v for k, v in cfg.arch_options.items() if saved.get(k) != v}
        if self.base_card is None and changed:
            raise TrainingError(
                f"the run in {self.ckpt} was started with {saved}; resume with the same "
                f"architecture options (not {changed}) or pass --restart"
            )
        self._check_resumed_settings(bundle.card.training or {})
        self.state.update({k: v for k, v in state.items() if k in (*self.state, "best_dice")})
        self.split = state["split"]
        self.resumed_card = bundle.card
        self.parent = bundle.card.parent
        return bundle, optim_state

    def _check_resumed_settings(self, training: dict) -> None:
        """A resumed run keeps its settings (data, losses, optimiser, processes...): only
        the steps, the time budget, validation and the device may change."""
        import json

        saved = training.get("config") or {}
        now = json.loads(json.dumps(self.config.to_dict(), default=str))
        differ = [
            f"{key} {saved[key]!r} -> {value!r}"
            for key, value in now.items()
            if key in saved and key not in RESUMABLE_SETTINGS and saved[key] != value
        ]
        processes = training.get("processes")
        if processes and int(processes) != self.dist.world_size:
            differ.append(f"processes {processes} -> {self.dist.world_size}")
        if differ:
            raise TrainingError(
                f"the run in {self.ckpt} was started with other settings ({'; '.join(differ)}); "
                "resume it with the same ones (steps, time budget and device may change) "
                "or pass --restart"
            )

    def _setup_grid(self) -> None:
        """The orientation and spacing the model learns in (``training.grid``): the
        parent's or the resumed run's, the settings', else the data's; cases are brought
        there (a fine-tune's data is already in its parent's grid)."""
        cfg = self.config
        template = self.base_card or self.resumed_card
        if template is not None:
            self.grid = (template.orientation, template.spacing)
        elif cfg.orientation or cfg.spacing or self.patch_source is not None:
            self.grid = (cfg.orientation, cfg.spacing)
        else:
            self.grid = data_grid([c.affine for c in self.cases])
        if self.base_card is None and any(self.grid):
            self.cases = [case_to_grid(c, *self.grid) for c in self.cases]

    def _setup_classes(self) -> None:
        cfg = self.config
        template = self.base_card or self.resumed_card
        if template is not None:
            self.class_names = list(template.class_names)
        else:
            values = np.unique(np.concatenate([np.unique(c.labels) for c in self.cases]))
            k = cfg.num_classes or int(values.max()) + 1
            if cfg.num_classes is None and k > 16 and k > 2 * values.size:
                shown = ", ".join(str(int(v)) for v in values[:6])
                hint = ",".join(f"{int(v)}:{i}" for i, v in enumerate(values[1:6], start=1))
                raise LabelError(
                    f"the labels use the values {shown}{'...' if values.size > 6 else ''} but "
                    f"classes are numbered 0, 1, 2...: this would build a network with {k} "
                    f"outputs; remap them, e.g. --label-map {hint}"
                )
            names = list(cfg.class_names or [])
            if names and cfg.num_classes is None:  # named classes may be absent from the data
                k = max(k, len(names))
            if names and len(names) != k:
                raise LabelError(
                    f"{len(names)} class names ({', '.join(names)}) for {k} classes: the labels "
                    f"hold values up to {int(values.max())}; give one name per class, background first"
                )
            self.class_names = names or ["background"] + [f"class {i}" for i in range(1, k)]
        self.num_classes = len(self.class_names)
        check_classes([c.labels for c in self.cases], self.num_classes)

    def _setup_split(self) -> None:
        cfg = self.config
        if self.patch_source is not None:  # generated training data; the cases validate
            self.split = {"train": ["generated"], "val": sorted(c.name for c in self.cases)}
            self.train_cases, self.val_cases = [], list(self.cases)
        else:
            if not self.resume:
                self.split = cfg.split or make_split(self.cases, cfg.val_fraction, cfg.seed)
            self.train_cases, self.val_cases = apply_split(self.cases, self.split)
        if self.validation_cases is not None:
            self.val_cases = list(self.validation_cases)

    def _setup_network(self, resumed) -> None:
        cfg = self.config
        in_channels = int(self.cases[0].image.shape[0])
        if resumed is not None:
            net = resumed[0].network
        elif self.network is not None:
            net = self.network
        else:
            torch.manual_seed(cfg.seed)
            try:
                net = models.build(cfg.arch, in_channels, self.num_classes, **cfg.arch_options)
            except (TypeError, ValueError, AssertionError) as err:
                raise TrainingError(
                    f"cannot build {cfg.arch} with options {cfg.arch_options}: {err}"
                ) from err
        if net.in_channels != in_channels:
            raise TrainingError(
                f"the model takes {net.in_channels} image channel(s), the data has {in_channels}"
            )
        divisor = int(getattr(net, "divisor", 1))
        if min(cfg.patch_size) < divisor:
            raise TrainingError(
                f"the patch {list(cfg.patch_size)} is smaller than {divisor} voxels along an "
                f"axis; {cfg.arch} down-samples by {divisor}: choose --patch of at least {divisor}"
            )
        self.net = net.to(self.device).train()
        self.memory_format = None
        if cfg.channels_last and self.device.type in ("cpu", "cuda"):
            dims = getattr(net, "spatial_dims", 3)
            self.memory_format = torch.channels_last_3d if dims == 3 else torch.channels_last
            self.net = self.net.to(memory_format=self.memory_format)
        if self.configure is not None:
            self.configure(self.net)
        step = _TrainStep(self.net)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            step = nn.parallel.DistributedDataParallel(step, device_ids=ids)
        self.step_module = step

    def _setup_optimizer(self, resumed) -> None:
        cfg = self.config
        params = [p for p in self.net.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("every parameter is frozen; nothing to train")
        if cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(
                params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay
            )
        else:
            self.optimizer = torch.optim.SGD(
                params, lr=cfg.learning_rate, momentum=cfg.momentum, nesterov=True,
                weight_decay=cfg.weight_decay,
            )  # fmt: skip
        if resumed is not None and resumed[1] is not None:
            self.optimizer.load_state_dict(resumed[1])
        self.scaler = None
        if self.amp == torch.float16 and self.device.type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")

    def _setup_sampling(self) -> None:
        """Patches, augmentation, losses and validation; the randomness is per rank, and
        fresh but reproducible after a resume."""
        cfg = self.config
        seed = [cfg.seed, self.dist.rank, int(self.state["iteration"])]
        self.rng = np.random.default_rng(seed)
        tgen = torch.Generator().manual_seed(int(np.random.default_rng(seed).integers(2**62)))
        dims = getattr(self.net, "spatial_dims", len(cfg.patch_size))
        self.dims = dims
        if self.patch_source is not None:
            self.sampler = self.patch_source(self.rng)
        else:
            self.sampler = PatchSampler(
                self.train_cases, cfg.patch_size, dims, slice_axis=cfg.slice_axis,
                fg_fraction=cfg.fg_fraction, focus_fraction=cfg.focus_fraction, rng=self.rng,
            )  # fmt: skip
        self.augment = Augmenter(dims, tgen) if cfg.augment else None
        self.loss = SelfRegLoss(
            SegmentationLoss(
                cfg.ce_weight, cfg.dice_weight, cfg.dice_background, squared=cfg.dice_squared
            ),
            cfg.lambda_scr,
            cfg.lambda_ifd,
            groups=models.selfreg_groups(self.net),
            generator=torch.Generator().manual_seed(int(tgen.initial_seed()) + 1),
            lambda_decor=cfg.lambda_decor,
        )
        self.validation = PatchValidation(
            self.val_cases, cfg, self.dims, self.dist.rank, self.dist.world_size
        )
