"""Class volume reports: one computation for the CLI's table and file and the widget."""

import csv
import json

import numpy as np
import pytest

from napari_selfreg.volumes import as_record, as_text, as_tsv, class_volumes, write_statistics


def test_volumes_use_the_voxel_size_of_an_oblique_affine():
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[:2] = 1  # 60 voxels
    labels[3, :2, :3] = 2  # 6 voxels
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])  # fmt: skip
    rows, unit = class_volumes(labels, ["bg", "a", "b"], rotation @ np.diag([2.0, 0.5, 3.0]))
    assert unit == "ml"
    assert [r.voxels for r in rows] == [120 - 66, 60, 6]
    assert rows[1].amount == pytest.approx(60 * 3 / 1000)
    assert rows[0].fraction is None
    assert rows[1].fraction == pytest.approx(60 / 66) and rows[2].fraction == pytest.approx(6 / 66)


def test_labels_beyond_the_names_and_2d_areas():
    labels = np.array([[0, 1], [4, 4]], np.uint8)
    rows, unit = class_volumes(labels, ["bg", "a"], np.diag([0.5, 0.5]))
    assert unit == "mm^2"
    assert [r.name for r in rows] == ["bg", "a", "class 2", "class 3", "class 4"]
    assert rows[4].amount == pytest.approx(0.5)


def test_nothing_labelled_gives_zero_fractions():
    rows, _ = class_volumes(np.zeros((2, 2, 2), np.uint8), ["bg", "a"], np.eye(3))
    assert rows[1].fraction == 0.0 and rows[0].voxels == 8


def test_text_tsv_and_files(tmp_path):
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:3] = 1
    labels[3:4] = 2
    rows, unit = class_volumes(labels, ["background", "grey matter", "white matter"], np.eye(3))
    tsv = as_tsv(rows, unit).splitlines()
    assert tsv[0] == "class\tvoxels\tml\t% of labelled"
    assert tsv[1] == "background\t600\t0.60\t"
    assert tsv[2] == "grey matter\t300\t0.30\t75.0"
    text = as_text(rows, unit).splitlines()
    ends = {line.index(f"{r.amount:.2f}") + len(f"{r.amount:.2f}") for line, r in zip(text[1:], rows, strict=True)}  # fmt: skip
    assert len(ends) == 1 and text[0].index(" ml") + 3 in ends  # aligned columns
    record = as_record(rows, unit, file="a.nii.gz", labels="a_seg.nii.gz")
    names = [r.name for r in rows]
    path = write_statistics(tmp_path / "v.csv", [record, record], names)
    table = list(csv.reader(path.open()))
    assert table[0][:4] == ["file", "labels", "background voxels", "background ml"]
    assert "background fraction" not in table[0] and "white matter fraction" in table[0]
    assert len(table) == 3 and table[1][table[0].index("white matter fraction")] == "0.25"
    data = json.loads(write_statistics(tmp_path / "v.json", [record], names).read_text())
    assert data["files"][0]["classes"]["grey matter"] == {"voxels": 300, "ml": 0.3, "fraction_of_labelled": 0.75}  # fmt: skip
    with pytest.raises(ValueError, match="needs a .csv or .json"):
        write_statistics(tmp_path / "v.txt", [record], names)
