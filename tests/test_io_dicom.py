"""DICOM series, NRRD and MetaImage in (``io/dicom.py``, ``io/sitk.py``, ``io/archive.py``).

Geometry is checked against independent readings: pydicom's own parse of each file's
headers and pixels, SimpleITK's reading of case D's NRRD labels, and nibabel's
reorientation of the same volume saved as NIfTI. Series are written here with pydicom
(``dicom_files.py``), with known oblique orientations, spacings and per-slice rescales.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from dicom_files import (
    COL,
    MR_IMAGE_STORAGE,
    ROW,
    case_d,
    copy_renamed,
    ct_stored,
    folder_state,
    require_dicom_extra,
    write_rtstruct,
    write_series,
)

from fastcascade.io import archive, dicom
from fastcascade.io.scan import load_scan
from fastcascade.io.sitk import INSTALL_DICOM, LPS_TO_RAS, MissingDependencyError, read_image


@pytest.fixture(autouse=True)
def _dicom_extra():
    require_dicom_extra()


def header_affine_ras(paths_in_order) -> np.ndarray:
    """The voxel → RAS affine from the files' own headers (pydicom), slices in order."""
    import pydicom

    first = pydicom.dcmread(paths_in_order[0], stop_before_pixels=True)
    last = pydicom.dcmread(paths_in_order[-1], stop_before_pixels=True)
    iop = np.array(first.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in first.PixelSpacing)
    n = len(paths_in_order)
    p0, p1 = np.array(first.ImagePositionPatient, float), np.array(last.ImagePositionPatient, float)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = iop[:3] * dc, iop[3:] * dr
    lps[:3, 2] = (p1 - p0) / (n - 1) if n > 1 else np.cross(iop[:3], iop[3:])
    lps[:3, 3] = p0
    return LPS_TO_RAS @ lps


def pydicom_hu(path) -> np.ndarray:
    """(columns, rows) float64 HU of one file, by pydicom."""
    import pydicom

    ds = pydicom.dcmread(path)
    return (
        ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    ).T


# --------------------------------------------------------------------------- case D


def test_case_d_matches_its_headers_and_nrrd_labels():
    folder = case_d()
    voxels, series = dicom.read_series(folder)
    assert voxels.shape == series.shape == (512, 512, 3) and voxels.dtype == np.float32
    # slices by position along the normal (+z): 03.dcm (z=-128.69) first, not by name
    assert series.names == ("03.dcm", "02.dcm", "01.dcm")
    paths = [folder / n for n in series.names]
    np.testing.assert_allclose(series.affine, header_affine_ras(paths), atol=1e-5)
    labels, nrrd_affine = read_image(folder.parent / "liver_seg.nrrd")
    assert labels.shape == voxels.shape
    np.testing.assert_allclose(series.affine, nrrd_affine, atol=1e-5)
    for k, p in enumerate(paths):
        np.testing.assert_array_equal(voxels[:, :, k], pydicom_hu(p))
    assert voxels.min() == -3024.0  # padding -2000 stored, intercept -1024


def test_case_d_scan_is_ras_and_goes_back_exactly():
    voxels, series = dicom.read_series(case_d())
    scan = load_scan(case_d())
    assert scan.path == case_d() and scan.dicom.uid == series.uid
    np.testing.assert_allclose(scan.input_affine, series.affine)
    # LPS columns/rows: RAS is both in-plane axes flipped
    np.testing.assert_array_equal(scan.data.numpy(), voxels[::-1, ::-1, :])
    assert torch.equal(scan.to_input_grid(scan.data), torch.from_numpy(voxels))
    # canonical voxel (x, y, z) and input voxel lie at the same point
    i, j, k = 5, 300, 2
    x, y = 511 - i, 511 - j
    np.testing.assert_allclose(scan.affine @ [x, y, k, 1], series.affine @ [i, j, k, 1])


