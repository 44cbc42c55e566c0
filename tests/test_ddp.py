"""Data-parallel training: ``torchrun --nproc_per_node=2`` on CPU (gloo) with the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_selfreg import models
from napari_selfreg.data import make_phantom
from napari_selfreg.modelfile import load_model
from napari_selfreg.training.distributed import weights_digest

pytestmark = pytest.mark.usefixtures("selfreg_home")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("form", ["installed", "checkout"])
def test_torchrun_two_cpu_processes_keep_identical_replicas(tmp_path, form):
    """The README's command (``--no-python``: torchrun starts the installed command)
    and its plain form from the repository root (``python napari-selfreg``: the
    launcher file there)."""
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    for i in range(2):
        image, labels = make_phantom((20, 20, 20), 3, seed=i)
        nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "images" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "labels" / f"c{i}.nii.gz")
    out = tmp_path / "runs" / "ddp"
    launch = ["--no-python"] if form == "installed" else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *launch, "napari-selfreg", "train", "--images", str(tmp_path / "images"),
           "--labels", str(tmp_path / "labels"), "--out", str(out), "--arch", "unet3d",
           "--channels", "4", "8", "16", "--patch", "16", "16", "16", "--batch-size", "1",
           "--iterations", "3", "--val-fraction", "0", "--precision", "fp32", "--quiet",
           "--seed", "0"]  # fmt: skip
    bin_dir = Path(sys.executable).parent  # where the installed command is
    assert (bin_dir / "napari-selfreg").exists()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    cwd = tmp_path if form == "installed" else REPO  # no launcher file in tmp_path
    run = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == str(out)  # rank 0 prints, once
    assert run.stdout.count(str(out)) == 1

    bundle = load_model(out)
    training = bundle.card.training
    assert training["processes"] == 2
    replicas = training["replica_weights_sha256"]
    assert len(replicas) == 2 and replicas[0] == replicas[1]  # identical after the steps
    assert weights_digest(bundle.network) == replicas[0]  # ... and they are what was saved
    torch.manual_seed(0)
    initial = models.build("unet3d", 1, 3, channels=(4, 8, 16))
    assert weights_digest(initial) != replicas[0]  # the steps changed the weights
    assert sorted(p.name for p in out.parent.iterdir()) == ["ddp", "ddp.checkpoints"]
