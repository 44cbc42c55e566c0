"""Model files: safetensors weights + a JSON model card, in one folder per model.

A model folder ``NAME/`` holds ``model.safetensors`` and ``model.json``. Loading
never unpickles anything; saving never overwrites an existing model and is
atomic (written to a temporary folder next to the target, then renamed).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
FORMAT = "napari-selfreg-model"
FORMAT_VERSION = 1
DEFAULT_MODEL = "brain-tissue-unet3d"
log = logging.getLogger(__name__)
BUNDLED_DIR = Path(__file__).parent / "bundled_models"

DEFAULT_COLORS = [
    "#000000", "#e6194b", "#3cb44b", "#4363d8", "#ffe119", "#f58231", "#911eb4",
    "#46f0f0", "#f032e6", "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324",
]  # fmt: skip


def colors_after(used: list[str], n: int) -> list[str]:
    """``n`` class colours for labels after ``used``: the default colours no class uses
    yet, in order (then all of them again, when more are needed)."""
    taken = {c.lower() for c in used}
    fresh = [c for c in DEFAULT_COLORS[1:] if c.lower() not in taken] or DEFAULT_COLORS[1:]
    cycle = fresh + [c for c in DEFAULT_COLORS[1:] if c not in fresh]
    return [cycle[i % len(cycle)] for i in range(n)]


class ModelFileError(ValueError):
    """A model file is missing, corrupt or not a napari-selfreg model."""


MAX_NAME = 100
_AXES = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}


def check_name(name: Any, what: str = "model name") -> str:
    """``name`` if it can be a folder name; else :class:`ModelFileError` (one sentence).

    No path separators, no ``..``, no leading dot, no control characters, at most
    :data:`MAX_NAME` characters: a name from a card or a user never leads outside
    the models folder.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelFileError(f"the {what} must be a non-empty text")
    bad = (
        "/" in name or "\\" in name or os.sep in name or ".." in name or name.startswith(".")
        or any(ord(c) < 32 or ord(c) == 127 for c in name) or len(name) > MAX_NAME
    )  # fmt: skip
    if bad:
        raise ModelFileError(
            f"the {what} {name[:40]!r} cannot be a folder name: no path separators, '..', "
            f"leading dot or control characters, at most {MAX_NAME} characters"
        )
    return name


def _check_schema(card: ModelCard) -> None:
    """Types and sizes of a card's fields (a card may come from anyone)."""

    def fail(field_: str, expected: str) -> None:
        raise ModelFileError(f"the model card's {field_!r} must be {expected}")

    def is_list(value, kind, min_len=0, max_len=10_000) -> bool:
        return (
            isinstance(value, list)
            and min_len <= len(value) <= max_len
            and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
        )

    check_name(card.name, "model card's name")
    if not isinstance(card.architecture, str) or not card.architecture:
        fail("architecture", "a name")
    if not isinstance(card.options, dict) or not all(isinstance(k, str) for k in card.options):
        fail("options", "a mapping of option names to values")
    if not is_list(card.class_names, str, 1, 1000):
        fail("class_names", "a list of 1 to 1000 names")
    if not is_list(card.class_colors, str, 0, 1000):
        fail("class_colors", "a list of colours like '#ff8800'")
    if not isinstance(card.normalization, dict):
        fail("normalization", "a mapping such as {'method': 'zscore'}")
    if card.patch_size is not None and not (is_list(card.patch_size, int, 2, 3) and min(card.patch_size) > 0):  # fmt: skip
        fail("patch_size", "2 or 3 positive whole numbers")
    if card.spacing is not None and not (is_list(card.spacing, (int, float), 2, 3) and min(card.spacing) > 0):  # fmt: skip
        fail("spacing", "2 or 3 positive numbers (mm)")
    codes = card.orientation
    if codes is not None and not (
        isinstance(codes, str) and len(codes) == 3 and all(c in _AXES for c in codes)
        and sorted(_AXES[c] for c in codes) == [0, 1, 2]
    ):  # fmt: skip
        fail("orientation", "three axis codes such as 'RAS'")
    groups = card.keep_largest
    if groups is not None and not (
        isinstance(groups, list)
        and all(is_list(g, int, 1, 1000) and min(g) >= 1 for g in groups)
    ):  # fmt: skip
        fail("keep_largest", "a list of lists of foreground class indices")
    for name in ("training", "metrics"):
        if not isinstance(getattr(card, name), dict):
            fail(name, "a mapping")
    for name in ("description", "created"):
        if not isinstance(getattr(card, name), str):
            fail(name, "a text")
    if card.parent is not None and not isinstance(card.parent, str):
        fail("parent", "a model name or folder")


