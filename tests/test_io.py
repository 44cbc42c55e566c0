"""Reading (nibabel formats, DICOM, TIFF), atomic writing, exact round trips, napari placement."""

import errno
import gzip
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from napari_selfreg import io
from napari_selfreg._reader import napari_get_reader
from napari_selfreg.geometry import layer_kwargs
from napari_selfreg.io import Volume, VolumeReadError, VolumeWriteError, read_volume

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def _f32(a):
    return np.asarray(a, np.float32).astype(np.float64)


# --------------------------------------------------------------------------- nibabel files


def test_nifti1_4d_needs_a_channel():
    path = NIB_DATA / "example4d.nii.gz"
    with pytest.raises(VolumeReadError, match=r"4D with 2 volumes.*channel=0\.\.1"):
        read_volume(path)
    vol = read_volume(path, channel=1)
    img = nib.load(path)
    assert vol.shape == (128, 96, 24) and vol.data.dtype == np.int16  # no scaling: dtype kept
    assert np.array_equal(vol.data, np.asarray(img.dataobj)[..., 1])
    assert np.array_equal(vol.affine, img.affine)
    assert vol.spacing == pytest.approx(img.header.get_zooms()[:3])
    assert vol.metadata["format"] == "nifti1" and vol.metadata["header"] is not None
    with pytest.raises(VolumeReadError, match="out of range"):
        read_volume(path, channel=2)


def test_nifti2_bigendian_and_3d():
    v2 = read_volume(NIB_DATA / "example_nifti2.nii.gz", channel=0)
    assert v2.metadata["format"] == "nifti2" and v2.shape == (32, 20, 12)
    anat = read_volume(NIB_DATA / "anatomical.nii")  # big-endian int16 on disk
    assert anat.data.dtype == np.dtype("int16") and anat.data.dtype.isnative
    assert np.array_equal(anat.data, np.asarray(nib.load(NIB_DATA / "anatomical.nii").dataobj))
    std = read_volume(NIB_DATA / "standard.nii.gz")
    assert std.shape == (4, 5, 7) and std.data.dtype == np.uint8
    with pytest.raises(VolumeReadError, match="no 4th axis"):
        read_volume(NIB_DATA / "standard.nii.gz", channel=1)


def test_mgz_and_minc(tmp_path):
    mgz = read_volume(NIB_DATA / "test.mgz", channel=1)
    img = nib.load(NIB_DATA / "test.mgz")
    assert mgz.metadata["format"] == "mgh" and mgz.shape == (3, 4, 5)
    assert np.array_equal(mgz.data, np.asarray(img.dataobj)[..., 1])
    assert np.array_equal(mgz.affine, _f32(img.affine))
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    nib.MGHImage(data, np.diag([1.5, 1.0, 2.0, 1.0])).to_filename(tmp_path / "x.mgz")
    whole = read_volume(tmp_path / "x.mgz")  # gzip read to the end (CRC checked)
    assert np.array_equal(whole.data, data) and whole.spacing == (1.5, 1.0, 2.0)
    minc = read_volume(NIB_DATA / "minc1_1_scale.mnc")
    ref = nib.load(NIB_DATA / "minc1_1_scale.mnc")
    assert minc.metadata["format"] == "minc" and minc.data.dtype == np.float32
    assert np.allclose(minc.data, ref.get_fdata()) and np.array_equal(
        minc.affine, _f32(ref.affine)
    )
    try:
        import h5py  # noqa: F401
    except ImportError:
        with pytest.raises(VolumeReadError, match="h5py"):
            read_volume(NIB_DATA / "minc2_1_scale.mnc")
    else:
        assert read_volume(NIB_DATA / "minc2_1_scale.mnc").ndim == 3


