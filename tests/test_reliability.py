"""Nothing of the user's is lost under concurrency, interruptions and hostile input
(training runs, checkpoints, folder segmentation, odd volumes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_selfreg import io
from napari_selfreg.cli import main
from napari_selfreg.data import make_phantom
from napari_selfreg.modelfile import load_model
from napari_selfreg.training import TrainConfig, TrainingError, case_from_arrays, iter_train

pytestmark = pytest.mark.usefixtures("one_torch_thread", "selfreg_home")

TINY = ["--arch", "unet3d", "--channels", "4", "8", "16", "--patch", "16", "16", "16",
        "--batch-size", "1", "--precision", "fp32", "--threads", "1"]  # fmt: skip


def tiny_config(**kw) -> TrainConfig:
    base = {"arch": "unet3d", "arch_options": {"channels": [4, 8, 16]}, "patch_size": (16, 16, 16),
            "batch_size": 1, "iterations": 6, "val_every": 2, "precision": "fp32", "val_fraction": 0.0}  # fmt: skip
    return TrainConfig(**{**base, **kw})


def cases(n=2, labels_fn=None):
    out = []
    for i in range(n):
        image, labels = make_phantom((20, 20, 20), 3, seed=i)
        out.append(case_from_arrays(image, labels if labels_fn is None else labels_fn(labels), name=f"c{i}"))  # fmt: skip
    return out


@pytest.fixture
def folders(phantom_folders):
    return phantom_folders


# ----------------------------------------------------------------------------- training runs


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path):
    first = iter_train(tiny_config(), cases(), tmp_path / "M")
    next(first)  # the first run holds the lock now
    with pytest.raises(TrainingError, match=r"another training run \(process \d+\) is writing"):
        next(iter_train(tiny_config(arch_options={"channels": [4, 8, 32]}), cases(), tmp_path / "M"))  # fmt: skip
    first.close()
    assert not (tmp_path / "M.checkpoints").exists()  # it saved nothing: no empty folder
    # a lock left by a dead process is taken over
    (tmp_path / "M.checkpoints").mkdir()
    (tmp_path / "M.checkpoints" / ".lock").write_text("999999999")
    path = None
    for event in (gen := iter_train(tiny_config(), cases(), tmp_path / "M")):
        path = event.model_path or path
    assert load_model(tmp_path / "M").card.options["channels"] == [4, 8, 16]
    assert not (tmp_path / "M.checkpoints" / ".lock").exists()
    del gen


def test_an_interrupted_run_needs_resume_or_restart(tmp_path):
    gen = iter_train(tiny_config(iterations=50), cases(), tmp_path / "M")
    for event in gen:
        if event.stage == "checkpoint" and event.done >= 4:
            break
    gen.close()
    with pytest.raises(TrainingError, match="holds an interrupted run .* --resume .* --restart"):
        next(iter_train(tiny_config(iterations=50), cases(), tmp_path / "M"))
    with pytest.raises(TrainingError, match="resume with the same architecture options"):
        next(iter_train(tiny_config(iterations=50, arch_options={"channels": [4, 8, 32]}), cases(), tmp_path / "M", resume=True))  # fmt: skip
    # the data, losses and optimiser of a run stay; its steps and time budget may change
    for changed in ({"normalization": {"method": "percentile"}}, {"lr": 0.5}, {"optimizer": "sgd"}, {"seed": 7}):  # fmt: skip
        key = next(iter(changed))
        with pytest.raises(TrainingError, match=rf"started with other settings \({key} .* or pass --restart"):  # fmt: skip
            next(iter_train(tiny_config(iterations=50, **changed), cases(), tmp_path / "M", resume=True))  # fmt: skip
    with pytest.raises(TrainingError, match="pass one"):
        next(iter_train(tiny_config(iterations=50), cases(), tmp_path / "M", resume=True, restart=True))  # fmt: skip
    resumed = iter_train(tiny_config(iterations=80, max_seconds=600), cases(), tmp_path / "M", resume=True)  # fmt: skip
    assert "resumed at iteration" in next(resumed).message
    resumed.close()
    for _ in iter_train(tiny_config(iterations=6), cases(), tmp_path / "M", restart=True):
        pass
    card = load_model(tmp_path / "M").card
    assert card.training["iterations_done"] == 6  # started over, not from iteration 4


def test_a_checkpoint_parked_by_a_kill_between_renames_is_recovered(tmp_path):
    gen = iter_train(tiny_config(iterations=50), cases(), tmp_path / "M")
    for event in gen:
        if event.stage == "checkpoint" and event.done >= 4:
            break
    gen.close()
    ckpt = tmp_path / "M.checkpoints"
    os.rename(ckpt / "last", ckpt / f".last.old-{os.getpid()}-abcdef")  # killed right here
    resumed = iter_train(tiny_config(iterations=50), cases(), tmp_path / "M", resume=True)
    message = next(resumed)
    assert "resumed at iteration 4" in message.message
    resumed.close()


def test_disk_full_while_saving_a_checkpoint_is_one_sentence(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    from napari_selfreg.training import CheckpointError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CheckpointError, match="could not write the checkpoint .* previous checkpoint is intact"):  # fmt: skip
        for _ in iter_train(tiny_config(), cases(), tmp_path / "M"):
            pass
    assert not (tmp_path / "M.checkpoints").exists()  # no empty folder left behind


def test_sparse_label_values_are_refused_before_training(tmp_path):
    with pytest.raises(TrainingError, match=r"values 0, 255 .* 256 outputs; remap them, e.g. --label-map 255:1"):  # fmt: skip
        next(iter_train(tiny_config(), cases(labels_fn=lambda lab: np.where(lab > 0, 255, 0)), tmp_path / "M"))  # fmt: skip


@pytest.mark.parametrize(
    "settings, message",
    [({"val_every": 0}, "val_every must be at least 1"), ({"max_seconds": -1}, "time budget must be positive"),
     ({"label_map": {1: -3}}, "cannot be negative"), ({"patch_size": (1, 1, 1)}, "smaller than 4 voxels")],
)  # fmt: skip
def test_bad_settings_are_refused_in_one_sentence(tmp_path, settings, message):
    with pytest.raises(TrainingError, match=message):
        next(iter_train(tiny_config(**settings), cases(), tmp_path / "M"))


def test_the_cli_names_resume_after_an_interrupt_and_handles_sigterm(folders, tmp_path):
    script = (
        "import os, pathlib, signal, sys, threading, time\n"
        "from napari_selfreg.cli import main\n"
        "def stop_after_a_checkpoint():  # whatever the load of the machine\n"
        f"    last = pathlib.Path({str(tmp_path / 'M.checkpoints' / 'last')!r})\n"
        "    end = time.time() + 240\n"
        "    while not last.exists() and time.time() < end:\n"
        "        time.sleep(0.2)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "threading.Thread(target=stop_after_a_checkpoint, daemon=True).start()\n"
        f"sys.exit(main({['train', '--images', str(folders / 'images'), '--labels', str(folders / 'labels'), '--out', str(tmp_path / 'M'), '--iterations', '100000', '--val-every', '2', '--patience', '0', *TINY]!r}))\n"
    )  # fmt: skip
    env = {**os.environ, "NAPARI_SELFREG_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 130, done.stderr
    assert "--resume" in done.stderr.splitlines()[-1]
    leftovers = [p.name for p in tmp_path.rglob(".*") if p.name != ".lock"]
    assert not [n for n in leftovers if ".tmp" in n or "selfreg-" in n], leftovers
    assert not (tmp_path / "M.checkpoints" / ".lock").exists()


# ----------------------------------------------------------------------------- segment


def left_by_a_killed_run(path: Path, folder: bool = False) -> None:
    """A temporary of a process that no longer runs, last changed an hour ago."""
    if not path.exists():
        path.mkdir() if folder else path.write_bytes(b"partial")
    hour_ago = time.time() - 3600
    os.utime(path, (hour_ago, hour_ago))


@pytest.fixture
def scans(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        io.write_volume(folder / f"{name}.nii.gz", rng.normal(size=(20, 20, 20)).astype(np.float32), affine=np.eye(4))  # fmt: skip
    (folder / "b.nii.gz").write_bytes(b"not a volume")  # broken
    (folder / "._a.nii.gz").write_bytes(b"macos resource fork")
    left_by_a_killed_run(folder / ".selfreg-tmp-999999999-abcdef.nii.gz")
    return folder


def test_a_folder_run_skips_bad_files_and_a_rerun_continues(tiny_model, scans, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["segment", str(scans), "-o", str(out), "--model", str(tiny_model), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "1 of 3 input(s) failed" in err and "b.nii.gz" in err
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.nii.gz", "c_labels.nii.gz"]
    code = main(["segment", str(scans), "-o", str(out), "--model", str(tiny_model), "--quiet", "--skip-existing"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "1 of 1 input(s) failed (2 skipped: their labels exist)" in err
    error = next(line for line in err.splitlines() if "b.nii.gz" in line)
    assert error.count("b.nii.gz") == 1, error  # the file is named once
    io.write_volume(scans / "b.nii.gz", np.zeros((20, 20, 20), np.float32) + 1, affine=np.eye(4))
    code = main(["segment", str(scans), "-o", str(out), "--model", str(tiny_model), "--quiet", "--skip-existing"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0 and "skipping" in captured.out and "constant" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.nii.gz", "b_labels.nii.gz", "c_labels.nii.gz"]  # fmt: skip


def test_write_problems_show_before_the_inference(
    tiny_model, scans, tmp_path, monkeypatch, capsys
):
    from napari_selfreg import cli

    monkeypatch.setattr(cli, "segment_one", lambda *a: pytest.fail("inference started"))
    long = tmp_path / "out" / ("x" * 251 + ".nii.gz")
    code = main(["segment", str(scans / "a.nii.gz"), "-o", str(long), "--model", str(tiny_model)])
    assert code == 2 and "longer than the 255 bytes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing left behind


def test_a_full_disk_leaves_no_empty_output_folder(
    tiny_model, scans, tmp_path, monkeypatch, capsys
):
    def full(*args, **kwargs):
        raise io.VolumeWriteError("cannot write: the disk is full.")

    monkeypatch.setattr(io, "write_labels", full)
    code = main(["segment", str(scans / "a.nii.gz"), "-o", str(tmp_path / "new" / "deep" / "s.nii.gz"), "--model", str(tiny_model), "--quiet"])  # fmt: skip
    assert code == 2 and "disk is full" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_one_absurd_voxel_does_not_decide_the_labels(tiny_model):
    from napari_selfreg.inference import Predictor

    image, _ = make_phantom((24, 24, 24), 3, seed=3)
    predictor = Predictor(load_model(tiny_model), precision="fp32")
    reference = np.asarray(predictor.segment(image).labels)
    hostile = image.copy()
    hostile[0, 0, 0] = 3e38
    result = predictor.segment(hostile)
    assert any("clipped" in w for w in result.info["warnings"])
    assert np.mean(np.asarray(result.labels)[1:, 1:, 1:] == reference[1:, 1:, 1:]) > 0.99
    assert any("constant" in w for w in predictor.segment(np.zeros((24, 24, 24))).info["warnings"])


def test_a_single_slice_is_refused_the_same_way_in_any_axis(tiny_model, tmp_path, capsys):
    for shape in ((20, 20, 1), (1, 20, 20)):
        path = io.write_volume(tmp_path / f"s{shape[0]}.nii.gz", np.ones(shape, np.float32), affine=np.eye(4))  # fmt: skip
        code = main(["segment", str(path), "-o", str(tmp_path / "o.nii.gz"), "--model", str(tiny_model)])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and "a 3D model needs a 3D volume" in err, err


def test_tiles_below_the_network_s_down_sampling_are_refused(tiny_model, scans, tmp_path, capsys):
    code = main(["segment", str(scans / "a.nii.gz"), "-o", str(tmp_path / "o.nii.gz"), "--model", str(tiny_model), "--tile", "1", "1", "1"])  # fmt: skip
    assert code == 2 and "the tile [1, 1, 1] is too small" in capsys.readouterr().err


def test_the_ranking_and_statistics_files_of_a_folder_run(tiny_model, scans, tmp_path, capsys):
    io.write_volume(scans / "b.nii.gz", np.ones((20, 20, 20), np.float32), affine=np.eye(4))
    stats = tmp_path / "volumes.csv"
    code = main(["segment", str(scans), "-o", str(tmp_path / "out"), "--model", str(tiny_model), "--quiet", "--statistics", str(stats)])  # fmt: skip
    assert code == 0
    rows = stats.read_text().splitlines()
    assert rows[0].startswith("file,labels,background voxels,background ml,outer voxels,outer ml,outer fraction")  # fmt: skip
    assert len(rows) == 4  # one row per input
    as_json = tmp_path / "volumes.json"
    main(["segment", str(scans / "a.nii.gz"), "-o", str(tmp_path / "one.nii.gz"), "--model", str(tiny_model), "--quiet", "--statistics", str(as_json)])  # fmt: skip
    files = json.loads(as_json.read_text())["files"]
    assert len(files) == 1 and set(files[0]["classes"]) == {"background", "outer", "inner"}
    total = sum(c["voxels"] for c in files[0]["classes"].values())
    assert total == 20**3


def test_a_continued_folder_run_keeps_every_row_and_side_files_are_never_inputs(tiny_model, scans, tmp_path, capsys):  # fmt: skip
    io.write_volume(scans / "b.nii.gz", np.ones((20, 20, 20), np.float32), affine=np.eye(4))
    out, stats, ranks = tmp_path / "out", tmp_path / "volumes.csv", tmp_path / "next.json"
    run = ["segment", str(scans), "-o", str(out), "--model", str(tiny_model), "--quiet",
           "--statistics", str(stats), "--rank-slices", str(ranks)]  # fmt: skip
    assert main(run) == 0
    first, ranked = stats.read_text(), json.loads(ranks.read_text())["inputs"]
    (out / "b_labels.nii.gz").unlink()  # as if the run had stopped before b
    capsys.readouterr()
    elsewhere = [str(tmp_path / "out2") if a == str(out) else a for a in run]
    assert main(elsewhere) == 2  # the side files exist: not replaced without a word
    assert "--statistics" in capsys.readouterr().err and stats.read_text() == first
    assert main([*run, "--skip-existing"]) == 0
    assert stats.read_text() == first  # a and c from their labels, b segmented again
    assert json.loads(ranks.read_text())["inputs"] == ranked
    scan = scans / "a.nii.gz"
    before = scan.read_bytes()
    for flag, name in (("--rank-slices", "a.nii.gz"), ("--statistics", "x.txt")):
        args = ["segment", str(scan), "-o", str(tmp_path / "s.nii.gz"), "--model", str(tiny_model), flag, str(scans / name)]  # fmt: skip
        assert main(args) == 2 and flag in capsys.readouterr().err
    assert scan.read_bytes() == before and not (tmp_path / "s.nii.gz").exists()


def test_a_killed_finetuning_leaves_nothing_after_the_next_start(tmp_path, tiny_model):
    from napari_selfreg.training import FinetuneConfig
    from napari_selfreg.training.finetune import finetune

    image, labels = make_phantom((16, 16, 16), 3, seed=0)
    leftover = tmp_path / ".selfreg-finetune-999999999-abcdef"  # SIGKILL left it
    leftover.mkdir()
    (leftover / "last").mkdir()
    left_by_a_killed_run(leftover)
    changed = np.zeros(labels.shape, bool)
    changed[8, 4:8, 4:8] = True
    finetune(tiny_model, image, labels, changed, FinetuneConfig(iterations=1, precision="fp32"), tmp_path / "ft")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft", "selfreg-home"]


# ----------------------------------------------------------------------------- audit of issue 19


def test_a_full_disk_while_saving_the_final_model_is_one_sentence(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    from napari_selfreg.training import CheckpointError

    save = safetensors.torch.save_file

    def full_beside_the_model(tensors, path, *args, **kwargs):
        if Path(path).parent.parent == tmp_path:  # the model's temporary, not a checkpoint's
            raise SafetensorError("Error while serializing: IoError(No space left on device)")
        return save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_beside_the_model)
    with pytest.raises(CheckpointError, match=r"could not write the model .*No space left.* intact - run again with --resume"):  # fmt: skip
        for _ in iter_train(tiny_config(), cases(), tmp_path / "M"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["M.checkpoints", "selfreg-home"]


def test_a_parked_best_checkpoint_is_recovered_and_leftovers_cleared(tmp_path):
    config = tiny_config(iterations=50, val_fraction=0.5)
    gen = iter_train(config, cases(), tmp_path / "M")
    for event in gen:
        if event.stage == "checkpoint" and event.model_path.name == "last":
            break
    gen.close()
    ckpt = tmp_path / "M.checkpoints"
    os.rename(ckpt / "best", ckpt / f".best.old-{os.getpid()}-abcdef")  # killed right here
    (ckpt / ".last.old-999999999-fedcba").mkdir()  # killed after the second rename
    resumed = iter_train(config, cases(), tmp_path / "M", resume=True)
    assert "resumed at iteration 2" in next(resumed).message
    resumed.close()
    assert (ckpt / "best" / "model.json").is_file()
    assert not [p.name for p in ckpt.iterdir() if ".old-" in p.name]


def test_an_interrupted_checkpoint_write_leaves_no_temporary_folder(tiny_model, tmp_path, monkeypatch):  # fmt: skip
    import torch

    from napari_selfreg.training import checkpoint

    def interrupted(state):
        raise KeyboardInterrupt

    bundle = load_model(tiny_model)
    optimizer = torch.optim.AdamW(bundle.network.parameters())
    monkeypatch.setattr(checkpoint, "flatten_optimizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_checkpoint(tmp_path / "ckpt" / "last", bundle.network, bundle.card, optimizer, {})  # fmt: skip
    assert not list((tmp_path / "ckpt").iterdir())


def test_python_m_training_stops_on_sigterm_like_ctrl_c(tmp_path):
    script = (
        "import os, signal, sys, time\n"
        "from napari_selfreg.training import cli\n"
        "def run(args):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "cli.cmd_train = run\n"
        "sys.exit(cli.main(['train', '--images', 'i', '--labels', 'l', '--out', 'M']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert "interrupted" in done.stderr


@pytest.mark.parametrize("name", ["x" * 101, ".hidden", "a..b"])
def test_an_output_name_that_cannot_be_a_model_name_is_refused_before_training(tmp_path, name):
    with pytest.raises(TrainingError, match="cannot be a folder name"):
        next(iter_train(tiny_config(), cases(), tmp_path / name))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["selfreg-home"]  # nothing written


def test_a_long_base_name_still_gives_a_valid_finetuned_name(tiny_model, tmp_path):
    from napari_selfreg.modelfile import MAX_NAME, save_model
    from napari_selfreg.training import FinetuneConfig
    from napari_selfreg.training.finetune import finetune

    bundle = load_model(tiny_model)
    base = save_model(bundle.network, bundle.card, tmp_path / ("b" * MAX_NAME))
    image, labels = make_phantom((16, 16, 16), 3, seed=0)
    changed = np.zeros(labels.shape, bool)
    changed[8, 4:8, 4:8] = True
    config = FinetuneConfig(iterations=1, precision="fp32")
    first = finetune(base, image, labels, changed, config)
    second = finetune(base, image, labels, changed, config)
    assert first.name == "b" * (MAX_NAME - 7) + "-ft" and second.name == first.name + "-v2"
    assert load_model(second).card.name == second.name


def test_the_zarr_output_temporary_is_short_and_found_by_clear_stale(tiny_model, tmp_path, monkeypatch):  # fmt: skip
    from napari_selfreg import files
    from napari_selfreg.inference import Predictor, outputs

    made = []
    original = outputs._zarr_outputs
    monkeypatch.setattr(outputs, "_zarr_outputs", lambda path, specs: made.append(path) or original(path, specs))  # fmt: skip
    left_by_a_killed_run(tmp_path / ".selfreg-zarr-999999999-abcdef", folder=True)
    image, _ = make_phantom((20, 20, 20), 3, seed=1)
    Predictor(load_model(tiny_model), precision="fp32").segment(image, out=tmp_path / ("o" * 200 + ".zarr"))  # fmt: skip
    assert files._STALE.match(made[0].name) and len(made[0].name) < 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o" * 200 + ".zarr", "selfreg-home"]


@pytest.mark.parametrize("options", [["--model", "no-such-model"], ["--tile", "1", "1", "1"]])
def test_a_bad_model_or_tile_leaves_no_output_folder(tiny_model, scans, tmp_path, capsys, options):  # fmt: skip
    args = ["segment", str(scans / "a.nii.gz"), "-o", str(tmp_path / "new" / "deep" / "s.nii.gz"), "--model", str(tiny_model)]  # fmt: skip
    assert main(args + options) == 2
    assert capsys.readouterr().err.startswith("napari-selfreg: error:")
    assert not (tmp_path / "new").exists()


def test_one_absurd_voxel_outside_the_statistics_subsample_is_clipped():
    from napari_selfreg import preprocess

    image = np.random.default_rng(0).normal(100, 20, (180, 180, 180)).astype(np.float32)
    assert image.size > preprocess.MAX_STAT_SAMPLES
    image[1, 1, 1] = 3e38  # odd indices: never in the stride-2 subsample
    stats = preprocess.normalization_stats(image, {"method": "zscore", "foreground": "all"})
    assert any("clipped" in w for w in stats.warnings)
    out = preprocess.apply_normalization(image[:4], stats)
    assert np.isfinite(out).all() and float(np.abs(out).max()) < 10


def test_many_nonfinite_voxels_give_a_warning():
    from napari_selfreg import preprocess

    image = np.random.default_rng(1).normal(100, 20, (40, 40, 40)).astype(np.float32)
    image[:5] = np.nan
    image[5] = np.inf
    stats = preprocess.normalization_stats(image, {"method": "zscore"})
    assert stats.nonfinite == 6 * 40 * 40
    assert any("15 % of the voxels are NaN or infinite" in w for w in stats.warnings)
    assert np.isfinite(preprocess.apply_normalization(image, stats)).all()


def test_training_files_of_another_type_are_named_or_ignored(folders):
    from napari_selfreg.training import load_folder

    for sub in ("images", "labels"):
        (folders / sub / "extra.nrrd").write_bytes(b"NRRD0004\n")
    assert [c.name for c in load_folder(folders / "images", folders / "labels")] == ["c0", "c1", "c2"]  # fmt: skip
    only = folders / "nrrd"
    only.mkdir()
    (only / "a.nrrd").write_bytes(b"NRRD0004\n")
    with pytest.raises(TrainingError, match=r"holds no image files .*'a.nrrd' of another type - convert to NIfTI"):  # fmt: skip
        load_folder(only, only)
