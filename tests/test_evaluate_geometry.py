"""Label maps compared in physical space, against independent oracles: a world-coordinate
lookup written out per voxel, numpy flips and transposes with hand-made affines, and
SciPy's ``affine_transform`` (order 0) for resampling."""

import re

import numpy as np
import pytest
from scipy import ndimage

from fastcascade.evaluate.geometry import (
    LINEAR_RTOL,
    TRANSLATION_ATOL_MM,
    Grid,
    align_labels,
    check_grids,
    same_grid,
)

SHAPE = (7, 6, 5)
AFFINE = np.array(
    [[2.0, 0, 0, -40.0], [0, 3.0, 0, 12.5], [0, 0, 4.0, 100.0], [0, 0, 0, 1]]
)  # RAS, voxel size 2 x 3 x 4 mm
REF = Grid(SHAPE, AFFINE)


def _labels(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).integers(0, 6, size=shape).astype(np.uint8)


def _world_lookup(labels, source, target):
    """For each target voxel: its centre in mm, the source voxel there (nearest, by
    rounding), its label or 0 outside; written voxel by voxel."""
    out = np.zeros(target.shape, labels.dtype)
    inv = np.linalg.inv(source.affine)
    for ijk in np.ndindex(*target.shape):
        world = target.affine @ [*ijk, 1.0]
        src = np.floor(inv @ world + 0.5).astype(int)[:3]
        if all(0 <= s < n for s, n in zip(src, source.shape, strict=True)):
            out[ijk] = labels[tuple(src)]
    return out


def _flip(labels, affine, axes):
    """Flip voxel axes and move the affine's origin to the new first voxel by hand."""
    a = affine.copy()
    for ax in axes:
        labels = np.flip(labels, ax)
        n = labels.shape[ax]
        a[:3, 3] = a[:3, 3] + a[:3, ax] * (n - 1)
        a[:3, ax] = -a[:3, ax]
    return np.ascontiguousarray(labels), a


def _transpose(labels, affine, order):
    a = affine.copy()
    a[:, :3] = affine[:, list(order)]
    return np.ascontiguousarray(labels.transpose(order)), a


STORED = {
    "flip-x": lambda lab: _flip(lab, AFFINE, [0]),
    "LPS": lambda lab: _flip(lab, AFFINE, [0, 1]),
    "flip-z": lambda lab: _flip(lab, AFFINE, [2]),
    "transposed": lambda lab: _transpose(lab, AFFINE, (2, 0, 1)),
    "transposed-and-flipped": lambda lab: _flip(*_transpose(lab, AFFINE, (1, 2, 0)), [0, 2]),
}


@pytest.mark.parametrize("kind", list(STORED), ids=list(STORED))
def test_a_flipped_or_transposed_copy_is_reoriented_exactly(kind):
    labels = _labels()
    data, affine = STORED[kind](labels)
    stored = Grid(data.shape, affine)
    assert not same_grid(stored, REF)
    got, how = align_labels(data, stored, REF)
    assert how == "reoriented" and got.dtype == labels.dtype
    np.testing.assert_array_equal(got, labels)
    np.testing.assert_array_equal(got, _world_lookup(data, stored, REF))
    # and back again
    back, how = align_labels(labels, REF, stored)
    assert how == "reoriented"
    np.testing.assert_array_equal(back, data)


def test_the_same_grid_within_the_tolerances_and_not_beyond():
    labels = _labels()
    for shift, same in [(0.5 * TRANSLATION_ATOL_MM, True), (2 * TRANSLATION_ATOL_MM, False)]:
        a = AFFINE.copy()
        a[1, 3] += shift
        assert same_grid(Grid(SHAPE, a), REF) is same
    for tilt, same in [(0.5 * LINEAR_RTOL, True), (2 * LINEAR_RTOL, False)]:
        a = AFFINE.copy()
        a[0, 1] += tilt * 4.0  # relative to the largest voxel size, 4 mm
        assert same_grid(Grid(SHAPE, a), REF) is same
    got, how = align_labels(labels, Grid(SHAPE, AFFINE + 1e-5), REF)
    assert how == "same" and got is labels
    assert not same_grid(Grid((7, 6, 6), AFFINE), REF)


