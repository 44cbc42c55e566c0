"""Training checkpoints without pickles: model folder + optimiser tensors + JSON state.

A run that writes the model ``OUT`` keeps its checkpoints beside it in
``OUT.checkpoints/``::

    OUT.checkpoints/best/   model.safetensors + model.json (best validation so far)
    OUT.checkpoints/last/   model.safetensors + model.json + optimizer.safetensors
                            + trainer.json (iteration, best score, split, settings)

``best`` and ``last`` are complete model folders (``load_model`` reads them). The
optimiser state dict is flattened into named tensors (safetensors) plus JSON for
its numbers, so resuming never unpickles anything. Each checkpoint is written
to a temporary folder and swapped in by renames: a crash or a full disk leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from napari_selfreg.files import follow_umask, temporary_path
from napari_selfreg.modelfile import ModelCard, ModelFileError, load_model, save_model

from .config import CheckpointError, TrainingError

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer.json"


def checkpoint_dir(out: str | os.PathLike) -> Path:
    """The checkpoint folder of a run that writes the model ``out``."""
    out = Path(out)
    return out.parent / f"{out.name}.checkpoints"


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``state.<param>.<key>``) and JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, entry in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def _old_name(target: Path) -> Path:
    """Where :func:`_swap_in` parks the checkpoint it replaces (found again by
    :func:`recover`)."""
    return target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace folder ``target`` by ``tmp`` with renames only."""
    old = None
    if target.exists():
        old = _old_name(target)
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover(folder: str | os.PathLike) -> bool:
    """Bring back a checkpoint (``last`` or ``best``) that a run killed between
    :func:`_swap_in`'s two renames left parked as ``.NAME.old-*``, and remove the parked
    folders left over; True if it brought one back."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        return False
    parked = sorted(folder.parent.glob(f".{folder.name}.old-*"), key=lambda p: p.stat().st_mtime)
    complete = [p for p in parked if (p / STATE_FILE).is_file() or (p / "model.json").is_file()]
    restored = not folder.exists() and bool(complete)
    if restored:
        os.rename(complete[-1], folder)
    for p in parked:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)
    return restored


def write_checkpoint(
    folder: str | os.PathLike,
    network: torch.nn.Module,
    card: ModelCard,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write (or replace) a checkpoint folder atomically; return it.

    Raises:
        CheckpointError: the disk is full or not writable; the previous
            checkpoint in ``folder`` is left as it was.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = temporary_path(folder, "ckpt", keep_suffix=False)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        save_model(network, card, tmp, name=folder.name)
        if optimizer is not None:
            tensors, meta = flatten_optimizer(optimizer.state_dict())
            save_file(tensors, str(tmp / OPTIMIZER_FILE))
            follow_umask(tmp / OPTIMIZER_FILE)
            state = {**(state or {}), "optimizer": meta}
        if state is not None:
            with open(tmp / STATE_FILE, "w") as fh:
                json.dump(state, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
        _swap_in(tmp, folder)
    except BaseException as err:  # Ctrl-C / SIGTERM too: no half-written folder stays
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, (OSError, SafetensorError)):
            raise
        reason = getattr(err, "strerror", None) or str(err)
        raise CheckpointError(
            f"could not write the checkpoint {folder} ({reason}); the previous checkpoint "
            "is intact - free some space or choose another output folder"
        ) from err
    return folder


def read_checkpoint(folder: str | os.PathLike) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Load a ``last`` checkpoint: ``(ModelBundle, trainer state, optimizer state dict)``.

    Raises:
        TrainingError: the folder is missing or not a checkpoint of this module.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    recover(folder)
    if not (folder / STATE_FILE).is_file():
        raise TrainingError(f"nothing to resume: {folder} holds no training checkpoint")
    try:
        bundle = load_model(folder)
        state = json.loads((folder / STATE_FILE).read_text())
        optimizer = None
        if (folder / OPTIMIZER_FILE).is_file():
            optimizer = unflatten_optimizer(
                load_file(str(folder / OPTIMIZER_FILE)), state.pop("optimizer")
            )
    except (ModelFileError, OSError, json.JSONDecodeError, KeyError, ValueError) as err:
        raise TrainingError(f"cannot resume from {folder}: {err}") from err
    return bundle, state, optimizer
