"""The science recipes' statistics and arm settings (the recipes themselves run for hours)."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from napari_selfreg.data import make_phantom
from napari_selfreg.jobs import drain
from napari_selfreg.training import case_from_arrays, iter_train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RECIPES = Path(__file__).resolve().parents[1] / "training" / "recipes"


def recipe(name: str):
    """Import ``training/recipes/NAME.py`` as a module (recipes are scripts, not a package)."""
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))  # missu_ablation imports reproduce_selfreg_v2
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_difference_and_confidence_interval():
    v2 = recipe("reproduce_selfreg_v2")
    plain = [0.80, 0.82, 0.81, 0.79]
    arm = [0.81, 0.84, 0.81, 0.80]
    setting = {"arms": {"plain": {"seeds": [0, 1, 2, 3], "dice": plain},
                        "scr": {"seeds": [3, 1, 0, 2], "dice": [arm[3], arm[1], arm[0], arm[2]]},
                        "ifd": {"seeds": [5], "dice": [0.9]}}}  # fmt: skip
    mean, half, n = v2.paired(setting, "scr")  # paired by seed, not by position
    d = (np.array(arm) - np.array(plain)) * 100
    assert n == 4 and mean == pytest.approx(d.mean())
    assert half == pytest.approx(stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2)
    assert v2.paired(setting, "ifd") is None  # no shared seed
    table = v2.report({"settings": {"synth2d": {"arms": {
        a: {**r, "mean_abs_cos": {}, "effective_rank": {}} for a, r in setting["arms"].items()}}}})  # fmt: skip
    assert f"{mean:+.2f} +- {half:.2f} (n=4)" in table


def test_missu_ablation_arms_train(tmp_path):
    ablation = recipe("missu_ablation")
    image, labels = make_phantom((16, 16, 16), 3, seed=0)
    cases = [case_from_arrays(image, labels, name="p")]
    terms = {}
    for arm in ablation.ARMS:
        cfg = dataclasses.replace(ablation.config(arm, 0, 2, 16), precision="fp32", batch_size=1)
        events = []
        path = drain(iter_train(cfg, cases, tmp_path / arm), events.append)
        assert (path / "model.safetensors").is_file()
        terms[arm] = {k: v for e in events if e.stage == "iteration" for k, v in e.losses.items()}
    assert terms["plain"]["kd"] == 0 and "lmsf_aux" not in terms["plain"]
    assert terms["distillation"]["kd"] > 0 and "lmsf_aux" not in terms["distillation"]
    assert terms["distillation_lmsf"]["kd"] > 0 and terms["distillation_lmsf"]["lmsf_aux"] > 0
    assert terms["aux_heads"]["kd"] == 0 and terms["aux_heads"]["lmsf_aux"] > 0


def test_default_model_publish_ships_a_model_trained_elsewhere(tmp_path):
    from napari_selfreg.modelfile import BUNDLED_DIR, load_model, weights_sha256

    default_model = recipe("default_model")
    trained = tmp_path / "trained-on-gpu"
    shutil.copytree(BUNDLED_DIR / "brain-tissue-unet3d-v1", trained)
    out = tmp_path / "brain-tissue-unet3d"
    argv = ["--publish", str(trained), "--out", str(out), "--init", "parent", "--note", "GPU"]
    assert default_model.main(argv) == 0
    card = load_model(out).card
    assert card.name == "brain-tissue-unet3d" and card.description == default_model.DESCRIPTION
    assert card.training["note"] == "GPU" and card.training["init"] == "parent"
    assert card.training["trained_by"] == load_model(trained).card.training["command"]
    assert weights_sha256(out) == weights_sha256(trained)  # bf16 in, the same bf16 out
    assert default_model.main(argv) == 2  # never over an existing model without --replace