def _shifted(mm):
    a = AFFINE.copy()
    a[0, 3] += mm
    return Grid(SHAPE, a)


def test_a_shifted_grid_is_refused_naming_both_grids():
    with pytest.raises(ValueError) as e:
        align_labels(_labels(), _shifted(100.0), REF, names=("pred.nii.gz", "ref.nii.gz"))
    msg = str(e.value)
    assert "\n" not in msg
    assert "ref.nii.gz and pred.nii.gz have one shape (7, 6, 5) but lie elsewhere" in msg
    assert "ref.nii.gz: shape (7, 6, 5), voxel size 2 x 3 x 4 mm, origin (-40, 12.5, 100) mm" in msg
    assert "pred.nii.gz: shape (7, 6, 5), voxel size 2 x 3 x 4 mm, origin (60, 12.5, 100) mm" in msg
    assert "orientation RAS" in msg and "--resample" in msg


def test_other_voxel_sizes_and_shapes_are_refused_with_both_described():
    other = Grid((14, 6, 5), AFFINE @ np.diag([0.5, 1, 1, 1]))
    with pytest.raises(ValueError, match=re.escape("b has shape (7, 6, 5) but a has (14, 6, 5)")):
        check_grids("a", other, "b", REF)
    with pytest.raises(ValueError, match="voxel size 1 x 3 x 4 mm"):
        check_grids("a", other, "b", REF)
    lps = Grid(SHAPE, np.diag([-1.0, -1.0, 1.0, 1.0]) @ AFFINE)  # LPS axes, elsewhere
    with pytest.raises(ValueError, match="orientation LPS"):
        check_grids("a", lps, "b", REF)
    assert check_grids("a", other, "b", REF, resample=True) == "resampled"


@pytest.mark.parametrize("voxels", [3, -2], ids=["3-voxels-right", "2-voxels-left"])
def test_a_shifted_prediction_resampled_on_request_lands_where_it_belongs(voxels):
    """A copy whose voxels start ``voxels`` voxels further along x: resampled, each
    reference voxel gets the label stored for its position, background outside."""
    labels = _labels()
    n = SHAPE[0]
    source = _shifted(voxels * 2.0)  # 2 mm voxels along x
    data = np.zeros_like(labels)
    if voxels > 0:
        data[: n - voxels] = labels[voxels:]
    else:
        data[-voxels:] = labels[: n + voxels]
    got, how = align_labels(data, source, REF, resample=True)
    assert how == "resampled"
    want = labels.copy()  # the reference voxels the copy does not reach are background
    if voxels > 0:
        want[:voxels] = 0
    else:
        want[n + voxels :] = 0
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, _world_lookup(data, source, REF))


def test_resampling_matches_scipy_on_an_oblique_grid():
    labels = _labels((9, 8, 7), seed=1)
    theta = 0.3
    rot = np.array(
        [[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]
    )
    source = Grid(labels.shape, AFFINE)
    target_affine = np.eye(4)
    target_affine[:3, :3] = rot @ np.diag([2.5, 2.5, 3.5])
    target_affine[:3, 3] = [-38.0, 15.0, 101.0]
    target = Grid((10, 9, 8), target_affine)
    with pytest.raises(ValueError, match="not one grid"):
        align_labels(labels, source, target)
    got, how = align_labels(labels, source, target, resample=True)
    matrix = np.linalg.inv(source.affine) @ target.affine
    want = ndimage.affine_transform(
        labels, matrix, output_shape=target.shape, order=0, mode="grid-constant", cval=0
    )
    assert how == "resampled" and (got > 0).sum() > 50
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, _world_lookup(labels, source, target))


def test_align_checks_the_labels_shape():
    with pytest.raises(ValueError, match="expected its grid's"):
        align_labels(_labels((3, 3, 3)), REF, REF)


def test_grid_of_a_file_reads_the_header(tmp_path):
    import nibabel as nib

    data, affine = STORED["LPS"](_labels())
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "x.nii.gz")
    grid = Grid.of_file(tmp_path / "x.nii.gz")
    assert grid.shape == SHAPE and grid.axcodes == ("L", "P", "S")
    assert np.allclose(grid.affine, affine) and grid.voxel_size == pytest.approx((2, 3, 4))