def test_analyze_pair_scaled_float64_and_2d(tmp_path):
    data = np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8)
    nib.save(nib.AnalyzeImage(data, np.diag([2.0, 3.0, 4.0, 1.0])), tmp_path / "a.hdr")
    vol = read_volume(tmp_path / "a.hdr")
    assert vol.metadata["format"] == "analyze" and np.array_equal(vol.data, data)
    assert vol.spacing == (2.0, 3.0, 4.0)
    (tmp_path / "a.img").unlink()
    with pytest.raises(VolumeReadError, match="companion file"):
        read_volume(tmp_path / "a.hdr")

    scaled = nib.Nifti1Image(data, np.eye(4))
    scaled.header.set_slope_inter(2.5, -1.0)
    nib.save(scaled, tmp_path / "s.nii")
    vol = read_volume(tmp_path / "s.nii")
    assert vol.data.dtype == np.float32 and np.allclose(vol.data, data * 2.5 - 1)

    nib.save(nib.Nifti1Image(np.ones((5, 6, 7)), np.eye(4)), tmp_path / "f64.nii.gz")
    assert read_volume(tmp_path / "f64.nii.gz").data.dtype == np.float32

    flat = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30, 1)
    nib.save(nib.Nifti1Image(flat, np.diag([0.5, 0.7, 3.0, 1.0])), tmp_path / "flat.nii.gz")
    vol = read_volume(tmp_path / "flat.nii.gz")
    assert vol.ndim == 2 and vol.shape == (20, 30) and vol.spacing == (0.5, 0.699999988079071)


def test_nonfinite_voxels_are_counted_not_rejected(tmp_path):
    data = np.zeros((4, 5, 6), np.float32)
    data[0, 0, :3] = [np.nan, np.inf, -np.inf]
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii")
    vol = read_volume(tmp_path / "nan.nii")
    assert vol.metadata["nonfinite"] == 3
    assert any("NaN" in w for w in vol.metadata["warnings"])


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_give_one_sentence_errors(tmp_path):
    cases = {}
    cases["missing.nii.gz"] = "does not exist"
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    cases["empty.nii.gz"] = r"is empty \(0 bytes\)"
    (tmp_path / "text.nii.gz").write_text("this is not an image\n" * 20)
    cases["text.nii.gz"] = "not a valid gzip-compressed image"
    (tmp_path / "text.nii").write_text("this is not an image\n" * 40)
    cases["text.nii"] = r"not a valid \.nii image: its header cannot be read"
    (tmp_path / "notes.txt").write_text("hello")
    cases["notes.txt"] = r"unsupported file type '\.txt'"
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random((20, 20, 20)).astype(np.float32), np.eye(4)), tmp_path / "ok.nii.gz")  # fmt: skip
    raw = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    cases["cut.nii.gz"] = "truncated or corrupt"
    broken = bytearray(raw)
    broken[len(raw) // 2 : len(raw) // 2 + 64] = b"\x00" * 64
    (tmp_path / "corrupt.nii.gz").write_bytes(bytes(broken))
    cases["corrupt.nii.gz"] = "corrupt"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)), tmp_path / "u.nii")
    raw = (tmp_path / "u.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) // 2])
    cases["cut.nii"] = "truncated or corrupt"
    header = nib.load(tmp_path / "u.nii").header.copy()
    header.set_data_shape((30000, 30000, 30000))  # a damaged header, the voxels unchanged
    (tmp_path / "huge.nii").write_bytes(header.binaryblock + raw[348:])
    cases["huge.nii"] = r"truncated or corrupt: its header promises 30000 x 30000 x 30000 voxels"
    (tmp_path / "emptydir").mkdir()
    cases["emptydir"] = "holds no DICOM images"
    (tmp_path / "junkdir").mkdir()
    (tmp_path / "junkdir" / "readme.txt").write_text("no images here")
    cases["junkdir"] = "holds no DICOM images"
    for name, pattern in cases.items():
        with pytest.raises(VolumeReadError, match=pattern) as err:
            read_volume(tmp_path / name)
        message = str(err.value)
        assert message.count(". ") == 0 and message.endswith("."), message  # one sentence


# --------------------------------------------------------------------------- DICOM


def _dcm(path, pixels, position, orientation, spacing, uid, description, number, inter=-1024.0, **extra):  # fmt: skip
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_STORAGE
    meta.MediaStorageSOPInstanceUID = sop = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CT_STORAGE, sop, "CT"
    ds.SeriesInstanceUID, ds.SeriesDescription, ds.InstanceNumber = uid, description, number
    ds.Rows, ds.Columns = pixels.shape
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = 2.0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, inter
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)


AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
OBLIQUE = ((0.36, 0.48, 0.8), (0.8, -0.6, 0.0))


