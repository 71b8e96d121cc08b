"""Labels out as DICOM SEG (``io/dicom_seg.py``, ``SegmentationResult.save(dicom_seg=)``).

Each SEG written is read back with highdicom and pydicom and compared, frame by frame,
with the labels and with the source slices' own headers; on case D, with the SEG that
dcmqi (3D Slicer's converter) made of the same liver labels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from dicom_files import (
    CASE_D,
    COL,
    ROW,
    case_d,
    ct_stored,
    folder_state,
    require_dicom_extra,
    write_series,
)

from fastcascade.api import SegmentationResult
from fastcascade.config import CLASS_NAMES
from fastcascade.io import dicom, dicom_seg
from fastcascade.io.nifti import completion_marker_path
from fastcascade.io.sitk import read_image

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(autouse=True)
def _dicom_extra():
    require_dicom_extra()


@pytest.fixture
def oblique(tmp_path):
    """A 4-slice oblique series written in shuffled file order, and its labels."""
    write_series(
        tmp_path / "ct",
        ct_stored((4, 5, 6)),
        row=ROW,
        col=COL,
        names=["c.dcm", "a.dcm", "d.dcm", "b.dcm"],
        patient_name="Doe^Jane",
    )
    voxels, series = dicom.read_series(tmp_path / "ct")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(CLASS_NAMES), size=series.shape).astype(np.uint8)
    labels[:, :, 2] = 0  # an empty slice: its frames are left out
    return series, labels


def seg_by_source(seg_path, series, segments=None, **kwargs) -> np.ndarray:
    """The SEG's labels on ``series``' grid (columns, rows, slices), by highdicom."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    uids = [h.SOPInstanceUID for h in series.headers]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        segment_numbers=segments,
        combine_segments=True,
        skip_overlap_checks=True,
        **kwargs,
    )
    return np.asarray(pixels).transpose(2, 1, 0)


def test_seg_round_trip_matches_labels_and_source_headers(tmp_path, oblique):
    import pydicom

    series, labels = oblique
    path, write = dicom_seg.seg_output(tmp_path / "seg.dcm", labels, CLASS_NAMES, series, "9.9")
    write(path)
    np.testing.assert_array_equal(seg_by_source(path, series), labels)

    ds = pydicom.dcmread(path)
    first = series.headers[0]
    assert ds.SOPClassUID == SEG_STORAGE and ds.Modality == "SEG"
    assert ds.SegmentationType == "BINARY"
    assert ds.StudyInstanceUID == first.StudyInstanceUID and ds.PatientID == first.PatientID
    assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series.uid
    assert ds.SeriesInstanceUID != series.uid
    assert [s.SegmentLabel for s in ds.SegmentSequence] == list(CLASS_NAMES[1:])
    assert [s.SegmentNumber for s in ds.SegmentSequence] == list(range(1, len(CLASS_NAMES)))
    codes = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0] for s in ds.SegmentSequence}
    assert codes["liver"].CodeValue == "10200004" and codes["liver"].CodingSchemeDesignator == "SCT"
    assert codes["kidney_left"].CodeMeaning == "Left kidney"
    algo = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "fastcascade" and algo.AlgorithmVersion == "9.9"
    # each frame lies where its source slice lies, and says which slice that is
    by_uid = {h.SOPInstanceUID: h for h in series.headers}
    present = {
        (c, k) for c in range(1, len(CLASS_NAMES)) for k in range(4) if (labels[:, :, k] == c).any()
    }
    assert ds.NumberOfFrames == len(present)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in by_uid[source].ImagePositionPatient],
            atol=1e-4,
        )
    iop = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    np.testing.assert_allclose(
        [float(v) for v in iop.ImageOrientationPatient], [*ROW, *COL], atol=1e-6
    )


