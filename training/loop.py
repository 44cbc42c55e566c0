"""The one training loop: training, fine-tuning and torchrun runs all go through here.

:func:`iter_train` is a generator of :class:`TrainEvent` that returns the folder of
the model it wrote (``StopIteration.value``); :func:`train` drains it. Closing the
generator (napari's ``worker.quit()``) stops at the next event and writes nothing
more: the checkpoints written so far stay intact in ``OUT.checkpoints/``.

Per step: patches with class/focus oversampling -> augmentation -> forward under
autocast -> cross-entropy + Dice (+ SelfReg SCR/IFD, + the model's own
``training_losses``) -> loss summed over processes and checked for NaN ->
backward -> gradient clipping -> AdamW/SGD step with poly decay. Every
``val_every`` steps: Dice per class on fixed validation patches, best/last
checkpoints, early stopping. At the end the best model is saved as ``OUT`` with
its card (metrics on whole validation volumes, data summary, split, settings).
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from napari_selfreg import models
from napari_selfreg.device import (
    autocast,
    precision_name,
    resolve_device,
    resolve_precision,
    reuse_freed_memory,
)
from napari_selfreg.jobs import drain
from napari_selfreg.modelfile import ModelCard, load_model, save_model
from napari_selfreg.selfreg import SegmentationLoss, SelfRegLoss

from . import distributed, metrics
from .augment import Augmenter
from .cards import CardMixin
from .checkpoint import checkpoint_dir, read_checkpoint, write_checkpoint
from .config import (
    CheckpointError,
    LabelError,
    NonFiniteLossError,
    TrainConfig,
    TrainEvent,
    TrainingError,
)
from .datasets import Case, PatchSampler, apply_split, make_split
from .evaluate import PatchValidation


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


def poly_lr(base: float, iteration: int, total: int, power: float) -> float:
    """``base * (1 - iteration / total) ** power``."""
    return base * (1 - min(iteration, total) / max(total, 1)) ** power


class Trainer(CardMixin):
    """One training run (see the module docstring).

    Args:
        config: settings.
        cases: all cases; the split picks training and validation ones.
        out: the model folder to write (must not exist, unless ``new_version``).
        network: start from this network (fine-tuning); None: build ``config.arch``.
        base_card: card to start from (class names, colours, normalisation).
        parent: name or path of the parent model, recorded in the card.
        resume: continue from ``OUT.checkpoints/last``.
        checkpoints: where best/last go (default ``OUT.checkpoints``).
        configure: called with the network before the optimiser is built (freezing).
        new_version: write ``OUT-v2`` ... when ``out`` exists.
        extra_training: more entries for the card's ``training`` record.
        validation_cases: validate on these instead of the split's validation cases
            (fine-tuning: the voxels the user reviewed; a case's weight 0 leaves a voxel
            out of the Dice).
        patch_source: ``factory(rng) -> sampler`` whose ``sample(batch_size)`` returns
            training patches like :class:`PatchSampler` (synthetic data,
            ``synthesis.SyntheticPatches``); then every case validates.
    """

    def __init__(
        self,
        config: TrainConfig,
        cases: list[Case],
        out: str | Path,
        *,
        network: nn.Module | None = None,
        base_card: ModelCard | None = None,
        parent: str | None = None,
        resume: bool = False,
        checkpoints: str | Path | None = None,
        configure: Callable[[nn.Module], None] | None = None,
        new_version: bool = False,
        extra_training: dict[str, Any] | None = None,
        validation_cases: list[Case] | None = None,
        patch_source: Callable[[np.random.Generator], Any] | None = None,
    ):
        if not cases:
            raise TrainingError("no training data")
        self.config = config
        self.cases = cases
        self.out = Path(out)
        self.network = network
        self.base_card = base_card
        self.parent = parent
        self.resume = resume
        self.ckpt = Path(checkpoints) if checkpoints else checkpoint_dir(self.out)
        self.configure = configure
        self.new_version = new_version
        self.extra_training = extra_training or {}
        self.validation_cases = validation_cases
        self.patch_source = patch_source
        if self.out.exists() and not new_version:
            raise TrainingError(
                f"model {self.out} exists; models are never overwritten - choose another --out"
            )

    # ----------------------------------------------------------- set-up

    def setup(self) -> None:
        cfg = self.config
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.dist, self.device = distributed.setup(resolve_device(cfg.device))
        self.amp = resolve_precision(cfg.precision, self.device)
        self.state: dict[str, Any] = {
            "iteration": 0, "seconds": 0.0, "best_score": -1.0, "best_iteration": None,
            "bad_validations": 0, "history": [],
        }  # fmt: skip
        resumed, self.resumed_card = None, None
        if self.resume:
            bundle, state, optim_state = read_checkpoint(self.ckpt / "last")
            arch = self.base_card.architecture if self.base_card else cfg.arch
            if bundle.card.architecture != arch:
                raise TrainingError(
                    f"the checkpoint in {self.ckpt} is a {bundle.card.architecture}, "
                    f"not a {arch}; resume with the same --arch"
                )
            resumed = (bundle, optim_state)
            self.state.update({k: v for k, v in state.items() if k in (*self.state, "best_dice")})
            self.split = state["split"]
            self.resumed_card = bundle.card
            self.parent = bundle.card.parent
        # classes
        template = self.base_card or self.resumed_card
        if template is not None:
            self.class_names = list(template.class_names)
        else:
            k = cfg.num_classes or max(int(c.labels.max()) for c in self.cases) + 1
            self.class_names = list(cfg.class_names or [])
            if len(self.class_names) != k:
                self.class_names = ["background"] + [f"class {i}" for i in range(1, k)]
        self.num_classes = len(self.class_names)
        check_classes([c.labels for c in self.cases], self.num_classes)
        # split
        if self.patch_source is not None:  # generated training data; the cases validate
            self.split = {"train": ["generated"], "val": sorted(c.name for c in self.cases)}
            self.train_cases, self.val_cases = [], list(self.cases)
        else:
            if not self.resume:
                self.split = cfg.split or make_split(self.cases, cfg.val_fraction, cfg.seed)
            self.train_cases, self.val_cases = apply_split(self.cases, self.split)
        if self.validation_cases is not None:
            self.val_cases = list(self.validation_cases)
        # network
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
        params = [p for p in self.net.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("every parameter is frozen; nothing to train")
        if cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(
                params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay
            )
        else:
            self.optimizer = torch.optim.SGD(
                params, lr=cfg.learning_rate, momentum=0.99, nesterov=True,
                weight_decay=cfg.weight_decay,
            )  # fmt: skip
        if resumed is not None and resumed[1] is not None:
            self.optimizer.load_state_dict(resumed[1])
        self.scaler = None
        if self.amp == torch.float16 and self.device.type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")
        # randomness: per rank, and fresh but reproducible after a resume
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
            SegmentationLoss(cfg.ce_weight, cfg.dice_weight),
            cfg.lambda_scr,
            cfg.lambda_ifd,
            groups=models.selfreg_groups(self.net),
            generator=torch.Generator().manual_seed(int(tgen.initial_seed()) + 1),
        )
        self.validation = PatchValidation(
            self.val_cases, cfg, self.dims, self.dist.rank, self.dist.world_size
        )

    def _to_device(self, array: np.ndarray | torch.Tensor, image: bool = False) -> torch.Tensor:
        t = torch.as_tensor(array).to(self.device, non_blocking=True)
        if image and self.memory_format is not None and t.ndim in (4, 5):
            t = t.contiguous(memory_format=self.memory_format)
        return t

    # ------------------------------------------------------------- hooks

    def train_step(self, iteration: int) -> dict[str, float]:
        """One optimiser step; returns the loss terms averaged over processes."""
        cfg = self.config
        lr = poly_lr(cfg.learning_rate, iteration, cfg.iterations, cfg.poly_power)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        image, labels, weight = (torch.from_numpy(a) for a in self.sampler.sample(cfg.batch_size))
        if self.augment is not None:
            image, labels, weight = self.augment(image, labels, weight)
        x = self._to_device(image, image=True)
        y, w = self._to_device(labels), self._to_device(weight)
        with autocast(self.device, self.amp):
            logits, features, extra = self.step_module(x, y)
        total, parts = self.loss(logits, features, y, w)
        for name, value in extra.items():
            total = total + value.float()
            parts[name] = value.detach()
        parts = {"total": total.detach(), **{k: v for k, v in parts.items() if "/" not in k}}
        vector = torch.stack([v.float().reshape(()) for v in parts.values()])
        vector = self.dist.all_reduce_sum(vector) / self.dist.world_size
        values = dict(zip(parts, vector.tolist(), strict=True))
        if not math.isfinite(values["total"]):
            bad = [k for k, v in values.items() if not math.isfinite(v) and k != "total"]
            raise _NonFinite(iteration + 1, bad)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            total.backward()
        params = [p for p in self.net.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif not torch.isfinite(norm):
            raise _NonFinite(iteration + 1, ["gradient"])
        else:
            self.optimizer.step()
        values["lr"] = lr
        return values

    def validate(self) -> list[float | None]:
        """Dice per class on the fixed validation patches (summed over processes)."""
        counts = self.validation.counts(self.net, self.num_classes, self._to_device, self.amp)
        return metrics.dice_from_counts(self.dist.all_reduce_sum(counts))

    def _save(self, which: str) -> Path:
        state = {**self.state, "split": self.split}
        last = which == "last"  # resumable: the training network with its optimiser
        return write_checkpoint(
            self.ckpt / which,
            self.net if last else models.deploy(self.net),
            self.make_card(deployed=not last),
            self.optimizer if which == "last" else None,
            state,
        )

    # -------------------------------------------------------------- run

    def run(self) -> Generator[TrainEvent, None, Path]:
        """The training generator (see :func:`iter_train`)."""
        self.setup()
        clean = False
        try:
            with reuse_freed_memory():
                path = yield from self._run()
            clean = True
            return path
        finally:
            # DDP's reducer must go before its process group, or its destructor
            # touches a destroyed group at exit (seen as SIGABRT under torchrun)
            self.step_module = None
            gc.collect()
            self.dist.close(clean)

    def _run(self) -> Generator[TrainEvent, None, Path]:
        cfg, ctx = self.config, self.dist
        total = cfg.iterations
        start_it = int(self.state["iteration"])
        clock = time.perf_counter() - float(self.state["seconds"])
        yield TrainEvent(
            start_it, total, "message",
            message=(
                f"training {len(self.train_cases)} case(s), validating {len(self.val_cases)}; "
                f"{ctx.world_size} process(es) on {self.device}, {precision_name(self.amp)}"
                + (f", resumed at iteration {start_it}" if self.resume else "")
            ),
        )  # fmt: skip
        stop_reason = ""
        for it in range(start_it, total):
            elapsed = time.perf_counter() - clock
            budget_hit = cfg.max_seconds is not None and elapsed >= cfg.max_seconds
            if ctx.enabled:  # every process must take the same decision
                flag = torch.tensor([float(budget_hit)])
                budget_hit = bool(ctx.all_reduce_sum(flag).item() > 0)
            if budget_hit:
                stop_reason = f"time budget of {cfg.max_seconds:g} s reached"
                break
            try:
                values = self.train_step(it)
            except _NonFinite as bad:
                yield from self._stop_non_finite(bad)
            self.state["iteration"] = it + 1
            self.state["seconds"] = time.perf_counter() - clock
            lr = values.pop("lr")
            yield TrainEvent(
                it + 1, total, "iteration", losses=values, lr=lr, seconds=self.state["seconds"]
            )
            if (it + 1) % cfg.val_every == 0 or it + 1 == total:
                events, stop = self._validate_and_checkpoint(it + 1, values)
                for event in events:
                    event.seconds = time.perf_counter() - clock
                    yield event
                if stop:
                    stop_reason = stop
                    break
        if stop_reason:
            yield TrainEvent(self.state["iteration"], total, "message", stop_reason)
            if self.state["iteration"] % cfg.val_every != 0 and self.state["iteration"]:
                events, _ = self._validate_and_checkpoint(self.state["iteration"], {})
                yield from events
        path, dice = self._publish()
        self.state["seconds"] = time.perf_counter() - clock
        yield TrainEvent(
            self.state["iteration"], total, "done", dice=dice,
            seconds=self.state["seconds"], model_path=path, message=stop_reason,
        )  # fmt: skip
        return path

    def _validate_and_checkpoint(self, it: int, losses: dict[str, float]):
        """Validation, best/last checkpoints and the early-stopping decision."""
        cfg, events, stop = self.config, [], ""
        self.dist.sync_buffers(self.net)
        if self.validation.patches or self.val_cases:
            dice = self.validate()
            score = metrics.mean_foreground(dice)
            improved = score > float(self.state["best_score"])
            self.state["history"].append(
                {"iteration": it, "mean_dice": round(score, 5), "loss": losses.get("total")}
            )
            if improved:
                self.state.update(best_score=score, best_iteration=it, bad_validations=0)
                self.state["best_dice"] = metrics.named(dice, self.class_names)
            else:
                self.state["bad_validations"] = int(self.state["bad_validations"]) + 1
            events.append(
                TrainEvent(
                    it,
                    cfg.iterations,
                    "validation",
                    losses=losses,
                    dice=metrics.named(dice, self.class_names),
                    message=f"mean foreground Dice {score:.4f}" + (" (best)" if improved else ""),
                )  # fmt: skip
            )
            if improved and self.dist.is_main:
                events.append(
                    TrainEvent(it, cfg.iterations, "checkpoint", model_path=self._save("best"))
                )
            if cfg.patience and int(self.state["bad_validations"]) >= cfg.patience:
                stop = f"early stop: no better validation Dice for {cfg.patience} validations"
        if self.dist.is_main:
            events.append(
                TrainEvent(it, cfg.iterations, "checkpoint", model_path=self._save("last"))
            )
        return events, stop

    def _stop_non_finite(self, bad: _NonFinite):
        where = ", ".join(bad.terms) or "total"
        last = self.ckpt / "last"
        kept = (
            f"the last good checkpoint (iteration {self._checkpoint_iteration()}) is kept in {last}"
            if (last / "model.json").is_file()
            else "no checkpoint had been written yet"
        )
        message = (
            f"the loss became NaN or infinite at iteration {bad.iteration} ({where}); training "
            f"stopped and {kept}; try a lower learning rate or --precision fp32"
        )
        yield TrainEvent(bad.iteration, self.config.iterations, "message", message)
        raise NonFiniteLossError(message)

    def _checkpoint_iteration(self) -> int | None:
        import json

        try:
            return json.loads((self.ckpt / "last" / "trainer.json").read_text())["iteration"]
        except (OSError, ValueError, KeyError):
            return None

    def _publish(self) -> tuple[Path, dict[str, float | None]]:
        """Save the best (or only) network as the model folder; rank 0 writes.

        Under DDP every process's weight digest is gathered first; different
        digests (replicas out of sync) stop the run, equal ones go into the card.
        """
        self.dist.sync_buffers(self.net)
        digests = self.dist.all_gather_object(distributed.weights_digest(self.net))
        if len(set(digests)) != 1:
            raise TrainingError("the processes ended with different weights (DDP out of sync)")
        if self.dist.enabled:
            self.extra_training["replica_weights_sha256"] = digests
        best = self.ckpt / "best"
        net = models.deploy(self.net)
        if self.state["best_iteration"] is not None and (best / "model.json").is_file():
            net = load_model(best, device=str(self.device)).network
        result: dict[str, Any] = {}
        path = self.out
        if self.dist.is_main:
            result = self._whole_volume_metrics(net)
            card = self.make_card(result)
            try:
                path = save_model(net, card, self.out, new_version=self.new_version)
            except OSError as err:
                hint = (
                    f"; the checkpoints in {self.ckpt} are intact - run again with --resume"
                    if self.ckpt == checkpoint_dir(self.out)
                    else ""
                )
                raise CheckpointError(
                    f"could not write the model {self.out} ({err.strerror or err}), nothing "
                    f"partial was left{hint}"
                ) from err
        path = Path(self.dist.broadcast_object(str(path)))
        return path, result.get("dice", {})


class _NonFinite(Exception):
    def __init__(self, iteration: int, terms: list[str]):
        super().__init__(iteration)
        self.iteration, self.terms = iteration, terms


def iter_train(
    config: TrainConfig,
    cases: list[Case],
    out: str | Path,
    **options: Any,
) -> Generator[TrainEvent, None, Path]:
    """Train a model; yield progress events; return the model folder written.

    Args:
        config: settings.
        cases: training data (:func:`datasets.load_folder` or :func:`datasets.case_from_arrays`).
        out: model folder to write; checkpoints go to ``OUT.checkpoints/``.
        **options: keyword options of :class:`Trainer` (``resume``, ``network``, ...).
    """
    return (yield from Trainer(config, cases, out, **options).run())


def train(
    config: TrainConfig,
    cases: list[Case],
    out: str | Path,
    callback: Callable[[TrainEvent], None] | None = None,
    **options: Any,
) -> Path:
    """Drain :func:`iter_train`; ``callback`` sees every event. Returns the model folder."""
    return drain(iter_train(config, cases, out, **options), callback)