def _series(folder, vol, orientation=AXIAL, origin=(-12.5, 30.25, 7.0), step=2.0, uid=None, description="axial", repeats=1, prefix="IM"):  # fmt: skip
    """Write ``vol`` (columns, rows, slices) as a shuffled single-slice series; return its affine."""
    folder.mkdir(exist_ok=True)
    uid = uid or generate_uid()
    row, col = np.array(orientation[0]), np.array(orientation[1])
    normal = np.cross(row, col)
    spacing = (0.75, 0.5)  # between rows, between columns
    order = np.random.default_rng(1).permutation(vol.shape[2] * repeats)
    for k in range(vol.shape[2]):
        for r in range(repeats):
            n = k * repeats + r
            pos = np.array(origin) + k * step * normal
            _dcm(folder / f"{prefix}{order[n]:04d}", vol[:, :, k].T + 100 * r, pos, [*row, *col], spacing,
                 uid, description, n + 1, AcquisitionNumber=r + 1)  # fmt: skip
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row * spacing[1], col * spacing[0]
    lps[:3, 2], lps[:3, 3] = normal * step, origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


@pytest.mark.parametrize("orientation", [AXIAL, OBLIQUE])
def test_dicom_series_sorted_by_position(tmp_path, orientation):
    vol = np.random.default_rng(0).integers(0, 3000, (9, 7, 5)).astype(np.int16)
    affine = _series(tmp_path / "s", vol, orientation)
    read = read_volume(tmp_path / "s")
    assert read.shape == (9, 7, 5) and read.data.dtype == np.int16
    assert np.array_equal(read.data, vol - 1024)  # shuffled files, intercept applied
    assert np.allclose(read.affine, affine, atol=1e-5)
    for k in range(5):  # voxel (0, 0, k) sits at slice k's ImagePositionPatient (in RAS)
        ds = pydicom.dcmread(read.metadata["files"][k])
        ras = np.array(ds.ImagePositionPatient, float) * [-1, -1, 1]
        assert np.allclose(read.affine @ [0, 0, k, 1], [*ras, 1], atol=1e-4)
    assert read.spacing == pytest.approx((0.5, 0.75, 2.0))
    one = read_volume(read.metadata["files"][2])  # a file of the series reads the series
    assert np.array_equal(one.data, read.data)


def test_dicom_unsigned_pixels_with_a_negative_intercept(tmp_path):
    """A cropped CT: uint16 pixels all above 1024 and RescaleIntercept -1024."""
    vol = np.random.default_rng(0).integers(1100, 3000, (6, 5, 4)).astype(np.int16)
    for k in range(4):
        _dcm(tmp_path / f"IM{k}", vol[:, :, k].T, (0.0, 0.0, 2.0 * k), [*AXIAL[0], *AXIAL[1]],
             (0.5, 0.5), "1.2.3", "ct", k + 1, PixelRepresentation=0)  # fmt: skip
    read = read_volume(tmp_path)
    assert read.data.dtype.kind == "i" and np.array_equal(read.data, vol.astype(int) - 1024)


def test_a_dicom_file_reads_the_slices_its_folder_reads(tmp_path):
    """Direction cosines that differ by rounding (1e-6) still belong to one series."""
    vol = np.arange(6 * 5 * 6, dtype=np.int16).reshape(6, 5, 6)
    for k in range(6):
        jitter = 1e-6 * (k % 2)
        _dcm(tmp_path / f"IM{k}", vol[:, :, k].T, (0.0, 0.0, 2.0 * k),
             [1.0 - jitter, jitter, 0.0, 0.0, 1.0, 0.0], (0.5, 0.5), "1.2.3", "ax", k + 1)  # fmt: skip
    folder = read_volume(tmp_path)
    one = read_volume(tmp_path / "IM3")
    assert folder.shape == one.shape == (6, 5, 6)
    assert np.array_equal(one.data, folder.data)


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_dicom_files_without_the_preamble(tmp_path, implicit_vr):
    """Older exports: no 128-byte preamble, no DICM marker, no file meta (pydicom's force)."""
    vol = np.random.default_rng(0).integers(0, 3000, (6, 5, 4)).astype(np.int16)
    affine = _series(tmp_path / "s", vol)
    for f in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(f)
        ds.preamble, ds.file_meta = None, FileMetaDataset()
        pydicom.dcmwrite(f, ds, implicit_vr=implicit_vr, little_endian=True)
        assert f.read_bytes()[:2] == b"\x08\x00"
    read = read_volume(tmp_path / "s")
    assert np.array_equal(read.data, vol - 1024) and np.allclose(read.affine, affine, atol=1e-5)
    assert np.array_equal(read_volume(next((tmp_path / "s").iterdir())).data, read.data)
    assert napari_get_reader(str(tmp_path / "s")) is not None


