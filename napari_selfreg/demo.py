"""The README's main command: the sample brain segmented in napari, or headless.

``python -m napari_selfreg.demo`` opens napari with the bundled MNI152 T1, docks
the Segment widget and starts it with the bundled default model.
``--headless`` (taken automatically when there is no display) writes the sample
as NIfTI and runs ``napari-selfreg segment`` on it, which prints where it wrote
the labels and the volume of each class in ml.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def has_display() -> bool:
    """True when a GUI can open (always on macOS/Windows; X11/Wayland on Linux)."""
    if not sys.platform.startswith("linux"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def run_headless(out_dir: Path) -> int:
    """Write the sample brain and segment it with the CLI (default model)."""
    from . import cli, data

    image_path, _ = data.write_sample("mni152", out_dir)
    print(f"sample written to {image_path}")
    return cli.main(["segment", str(image_path), "-o", str(fresh_path(out_dir, "mni152_segmentation"))])  # fmt: skip


def fresh_path(folder: Path, stem: str, suffix: str = ".nii.gz") -> Path:
    """``folder/stem.nii.gz``, or ``stem-2``, ``stem-3``... when taken: reruns keep earlier results."""
    path, n = folder / f"{stem}{suffix}", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}{suffix}"
    return path


def run_viewer() -> int:
    """napari with the sample brain, the Segment widget docked and running."""
    import napari

    viewer = napari.Viewer(title="napari-selfreg demo")
    image, reference = viewer.open_sample("napari-selfreg", "mni152")
    reference.visible = False  # the template's tissue labels; the model's labels come next
    _, segment = viewer.window.add_plugin_dock_widget("napari-selfreg", "Segment")
    segment.image_picker.set_layer(image)
    segment.run()
    napari.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--headless", action="store_true", help="no viewer: segment via the CLI")
    parser.add_argument("--out", type=Path, default=Path("selfreg-demo"), help="headless output")
    args = parser.parse_args(argv)
    if args.headless or not has_display():
        if not args.headless:
            print("no display found: running the headless demo (napari needs a screen)")
        return run_headless(args.out)
    return run_viewer()


if __name__ == "__main__":
    sys.exit(main())
