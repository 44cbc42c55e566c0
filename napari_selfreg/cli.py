"""The ``napari-selfreg`` command: segment, info, models, sample (+ train, finetune).

A thin argparse shell over the library: ``segment`` drains ``predict.iter_segment``
with ``jobs.ProgressPrinter`` (a bar, or log lines in a pipe) and writes labels with
``io.write_labels``; ``train`` and ``finetune`` come from
``napari_selfreg.training.cli.add_parsers``. Errors a user
can cause print one line ``napari-selfreg: error: ...`` and exit with status 2
(130 after Ctrl-C); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import textwrap
from pathlib import Path

PROG = "napari-selfreg"
OUTPUT_TAGS = ("_labels", "_probabilities", "_uncertainty")
USER_ERRORS = (ValueError, OSError, MemoryError)  # FileNotFound/FileExists are OSErrors


def default_model_summary() -> str:
    """What the bundled default model is for, from its card (the card says it once)."""
    from .modelfile import DEFAULT_MODEL, ModelFileError, read_card, resolve_model_path

    try:
        card = read_card(resolve_model_path(None))
    except ModelFileError as err:
        return f"{DEFAULT_MODEL} ({err})"
    return f"{card.name}, {card.description}".replace("%", "%%")  # argparse formats help


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help layout, without line breaks at hyphens: model names such as
    ``brain-tissue-unet3d-v1`` stay whole, so they can be copied from the help."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        return textwrap.fill(
            " ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
            break_on_hyphens=False,
        )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all subcommands."""
    from . import __version__
    from .geometry import orientation_codes
    from .settings import DEFAULTS, PRECISIONS

    parser = argparse.ArgumentParser(
        prog=PROG, description="Segment 3D medical volumes with self-regularised UNets."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    seg = sub.add_parser(
        "segment",
        help="segment volumes (files or folders) into label maps",
        description="Segment volumes; one input -> OUTPUT file (.nii/.nii.gz), several "
        "inputs or a folder -> OUTPUT folder with <name>_labels.nii.gz per input. "
        f"The default model: {default_model_summary()}",
        formatter_class=HelpFormatter,
    )
    seg.add_argument("inputs", nargs="+", metavar="INPUT", help="volume file, DICOM folder or folder of volumes")  # fmt: skip
    seg.add_argument("-o", "--output", required=True, help="output file (.nii.gz) or folder")
    seg.add_argument("--model", default=None, help="model name or folder (default: the bundled model)")  # fmt: skip
    seg.add_argument("--device", default=DEFAULTS.device, help=f"auto, cuda, cuda:N, mps or cpu (default {DEFAULTS.device})")  # fmt: skip
    seg.add_argument("--precision", default=DEFAULTS.precision, choices=list(PRECISIONS))
    seg.add_argument("--tile", type=int, nargs="+", metavar="N", help="tile size per axis (D H W; H W for 2D models)")  # fmt: skip
    seg.add_argument("--no-crop", dest="crop", action="store_false", help="tile the whole volume; by default only the box holding the nonzero voxels is tiled (a brain-extracted scan takes about half the time) and the rest is background")  # fmt: skip
    seg.add_argument("--keep-all-pieces", dest="keep_largest", action="store_false", help="skip the model's largest-piece post-processing (its card's keep_largest: the default model keeps only the largest connected piece of grey plus white matter, dropping tissue labels in the air or scalp)")  # fmt: skip
    seg.add_argument("--overlap", type=float, default=DEFAULTS.overlap, help=f"tile overlap in [0, 1) (default {DEFAULTS.overlap}; 0.5 is smoother and about 2.5x slower)")  # fmt: skip
    seg.add_argument("--batch-size", type=int, default=None, help="tiles per forward pass")
    seg.add_argument("--axis", type=int, default=0, choices=[0, 1, 2], help="slice axis for 2D models")  # fmt: skip
    seg.add_argument("--channel", type=int, default=None, help="volume to pick from a 4D file")
    seg.add_argument("--orientation", type=orientation_codes, default=None, metavar="CODES", help="where the array axes of a file without patient orientation (a TIFF stack) point, e.g. SPL for an axial stack shown as in napari (slices to superior, rows to posterior, columns to the left); without it they are taken as the model's")  # fmt: skip
    seg.add_argument("--probabilities", action="store_true", help="also write <name>_probabilities.nii.gz")  # fmt: skip
    seg.add_argument("--uncertainty", action="store_true", help="also write <name>_uncertainty.nii.gz (normalised entropy)")  # fmt: skip
    seg.add_argument("--rank-slices", default=None, metavar="FILE.json", help="write the slices where the model is least sure, per axis (where to correct next)")  # fmt: skip
    seg.add_argument("--rank-top", type=int, default=10, help="slices per axis in --rank-slices (default 10)")  # fmt: skip
    seg.add_argument("--statistics", default=None, metavar="FILE.csv|FILE.json", help="write each class's volume (ml), voxels and share of the labelled total, one row per input")  # fmt: skip
    seg.add_argument("--skip-existing", action="store_true", help="skip inputs whose labels exist (continue an interrupted folder run)")  # fmt: skip
    seg.add_argument("--overwrite", action="store_true", help="replace existing outputs (never an input)")  # fmt: skip
    seg.add_argument("--quiet", action="store_true", help="no progress bar")
    seg.set_defaults(func=cmd_segment)

    info = sub.add_parser("info", help="torch build, GPUs, CPU features, precision choice")
    info.set_defaults(func=cmd_info)

    mods = sub.add_parser("models", help="list bundled and user models")
    mods.add_argument("--json", action="store_true", help="machine-readable output")
    mods.set_defaults(func=cmd_models)

    sample = sub.add_parser("sample", help="write a sample volume and its labels")
    sample.add_argument("name", help="sample name, e.g. mni152 or phantom")
    sample.add_argument("-o", "--output", required=True, help="output folder")
    sample.set_defaults(func=cmd_sample)

    export = sub.add_parser(
        "export",
        help="export a model as a bioimage.io package or a MONAI bundle",
        description="Export a model for other tools: --format bioimageio writes a bioimage.io "
        "model package (.zip: PyTorch and TorchScript weights, test data, docs); --format "
        "monai-bundle writes a MONAI bundle folder (for MONAI Label in 3D Slicer, MONAI "
        "Auto3DSeg, monai.bundle). Inputs must be normalised as the model card says; see "
        "docs/exports.md.",
    )
    export.add_argument("model", metavar="MODEL", help="model name or folder ('default': the bundled model)")  # fmt: skip
    export.add_argument("--format", required=True, choices=["bioimageio", "monai-bundle"], help="bioimageio (a .zip) or monai-bundle (a folder)")  # fmt: skip
    export.add_argument("-o", "--output", required=True, help="MODEL.zip for bioimageio, a new folder for monai-bundle")  # fmt: skip
    export.add_argument("--overwrite", action="store_true", help="replace an existing package or bundle (never another file or folder)")  # fmt: skip
    export.set_defaults(func=cmd_export)

    try:
        training_cli = importlib.import_module("napari_selfreg.training.cli")
    except ModuleNotFoundError as err:  # the training module is optional
        if err.name not in ("napari_selfreg.training", "napari_selfreg.training.cli"):
            raise
    else:
        training_cli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with sigterm_like_ctrl_c():
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def sigterm_like_ctrl_c():
    """Inside, SIGTERM (a scheduler, ``kill``, torchrun) stops the command the way Ctrl-C
    does: the running job is closed at its next step and removes its temporary files. The
    previous handler comes back on exit; outside the main thread nothing changes."""
    import signal
    import threading

    def stop(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def one_line(err: BaseException) -> str:
    """A one-line message for an exception (OSErrors get their file name)."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        text = f"{err.strerror}: {err.filename}"
    elif isinstance(err, MemoryError):
        text = str(err) or "out of memory"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


# ----------------------------------------------------------------------------- segment


def stem(path: Path) -> str:
    """File name without its volume suffix (``scan.nii.gz`` -> ``scan``)."""
    from .io import READ_SUFFIXES

    name = path.name
    for suffix in sorted(READ_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _pair_image(path: Path) -> bool:
    """The ``.img`` half of an Analyze / NIfTI pair (its ``.hdr`` is the input)."""
    name = path.name
    for img, hdr in ((".img", ".hdr"), (".img.gz", ".hdr.gz")):
        if name.lower().endswith(img):
            base = name[: -len(img)]
            return any((path.parent / (base + h)).is_file() for h in (hdr, hdr.upper()))
    return False


def expand_inputs(inputs: list[str]) -> tuple[list[Path], bool]:
    """Input volumes, and whether the outputs go to a folder.

    Files are taken as given; a folder holding volume files gives each of them
    (this command's outputs, ``*_labels`` etc., skipped); any other folder is read
    as one DICOM series. Several volumes, or a folder of them, mean folder output.
    """
    from .io import DICOM_SUFFIXES, READ_SUFFIXES

    found: list[Path] = []
    folder_mode = False
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"input {path} does not exist")
        volumes = [path]
        if path.is_dir():
            volumes = [
                p
                for p in sorted(path.iterdir())
                if p.is_file()
                and not p.name.startswith(".")  # temporaries, macOS ._ files
                and p.name.lower().endswith(READ_SUFFIXES)
                and not p.name.lower().endswith(DICOM_SUFFIXES)
                and not stem(p).endswith(OUTPUT_TAGS)
                and not _pair_image(p)
            ] or [path]
            folder_mode |= volumes != [path]
        found.extend(volumes)
    return found, folder_mode or len(found) > 1


# output names that mean a file in another format, not a folder to create
FILE_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".mgz", ".mgh", ".hdr", ".img", ".mnc",
                 ".tif", ".tiff", ".dcm", ".gz", ".zip", ".npy", ".txt", ".csv", ".json")  # fmt: skip


def plan_outputs(inputs: list[Path], output: str, folder_mode: bool) -> list[Path]:
    """Labels path per input: OUTPUT for one volume and a .nii/.nii.gz OUTPUT, else
    ``OUTPUT/<stem>_labels.nii.gz``."""
    out = Path(output).expanduser()
    is_file = out.name.lower().endswith((".nii", ".nii.gz"))
    if is_file and not folder_mode:
        return [out]
    if is_file:
        raise ValueError(f"several inputs need an output folder, not the file name {out}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} is a file; give a folder")
    if not out.exists() and out.name.lower().endswith(FILE_SUFFIXES):
        raise ValueError(f"labels are written as .nii or .nii.gz files (or into a folder), not {out.name}")  # fmt: skip
    names = [f"{stem(p)}_labels.nii.gz" for p in inputs]
    if len(set(names)) != len(names):
        raise ValueError("two inputs have the same name; segment them into different folders")
    return [out / n for n in names]


def companion(labels_path: Path, tag: str) -> Path:
    """``x_labels.nii.gz`` -> ``x_<tag>.nii.gz``; ``out.nii`` -> ``out_<tag>.nii``."""
    name = labels_path.name
    suffix = ".nii.gz" if name.lower().endswith(".nii.gz") else ".nii"
    base = name[: -len(suffix)]
    base = base[: -len("_labels")] if base.endswith("_labels") else base
    return labels_path.with_name(f"{base}_{tag}{suffix}")


def check_side_outputs(args, inputs: list[Path], outputs: list[Path]) -> None:
    """``--statistics`` and ``--rank-slices``: a known format, never an input or another
    output, an existing file replaced only with ``--overwrite`` or ``--skip-existing``
    (which continues a folder run: the rows of the inputs it skips are kept)."""
    sides = {"--statistics": args.statistics, "--rank-slices": args.rank_slices}
    taken = {p.resolve() for p in inputs + outputs}
    for flag, given in sides.items():
        if given is None:
            continue
        path = Path(given).expanduser()
        formats = (".csv", ".json") if flag == "--statistics" else (".json",)
        if path.suffix.lower() not in formats:
            raise ValueError(f"{flag} needs a {' or '.join(formats)} file name, not {path.name}")
        if path.resolve() in taken:
            raise FileExistsError(f"{flag} {path} is an input or another output of this run")
        if path.exists() and not (args.overwrite or args.skip_existing):
            raise FileExistsError(f"{flag} {path} exists; pass --overwrite to replace it")


def labels_statistics(source: Path, labels_path: Path, names: list[str]) -> dict:
    """The statistics row of an input whose labels an earlier run wrote."""
    import numpy as np

    from . import io
    from .volumes import as_record, class_volumes

    labels = io.read_volume(labels_path)
    linear = labels.affine[:3, :3] if labels.ndim == 3 else np.diag(labels.spacing[:2])
    rows, unit = class_volumes(np.asarray(labels.data), names, linear)
    return as_record(rows, unit, file=str(source), labels=str(labels_path))


def earlier_rankings(path: str | None, skipped: list[tuple[Path, Path]]) -> dict[str, dict]:
    """The slice rankings an earlier run wrote to ``path`` for the inputs now skipped."""
    import json

    if path is None or not skipped or not Path(path).expanduser().is_file():
        return {}
    try:
        earlier = json.loads(Path(path).expanduser().read_text()).get("inputs", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(s): earlier[str(s)] for s, _ in skipped if str(s) in earlier}


def check_outputs(inputs: list[Path], outputs: list[Path], overwrite: bool) -> None:
    """Never write over an input; write over other files only with ``--overwrite``."""
    sources = {p.resolve() for p in inputs}
    for out in outputs:
        if out.resolve() in sources:
            raise FileExistsError(f"output {out} is one of the inputs; it is never overwritten")
        if out.exists() and not overwrite:
            raise FileExistsError(f"output {out} exists; pass --overwrite to replace it")


def cmd_segment(args) -> int:
    from .files import clear_stale
    from .inference import Predictor

    inputs, folder_mode = expand_inputs(args.inputs)
    order = {str(p): i for i, p in enumerate(inputs)}  # statistics rows in input order
    outputs = plan_outputs(inputs, args.output, folder_mode)
    tags = [t for t in ("probabilities", "uncertainty") if getattr(args, t)]
    skipped: list[tuple[Path, Path]] = []  # (input, its labels) of a run being continued
    if args.skip_existing:
        done = [o.exists() for o in outputs]
        for source, target, skip in zip(inputs, outputs, done, strict=True):
            if skip:
                print(f"skipping {source}: its labels exist")
                skipped.append((source, target))
        inputs = [p for p, d in zip(inputs, done, strict=True) if not d]
        outputs = [o for o, d in zip(outputs, done, strict=True) if not d]
    companions = [companion(o, t) for o in outputs for t in tags]
    every = outputs + companions
    check_outputs(inputs, outputs, args.overwrite)
    # an interrupted run wrote some of these before its labels: --skip-existing redoes them
    check_outputs(inputs, companions, args.overwrite or args.skip_existing)
    check_side_outputs(args, inputs + [s for s, _ in skipped], every)
    predictor = Predictor(  # a bad --model or --tile fails before any folder is made
        args.model,
        tile=args.tile,
        overlap=args.overlap,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        axis=args.axis,
        probabilities=args.probabilities,
        uncertainty=args.uncertainty,
        slice_scores=bool(args.rank_slices),
        crop_to_nonzero=args.crop,
        keep_largest=args.keep_largest,
    )
    card = predictor.card
    names = card.class_names if card else [f"class {i}" for i in range(predictor.num_classes)]
    rankings: dict[str, dict] = earlier_rankings(args.rank_slices, skipped)
    statistics: list[dict] = [labels_statistics(s, t, names) for s, t in skipped] if args.statistics else []  # fmt: skip
    created = prepare_output_folders(every)
    for folder in {o.parent for o in outputs}:
        clear_stale(folder)
    failed: list[str] = []
    for source, target in zip(inputs, outputs, strict=True):
        try:
            stats, ranking = segment_one(predictor, source, target, names, args)
        except KeyboardInterrupt:
            remove_if_empty(created)  # what is written stays: --skip-existing goes on
            raise
        except USER_ERRORS as err:
            if not folder_mode:
                remove_if_empty(created)
                raise
            message = one_line(err)  # named once: most messages name their file
            where = "" if str(source) in message else f"{source}: "
            print(f"{PROG}: error: {where}{message}", file=sys.stderr)
            failed.append(str(source))
            continue
        statistics.append(stats)
        if ranking is not None:  # saved after each input: a stopped run keeps them
            rankings[str(source)] = ranking
            save_rankings(args.rank_slices, rankings)
    if args.rank_slices and rankings:
        print(f"wrote slice ranking {save_rankings(args.rank_slices, rankings)}")
    if args.statistics and statistics:
        from .volumes import write_statistics

        statistics.sort(key=lambda row: order[row["file"]])
        print(f"wrote volume statistics {write_statistics(args.statistics, statistics, names)}")
    remove_if_empty(created)
    if failed:
        also = f" ({len(skipped)} skipped: their labels exist)" if skipped else ""
        print(f"{PROG}: {len(failed)} of {len(inputs)} input(s) failed{also}: {', '.join(failed)}", file=sys.stderr)  # fmt: skip
        return 2
    return 0


def save_rankings(path: str, rankings: dict[str, dict]) -> Path:
    """Write the slice rankings of the inputs segmented so far (atomically)."""
    from .files import write_json_atomic

    return write_json_atomic(path, {"what": "slices ranked by summed normalised entropy (1 = the most uncertain slice)", "inputs": rankings})  # fmt: skip


def segment_one(predictor, source: Path, target: Path, names: list[str], args):
    """Segment one input, write its outputs, print its class volumes; returns the
    statistics row and the slice ranking (or None)."""
    import textwrap

    import numpy as np

    from . import io
    from .review import rank_slices, suggestion_spacing
    from .volumes import as_record, as_text, class_volumes

    volume = with_orientation(io.read_volume(source, channel=args.channel), args.orientation, predictor)  # fmt: skip
    result = run_with_progress(predictor, volume, source.name, args.quiet)
    for warning in result.info.get("warnings", []):
        print(f"{PROG}: warning: {source.name}: {warning}", file=sys.stderr)
    labels = np.asarray(result.labels)
    extras = {}
    if result.probabilities is not None:  # classes on the 4th NIfTI axis
        extras["probabilities"] = np.moveaxis(np.asarray(result.probabilities), 0, -1)
    if result.uncertainty is not None:
        extras["uncertainty"] = np.asarray(result.uncertainty)
    for tag, data in extras.items():
        redo = args.overwrite or args.skip_existing  # checked in cmd_segment
        path = io.write_volume(companion(target, tag), data, reference=volume, overwrite=redo)
        print(f"wrote {tag} {path}")
    # the labels last: their file marks the input as done for --skip-existing
    written = io.write_labels(target, labels, reference=volume, overwrite=args.overwrite)
    info = result.info
    print(
        f"wrote labels {written} ({' x '.join(map(str, volume.shape))} voxels, "
        f"{info['seconds']:.1f} s on {info['device']} in {info['precision']})"
    )
    linear = volume.affine[:3, :3] if volume.ndim == 3 else np.diag(volume.spacing[:2])
    rows, unit = class_volumes(labels, names, linear)
    print(textwrap.indent(as_text(rows, unit), "  "), end="")
    stats = as_record(rows, unit, file=str(source), labels=str(written))
    ranking = None
    if result.slice_scores is not None:
        ranking = {
            f"axis {axis}": [
                {"slice": i, "score": round(v, 4)}
                for i, v in rank_slices(
                    scores, top=args.rank_top, spacing=suggestion_spacing(len(scores))
                )  # fmt: skip
            ]
            for axis, scores in enumerate(result.slice_scores)
        }
    return stats, ranking


def prepare_output_folders(outputs: list[Path]) -> list[Path]:
    """Create the output folders and check that they take a file, before any work (a
    read-only folder or a name too long for the file system fails here, not after the
    inference). Returns the folders it created."""
    from .files import temporary_path

    created = []
    for out in outputs:
        if len(out.name.encode()) > 255:
            raise ValueError(f"the output name {out.name[:40]}... is longer than the 255 bytes a file name may have")  # fmt: skip
        folder = out.parent
        if not folder.exists():
            missing = [p for p in [folder, *folder.parents] if not p.exists()]
            folder.mkdir(parents=True, exist_ok=True)
            created.extend(reversed(missing))
    for folder in {o.parent for o in outputs}:
        probe = temporary_path(folder / "probe", "probe", keep_suffix=False)
        try:
            probe.write_bytes(b"")
        except OSError as err:
            raise PermissionError(err.errno, f"cannot write into {folder} ({err.strerror})", str(folder)) from err  # fmt: skip
        probe.unlink()
    return created


def remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders this run created that stayed empty (deepest first)."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            break


def with_orientation(volume, codes: str | None, predictor):
    """A TIFF stack (no patient orientation) with the axes ``--orientation`` states; else
    taken as the model's, with a warning."""
    from dataclasses import replace

    from .geometry import affine_from_codes

    if volume.metadata.get("format") != "tiff" or volume.ndim != 3:
        return volume
    if codes:
        return replace(volume, affine=affine_from_codes(codes, volume.spacing))
    if predictor.card and predictor.card.orientation:
        print(f"{PROG}: warning: {Path(volume.metadata['source']).name}: a TIFF stack carries no patient orientation; its axes are taken as the model's ({predictor.card.orientation}); if the labels look wrong, pass --orientation (e.g. SPL for an axial stack shown as in napari)", file=sys.stderr)  # fmt: skip
    return volume


def run_with_progress(predictor, volume, label: str, quiet: bool):
    """Drain ``predictor.iter_segment`` with the CLI's progress printer."""
    from .jobs import ProgressPrinter, drain

    affine = volume.affine if volume.ndim == 3 else None  # reorients to the model's order
    printer = ProgressPrinter(label, quiet)
    try:
        return drain(
            predictor.iter_segment(volume.data, spacing=volume.spacing, affine=affine), printer
        )
    finally:
        printer.close()


# ----------------------------------------------------------------------------- other commands


def cmd_info(args) -> int:
    from . import __version__
    from .device import device_report
    from .modelfile import user_models_dir

    print(f"napari-selfreg {__version__}")
    print(device_report())
    print(f"user models: {user_models_dir()}")
    return 0


def cmd_models(args) -> int:
    from .modelfile import BUNDLED_DIR, list_models, user_models_dir

    rows = []
    for name, folder, card in list_models():
        rows.append(
            {
                "name": name,
                "source": "bundled" if folder.parent == BUNDLED_DIR else "user",
                "path": str(folder),
                "architecture": card.architecture,
                "classes": card.class_names,
                "patch_size": card.patch_size,
                "spacing": card.spacing,
                "normalization": card.normalization,
                "parent": card.parent,
                "metrics": card.metrics,
                "description": card.description,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models installed; user models go to {user_models_dir()}")
    for r in rows:
        print(f"{r['name']}  ({r['source']}, {r['architecture']}, {len(r['classes'])} classes)")
        print(f"  classes: {', '.join(r['classes'])}")
        print(f"  patch {r['patch_size']}, spacing {r['spacing']}, path {r['path']}")
        if r["description"]:
            print(f"  {r['description'].splitlines()[0]}")
    return 0


def cmd_sample(args) -> int:
    from .data import write_sample

    folder = Path(args.output).expanduser()
    existed = set(folder.glob(f"{args.name}_*.nii.gz")) if folder.is_dir() else set()
    for path in write_sample(args.name, folder):
        print(f"kept the existing {path}" if path in existed else f"wrote {path}")
    return 0


def cmd_export(args) -> int:
    from .export import export_bioimageio, export_monai_bundle
    from .files import full_disk_named

    write = export_bioimageio if args.format == "bioimageio" else export_monai_bundle
    output = Path(args.output).expanduser()
    with full_disk_named(output.absolute().parent):
        path = write(args.model, output, overwrite=args.overwrite)
    print(
        f"wrote {'bioimage.io package' if args.format == 'bioimageio' else 'MONAI bundle'} {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