def test_dicom_two_series_and_4d(tmp_path):
    vol = np.ones((6, 5, 3), np.int16)
    _series(tmp_path / "two", vol, uid="1.2.3.4", description="T1 axial")
    _series(tmp_path / "two", vol[:, :, :2] * 7, OBLIQUE, uid="1.2.3.5", description="T2 oblique", prefix="B")  # fmt: skip
    (tmp_path / "two" / "notes.txt").write_text("ignored")
    with pytest.raises(VolumeReadError, match=r"holds 2 DICOM series: .*open one file") as err:
        read_volume(tmp_path / "two")
    message = str(err.value)
    for part in ("'T1 axial' (SeriesInstanceUID 1.2.3.4, 3 images", "'T2 oblique' (SeriesInstanceUID 1.2.3.5, 2 images"):  # fmt: skip
        assert part in message
    assert message.count(". ") == 0
    picked = tmp_path / "two" / "B0001"
    assert np.array_equal(read_volume(picked).data, vol[:, :, :2] * 7 - 1024)

    _series(tmp_path / "4d", vol, repeats=2)
    with pytest.raises(VolumeReadError, match=r"4D with 2 images per slice position.*channel=0\.\.1"):  # fmt: skip
        read_volume(tmp_path / "4d")
    second = read_volume(tmp_path / "4d", channel=1)
    assert np.array_equal(second.data, vol + 100 - 1024)


def test_dicom_enhanced_multiframe(tmp_path):
    rng = np.random.default_rng(2)
    vol = rng.integers(0, 1000, (6, 5, 4)).astype(np.int16)  # columns, rows, frames in space
    order = [2, 0, 3, 1]  # frames stored out of spatial order
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ENHANCED_MR, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = ENHANCED_MR, meta.MediaStorageSOPInstanceUID, "MR"  # fmt: skip
    ds.SeriesInstanceUID, ds.NumberOfFrames = generate_uid(), 4
    ds.Rows, ds.Columns = 5, 6
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1

    def item(**kw):
        d = Dataset()
        for k, v in kw.items():
            setattr(d, k, v)
        return d

    shared = item(
        PixelMeasuresSequence=[item(PixelSpacing=[0.9, 0.8], SliceThickness=3.0)],
        PlaneOrientationSequence=[item(ImageOrientationPatient=[1.0, 0, 0, 0, 1.0, 0])],
        PixelValueTransformationSequence=[item(RescaleSlope=2.0, RescaleIntercept=-5.0)],
    )
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [
        item(PlanePositionSequence=[item(ImagePositionPatient=[10.0, 20.0, 3.0 * k])]) for k in order
    ]  # fmt: skip
    ds.PixelData = np.stack([vol[:, :, k].T for k in order]).astype("<i2").tobytes()
    ds.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    read = read_volume(tmp_path / "enhanced.dcm")
    assert read.shape == (6, 5, 4) and read.data.dtype == np.float32
    assert np.array_equal(read.data, vol * 2.0 - 5.0)
    assert np.allclose(read.affine, [[-0.8, 0, 0, -10], [0, -0.9, 0, -20], [0, 0, 3, 0], [0, 0, 0, 1]])  # fmt: skip


