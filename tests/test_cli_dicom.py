"""``fastcascade segment`` on DICOM input: ``--series``, ``--dicom-seg``, refusals.

Most tests replace ``fastcascade.segment`` by a fake that reads the scan for real
(``load_scan``) and labels it by a threshold, so the command's input handling and
outputs are exercised without a network; ``test_dicom_end_to_end_matches_nifti`` runs
the real cascade (a tiny random model) on the same volume as NIfTI and as a DICOM series.
"""

from __future__ import annotations

import json
import sys
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from dicom_files import COL, ROW, ct_stored, folder_state, require_dicom_extra, write_series

import fastcascade
from fastcascade import cli
from fastcascade.api import SegmentationResult
from fastcascade.config import CLASS_NAMES
from fastcascade.io.scan import load_scan


@pytest.fixture(autouse=True)
def _dicom_extra():
    require_dicom_extra()


class ReadingFakeSegment:
    """Stands in for ``fastcascade.segment``: reads the scan for real, labels voxels above
    0 HU as liver (on the canonical grid, then back), records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, volume, **kwargs):
        self.calls.append((volume, kwargs))
        scan = load_scan(volume, series=kwargs.get("series"), hu_check="off")
        labels = scan.to_input_grid((scan.data > 0).to(torch.uint8)).numpy()
        return SegmentationResult(
            labels=labels,
            class_names=CLASS_NAMES,
            affine=scan.input_affine,
            timings={"total": 0.0},
            source=scan.path,
            dicom=scan.dicom,
        )


@pytest.fixture
def fake(monkeypatch):
    fake = ReadingFakeSegment()
    monkeypatch.setattr(fastcascade, "segment", fake, raising=False)
    return fake


@pytest.fixture
def series_dir(tmp_path):
    stored = ct_stored((4, 5, 6))
    write_series(tmp_path / "ct", stored, row=ROW, col=COL, names=["4", "2", "3", "1"])
    return tmp_path / "ct"


def test_dicom_folder_to_nifti_and_seg(series_dir, fake, tmp_path, capsys):
    import highdicom as hd

    from fastcascade.io.dicom import read_series

    before = folder_state(series_dir)
    out, seg = tmp_path / "out" / "x.nii.gz", tmp_path / "out" / "x.dcm"
    argv = ["segment", str(series_dir), "-o", str(out), "--dicom-seg", str(seg), "--quiet"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert folder_state(series_dir) == before
    voxels, series = read_series(series_dir)
    expected = (voxels > 0).astype(np.uint8)
    img = nib.load(out)
    np.testing.assert_array_equal(np.asarray(img.dataobj), expected)
    np.testing.assert_allclose(img.affine, series.affine, atol=1e-6)  # RAS, the series' grid
    assert img.get_data_dtype() == np.uint8
    frames = hd.seg.segread(seg).get_pixels_by_source_instance(
        source_sop_instance_uids=[h.SOPInstanceUID for h in series.headers],
        combine_segments=True,
    )
    np.testing.assert_array_equal(np.asarray(frames).transpose(2, 1, 0), expected)
    marker = json.loads((tmp_path / "out" / "x.done.json").read_text())
    assert marker["outputs"] == ["x.dcm", "x.json", "x.nii.gz"]
    assert marker["series"] == series.uid and marker["input"]["files"] == 4
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "x.dcm",
        "x.done.json",
        "x.json",
        "x.nii.gz",
    ]


def test_nifti_output_alone_for_dicom_input(series_dir, fake, tmp_path):
    out = tmp_path / "x.nii.gz"
    assert cli.main(["segment", str(series_dir), "-o", str(out), "--quiet"]) == 0
    ((volume, kwargs),) = fake.calls
    assert volume == str(series_dir) and "series" not in kwargs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "x.done.json", "x.json", "x.nii.gz"]


def test_zip_input(series_dir, fake, tmp_path):
    zip_path = tmp_path / "ct.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        for p in series_dir.iterdir():
            z.write(p, f"DICOM/{p.name}")
    out = tmp_path / "z.nii.gz"
    assert (
        cli.main(
            [
                "segment",
                str(zip_path),
                "-o",
                str(out),
                "--quiet",
                "--dicom-seg",
                str(tmp_path / "z.dcm"),
            ]
        )
        == 0
    )
    folder = tmp_path / "f.nii.gz"
    assert cli.main(["segment", str(series_dir), "-o", str(folder), "--quiet"]) == 0
    np.testing.assert_array_equal(
        np.asarray(nib.load(out).dataobj), np.asarray(nib.load(folder).dataobj)
    )
    assert (tmp_path / "z.dcm").stat().st_size > 0


def test_several_series_listed_then_chosen(series_dir, fake, tmp_path, capsys):
    write_series(
        series_dir,
        ct_stored((2, 5, 6), seed=4),
        series_uid="1.2.3.9",
        description="other",
        names=["o1", "o2"],
    )
    out = tmp_path / "x.nii.gz"
    assert cli.main(["segment", str(series_dir), "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds 2 series" in err and "1.2.3.9" in err and "--series UID" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
    argv = ["segment", str(series_dir), "-o", str(out), "--quiet", "--series", "1.2.3.9"]
    assert cli.main(argv) == 0
    assert fake.calls[-1][1]["series"] == "1.2.3.9"
    assert nib.load(out).shape == (6, 5, 2)
    marker = json.loads((tmp_path / "x.done.json").read_text())
    assert marker["series"] == "1.2.3.9"


def test_statistics_of_a_chosen_series_read_that_series_again(series_dir, fake, tmp_path):
    from fastcascade.io.dicom import read_series

    other = ct_stored((2, 5, 6), seed=4)
    write_series(series_dir, other, series_uid="1.2.3.9", description="other", names=["o1", "o2"])
    out, stats = tmp_path / "x.nii.gz", tmp_path / "stats.json"
    argv = ["segment", str(series_dir), "-o", str(out), "--quiet", "--series", "1.2.3.9"]
    assert cli.main([*argv, "--statistics", str(stats)]) == 0  # the result keeps no scan
    voxels, _ = read_series(series_dir, series="1.2.3.9")
    liver = json.loads(stats.read_text())["organs"]["liver"]
    assert liver["voxels"] == int((voxels > 0).sum()) > 0
    assert liver["hu_mean"] == pytest.approx(float(voxels[voxels > 0].mean()))


def test_dicom_seg_needs_dicom_input(tmp_path, fake, capsys):
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), -1000, np.int16), np.eye(4)), ct)
    argv = [
        "segment",
        str(ct),
        "-o",
        str(tmp_path / "s.nii.gz"),
        "--dicom-seg",
        str(tmp_path / "s.dcm"),
    ]
    assert cli.main(argv) == 2
    assert "--dicom-seg references the input's DICOM series" in capsys.readouterr().err
    assert fake.calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


@pytest.mark.parametrize("which", ["output", "dicom-seg"])
def test_outputs_inside_the_input_folder_are_refused(series_dir, fake, tmp_path, capsys, which):
    before = folder_state(series_dir)
    out, seg = tmp_path / "x.nii.gz", tmp_path / "x.dcm"
    if which == "output":
        out = series_dir / "x.nii.gz"
    else:
        seg = series_dir / "sub" / "x.dcm"
    argv = ["segment", str(series_dir), "-o", str(out), "--dicom-seg", str(seg), "--quiet"]
    assert cli.main(argv) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert fake.calls == [] and folder_state(series_dir) == before
    assert not (series_dir / "sub").exists()


def test_existing_seg_needs_overwrite(series_dir, fake, tmp_path, capsys):
    seg = tmp_path / "x.dcm"
    seg.write_bytes(b"old")
    argv = ["segment", str(series_dir), "-o", str(tmp_path / "x.nii.gz"), "--dicom-seg", str(seg)]
    assert cli.main([*argv, "--quiet"]) == 2
    assert "x.dcm" in capsys.readouterr().err and seg.read_bytes() == b"old"
    assert cli.main([*argv, "--quiet", "--overwrite"]) == 0
    assert seg.read_bytes() != b"old"


@pytest.mark.parametrize(
    "make, message",
    [
        pytest.param(
            lambda d: write_series(
                d, ct_stored((3, 4, 4)), modality="MR", sop_class="1.2.840.10008.5.1.4.1.1.4"
            ),
            "Modality 'MR'",
            id="mr",
        ),
        pytest.param(lambda d: d.mkdir(), "no DICOM series found", id="empty"),
    ],
)
def test_bad_dicom_input_is_one_line(tmp_path, fake, capsys, make, message):
    make(tmp_path / "in")
    out = tmp_path / "x.nii.gz"
    assert cli.main(["segment", str(tmp_path / "in"), "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_extra_is_one_line_naming_the_install(
    series_dir, fake, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    assert cli.main(["segment", str(series_dir), "-o", str(tmp_path / "x.nii.gz"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'fastcascade[dicom]'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_dicom_end_to_end_matches_nifti(tmp_path, capsys):
    """The real cascade (tiny random model) on one volume as RAS NIfTI and as an LPS
    DICOM series with shuffled file names: the same labels at the same places."""
    from tiny_models import save_tiny_cascade

    from fastcascade.io.dicom import read_series

    model = tmp_path / "model"
    save_tiny_cascade(model, spacing=4.0, base_channels=4)

    hu = np.full((20, 18, 14), -1000, np.int16)  # (x, y, z) RAS
    hu[4:16, 4:14, 3:11] = 40
    hu[6:9, 6:9, 5:8] = 300
    nib.save(nib.Nifti1Image(hu, np.diag([3.0, 3.0, 3.0, 1.0])), tmp_path / "ct.nii.gz")
    # DICOM: column i = -x (towards the left), row j = -y (posterior), slices +z
    stored = (hu[::-1, ::-1, :] + 1024).transpose(2, 1, 0)  # (slices, rows, columns)
    names = [f"{n:02d}.dcm" for n in np.random.default_rng(0).permutation(14)]
    write_series(
        tmp_path / "dcm",
        stored,
        pixel_spacing=(3.0, 3.0),
        step=3.0,
        origin=(-57.0, -51.0, 0.0),
        names=names,
    )
    _, series = read_series(tmp_path / "dcm")
    np.testing.assert_allclose(series.affine @ [19, 17, 0, 1], [0, 0, 0, 1], atol=1e-9)

    model_args = ["--model", f"{model}.safetensors", "--device", "cpu", "--quiet"]
    nifti_out, dicom_out, seg = tmp_path / "n.nii.gz", tmp_path / "d.nii.gz", tmp_path / "d.dcm"
    assert (
        cli.main(["segment", str(tmp_path / "ct.nii.gz"), "-o", str(nifti_out), *model_args]) == 0
    )
    argv = ["segment", str(tmp_path / "dcm"), "-o", str(dicom_out), "--dicom-seg", str(seg)]
    assert cli.main([*argv, *model_args]) == 0, capsys.readouterr().err
    reference = np.asarray(nib.load(nifti_out).dataobj)
    got = nib.load(dicom_out)
    assert len(np.unique(reference)) > 1  # a random model, but not a constant one
    np.testing.assert_array_equal(np.asarray(got.dataobj)[::-1, ::-1, :], reference)
    np.testing.assert_allclose(got.affine, series.affine, atol=1e-9)
    assert seg.stat().st_size > 0


def test_env_reports_the_dicom_extra(capsys):
    import highdicom
    import pydicom
    import SimpleITK

    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    for name, module in (("SimpleITK", SimpleITK), ("pydicom", pydicom), ("highdicom", highdicom)):
        assert f"{name:<11} {module.__version__}" in out
