"""Model folders: bit-exact round trip, no pickles, no overwrites, atomic writes."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from napari_selfreg import models
from napari_selfreg.modelfile import (
    CARD_FILE,
    WEIGHTS_FILE,
    ModelCard,
    ModelFileError,
    list_models,
    load_model,
    next_version_path,
    read_card,
    save_model,
)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_SELFREG_HOME", str(tmp_path / "home"))


def _card(name="tiny", **kw):
    options = {"in_channels": 1, "num_classes": 3, "channels": [4, 8, 16], "norm": "batch"}
    return ModelCard(
        name=name,
        architecture="unet3d",
        options=options,
        class_names=["background", "a", "b"],
        normalization={"method": "zscore"},
        patch_size=[32, 32, 32],
        spacing=[1.0, 1.0, 1.0],
        **kw,
    )


def _trained_like(card):
    torch.manual_seed(0)
    net = models.build(card.architecture, **card.options)
    net.train()
    with torch.no_grad():  # move BatchNorm running stats away from their defaults
        net(torch.randn(2, 1, 16, 16, 16))
    return net.eval()


def test_round_trip_is_bit_exact(tmp_path):
    card = _card(metrics={"dice": {"a": 0.9}}, training={"iterations": 10}, parent="base")
    net = _trained_like(card)
    path = save_model(net, card, tmp_path / "m")
    bundle = load_model(path)
    for key, value in net.state_dict().items():
        assert torch.equal(bundle.network.state_dict()[key], value), key
    x = torch.randn(1, 1, 13, 14, 15)
    with torch.no_grad():
        assert torch.equal(net(x), bundle.network(x))
    assert bundle.card.class_names == card.class_names
    assert bundle.card.metrics == {"dice": {"a": 0.9}}
    assert bundle.card.parent == "base"
    assert bundle.card.name == "m"
    assert not bundle.network.training


def test_model_files_follow_the_umask(tmp_path):
    import os

    card = _card()
    old = os.umask(0o022)
    try:
        path = save_model(_trained_like(card), card, tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in path.iterdir()}
    assert modes == {"model.json": oct(0o644), "model.safetensors": oct(0o644)}  # 0600 before
    assert oct(path.stat().st_mode & 0o777) == oct(0o755)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    card = _card()
    path = save_model(_trained_like(card), card, tmp_path / "m")

    def forbidden(*args, **kwargs):
        raise AssertionError("a model file was unpickled")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    load_model(path)
    assert (path / WEIGHTS_FILE).read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle stream


def test_refuses_to_overwrite_and_versions(tmp_path):
    card = _card()
    net = _trained_like(card)
    path = save_model(net, card, tmp_path / "m")
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_model(net, card, path)
    v2 = save_model(net, card, path, new_version=True)
    v3 = save_model(net, card, path, new_version=True)
    assert (v2.name, v3.name) == ("m-v2", "m-v3")
    assert next_version_path(v3).name == "m-v4"
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before


def test_a_model_saved_meanwhile_under_the_name_is_kept(tmp_path, monkeypatch):
    """Two fine-tunes to one OUT: the later one takes the next version, not an error."""
    from napari_selfreg import modelfile

    card = _card()
    net = _trained_like(card)
    real_digest = modelfile.weights_sha256
    others = []

    def another_process_saves_first(folder):
        if not others:
            others.append(folder)  # (the other process's save passes through here too)
            save_model(net, card, tmp_path / "m")
        return real_digest(folder)

    monkeypatch.setattr(modelfile, "weights_sha256", another_process_saves_first)
    path = save_model(net, card, tmp_path / "m", new_version=True)
    assert path.name == "m-v2" and read_card(path).name == "m-v2"
    assert read_card(tmp_path / "m").name == "m"
    shutil.rmtree(tmp_path / "m")
    others.clear()
    with pytest.raises(FileExistsError, match="appeared while saving"):  # nothing of ours left
        save_model(net, card, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m-v2"]


def test_a_folder_named_like_a_model_does_not_hide_it(tmp_path, monkeypatch):
    """E.g. an export written to ./brain-tissue-unet3d: no model card, so not a model."""
    from napari_selfreg.modelfile import BUNDLED_DIR, DEFAULT_MODEL, resolve_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / DEFAULT_MODEL / "configs").mkdir(parents=True)
    assert resolve_model_path(None) == BUNDLED_DIR / DEFAULT_MODEL
    assert resolve_model_path(DEFAULT_MODEL) == BUNDLED_DIR / DEFAULT_MODEL
    (tmp_path / "other").mkdir()
    assert resolve_model_path("other") == Path("other")  # reading it says what is wrong
    with pytest.raises(ModelFileError, match="not a napari-selfreg model"):
        read_card(resolve_model_path("other"))


def test_new_classes_get_colours_no_class_has():
    from napari_selfreg.modelfile import DEFAULT_COLORS, colors_after

    bundled = ["#000000", "#f58231", "#4363d8"]  # the default model: orange, blue
    fresh = colors_after(bundled, 3)
    assert len(set(fresh)) == 3 and not set(fresh) & set(bundled)
    assert fresh[0] == "#e6194b"  # the first default colour no class uses
    many = colors_after(bundled, 40)  # more than there are: they come round again
    assert set(many) == set(DEFAULT_COLORS[1:]) and many[:11] == colors_after(bundled, 11)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    card = _card()
    net = _trained_like(card)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_model(net, card, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_default_location_and_listing(tmp_path):
    card = _card(name="mine")
    path = save_model(_trained_like(card), card)
    assert path.parent == tmp_path / "home" / "models"
    names = [name for name, _, _ in list_models()]
    assert "mine" in names
    assert load_model("mine").card.name == "mine"


def test_reduced_precision_storage_loads_as_float32(tmp_path):
    card = _card()
    net = _trained_like(card)
    path = save_model(net, card, tmp_path / "m", dtype="bfloat16")
    small = (path / WEIGHTS_FILE).stat().st_size
    full = (save_model(net, card, tmp_path / "f") / WEIGHTS_FILE).stat().st_size
    assert small < 0.6 * full
    bundle = load_model(path)
    weight = bundle.network.stem[0].weight
    assert weight.dtype == torch.float32
    ref = net.stem[0].weight
    assert torch.allclose(weight, ref, rtol=1e-2, atol=1e-3)


def test_bad_model_files_give_clear_errors(tmp_path):
    with pytest.raises(ModelFileError, match="no model"):
        load_model(tmp_path / "missing")
    folder = tmp_path / "notours"
    folder.mkdir()
    (folder / CARD_FILE).write_text(json.dumps({"hello": 1}))
    with pytest.raises(ModelFileError, match="not a napari-selfreg model"):
        load_model(folder)
    (folder / CARD_FILE).write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_model(folder)
    card = _card()
    path = save_model(_trained_like(card), card, tmp_path / "m")
    (path / WEIGHTS_FILE).write_bytes(b"garbage" * 10)
    with pytest.raises(ModelFileError, match="do not match their card"):
        load_model(path)
    data = json.loads((path / CARD_FILE).read_text())
    del data["weights_sha256"]  # a card without a digest: the file itself is checked
    (path / CARD_FILE).write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match="corrupt"):
        load_model(path)
    other = save_model(_trained_like(card), card, tmp_path / "n")
    data["options"]["channels"] = [4, 8, 32]
    (other / CARD_FILE).write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match="do not fit"):
        load_model(other)


def test_card_validation():
    with pytest.raises(ValueError, match="class names"):
        ModelCard("x", "unet3d", {"num_classes": 3}, ["a", "b"])
    card = ModelCard("x", "unet3d", {"num_classes": 2}, ["bg", "fg"])
    assert len(card.class_colors) == 2 and card.class_colors[0].startswith("#")


def test_hostile_and_malformed_cards_are_refused_in_one_sentence(tmp_path, caplog):
    card = _card()
    good = save_model(_trained_like(card), card, tmp_path / "good")
    data = json.loads((good / CARD_FILE).read_text())

    def variant(folder_name, **changes):
        folder = tmp_path / folder_name
        shutil.copytree(good, folder)
        (folder / CARD_FILE).write_text(
            json.dumps({**data, **changes}) if changes else "[" * 100_000
        )
        return folder

    cases = {
        variant("escape", name="../../../somewhere/escaped"): "cannot be a folder name",
        variant("deep"): "nested too deeply",
        variant("opts", options=[1, 2]): "'options' must be",
        variant("names", class_names="abc"): "'class_names' must be",
        variant("patch", patch_size=[1, "x", 3]): "'patch_size' must be",
        variant("orient", orientation="RAR"): "'orientation' must be",
        variant("largest", keep_largest=[[0, 1]]): "'keep_largest' must be",
    }
    for folder, message in cases.items():
        with pytest.raises(ModelFileError, match=message):
            load_model(folder)
    # tampered weights: the card's digest no longer fits
    tampered = tmp_path / "tampered"
    shutil.copytree(good, tampered)
    raw = bytearray((tampered / WEIGHTS_FILE).read_bytes())
    raw[-1] ^= 0x01
    (tampered / WEIGHTS_FILE).write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="do not match their card"):
        load_model(tampered)
    # NaN weights are refused even without a digest
    net = _trained_like(card)
    with torch.no_grad():
        next(net.parameters())[0].fill_(float("nan"))
    nan = save_model(net, card, tmp_path / "nan")
    with pytest.raises(ModelFileError, match="NaN or infinite weights"):
        load_model(nan)


def test_listing_skips_a_bad_model_with_a_warning(selfreg_home, caplog):
    from napari_selfreg.modelfile import list_models, user_models_dir

    card = _card()
    save_model(_trained_like(card), card)
    bad = user_models_dir() / "bad"
    bad.mkdir(parents=True)
    (bad / CARD_FILE).write_text(json.dumps({"format": "napari-selfreg-model", "name": "bad", "architecture": "unet3d", "options": [], "class_names": ["a"]}))  # fmt: skip
    with caplog.at_level("WARNING"):
        names = [name for name, _, _ in list_models()]
    assert card.name in names and "bad" not in names
    assert any(
        "skipping the model" in r.message and "options" in r.message for r in caplog.records
    )


def test_user_models_follow_xdg_data_home(tmp_path, monkeypatch):
    from napari_selfreg.modelfile import user_models_dir

    monkeypatch.delenv("NAPARI_SELFREG_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert user_models_dir() == tmp_path / "xdg" / "napari-selfreg" / "models"