def test_pydicom_bundled_files(tmp_path):
    ct = Path(get_testdata_file("CT_small.dcm"))
    shutil.copy(ct, tmp_path / "ct.dcm")
    vol = read_volume(tmp_path / "ct.dcm")
    ds = pydicom.dcmread(ct)
    assert vol.ndim == 2 and vol.shape == (128, 128)
    assert np.array_equal(vol.data, ds.pixel_array.T.astype(np.int32) - 1024)
    ipp = np.array(ds.ImagePositionPatient, float)
    assert np.allclose(vol.affine[:3, 3], ipp * [-1, -1, 1], atol=1e-4)
    assert "affine" in layer_kwargs(vol.affine, vol.ndim)  # LPS -> RAS flips x and y
    mr = read_volume(get_testdata_file("MR_small.dcm"))  # its folder holds other series and copies
    assert mr.shape == (64, 64) and len(mr.metadata["files"]) == 1
    dose = read_volume(get_testdata_file("rtdose.dcm"))  # classic multi-frame
    ds = pydicom.dcmread(get_testdata_file("rtdose.dcm"))
    assert dose.shape == (10, 10, 15) and dose.spacing == pytest.approx((10, 10, 5))
    assert np.allclose(dose.data, np.moveaxis(ds.pixel_array, 0, -1).transpose(1, 0, 2) * float(ds.DoseGridScaling))  # fmt: skip
    seg = read_volume(get_testdata_file("liver_1frame.dcm"))  # per-frame functional groups
    assert seg.shape == (512, 512) and seg.spacing == pytest.approx((0.810547, 0.810547))
    with pytest.raises(VolumeReadError, match="colour"):
        read_volume(get_testdata_file("SC_rgb_rle.dcm"))
    with pytest.raises(VolumeReadError, match="truncated or corrupt"):
        read_volume(get_testdata_file("MR_truncated.dcm"))
    with pytest.raises(VolumeReadError, match="without an image"):
        read_volume(get_testdata_file("reportsi.dcm"))


# --------------------------------------------------------------------------- TIFF


def test_tiff_spacing_channels_and_2d(tmp_path):
    vol = np.arange(7 * 5 * 6, dtype=np.uint16).reshape(7, 5, 6)
    tifffile.imwrite(tmp_path / "ij.tif", vol, imagej=True, resolution=(2.0, 2.0), metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"})  # fmt: skip
    ij = read_volume(tmp_path / "ij.tif")
    assert np.array_equal(ij.data, vol) and ij.metadata["spacing_known"]
    assert ij.spacing == pytest.approx((0.002, 0.0005, 0.0005))
    ome_meta = {"axes": "ZYX", "PhysicalSizeX": 0.4, "PhysicalSizeY": 0.3, "PhysicalSizeZ": 1.5, "PhysicalSizeZUnit": "mm"}  # fmt: skip
    tifffile.imwrite(tmp_path / "o.ome.tif", vol, ome=True, metadata=ome_meta)
    assert read_volume(tmp_path / "o.ome.tif").spacing == pytest.approx((1.5, 0.0003, 0.0004))
    tifffile.imwrite(tmp_path / "plain.tif", vol)
    plain = read_volume(tmp_path / "plain.tif")
    assert plain.spacing == (1.0, 1.0, 1.0) and not plain.metadata["spacing_known"]
    assert "no physical voxel size" in plain.metadata["warnings"][0]
    tifffile.imwrite(tmp_path / "c.tif", np.stack([vol, vol + 1, vol + 2], 1), imagej=True, metadata={"axes": "ZCYX"})  # fmt: skip
    with pytest.raises(VolumeReadError, match=r"3 images along its C axis.*channel=0\.\.2"):
        read_volume(tmp_path / "c.tif")
    assert np.array_equal(read_volume(tmp_path / "c.tif", channel=2).data, vol + 2)
    tifffile.imwrite(tmp_path / "slice.tif", vol[0])
    assert read_volume(tmp_path / "slice.tif").shape == (5, 6)
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tif:  # pages written one by one
        for plane in vol:
            tif.write(plane, contiguous=False)
    assert np.array_equal(read_volume(tmp_path / "pages.tif").data, vol)
    with tifffile.TiffWriter(tmp_path / "mixed.tif") as tif:  # e.g. an image and a thumbnail
        tif.write(vol)
        tif.write(vol[0, :2, :3])
    mixed = read_volume(tmp_path / "mixed.tif")
    assert np.array_equal(mixed.data, vol) and "2 series" in mixed.metadata["warnings"][0]


# --------------------------------------------------------------------------- writing


def _oblique_affine():
    theta = 0.3
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])  # fmt: skip
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.9, 1.1, 2.3])
    affine[:3, 3] = [-40.3, 12.7, 5.1]
    return affine