def test_case_d_shuffled_names_give_the_same_volume(tmp_path):
    voxels, series = dicom.read_series(case_d())
    shuffled = copy_renamed(
        case_d(), tmp_path / "s", {"01.dcm": "b.dcm", "02.dcm": "c.dcm", "03.dcm": "a.dcm"}
    )
    voxels2, series2 = dicom.read_series(shuffled)
    np.testing.assert_array_equal(voxels2, voxels)
    np.testing.assert_array_equal(series2.affine, series.affine)
    assert series2.names == ("a.dcm", "c.dcm", "b.dcm")


# --------------------------------------------------------------------------- synthetic


def test_oblique_series_with_rescales_reads_exactly(tmp_path):
    stored = ct_stored((4, 5, 6))
    slopes, inters = [1.0, 0.5, 2.0, 0.25], [-1024.0, -1000.25, 7.0, 0.0]
    origin = np.array([10.0, -20.0, 30.0])
    names = ["d.dcm", "b.dcm", "a.dcm", "c.dcm"]  # file names in no order
    write_series(
        tmp_path / "s",
        stored,
        row=ROW,
        col=COL,
        pixel_spacing=(0.9, 0.7),
        origin=origin,
        step=2.5,
        slopes=slopes,
        intercepts=inters,
        names=names,
    )
    voxels, series = dicom.read_series(tmp_path / "s")
    normal = np.cross(ROW, COL)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = ROW * 0.7, COL * 0.9, normal * 2.5, origin
    expected_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    np.testing.assert_allclose(series.affine, expected_ras, atol=1e-6)
    assert series.shape == (6, 5, 4) and series.names == tuple(names)
    hu = stored * np.array(slopes)[:, None, None] + np.array(inters)[:, None, None]
    expected = np.ascontiguousarray(hu.transpose(2, 1, 0)).astype(np.float32)
    np.testing.assert_array_equal(voxels, expected)
    assert (voxels % 1 != 0).any()  # fractional slopes and intercepts kept
    scan = load_scan(tmp_path / "s", hu_check="off")
    for idx in [(0, 0, 0), (5, 4, 3), (2, 3, 1)]:
        world = series.affine @ [*idx, 1]
        canonical = np.linalg.solve(scan.affine, world)[:3]
        c = tuple(int(round(v)) for v in canonical)
        np.testing.assert_allclose(canonical, c, atol=1e-6)
        assert scan.data[c].item() == voxels[idx]


def test_positions_decide_the_order_not_instance_numbers(tmp_path):
    stored = ct_stored((4, 3, 5), seed=1)
    # slice k lies at step k, but files are written (and numbered) in reverse
    paths = write_series(tmp_path / "s", stored[::-1], step=-2.0, origin=(0, 0, 6.0))
    voxels, series = dicom.read_series(tmp_path / "s")
    assert series.names == tuple(p.name for p in paths[::-1])
    np.testing.assert_array_equal(voxels, (stored.astype(np.float32) - 1024).transpose(2, 1, 0))
    assert series.affine[2, 2] == pytest.approx(2.0) and series.affine[2, 3] == pytest.approx(0.0)


def test_two_series_are_listed_and_one_is_chosen(tmp_path):
    a = ct_stored((3, 4, 5), seed=2)
    b = ct_stored((2, 4, 5), seed=3)
    write_series(tmp_path / "d", a, description="abdomen", names=["a1", "a2", "a3"])
    write_series(tmp_path / "d", b, description="lungs", names=["b1", "b2"], series_uid="1.2.3.4")
    with pytest.raises(ValueError, match="holds 2 series") as err:
        dicom.read_series(tmp_path / "d")
    text = str(err.value)
    assert "1.2.3.4" in text and "'lungs'" in text and "2 files" in text and "'abdomen'" in text
    assert "3 files" in text and "series='UID'" in text and "--series" in text
    voxels, series = dicom.read_series(tmp_path / "d", series="1.2.3.4")
    assert series.uid == "1.2.3.4" and series.description == "lungs"
    np.testing.assert_array_equal(voxels, (b.astype(np.float32) - 1024).transpose(2, 1, 0))
    with pytest.raises(ValueError, match="holds no series '9.9'"):
        dicom.read_series(tmp_path / "d", series="9.9")
    assert load_scan(tmp_path / "d", series="1.2.3.4").dicom.uid == "1.2.3.4"