def test_seg_of_case_d_liver_matches_dcmqi(tmp_path):
    """Our SEG of case D's liver labels holds what dcmqi's ``liver.dcm`` holds."""
    series_folder = case_d()
    _, series = dicom.read_series(series_folder)
    liver, affine = read_image(CASE_D / "liver_seg.nrrd")  # (i, j, k) on the same grid
    np.testing.assert_allclose(affine, series.affine, atol=1e-5)
    labels = (liver > 0).astype(np.uint8)
    path, write = dicom_seg.seg_output(
        tmp_path / "liver.dcm", labels, ("background", "liver"), series, "1"
    )
    write(path)
    ours = seg_by_source(path, series)
    # dcmqi's file does not state SpatialLocationsPreserved; its frames are the slices'
    theirs = seg_by_source(
        CASE_D / "liver.dcm", series, segments=[1], ignore_spatial_locations=True
    )
    assert ours.sum() == 107098  # liver voxels in the NRRD
    np.testing.assert_array_equal(ours, theirs)


def test_seg_refuses_labels_off_the_series_grid(tmp_path, oblique):
    series, labels = oblique
    with pytest.raises(ValueError, match=r"labels have shape \(5, 6, 4\); the series"):
        dicom_seg.seg_output(
            tmp_path / "s.dcm", labels.transpose(1, 0, 2), CLASS_NAMES, series, "1"
        )
    with pytest.raises(ValueError, match=r"expected ids in \[0, 1\]"):
        dicom_seg.seg_output(tmp_path / "s.dcm", labels, ("bg", "liver"), series, "1")
    with pytest.raises(TypeError, match="integer class ids"):
        dicom_seg.seg_output(tmp_path / "s.dcm", labels.astype(float), CLASS_NAMES, series, "1")
    with pytest.raises(ValueError, match="did not come from one"):
        dicom_seg.seg_output(tmp_path / "s.dcm", labels, CLASS_NAMES, None, "1")


def result_for(series, labels, tmp_path) -> SegmentationResult:
    return SegmentationResult(
        labels=labels,
        class_names=CLASS_NAMES,
        affine=series.affine,
        source=tmp_path / "ct",
        dicom=series,
    )


def test_save_writes_nifti_and_seg_with_a_marker(tmp_path, oblique):
    import nibabel as nib

    series, labels = oblique
    before = folder_state(tmp_path / "ct")
    out = tmp_path / "out"
    out.mkdir()
    paths = result_for(series, labels, tmp_path).save(
        out / "seg.nii.gz", marker={"input": "ct"}, dicom_seg=out / "seg.dcm"
    )
    assert [p.name for p in paths] == ["seg.dcm", "seg.json", "seg.nii.gz", "seg.done.json"]
    img = nib.load(out / "seg.nii.gz")
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels)
    np.testing.assert_allclose(img.header.get_sform(), series.affine, atol=1e-6)
    np.testing.assert_array_equal(seg_by_source(out / "seg.dcm", series), labels)
    marker = json.loads(completion_marker_path(out / "seg.nii.gz").read_text())
    assert marker["outputs"] == ["seg.dcm", "seg.json", "seg.nii.gz"]
    assert marker["series"] == series.uid
    assert folder_state(tmp_path / "ct") == before


def test_save_is_all_or_nothing_with_the_seg(tmp_path, oblique, monkeypatch):
    series, labels = oblique
    out = tmp_path / "out"
    out.mkdir()

    def failing(path, *args):
        def write(tmp):
            tmp.write_bytes(b"partial")
            raise OSError(28, "No space left on device")

        return path, write

    monkeypatch.setattr(dicom_seg, "seg_output", failing)
    with pytest.raises(OSError, match="No space"):
        result_for(series, labels, tmp_path).save(
            out / "seg.nii.gz", marker={}, dicom_seg=out / "seg.dcm"
        )
    assert list(out.iterdir()) == []


def test_save_refuses_a_seg_without_a_series_or_inside_the_input(tmp_path, oblique):
    series, labels = oblique
    plain = SegmentationResult(labels=labels, class_names=CLASS_NAMES, affine=series.affine)
    with pytest.raises(ValueError, match="needs a DICOM series as the input"):
        plain.save(tmp_path / "seg.nii.gz", dicom_seg=tmp_path / "seg.dcm")
    before = folder_state(tmp_path / "ct")
    with pytest.raises(ValueError, match="inside the input folder"):
        result_for(series, labels, tmp_path).save(
            tmp_path / "seg.nii.gz", dicom_seg=tmp_path / "ct" / "seg.dcm"
        )
    assert folder_state(tmp_path / "ct") == before
    assert not (tmp_path / "seg.nii.gz").exists()