def _nifti_sources(tmp_path):
    """Reference volumes read from NIfTI (sform oblique, qform only), DICOM and TIFF."""
    data = np.random.default_rng(0).integers(0, 500, (11, 9, 7)).astype(np.int16)
    img = nib.Nifti1Image(data, _oblique_affine())
    img.header.set_sform(_oblique_affine(), code=4)
    img.header.set_qform(_oblique_affine(), code=1)
    nib.save(img, tmp_path / "sform.nii.gz")
    qonly = nib.Nifti1Image(data, None)
    qonly.header.set_qform(_oblique_affine(), code=1)
    qonly.header.set_sform(None, code=0)
    nib.save(qonly, tmp_path / "qform.nii")
    nib.save(nib.Nifti1Image(data, None), tmp_path / "base.nii")  # no s/qform: pixdim affine
    _series(tmp_path / "dcm", data[:, :, :4], OBLIQUE)
    _series(tmp_path / "dcm2d", data[:, :, :1], OBLIQUE)
    tifffile.imwrite(tmp_path / "t.tif", data, imagej=True, resolution=(1 / 0.3, 1 / 0.3), metadata={"spacing": 1.7, "unit": "mm", "axes": "ZYX"})  # fmt: skip
    names = ["sform.nii.gz", "qform.nii", "base.nii", "dcm", "dcm2d", "t.tif"]
    return [read_volume(tmp_path / n) for n in names]


def test_round_trip_keeps_shape_and_affine_exactly(tmp_path):
    for k, ref in enumerate(_nifti_sources(tmp_path)):
        labels = (ref.data > ref.data.mean()).astype(np.uint8) * 2
        out = io.write_labels(tmp_path / f"labels{k}.nii.gz", labels, ref)
        back = read_volume(out)
        assert back.shape == ref.shape, ref.metadata["source"]
        assert np.array_equal(back.affine, ref.affine), ref.metadata["source"]
        assert np.array_equal(back.data, labels) and back.data.dtype == np.uint8
        assert back.metadata["header"].get_intent()[0] == "label"
        if ref.metadata["format"] == "nifti1":
            for code in ("sform_code", "qform_code"):
                assert back.metadata[code] == ref.metadata[code]
        image = io.write_volume(tmp_path / f"image{k}.nii", ref.data.astype(np.float32) / 3, ref)
        again = read_volume(image)
        assert np.array_equal(again.affine, ref.affine) and again.data.dtype == np.float32
        assert np.allclose(again.data, ref.data / 3)


@pytest.mark.parametrize(("unit", "size"), [("meter", 0.0015), ("micron", 1500.0)])
def test_nifti_units_other_than_mm_are_read_in_mm(tmp_path, unit, size):
    """xyzt_units says what the affine's numbers are: metres and microns become mm."""
    affine = np.diag([size, size, 2 * size, 1.0])
    affine[:3, 3] = [10 * size, 0.0, -size]
    img = nib.Nifti1Image(np.ones((4, 5, 6), np.int16), affine)
    img.header.set_xyzt_units(unit, "sec")
    nib.save(img, tmp_path / "scan.nii.gz")
    read = read_volume(tmp_path / "scan.nii.gz")
    assert read.spacing == pytest.approx((1.5, 1.5, 3.0)) and read.metadata["spatial_unit"] == unit
    assert np.allclose(read.affine[:3, 3], [15.0, 0.0, -1.5])
    back = read_volume(io.write_labels(tmp_path / "labels.nii.gz", np.ones((4, 5, 6), np.uint8), read))  # fmt: skip
    assert np.array_equal(back.affine, read.affine)
    assert back.metadata["header"].get_xyzt_units() == ("mm", "sec")


def test_written_files_keep_the_geometry_not_the_sources_extensions(tmp_path):
    img = nib.Nifti1Image(np.ones((4, 5, 6), np.int16), np.diag([1.5, 1.5, 2.0, 1.0]))
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"source notes"))
    img.header["aux_file"] = b"source.lut"
    nib.save(img, tmp_path / "t1.nii.gz")
    read = read_volume(tmp_path / "t1.nii.gz")
    back = nib.load(io.write_labels(tmp_path / "labels.nii.gz", np.ones((4, 5, 6), np.uint8), read))  # fmt: skip
    assert len(back.header.extensions) == 0 and back.header["aux_file"].item() == b""
    assert np.array_equal(back.affine, read.affine)


