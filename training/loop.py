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

import contextlib
import gc
import math
import os
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
    reuse_freed_memory,
)
from napari_selfreg.files import RunLock, RunLockedError, clear_stale
from napari_selfreg.jobs import drain
from napari_selfreg.modelfile import (
    MAX_NAME,
    ModelCard,
    ModelFileError,
    check_name,
    load_model,
    save_model,
)

from . import distributed, metrics
from .cards import CardMixin
from .checkpoint import checkpoint_dir, write_checkpoint
from .config import (
    CheckpointError,
    NonFiniteLossError,
    TrainConfig,
    TrainEvent,
    TrainingError,
)
from .datasets import Case
from .setup import SetupMixin


def fit_name(out: Path, limit: int) -> Path:
    """``out`` with its name cut to ``limit`` characters, keeping a short last ``-part``
    (``<long base name>-ft`` stays ``<cut base name>-ft``)."""
    name = out.name
    if len(name) <= limit:
        return out
    head, sep, tail = name.rpartition("-")
    keep = sep + tail if head and len(tail) <= 8 else ""
    return out.with_name(name[: limit - len(keep)].rstrip("-. ") + keep)


def poly_lr(base: float, progress: float, power: float, cooldown: float = 0.0) -> float:
    """``base * (1 - progress) ** power``, ``progress`` the share of the run done (0-1),
    times a linear fall to 0 over the last ``cooldown`` share of the run (0: none)."""
    left = 1 - min(max(progress, 0.0), 1.0)
    return base * left**power * (min(1.0, left / cooldown) if cooldown > 0 else 1.0)