def test_mr_series_is_refused(tmp_path):
    write_series(tmp_path / "mr", ct_stored((3, 4, 4)), modality="MR", sop_class=MR_IMAGE_STORAGE)
    with pytest.raises(ValueError, match=r"MR Image Storage.*Modality 'MR'.*expected a CT"):
        load_scan(tmp_path / "mr")


def test_ct_modality_with_another_object_type_is_refused(tmp_path):
    write_series(tmp_path / "x", ct_stored((3, 4, 4)), sop_class=MR_IMAGE_STORAGE)
    with pytest.raises(ValueError, match="expected a CT series"):
        dicom.read_series(tmp_path / "x")


def test_seg_and_rtstruct_beside_a_series_are_listed(tmp_path):
    from fastcascade.io.dicom_seg import seg_output

    stored = ct_stored((3, 4, 5))
    write_series(tmp_path / "ct", stored, series_uid="1.2.826.0.1.3680043.10.1")
    _, series = dicom.read_series(tmp_path / "ct")
    folder = tmp_path / "study"
    shutil.copytree(tmp_path / "ct", folder)
    path, write = seg_output(
        folder / "seg.dcm", np.ones((5, 4, 3), np.uint8), ["bg", "liver"], series, "1"
    )
    write(path)
    write_rtstruct(folder / "rt.dcm")
    with pytest.raises(ValueError, match="holds 3 series") as err:
        dicom.read_series(folder)
    assert "Segmentation Storage" in str(err.value) and "RT Structure Set Storage" in str(err.value)
    assert "SEG" in str(err.value) and "RTSTRUCT" in str(err.value)
    voxels, chosen = dicom.read_series(folder, series="1.2.826.0.1.3680043.10.1")
    assert chosen.names == ("001.dcm", "002.dcm", "003.dcm")
    # a folder of only a SEG, or only an RT-STRUCT
    only_seg = tmp_path / "only_seg"
    only_seg.mkdir()
    shutil.copy(folder / "seg.dcm", only_seg)
    with pytest.raises(ValueError, match=r"Segmentation Storage.*Modality 'SEG'.*expected a CT"):
        load_scan(only_seg)
    with pytest.raises(ValueError, match=r"RT Structure Set Storage.*expected a CT"):
        load_scan(write_rtstruct(tmp_path / "only_rt" / "rt.dcm").parent)


def test_missing_slice_is_refused_naming_the_gap(tmp_path):
    paths = write_series(tmp_path / "s", ct_stored((6, 4, 4)), step=1.5)
    paths[3].unlink()
    with pytest.raises(
        ValueError,
        match=r"gap of 3 mm between 003\.dcm and 005\.dcm.*1\.5 mm apart, about 1 slice\(s\)"
        " missing",
    ):
        load_scan(tmp_path / "s")


@pytest.mark.parametrize(
    "z, match",
    [
        pytest.param([0, 2, 4, 7, 9, 11], "gap of 3 mm", id="uneven"),
        pytest.param([0, 2, 2, 4, 6, 8], "lie at the same position", id="duplicate"),
        pytest.param([0, 2, 4, 6, 8, 10.1], "gap of 2.1 mm", id="last-gap-off-by-5pct"),
    ],
)
def test_uneven_or_duplicate_positions_are_refused(tmp_path, z, match):
    positions = [(0.0, 0.0, v) for v in z]
    write_series(tmp_path / "s", ct_stored((6, 4, 4)), positions=positions)
    with pytest.raises(ValueError, match=match):
        dicom.read_series(tmp_path / "s")


def test_small_rounding_of_positions_is_accepted(tmp_path):
    positions = [(0.0, 0.0, 2.0 * k + (0.004 if k % 2 else -0.004)) for k in range(5)]
    write_series(tmp_path / "s", ct_stored((5, 4, 4)), positions=positions)
    _, series = dicom.read_series(tmp_path / "s")
    assert series.affine[2, 2] == pytest.approx(2.0, abs=0.01)