def test_a_sheared_affine_is_written_as_the_sform_only(tmp_path):
    """A gantry-tilted CT: a qform cannot hold the shear, so it must not claim a frame."""
    sheared = np.diag([0.5, 0.5, 1.0, 1.0])
    sheared[1, 2] = 0.3  # slices shifted along y with z
    back = nib.load(io.write_labels(tmp_path / "tilt.nii.gz", np.ones((4, 5, 6), np.uint8), affine=sheared))  # fmt: skip
    assert int(back.header["sform_code"]) > 0 and int(back.header["qform_code"]) == 0
    assert np.allclose(back.affine, sheared)
    plain = nib.load(io.write_labels(tmp_path / "plain.nii.gz", np.ones((4, 5, 6), np.uint8), affine=np.diag([0.5, 0.5, 1.0, 1.0])))  # fmt: skip
    assert int(plain.header["qform_code"]) == int(plain.header["sform_code"]) > 0


def test_write_dtypes_and_replace(tmp_path):
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    path = io.write_volume(tmp_path / "b.nii.gz", np.ones((4, 5, 6), bool), affine=affine)
    assert read_volume(path).data.dtype == np.uint8
    path = io.write_labels(tmp_path / "b.nii.gz", np.full((4, 5, 6), 300, np.int64), affine=affine)
    assert read_volume(path).data.dtype == np.uint16 and sorted(p.name for p in tmp_path.iterdir()) == ["b.nii.gz"]  # fmt: skip
    with pytest.raises(ValueError, match=">= 0"):
        io.write_labels(tmp_path / "n.nii.gz", -np.ones((3, 3, 3)), affine=affine)
    with pytest.raises(ValueError, match="reference Volume or an affine"):
        io.write_volume(tmp_path / "x.nii", np.ones((3, 3, 3)))
    ref = Volume(np.zeros((3, 3, 3)), affine, (1.5,) * 3)
    with pytest.raises(ValueError, match="does not match the reference shape"):
        io.write_labels(tmp_path / "x.nii", np.ones((4, 3, 3)), ref)


def test_write_errors_leave_no_partial_file(tmp_path, monkeypatch):
    affine = np.eye(4)
    data = np.ones((8, 8, 8), np.float32)
    with pytest.raises(VolumeWriteError, match=r"written as \.nii or \.nii\.gz"):
        io.write_volume(tmp_path / "x.png", data, affine=affine)
    with pytest.raises(VolumeWriteError, match="does not exist"):
        io.write_volume(tmp_path / "nope" / "x.nii", data, affine=affine)

    def full_disk(self, filename, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", full_disk)
    with pytest.raises(VolumeWriteError, match=r"the disk is full\.$"):
        io.write_labels(tmp_path / "full.nii.gz", data.astype(np.uint8), affine=affine)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", denied)
    with pytest.raises(VolumeWriteError, match="is not writable"):
        io.write_volume(tmp_path / "ro.nii", data, affine=affine)
    assert list(tmp_path.iterdir()) == []


def test_written_files_follow_the_umask_and_long_names_fit(tmp_path):
    import os

    affine = np.eye(4)
    old = os.umask(0o022)
    try:
        path = io.write_labels(tmp_path / "x.nii.gz", np.ones((4, 4, 4), np.uint8), affine=affine)
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)  # mkstemp's 0600 before
    long = tmp_path / ("n" * (255 - len(".nii.gz")) + ".nii.gz")  # the longest name allowed
    assert io.write_labels(long, np.ones((4, 4, 4), np.uint8), affine=affine) == long


def test_a_file_that_appears_meanwhile_is_not_replaced_without_overwrite(tmp_path):
    path = tmp_path / "seg.nii.gz"
    io.write_labels(path, np.ones((4, 4, 4), np.uint8), affine=np.eye(4))
    with pytest.raises(VolumeWriteError, match="it is not replaced"):
        io.write_labels(path, np.zeros((4, 4, 4), np.uint8), affine=np.eye(4), overwrite=False)
    assert io.read_volume(path).data.max() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]