class Trainer(SetupMixin, CardMixin):
    """One training run (see the module docstring).

    Args:
        config: settings.
        cases: all cases; the split picks training and validation ones.
        out: the model folder to write (must not exist, unless ``new_version``).
        network: start from this network (fine-tuning); None: build ``config.arch``.
        base_card: card to start from (class names, colours, normalisation).
        parent: name or path of the parent model, recorded in the card.
        resume: continue from ``OUT.checkpoints/last``.
        restart: discard an interrupted run's checkpoints and start over (without it,
            such a run is refused: resume it or restart).
        checkpoints: where best/last go (default ``OUT.checkpoints``).
        configure: called with the network before the optimiser is built (freezing).
        new_version: write ``OUT-v2`` ... when ``out`` exists (a name too long to take
            ``-vN`` is cut, see :func:`fit_name`).
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
        restart: bool = False,
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
        if new_version:  # room for the -vN a taken name gets
            self.out = fit_name(self.out, MAX_NAME - len("-v99"))
        try:  # the folder's name is the card's name: refuse it now, not at the first checkpoint
            check_name(self.out.name, "model name (the output folder's name)")
        except ModelFileError as err:
            raise TrainingError(str(err)) from err
        self.network = network
        self.base_card = base_card
        self.parent = parent
        if resume and restart:
            raise TrainingError("--resume continues a run and --restart starts it over: pass one")
        self.resume, self.restart = resume, restart
        self.resumed_card = None
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

    def _to_device(self, array: np.ndarray | torch.Tensor, image: bool = False) -> torch.Tensor:
        t = torch.as_tensor(array).to(self.device, non_blocking=True)
        if image and self.memory_format is not None and t.ndim in (4, 5):
            t = t.contiguous(memory_format=self.memory_format)
        return t

    # ------------------------------------------------------------- hooks

    def _progress(self, iteration: int, elapsed: float | None = None) -> float:
        """The schedule's clock: the share of iterations done, or with ``anneal_to_budget``
        (and ``elapsed`` seconds given) the larger of that and the share of ``max_seconds``."""
        cfg = self.config
        done = iteration / max(cfg.iterations, 1)
        if cfg.anneal_to_budget and cfg.max_seconds and elapsed is not None:
            done = max(done, elapsed / cfg.max_seconds)
        return done

    def _training_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch of training patches (augmented), labels and loss weights on the device."""
        image, labels, weight = (
            torch.from_numpy(a) for a in self.sampler.sample(self.config.batch_size)
        )
        if self.augment is not None:
            image, labels, weight = self.augment(image, labels, weight)
        return self._to_device(image, image=True), self._to_device(labels), self._to_device(weight)

    def train_step(self, iteration: int, progress: float | None = None) -> dict[str, float]:
        """One optimiser step; returns the loss terms averaged over processes.
        ``progress``: the share of the run done (the schedule's clock); None:
        ``iteration / iterations``."""
        cfg = self.config
        if progress is None:
            progress = self._progress(iteration)
        lr = poly_lr(cfg.learning_rate, progress, cfg.poly_power, cfg.cooldown)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y, w = self._training_batch()
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
        """The training generator (see :func:`iter_train`). The checkpoint folder is locked
        for the run (a second run writing it is refused) and cleared of what killed runs
        left there."""
        main = os.environ.get("RANK", "0") == "0"  # one lock per run, held by rank 0
        lock = RunLock(self.ckpt, "training run") if main else contextlib.nullcontext()
        try:
            with lock:
                if main:
                    clear_stale(self.ckpt)
                    clear_stale(self.out.parent)
                self.check_run_folder(main)
                return (yield from self._run_locked())
        except RunLockedError as err:
            raise TrainingError(str(err)) from err
        finally:
            if main:  # a run that saved nothing (a full disk, Ctrl-C) leaves no empty folder
                with contextlib.suppress(OSError):
                    self.ckpt.rmdir()  # fails, as it should, on a folder with checkpoints

    def _run_locked(self) -> Generator[TrainEvent, None, Path]:
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
        if self.base_card is not None and start_it == 0 and self.validation.patches:
            # a fine-tune: the base model on the same voxels, to tell whether the round helped
            base = metrics.mean_foreground(self.validate())
            self.state["base_score"] = base
            yield TrainEvent(0, total, "message", message=f"the base model: mean foreground Dice {base:.4f} on the validation voxels")  # fmt: skip
        stop_reason = ""
        for it in range(start_it, total):
            elapsed = time.perf_counter() - clock
            if ctx.enabled:  # every process must take the same decisions: one clock
                elapsed = (
                    float(ctx.all_reduce_sum(torch.tensor([elapsed])).item()) / ctx.world_size
                )
            budget_hit = cfg.max_seconds is not None and elapsed >= cfg.max_seconds
            if budget_hit:
                stop_reason = f"time budget of {cfg.max_seconds:g} s reached"
                break
            try:
                values = self.train_step(it, self._progress(it, elapsed))
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
            best_mark = ""  # the weights saved are the best's (keep=best) or the last ones
            if improved:
                best_mark = " (best; kept)" if cfg.keep == "best" else " (best so far)"
            events.append(
                TrainEvent(
                    it,
                    cfg.iterations,
                    "validation",
                    losses=losses,
                    dice=metrics.named(dice, self.class_names),
                    message=f"mean foreground Dice {score:.4f}{best_mark}",
                )  # fmt: skip
            )
            if improved and self.dist.is_main and cfg.keep == "best":  # "last" never reads it
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
        keep_best = self.config.keep == "best" and self.state["best_iteration"] is not None
        if keep_best and (best / "model.json").is_file():
            net = load_model(best, device=str(self.device)).network
        result: dict[str, Any] = {}
        path = self.out
        if self.dist.is_main:
            if self.config.batchnorm_batches:
                self._estimate_batchnorm(net, self.config.batchnorm_batches)
            result = self._whole_volume_metrics(net)
            card = self.make_card(result)
            from safetensors import SafetensorError  # a full disk, like OSError

            try:
                path = save_model(net, card, self.out, new_version=self.new_version)
            except (OSError, SafetensorError) as err:
                reason = getattr(err, "strerror", None) or err
                hint = (
                    f"; the checkpoints in {self.ckpt} are intact - run again with --resume"
                    if self.ckpt == checkpoint_dir(self.out)
                    else ""
                )
                raise CheckpointError(
                    f"could not write the model {self.out} ({reason}), nothing "
                    f"partial was left{hint}"
                ) from err
        path = Path(self.dist.broadcast_object(str(path)))
        return path, result.get("dice", {})

    def _estimate_batchnorm(self, net: nn.Module, batches: int) -> None:
        """BatchNorm running statistics of ``net`` := the plain average over ``batches``
        training batches through its final weights (the rest of the network in eval mode,
        no gradient); frozen layers (no trainable parameter) keep theirs."""
        trained = {  # by name: ``net`` may be a reloaded checkpoint, all of it trainable
            name
            for name, m in models.deploy(self.net).named_modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))
        }
        norms = [
            m
            for name, m in net.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats
            and name in trained
        ]
        if not norms:
            return
        momenta = [m.momentum for m in norms]
        net.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average
            m.train()
        with torch.no_grad():
            for _ in range(batches):
                x = self._training_batch()[0]
                with autocast(self.device, self.amp):
                    net(x)
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
            m.eval()


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