def test_single_slice_takes_its_thickness_from_the_header(tmp_path):
    stored = ct_stored((1, 4, 5))
    write_series(tmp_path / "s", stored, row=ROW, col=COL, step=2.5)
    voxels, series = dicom.read_series(tmp_path / "s")
    assert voxels.shape == (5, 4, 1)
    np.testing.assert_allclose(np.linalg.norm(series.affine[:3, :3], axis=0), [0.7, 0.9, 2.5])
    normal_ras = np.diag([-1.0, -1.0, 1.0]) @ np.cross(ROW, COL)
    np.testing.assert_allclose(series.affine[:3, 2], normal_ras * 2.5, atol=1e-6)


def test_reader_geometry_disagreeing_with_headers_is_refused(tmp_path, monkeypatch):
    write_series(tmp_path / "s", ct_stored((3, 4, 4)), row=ROW, col=COL)
    real = dicom.image_geometry

    def shifted(image):
        affine = real(image)
        affine[:3, 3] += [0.0, 0.0, 0.01]  # 10 µm: more than the 1 µm allowed
        return affine

    monkeypatch.setattr(dicom, "image_geometry", shifted)
    with pytest.raises(ValueError, match="refusing an ambiguous geometry"):
        dicom.read_series(tmp_path / "s")


def test_tilted_gantry_is_refused(tmp_path):
    positions = [(0.0, 0.5 * k, 2.0 * k) for k in range(4)]  # slices shift in-plane
    write_series(tmp_path / "s", ct_stored((4, 4, 4)), positions=positions)
    with pytest.raises(ValueError, match="tilted gantry"):
        dicom.read_series(tmp_path / "s")