@dataclass
class ModelCard:
    """Everything needed to rebuild and use a model, stored as JSON beside the weights.

    Attributes:
        name: model name (the folder name when saved).
        architecture: registry name for ``models.build``.
        options: keyword options of ``models.build`` (``in_channels``,
            ``num_classes`` and architecture options).
        class_names: one name per output class, background first.
        class_colors: one ``#rrggbb`` colour per class.
        normalization: intensity normalisation, e.g. ``{"method": "zscore"}``,
            ``{"method": "ct_window", "low": -160, "high": 240}`` or
            ``{"method": "percentile", "low": 0.5, "high": 99.5}``.
        patch_size: training / default inference tile (array axis order).
        spacing: voxel spacing in mm the model expects (None: any).
        orientation: nibabel axis codes of the array axes the model was trained in
            (``"RAS"``: the first axis runs towards the right, the second anterior, the
            third superior); the predictor reorients a volume with a known affine to
            it and back. None: arrays as stored.
        keep_largest: groups of classes (lists of class indices) of which the predictor
            keeps only the largest connected piece of their union, the rest becoming
            background (nnU-Net's "largest component" post-processing; for a brain
            model, ``[[1, 2]]``: grey and white matter form one piece). None: none.
        description: free text (what it segments, recipe, caveats).
        training: training summary (recipe, data, iterations, split, seed...).
        metrics: validation metrics, e.g. ``{"dice": {"grey matter": 0.93}}``.
        parent: name or path of the model this one was fine-tuned from.
        created: ISO time of saving.
    """

    name: str
    architecture: str
    options: dict[str, Any]
    class_names: list[str]
    class_colors: list[str] = field(default_factory=list)
    normalization: dict[str, Any] = field(default_factory=lambda: {"method": "zscore"})
    patch_size: list[int] | None = None
    spacing: list[float] | None = None
    orientation: str | None = None
    keep_largest: list[list[int]] | None = None
    description: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None
    created: str = ""

    def __post_init__(self) -> None:
        _check_schema(self)
        n = int(self.options.get("num_classes", len(self.class_names)))
        if len(self.class_names) != n:
            raise ValueError(f"{len(self.class_names)} class names for {n} classes")
        if not self.class_colors:
            self.class_colors = [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(n)]
        if len(self.class_colors) != n:
            raise ValueError(f"{len(self.class_colors)} class colours for {n} classes")
        if self.keep_largest and max(max(g) for g in self.keep_largest) >= n:
            raise ValueError(f"keep_largest names a class beyond the {n} classes")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return int(self.options.get("in_channels", 1))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        if data.get("format") != FORMAT:
            raise ModelFileError("not a napari-selfreg model card (no 'format' marker)")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise ModelFileError(
                f"model card format {data['format_version']} is newer than this "
                f"napari-selfreg understands ({FORMAT_VERSION}); upgrade napari-selfreg"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        missing = {"name", "architecture", "options", "class_names"} - set(data)
        if missing:
            raise ModelFileError(f"model card lacks {', '.join(sorted(missing))}")
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class ModelBundle:
    """A loaded model: the torch module, its card and the folder it came from."""

    network: Any
    card: ModelCard
    path: Path | None = None


def user_models_dir() -> Path:
    """Where user models live: ``$NAPARI_SELFREG_HOME/models``, else
    ``$XDG_DATA_HOME/napari-selfreg/models`` (``~/.local/share`` when unset)."""
    home = os.environ.get("NAPARI_SELFREG_HOME")
    if home:
        return Path(home) / "models"
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "napari-selfreg" / "models"


def save_model(
    network,
    card: ModelCard,
    path: str | os.PathLike | None = None,
    *,
    new_version: bool = False,
    dtype: str | None = None,
    name: str | None = None,
) -> Path:
    """Save ``network`` and ``card`` into a new model folder; return the folder.

    Args:
        network: the torch module (a DDP wrapper is unwrapped).
        card: its model card; ``card.name`` becomes the folder name when
            ``path`` is None (then the folder goes into :func:`user_models_dir`).
        path: target folder. It must not exist, unless ``new_version``.
        new_version: if the target exists, save as ``<name>-v2``, ``-v3``...
        dtype: store floating weights as ``"bfloat16"`` or ``"float16"`` (smaller
            files; loading casts back to float32). Default: as they are.
        name: the name in the saved card (default: the folder's name).

    Raises:
        FileExistsError: the target exists and ``new_version`` is False.
        OSError: the disk is full or not writable (nothing is left behind).
    """
    import torch
    from safetensors.torch import save_file

    network = getattr(network, "module", network)
    target = Path(path) if path is not None else user_models_dir() / check_name(card.name)
    if target.exists():
        if not new_version:
            raise FileExistsError(
                f"model {target} exists; models are never overwritten - choose another name"
            )
        target = next_version_path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    card = dataclasses.replace(
        card, name=name or target.name, created=_dt.datetime.now(_dt.timezone.utc).isoformat()
    )
    store = getattr(torch, dtype) if dtype else None
    tensors = {}
    for key, value in network.state_dict().items():
        value = value.detach().cpu()
        if store is not None and value.is_floating_point():
            value = value.to(store)
        tensors[key] = value.contiguous()
    from .files import clear_stale, follow_umask, temporary_path

    clear_stale(target.parent)
    tmp = temporary_path(target, "model", keep_suffix=False)

    def write_card(card: ModelCard) -> None:
        with open(tmp / CARD_FILE, "w") as fh:
            json.dump({**card.to_dict(), "weights_sha256": digest}, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        follow_umask(tmp / CARD_FILE)

    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        digest = weights_sha256(tmp)
        write_card(card)
        for path in (tmp / WEIGHTS_FILE, tmp):  # safetensors writes 0600
            follow_umask(path)
        while True:
            try:
                os.rename(tmp, target)  # atomic; fails if target appeared meanwhile
                break
            except OSError as err:  # another process saved under this name meanwhile
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                if not new_version:
                    raise FileExistsError(f"model folder {target} appeared while saving; it is not replaced") from err  # fmt: skip
                target = next_version_path(target)
                if name is None:
                    card = dataclasses.replace(card, name=target.name)
                    write_card(card)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def next_version_path(path: str | os.PathLike) -> Path:
    """First free ``<name>-vN`` (N >= 2) beside ``path``."""
    path = Path(path)
    stem = path.name
    base, sep, num = stem.rpartition("-v")
    if sep and num.isdigit():
        stem = base
    n = 2
    while (path.parent / f"{stem}-v{n}").exists():
        n += 1
    return path.parent / f"{stem}-v{n}"


def resolve_model_path(name_or_path: str | os.PathLike | None) -> Path:
    """Find a model folder from a path, a user model name, a bundled name or None (the default).

    A folder holding a model card comes first, then user and bundled models of that
    name, then any other folder of that path (whose reading then says what is wrong).
    The default is looked up by name only: a folder of that name here does not hide it.
    """
    default = name_or_path is None or str(name_or_path) == "default"
    if default:
        name_or_path = DEFAULT_MODEL
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file() and candidate.name in (WEIGHTS_FILE, CARD_FILE):
        candidate = candidate.parent
    if not default and (candidate / CARD_FILE).is_file():
        return candidate
    for root in (user_models_dir(), BUNDLED_DIR):
        if (root / str(name_or_path) / CARD_FILE).is_file():
            return root / str(name_or_path)
    if not default and candidate.is_dir():
        return candidate
    if str(name_or_path) == DEFAULT_MODEL:
        raise ModelFileError(
            "the bundled default model is not installed in this copy of napari-selfreg; "
            "pass --model NAME|PATH"
        )
    raise ModelFileError(
        f"no model {str(name_or_path)!r}: not a folder, nor a user or bundled model name"
    )


def model_reference(path: str | os.PathLike) -> str:
    """How a card names another model: by name where it is a user or bundled model (the
    name finds it after the package moves or upgrades), else by its absolute path."""
    path = Path(path).expanduser().resolve()
    for root in (user_models_dir(), BUNDLED_DIR):
        if (
            path.parent == root.expanduser().resolve()
            and resolve_model_path(path.name) == root / path.name
        ):
            return path.name
    return str(path)


def model_lineage(path: str | os.PathLike) -> list[str]:
    """Model names from the first base model to ``path``, following the cards' parents."""
    names: list[str] = []
    current: str | None = str(path)
    while current and len(names) < 20:
        try:
            card = read_card(resolve_model_path(current))
        except (ModelFileError, OSError):
            names.append(Path(current).name)
            break
        names.append(card.name)
        current = card.parent
    return names[::-1]


def read_card(path: str | os.PathLike) -> ModelCard:
    """Read and validate the model card of a model folder."""
    card_path = Path(path) / CARD_FILE
    try:
        data = json.loads(card_path.read_text())
    except FileNotFoundError as err:
        raise ModelFileError(f"{path} is not a napari-selfreg model (no {CARD_FILE})") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{card_path} is not valid JSON: {err}") from err
    except RecursionError as err:
        raise ModelFileError(f"{card_path} is nested too deeply to be a model card") from err
    if not isinstance(data, dict):
        raise ModelFileError(f"{card_path} is not a napari-selfreg model card")
    try:
        return ModelCard.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ModelFileError(f"{card_path}: {err}") from err


def load_model(name_or_path: str | os.PathLike | None = None, device: str = "cpu") -> ModelBundle:
    """Load a model folder (or a user/bundled model by name) without unpickling.

    The network is rebuilt from the card with ``models.build`` and put in eval
    mode on ``device`` in float32.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from . import models

    path = resolve_model_path(name_or_path)
    card = read_card(path)
    _check_digest(path)
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except FileNotFoundError as err:
        raise ModelFileError(f"{path} has no {WEIGHTS_FILE}") from err
    except (SafetensorError, OSError) as err:
        raise ModelFileError(f"{path / WEIGHTS_FILE} is corrupt: {err}") from err
    try:
        network = models.build(card.architecture, **card.options)
    except (TypeError, ValueError) as err:
        raise ModelFileError(f"cannot build {card.architecture!r} from {path}: {err}") from err
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelFileError(f"{path} holds NaN or infinite weights (in {bad[0]}); it cannot be used")  # fmt: skip
    reference = network.state_dict()
    for key, value in state.items():
        if key in reference and value.is_floating_point():
            state[key] = value.to(reference[key].dtype)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelFileError(f"weights in {path} do not fit its card: {err}") from err
    network.to(torch.device(device)).eval()
    return ModelBundle(network=network, card=card, path=path)


def weights_sha256(folder: str | os.PathLike) -> str:
    """sha256 of the weights file in a model folder (the card's ``weights_sha256``)."""
    return hashlib.sha256((Path(folder) / WEIGHTS_FILE).read_bytes()).hexdigest()


def _check_digest(path: Path) -> None:
    """Compare the weights with the card's ``weights_sha256`` (when the card has one)."""
    try:
        expected = json.loads((path / CARD_FILE).read_text()).get("weights_sha256")
        if not expected:
            return
        digest = weights_sha256(path)
    except (OSError, ValueError, AttributeError):
        return  # missing files are reported by the loader
    if digest != expected:
        raise ModelFileError(
            f"the weights in {path} do not match their card (weights_sha256): the file was "
            "changed or damaged after saving"
        )


def list_models() -> list[tuple[str, Path, ModelCard]]:
    """Bundled and user models as ``(name, folder, card)``; unreadable folders are skipped."""
    found = []
    for root in (BUNDLED_DIR, user_models_dir()):
        if not root.is_dir():
            continue
        for folder in sorted(root.iterdir()):
            if (folder / CARD_FILE).is_file():
                try:
                    found.append((folder.name, folder, read_card(folder)))
                except ModelFileError as err:
                    log.warning("skipping the model %s: %s", folder, err)
    return found