def test_stale_temporaries_of_dead_processes_are_cleared(tmp_path):
    from napari_selfreg.files import clear_stale, temporary_path

    mine = temporary_path(tmp_path / "a.nii.gz")
    mine.write_bytes(b"x")
    dead = tmp_path / ".selfreg-tmp-999999999-abcdef.nii.gz"  # no such process
    dead.write_bytes(b"partial")
    (tmp_path / ".selfreg-ckpt-999999999-abcdef").mkdir()
    fresh = tmp_path / ".selfreg-tmp-999999998-abcdef.nii.gz"  # e.g. another host's, writing
    fresh.write_bytes(b"being written")
    (tmp_path / "user.nii.gz").write_bytes(b"keep")
    hour_ago = time.time() - 3600
    for old in (mine, dead, tmp_path / ".selfreg-ckpt-999999999-abcdef"):
        os.utime(old, (hour_ago, hour_ago))
    removed = clear_stale(tmp_path)
    assert sorted(p.name for p in removed) == [".selfreg-ckpt-999999999-abcdef", dead.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, fresh.name, "user.nii.gz"])  # fmt: skip


# --------------------------------------------------------------------------- napari


def test_layer_kwargs_place_voxels_like_the_affine(tmp_path):
    from napari.layers import Image

    aligned = np.diag([0.5, 0.7, 2.0, 1.0])
    aligned[:3, 3] = [1.0, -2.0, 3.0]
    flipped = aligned @ np.diag([-1.0, 1.0, 1.0, 1.0])
    kwargs = layer_kwargs(aligned, 3)
    assert kwargs == {"scale": (0.5, 0.7, 2.0), "translate": (1.0, -2.0, 3.0)}
    assert set(layer_kwargs(flipped, 3)) == {"affine"}
    data = np.zeros((4, 5, 6), np.float32)
    voxel = np.array([3.0, 1.0, 2.0])
    for affine in (aligned, flipped, _oblique_affine()):
        layer = Image(data, **layer_kwargs(affine, 3))
        assert np.allclose(layer.data_to_world(voxel), (affine @ np.r_[voxel, 1])[:3])
    # 2D: an axial DICOM slice keeps its in-plane flips; a slice off the x-y plane keeps its pixel size
    _series(tmp_path / "axial2d", np.ones((6, 5, 1), np.int16))
    dcm = read_volume(tmp_path / "axial2d")
    assert dcm.ndim == 2 and set(layer_kwargs(dcm.affine, dcm.ndim)) == {"affine"}
    layer = Image(dcm.data, **layer_kwargs(dcm.affine, dcm.ndim))
    assert np.allclose(layer.data_to_world([2.0, 3.0]), (dcm.affine @ [2, 3, 0, 1])[:2])
    sagittal = np.array([[0, 0, 1.5, 0], [0.8, 0, 0, 0], [0, 0.6, 0, 0], [0, 0, 0, 1.0]])
    assert layer_kwargs(sagittal, 2) == {"scale": (0.8, 0.6), "translate": (0.0, 0.0)}


def test_modules_import_without_heavy_libraries():
    code = (
        "import sys, napari_selfreg.io, napari_selfreg.data, napari_selfreg.preprocess; "
        "heavy = {'torch', 'pydicom', 'tifffile', 'nilearn', 'nibabel'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gzip_helper_sanity(tmp_path):
    # a .nii.gz written by io is a real gzip stream (atomic temp file renamed, not left behind)
    path = io.write_volume(tmp_path / "g.nii.gz", np.zeros((3, 4, 5), np.int16), affine=np.eye(4))
    with gzip.open(path) as f:
        assert len(f.read()) > 348
    assert [p.name for p in tmp_path.iterdir()] == ["g.nii.gz"]


def test_minc2_files_read_through_h5py(tmp_path):
    import nibabel

    path = Path(nibabel.__file__).parent / "tests" / "data" / "minc2_1_scale.mnc"
    volume = io.read_volume(path)
    assert volume.shape == (10, 20, 20) and volume.metadata["format"] == "minc"
    np.testing.assert_allclose(volume.spacing, (2.0, 2.0, 2.0))