def test_folder_without_images_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no DICOM series found \(0 files"):
        load_scan(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "README").write_text("not a scan")
    with pytest.raises(ValueError, match=r"no DICOM series found \(1 file looked at"):
        load_scan(tmp_path / "text")


def test_non_dicom_files_beside_a_series_are_skipped(tmp_path):
    stored = ct_stored((3, 4, 4))
    write_series(tmp_path / "s", stored)
    (tmp_path / "s" / "notes.txt").write_text("hello")
    voxels, _ = dicom.read_series(tmp_path / "s")
    np.testing.assert_array_equal(voxels, (stored.astype(np.float32) - 1024).transpose(2, 1, 0))


def test_truncated_file_is_named_before_pixels_are_read(tmp_path, monkeypatch):
    paths = write_series(tmp_path / "s", ct_stored((3, 4, 4)))
    paths[1].write_bytes(paths[1].read_bytes()[:-10])
    monkeypatch.setattr(dicom, "_read_voxels", lambda *a: pytest.fail("pixels read"))
    with pytest.raises(
        ValueError, match=r"002\.dcm holds 22 bytes of pixel data, expected 32.*truncated"
    ):
        dicom.read_series(tmp_path / "s")


def test_corrupt_header_is_named(tmp_path):
    paths = write_series(tmp_path / "s", ct_stored((3, 4, 4)))
    data = bytearray(paths[2].read_bytes())
    paths[2].write_bytes(bytes(data[:132]) + b"\x08\x00\x05\x00CS\xff\xff" + b"\x00" * 4)
    with pytest.raises(ValueError, match=r"003\.dcm is a DICOM file without a SeriesInstanceUID"):
        dicom.read_series(tmp_path / "s")
    paths[2].write_bytes(bytes(data[:132]) + bytes(range(256)) * 4)  # garbage after DICM
    with pytest.raises(ValueError, match=r"003\.dcm (is not a readable DICOM file|is a DICOM)"):
        dicom.read_series(tmp_path / "s")


def test_size_is_checked_before_pixels_are_read(tmp_path, monkeypatch):
    write_series(tmp_path / "s", ct_stored((3, 4, 5)))
    monkeypatch.setenv("FASTCASCADE_MAX_VOXELS", "59")
    monkeypatch.setattr(dicom, "_read_voxels", lambda *a: pytest.fail("pixels read"))
    with pytest.raises(ValueError, match=r"claims 5×4×3 = 60 voxels.*FASTCASCADE_MAX_VOXELS"):
        load_scan(tmp_path / "s")


def test_one_dicom_file_and_series_for_other_inputs_are_refused(tmp_path):
    paths = write_series(tmp_path / "s", ct_stored((3, 4, 4)))
    with pytest.raises(ValueError, match="one DICOM file; give the folder"):
        load_scan(paths[0])
    img = nib.Nifti1Image(np.full((4, 4, 4), -1000, np.int16), np.eye(4))
    nib.save(img, tmp_path / "ct.nii.gz")
    with pytest.raises(ValueError, match="series='1.2' was given with a file that is not"):
        load_scan(tmp_path / "ct.nii.gz", series="1.2")
    with pytest.raises(ValueError, match="series='1.2' was given with a ndarray"):
        load_scan(np.zeros((4, 4, 4)), spacing=(1, 1, 1), series="1.2")


def test_missing_extra_names_the_install_command(tmp_path, monkeypatch):
    write_series(tmp_path / "s", ct_stored((3, 4, 4)))
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import fails
    with pytest.raises(
        MissingDependencyError, match=r"needs SimpleITK.*pip install 'fastcascade\[dicom\]'"
    ):
        load_scan(tmp_path / "s")
    assert INSTALL_DICOM in "pip install 'fastcascade[dicom]'"
    (tmp_path / "ct.nrrd").write_text("NRRD0004\n")
    with pytest.raises(MissingDependencyError):
        load_scan(tmp_path / "ct.nrrd")


# --------------------------------------------------------------------------- zip


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    """A private TMPDIR, to see that unpacked zips are removed."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def zip_folder(folder: Path, zip_path: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(folder.rglob("*")):
            z.write(p, prefix + str(p.relative_to(folder)))
    return zip_path


def test_zip_reads_like_the_folder_and_leaves_nothing(tmp_path, temp_root):
    stored = ct_stored((3, 4, 5))
    write_series(tmp_path / "s", stored, row=ROW, col=COL, names=["z", "x", "y"])
    inputs = tmp_path / "in"
    inputs.mkdir()
    zip_path = zip_folder(tmp_path / "s", inputs / "series.zip", prefix="export/CT/")
    before = folder_state(inputs)
    voxels, series = dicom.read_series(tmp_path / "s")
    scan = load_scan(zip_path)
    assert scan.path == zip_path and scan.dicom.source == zip_path
    assert scan.dicom.names == tuple(f"export/CT/{n}" for n in series.names)
    np.testing.assert_array_equal(scan.to_input_grid(scan.data).numpy(), voxels)
    np.testing.assert_array_equal(scan.input_affine, series.affine)
    assert folder_state(inputs) == before  # nothing written beside the input
    assert list(temp_root.iterdir()) == []  # the unpacked copy is gone


@pytest.mark.parametrize(
    "member", ["../evil.dcm", "a/../../evil.dcm", "/abs/evil.dcm", "C:\\evil.dcm"]
)
def test_zip_slip_is_refused(tmp_path, temp_root, member):
    zip_path = tmp_path / "in" / "bad.zip"
    zip_path.parent.mkdir()
    with zipfile.ZipFile(zip_path, "w") as z:
        z.writestr("ok.txt", "fine")
        z.writestr(member, b"x" * 10)
    with pytest.raises(ValueError, match="outside the folder"):
        load_scan(zip_path)
    assert not list(tmp_path.rglob("evil.dcm"))
    assert sorted(p.name for p in zip_path.parent.iterdir()) == ["bad.zip"]
    assert list(temp_root.iterdir()) == []


def test_zip_symlink_member_is_refused(tmp_path, temp_root):
    zip_path = tmp_path / "link.zip"
    info = zipfile.ZipInfo("link.dcm")
    info.external_attr = 0o120777 << 16  # a symbolic link
    with zipfile.ZipFile(zip_path, "w") as z:
        z.writestr(info, "/etc/passwd")
    with pytest.raises(ValueError, match="symbolic link"):
        load_scan(zip_path)


def test_zip_bomb_is_refused_unpacked(tmp_path, temp_root, monkeypatch):
    zip_path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("huge.dcm", b"\0" * (8 << 20))  # 8 MiB of zeros, ~8 KiB compressed
    assert zip_path.stat().st_size < 64 << 10
    monkeypatch.setenv("FASTCASCADE_MAX_VOXELS", str(1 << 20))  # 4 MiB may be unpacked
    monkeypatch.setattr(archive, "_unpack", lambda *a: pytest.fail("unpacked"))
    with pytest.raises(ValueError, match=r"claim 8\.0 MiB once unpacked; the limit is 4\.0 MiB"):
        load_scan(zip_path)
    assert list(temp_root.iterdir()) == []


def test_zip_member_larger_than_it_claims_is_refused(tmp_path, temp_root):
    zip_path = tmp_path / "liar.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("a.dcm", b"y" * 1000)
    data = bytearray(zip_path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local, central
        at = data.index(signature) + offset
        data[at : at + 4] = (10).to_bytes(4, "little")  # a forged size: 10 bytes
    zip_path.write_bytes(bytes(data))
    with zipfile.ZipFile(zip_path) as z:
        assert z.infolist()[0].file_size == 10
    with pytest.raises(ValueError, match="member 'a.dcm'"):
        load_scan(zip_path)
    assert list(temp_root.iterdir()) == []


def test_not_a_zip_is_refused(tmp_path, temp_root):
    (tmp_path / "x.zip").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(ValueError, match="not a readable zip"):
        load_scan(tmp_path / "x.zip")


# --------------------------------------------------------------------------- NRRD, MHA


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_and_mha_match_the_same_volume_in_nifti(tmp_path, suffix):
    import SimpleITK as sitk

    hu = (ct_stored((5, 6, 7)).astype(np.int16) - 1024).transpose(2, 1, 0)  # (i, j, k)
    image = sitk.GetImageFromArray(np.ascontiguousarray(hu.transpose(2, 1, 0)))
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection(np.column_stack([ROW, COL, np.cross(ROW, COL)]).ravel().tolist())
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(image, str(path))
    scan = load_scan(path)
    # oracle: the same voxels and geometry as NIfTI, reoriented by nibabel's code path
    lps = np.eye(4)
    lps[:3, :3] = np.column_stack([ROW, COL, np.cross(ROW, COL)]) * [0.7, 0.9, 2.5]
    lps[:3, 3] = (10.0, -20.0, 30.0)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    nib.save(nib.Nifti1Image(hu, ras), tmp_path / "ct.nii.gz")
    reference = load_scan(tmp_path / "ct.nii.gz")
    np.testing.assert_allclose(scan.input_affine, ras, atol=1e-6)
    np.testing.assert_allclose(scan.affine, reference.affine, atol=1e-6)
    assert torch.equal(scan.data, reference.data)


def test_nrrd_size_and_damage_are_refused(tmp_path, monkeypatch):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.full((4, 5, 6), -1000, np.int16))
    sitk.WriteImage(image, str(tmp_path / "ct.mha"))
    monkeypatch.setenv("FASTCASCADE_MAX_VOXELS", "100")
    with pytest.raises(ValueError, match=r"claims 6×5×4 = 120 voxels"):
        load_scan(tmp_path / "ct.mha")
    monkeypatch.delenv("FASTCASCADE_MAX_VOXELS")
    data = (tmp_path / "ct.mha").read_bytes()
    (tmp_path / "cut.mha").write_bytes(data[:-20])
    with pytest.raises(ValueError, match=r"cut\.mha: cannot read the voxel data.*truncated"):
        load_scan(tmp_path / "cut.mha")
    (tmp_path / "bad.nrrd").write_text("NRRD0004\nnonsense: 1\n")
    with pytest.raises(ValueError, match=r"bad\.nrrd: cannot read its header"):
        load_scan(tmp_path / "bad.nrrd")
    vector = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.float32), isVector=True)
    sitk.WriteImage(vector, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(ValueError, match="3 values per voxel"):
        load_scan(tmp_path / "rgb.nrrd")
