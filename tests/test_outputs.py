"""Outputs people look at: the preview PNG and its palette, per-organ statistics, one mask
per organ, a subset of organs, the largest component per organ, and all of them written
with the labels in one all-or-nothing group listed by the completion marker.

Statistics are checked against hand counts on a phantom (volume = count × voxel volume,
HU by NumPy on the same voxels, bounding boxes from the voxel indices by hand) and on
tiny volumes whose numbers are worked out in the test.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from fastcascade import viz
from fastcascade.api import SegmentationResult
from fastcascade.config import CLASS_NAMES
from fastcascade.io import nifti
from fastcascade.phantom import make_phantom
from fastcascade.postprocess import keep_largest_components, organ_ids
from fastcascade.statistics import (
    CSV_COLUMNS,
    organ_statistics,
    statistics_json,
    statistics_paths,
)

SPACING = (8.0, 8.0, 8.0)


@pytest.fixture(scope="module")
def phantom():
    """40×36×30 voxels of 8 mm: every class present (5 to 363 voxels each)."""
    ph = make_phantom(shape=(40, 36, 30), spacing=SPACING, seed=1)
    assert set(np.unique(ph.labels)) == set(range(len(CLASS_NAMES)))
    return ph


def result_of(ph, **kwargs) -> SegmentationResult:
    return SegmentationResult(
        labels=ph.labels.copy(), class_names=CLASS_NAMES, affine=ph.affine, **kwargs
    )


# -- the palette -------------------------------------------------------------------------------
def cielab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in 0..1 → CIELAB (D65), written out from the standard's formulas."""
    rgb = np.asarray(rgb, dtype=np.float64)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
         [0.0193339, 0.1191920, 0.9503041]]
    )  # fmt: skip
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
    eps = (6 / 29) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1
    )


def delta_e76(a, b) -> float:
    return float(np.linalg.norm(cielab(a) - cielab(b)))


def test_cielab_of_known_colours():
    np.testing.assert_allclose(cielab([1.0, 1.0, 1.0]), [100.0, 0.0, 0.0], atol=0.01)
    np.testing.assert_allclose(cielab([1.0, 0.0, 0.0]), [53.24, 80.09, 67.20], atol=0.05)


MIN_DELTA_E = 25.0  # CIE76; about 2.3 is a just-noticeable difference


def test_every_pair_of_palette_colours_is_far_apart_and_none_is_grey():
    colours = [viz._rgb(h) for h in viz.PALETTE]
    assert len(colours) >= 10
    for (i, a), (j, b) in itertools.combinations(enumerate(colours), 2):
        assert delta_e76(a, b) >= MIN_DELTA_E, (viz.PALETTE[i], viz.PALETTE[j])
    chroma = np.hypot(*cielab(np.array(colours))[:, 1:].T)
    assert chroma.min() >= 25.0  # distinct from the grey CT under it


def test_default_classes_get_distinct_colours():
    rgb = viz.label_colours(CLASS_NAMES)[1:, :3]
    for (i, a), (j, b) in itertools.combinations(enumerate(rgb, start=1), 2):
        assert delta_e76(a, b) >= MIN_DELTA_E, (CLASS_NAMES[i], CLASS_NAMES[j])
    # the old overlay's gallbladder and inferior vena cava were 6 ΔE apart
    gallbladder, ivc = CLASS_NAMES.index("gallbladder"), CLASS_NAMES.index("inferior_vena_cava")
    assert delta_e76(rgb[gallbladder - 1], rgb[ivc - 1]) > 40
    assert viz.label_colours(CLASS_NAMES)[0, 3] == 0.0  # background is transparent


def test_other_class_lists_keep_the_default_colours_by_name():
    names = ("background", "spleen", "tumour", "liver", "cyst")
    got = viz.label_colours(names)
    default = viz.label_colours(CLASS_NAMES)
    assert np.array_equal(got[1], default[CLASS_NAMES.index("spleen")])
    assert np.array_equal(got[3], default[CLASS_NAMES.index("liver")])
    # new names take the first colours liver (0) and spleen (1) left unused
    assert np.array_equal(got[2, :3], viz._rgb(viz.PALETTE[2]))
    assert np.array_equal(got[4, :3], viz._rgb(viz.PALETTE[3]))
    many = viz.label_colours(["background"] + [f"c{i}" for i in range(20)])
    assert len({tuple(c) for c in many[1:17]}) == 16  # distinct up to the palette's size


# -- the preview PNG ---------------------------------------------------------------------------
def find_colour(png: np.ndarray, rgb, tolerance: float = 1.5 / 255) -> int:
    """Pixels of ``png`` (H, W, 3|4 floats) within ``tolerance`` of ``rgb`` per channel."""
    return int((np.abs(png[..., :3] - np.asarray(rgb)) <= tolerance).all(-1).sum())


def test_preview_png_shows_every_present_label_in_its_colour_with_a_legend(tmp_path, phantom):
    from matplotlib.image import imread

    labels = phantom.labels.copy()
    absent = (CLASS_NAMES.index("pancreas"), CLASS_NAMES.index("stomach"))
    labels[np.isin(labels, absent)] = 0
    drawn = viz.preview_png(phantom.image, labels, phantom.affine, tmp_path / "p.png")
    present = [k for k in range(1, len(CLASS_NAMES)) if k not in absent]
    assert drawn.legend == tuple(CLASS_NAMES[k] for k in present)

    png = imread(tmp_path / "p.png")
    split = int(png.shape[1] * viz.LEGEND_LEFT)
    panels, legend = png[:, :split], png[:, split:]
    ix, iy, iz = drawn.slices  # the phantom is stored RAS: these index its labels
    visible = (
        set(np.unique(labels[ix]))
        | set(np.unique(labels[:, iy]))
        | set(np.unique(labels[:, :, iz]))
    )
    assert len(visible - {0}) >= 6  # the slices go through the organs
    colours = viz.label_colours(CLASS_NAMES)[:, :3]
    for k in present:
        assert find_colour(legend, colours[k]) >= 20, CLASS_NAMES[k]  # its legend patch
        if k in visible:
            assert find_colour(panels, colours[k]) >= 4, CLASS_NAMES[k]  # its outline
    for k in absent:
        assert find_colour(png, colours[k]) == 0, CLASS_NAMES[k]


def test_preview_of_a_reoriented_copy_is_the_same_picture(tmp_path, phantom):
    """Arrays on an LPS, axis-swapped grid are brought to RAS before they are drawn."""
    from matplotlib.image import imread

    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = [(phantom.labels.shape[0] - 1), (phantom.labels.shape[1] - 1), 0]
    swap = np.eye(4)[[1, 0, 2, 3]]  # stored (y, x, z)
    affine = phantom.affine @ flip @ swap
    image = np.transpose(phantom.image[::-1, ::-1], (1, 0, 2))
    labels = np.transpose(phantom.labels[::-1, ::-1], (1, 0, 2))
    x, y = phantom.labels.shape[0] - 1 - 5, phantom.labels.shape[1] - 1 - 3
    np.testing.assert_allclose(affine @ [3, 5, 7, 1], phantom.affine @ [x, y, 7, 1])
    assert image[3, 5, 7] == phantom.image[x, y, 7]
    a = viz.preview_png(phantom.image, phantom.labels, phantom.affine, tmp_path / "a.png")
    b = viz.preview_png(image, labels, affine, tmp_path / "b.png")
    assert a == b
    assert np.array_equal(imread(tmp_path / "a.png"), imread(tmp_path / "b.png"))


def test_result_preview_reads_the_ct_from_the_source_file(tmp_path, phantom):
    from matplotlib.image import imread

    ct_path = tmp_path / "ct.nii.gz"
    nib.save(phantom.to_nifti()[0], ct_path)
    result = result_of(phantom, source=ct_path)
    assert result.preview(tmp_path / "p.png") == tmp_path / "p.png"
    png = imread(tmp_path / "p.png")
    liver = viz.label_colours(CLASS_NAMES)[1, :3]
    assert find_colour(png, liver) > 20
    with pytest.raises(ValueError, match=r"\.png"):
        result.preview(tmp_path / "p.jpg")
    with pytest.raises(ValueError, match="pass ct="):
        result_of(phantom).preview(tmp_path / "q.png")
    assert not (tmp_path / "q.png").exists()


def test_preview_without_matplotlib_names_the_extra(tmp_path, phantom, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install fastcascade\[viz\]"):
        result_of(phantom).preview(tmp_path / "p.png", ct=phantom.image)
    assert list(tmp_path.iterdir()) == []


# -- statistics --------------------------------------------------------------------------------
def test_statistics_match_a_hand_count_on_a_phantom(phantom):
    stats = result_of(phantom).statistics(ct=phantom.image)
    assert list(stats["organs"]) == list(CLASS_NAMES[1:])
    assert stats["voxel_volume_ml"] == 8.0 * 8.0 * 8.0 / 1000.0
    origin = phantom.affine[:3, 3]
    for k, name in enumerate(CLASS_NAMES[1:], start=1):
        s = stats["organs"][name]
        where = phantom.labels == k
        hu = phantom.image[where].astype(np.float64)
        assert s["id"] == k and s["voxels"] == int(where.sum())
        assert s["volume_ml"] == pytest.approx(where.sum() * 512 / 1000, rel=1e-12)
        assert s["hu_mean"] == pytest.approx(hu.mean(), rel=1e-9)
        assert s["hu_std"] == pytest.approx(hu.std(), rel=1e-9)
        idx = np.argwhere(where)
        assert s["bbox_voxels"] == {"min": idx.min(0).tolist(), "max": idx.max(0).tolist()}
        np.testing.assert_allclose(s["bbox_mm"]["min"], origin + 8.0 * idx.min(0))
        np.testing.assert_allclose(s["bbox_mm"]["max"], origin + 8.0 * idx.max(0))


def test_statistics_in_world_coordinates_of_a_flipped_grid():
    """An LPS-stored grid: the bounding box is in world RAS mm, min below max."""
    labels = np.zeros((5, 4, 3), np.uint8)
    labels[1:3, 2, 0:2] = 2  # 4 voxels
    ct = np.full(labels.shape, -1000.0, np.float32)
    ct[labels == 2] = [10.0, 20.0, 30.0, 60.0]
    affine = np.array([[-2.0, 0, 0, 50], [0, -3.0, 0, 20], [0, 0, 4.0, -10], [0, 0, 0, 1]])
    s = organ_statistics(labels, ct, affine, ("background", "a", "b"))["organs"]
    assert s["a"] == {
        "id": 1, "voxels": 0, "volume_ml": 0.0, "hu_mean": None, "hu_std": None,
        "bbox_mm": None, "bbox_voxels": None,
    }  # fmt: skip
    b = s["b"]
    assert b["voxels"] == 4 and b["volume_ml"] == pytest.approx(4 * 24 / 1000)
    assert b["hu_mean"] == 30.0
    assert b["hu_std"] == pytest.approx(math.sqrt((400 + 100 + 0 + 900) / 4))
    # i 1..2 → x 48..46, j 2 → y 14, k 0..1 → z -10..-6
    assert b["bbox_mm"] == {"min": [46.0, 14.0, -10.0], "max": [48.0, 14.0, -6.0]}
    assert b["bbox_voxels"] == {"min": [1, 2, 0], "max": [2, 2, 1]}


def test_statistics_bounding_box_on_an_oblique_grid_holds_the_voxel_centres_only():
    """Rotated 45° about z: the corners of the index box would reach further than the
    organ's voxels; the box is that of the voxel centres."""
    labels = np.zeros((3, 3, 1), np.uint8)
    for i, j in ((0, 0), (2, 1), (0, 2)):
        labels[i, j, 0] = 1
    c = 1 / math.sqrt(2)
    affine = np.array([[c, -c, 0, 0], [c, c, 0, 0], [0, 0, 1, 5], [0, 0, 0, 1]])
    s = organ_statistics(labels, np.zeros(labels.shape), affine, ("bg", "x"))["organs"]["x"]
    # centres: (0,0) → (0, 0); (2,1) → (c, 3c); (0,2) → (-2c, 2c)
    np.testing.assert_allclose(s["bbox_mm"]["min"], [-2 * c, 0.0, 5.0], atol=1e-12)
    np.testing.assert_allclose(s["bbox_mm"]["max"], [c, 3 * c, 5.0], atol=1e-12)
    assert s["volume_ml"] == pytest.approx(3 / 1000)


def test_statistics_csv_and_json_files_agree(tmp_path, phantom):
    result = result_of(phantom).select(["liver", "pancreas"])
    result.save(tmp_path / "seg.nii.gz", statistics=tmp_path / "stats.json", ct=phantom.image)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert list(stats["organs"]) == ["liver", "pancreas"]
    with open(tmp_path / "stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["name"] for r in rows] == ["liver", "pancreas"]
    for row in rows:
        s = stats["organs"][row["name"]]
        assert int(row["voxels"]) == s["voxels"] and int(row["id"]) == s["id"]
        assert float(row["volume_ml"]) == s["volume_ml"]
        assert float(row["hu_mean"]) == s["hu_mean"] and float(row["hu_std"]) == s["hu_std"]
        assert [float(row[f"bbox_min_{a}_mm"]) for a in "xyz"] == s["bbox_mm"]["min"]
        assert [int(row[f"bbox_max_{a}"]) for a in "ijk"] == s["bbox_voxels"]["max"]


def test_statistics_of_an_absent_organ_are_empty_cells(tmp_path):
    labels = np.zeros((3, 3, 3), np.uint8)
    result = SegmentationResult(labels=labels, class_names=("bg", "x"), affine=np.eye(4))
    result.save(tmp_path / "s.nii", statistics=tmp_path / "st.json", ct=np.zeros((3, 3, 3)))
    text = (tmp_path / "st.csv").read_text().splitlines()
    assert text[1] == "1,x,0,0.0" + "," * (len(CSV_COLUMNS) - 4)


def test_statistics_read_the_ct_again_from_the_source_or_take_it(tmp_path, phantom):
    ct_path = tmp_path / "ct.nii.gz"
    nib.save(phantom.to_nifti()[0], ct_path)
    stored = np.rint(phantom.image).astype(np.int16)  # what the file holds
    expected = result_of(phantom).statistics(ct=stored)
    assert result_of(phantom, source=ct_path).statistics() == expected
    assert result_of(phantom).statistics(ct=ct_path) == expected
    assert result_of(phantom).statistics(ct=torch.from_numpy(stored)) == expected
    with pytest.raises(ValueError, match="pass ct="):
        result_of(phantom).statistics()
    with pytest.raises(ValueError, match="shape"):
        result_of(phantom).statistics(ct=stored[:-1])
    moved = phantom.affine.copy()
    moved[0, 3] += 5.0
    with pytest.raises(ValueError, match="affine differs"):
        result_of(phantom).statistics(ct=nib.Nifti1Image(stored, moved))


def test_save_reads_the_ct_once_for_statistics_and_preview(tmp_path, phantom, monkeypatch):
    import fastcascade.api

    ct_path = tmp_path / "ct.nii.gz"
    nib.save(phantom.to_nifti()[0], ct_path)
    reads = []
    original = fastcascade.api.load_scan

    def counting(*args, **kwargs):
        reads.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(fastcascade.api, "load_scan", counting)
    result = result_of(phantom, source=ct_path)
    result.save(tmp_path / "seg.nii.gz", statistics=tmp_path / "s.json", preview=tmp_path / "s.png")
    assert reads == [ct_path]
    assert (tmp_path / "s.json").read_text() == statistics_json(result.statistics())
    assert (tmp_path / "s.png").is_file()


def test_statistics_paths_need_a_json_name():
    assert statistics_paths("a/s.json") == (Path("a/s.json"), Path("a/s.csv"))
    for bad in ("s.csv", "s", "s.json.gz"):
        with pytest.raises(ValueError, match=r"\.json"):
            statistics_paths(bad)


# -- split masks -------------------------------------------------------------------------------
def test_split_writes_one_binary_mask_per_organ(tmp_path, phantom):
    header = phantom.to_nifti()[1].header
    result = result_of(phantom, header=header)
    written = result.split(tmp_path / "masks")
    names = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert names == sorted(
        [f"{n}.nii.gz" for n in CLASS_NAMES[1:]] + [f"{n}.json" for n in CLASS_NAMES[1:]]
    )
    assert sorted(p.name for p in written) == names
    for k, name in enumerate(CLASS_NAMES[1:], start=1):
        img = nib.load(tmp_path / "masks" / f"{name}.nii.gz")
        assert img.get_data_dtype() == np.uint8
        data = np.asarray(img.dataobj)
        assert np.array_equal(data, (phantom.labels == k).astype(np.uint8))
        np.testing.assert_allclose(img.header.get_sform(), phantom.affine)
        np.testing.assert_allclose(img.header.get_qform(), phantom.affine)
        assert img.dataobj.slope == 1.0 and img.dataobj.inter == 0.0
        assert nifti.read_label_names(tmp_path / "masks" / f"{name}.nii.gz") == (
            "background",
            name,
        )


def test_split_of_a_selection_and_odd_names(tmp_path):
    labels = np.zeros((4, 3, 2), np.uint8)
    labels[0, 0, 0], labels[1, 1, 1], labels[3, 2, 1] = 1, 2, 3
    names = ("background", "a/../b", "lesion 2", "c")
    result = SegmentationResult(labels=labels, class_names=names, affine=np.eye(4))
    result.select("a/../b,c").split(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "a_.._b.json", "a_.._b.nii.gz", "c.json", "c.nii.gz",
    ]  # fmt: skip
    assert np.asarray(nib.load(tmp_path / "m" / "c.nii.gz").dataobj)[3, 2, 1] == 1
    clash = SegmentationResult(
        labels=labels, class_names=("bg", "a b", "a_b", "c"), affine=np.eye(4)
    )
    with pytest.raises(ValueError, match="one mask file name"):
        clash.split(tmp_path / "n")


# -- organs subset -----------------------------------------------------------------------------
def test_select_keeps_the_named_organs_only(phantom):
    probs = np.random.default_rng(0).random((len(CLASS_NAMES), *phantom.labels.shape))
    result = result_of(phantom, probabilities=probs)
    chosen = result.select("spleen, liver")
    assert chosen.organ_ids == (1, 2) and result.organ_ids == tuple(range(1, 11))
    expected = np.where(np.isin(phantom.labels, [1, 2]), phantom.labels, 0)
    assert np.array_equal(chosen.labels, expected) and chosen.labels.dtype == np.uint8
    assert chosen.probabilities is probs and chosen.class_names == CLASS_NAMES
    assert np.array_equal(result.labels, phantom.labels)  # the original is unchanged
    assert np.array_equal(chosen.select(["liver"]).labels, np.where(phantom.labels == 1, 1, 0))
    with pytest.raises(ValueError, match="spleen: already removed"):
        chosen.select(["liver"]).select(["spleen"])


@pytest.mark.parametrize(
    "organs, match",
    [
        pytest.param(
            "livr", r"unknown organ\(s\) 'livr'; the model's organs are liver, spleen", id="typo"
        ),
        pytest.param(["background"], "unknown organ", id="background"),
        pytest.param([], "expected one or more", id="empty"),
        pytest.param("liver,,spleen", "expected one or more", id="empty-name"),
    ],
)
def test_select_refuses_unknown_names(organs, match):
    with pytest.raises(ValueError, match=match):
        organ_ids(CLASS_NAMES, organs)


def test_select_on_tensor_labels_stays_a_tensor():
    labels = torch.tensor([[[0, 1, 2, 3]]], dtype=torch.uint8)
    result = SegmentationResult(labels=labels, class_names=CLASS_NAMES[:4], affine=np.eye(4))
    chosen = result.select(["kidney_right", "liver"])
    assert isinstance(chosen.labels, torch.Tensor) and chosen.labels.dtype == torch.uint8
    assert chosen.labels.flatten().tolist() == [0, 1, 0, 3]


# -- largest component -------------------------------------------------------------------------
def test_largest_component_per_label_by_hand():
    labels = np.zeros((8, 6, 5), np.uint8)
    labels[0:3, 0:3, 0:2] = 1  # liver: 18 voxels …
    labels[5:7, 4:6, 3] = 1  # … and 4 elsewhere
    labels[4, 0, 0] = labels[5, 1, 0] = 2  # two spleen voxels touching by an edge only
    labels[7, 5, 4] = 3  # one voxel, kept
    labels[6, 0, 0] = 1  # a liver voxel next to the spleen (ids are separate)
    labels[7, 0, 0] = 2
    expected = labels.copy()
    expected[5:7, 4:6, 3] = 0
    expected[6, 0, 0] = 0
    # spleen: components {(4,0,0)}, {(5,1,0)}, {(7,0,0)}, each of 1 voxel: the first in
    # C order, (4, 0, 0), wins
    expected[5, 1, 0] = expected[7, 0, 0] = 0
    result = SegmentationResult(labels=labels, class_names=CLASS_NAMES, affine=np.eye(4))
    assert np.array_equal(result.largest_components().labels, expected)
    assert np.array_equal(result.labels, labels)  # a copy


def test_largest_component_matches_scipy_on_a_noisy_phantom(phantom):
    rng = np.random.default_rng(3)
    labels = phantom.labels.copy()
    speckle = rng.random(labels.shape) < 0.02
    labels[speckle] = rng.integers(1, len(CLASS_NAMES), speckle.sum())
    expected = np.zeros_like(labels)
    for k in range(1, len(CLASS_NAMES)):
        comp, count = ndimage.label(labels == k)
        sizes = np.bincount(comp.ravel())[1:]
        expected[comp == 1 + int(np.argmax(sizes))] = k
    assert np.array_equal(keep_largest_components(labels), expected)
    tensor = keep_largest_components(torch.from_numpy(labels))
    assert isinstance(tensor, torch.Tensor) and np.array_equal(tensor.numpy(), expected)
    only = keep_largest_components(labels, [1])
    assert np.array_equal(only == 1, expected == 1)
    assert np.array_equal(only[labels != 1], labels[labels != 1])


def test_largest_components_only_touch_the_selected_organs(phantom):
    labels = phantom.labels.copy()
    labels[0, 0, 0] = labels[-1, -1, -1] = 1
    result = result_of(phantom)
    result.labels = labels
    cleaned = result.select("liver,spleen").largest_components()
    assert cleaned.labels[0, 0, 0] == 0 and cleaned.labels[-1, -1, -1] == 0
    assert set(np.unique(cleaned.labels)) == {0, 1, 2}


# -- one group, one marker ---------------------------------------------------------------------
def test_save_writes_every_output_in_one_group_listed_by_the_marker(tmp_path, phantom):
    result = result_of(phantom).select("liver,aorta")
    out = tmp_path / "out"
    out.mkdir()
    paths = result.save(
        out / "seg.nii.gz",
        marker={"format": "test"},
        preview=out / "seg.png",
        statistics=out / "stats" / "s.json",
        split=out / "masks",
        ct=phantom.image,
    )
    marker = json.loads((out / "seg.done.json").read_text())
    listed = [
        "masks/liver.json", "masks/liver.nii.gz", "masks/aorta.json", "masks/aorta.nii.gz",
        "stats/s.json", "stats/s.csv", "seg.png", "seg.json", "seg.nii.gz",
    ]  # fmt: skip
    assert marker["outputs"] == listed and marker["format"] == "test"
    assert [p.relative_to(out).as_posix() for p in paths] == [*listed, "seg.done.json"]
    assert all(p.is_file() for p in paths)


def test_a_failing_output_leaves_none_of_the_group(tmp_path, phantom, monkeypatch):
    result = result_of(phantom)
    out = tmp_path / "seg.nii.gz"
    result.save(out, marker={"run": 1}, statistics=tmp_path / "s.json", ct=phantom.image)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(viz, "preview_png", broken)
    selected = result.select("liver")
    with pytest.raises(OSError, match="disk full"):
        selected.save(
            out,
            marker={"run": 2},
            preview=tmp_path / "p.png",
            statistics=tmp_path / "s.json",
            split=tmp_path / "masks",
            ct=phantom.image,
        )
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # old labels, statistics and marker kept; nothing new
    assert not (tmp_path / "masks").exists()  # the folder it created is removed again


def test_outputs_never_overwrite_the_input_scan(tmp_path, phantom):
    ct_path = tmp_path / "ct.nii.gz"
    nib.save(phantom.to_nifti()[0], ct_path)
    before = ct_path.read_bytes()
    names = ("background", "ct")
    odd = SegmentationResult(
        labels=(phantom.labels > 0).astype(np.uint8), class_names=names, affine=phantom.affine,
        source=ct_path,
    )  # fmt: skip
    with pytest.raises(ValueError, match="input file"):
        odd.split(tmp_path)  # its mask would be ct.nii.gz
    assert ct_path.read_bytes() == before


# -- through a real segment() -------------------------------------------------------------------
@pytest.mark.parametrize("as_tensor", [False, True], ids=["array", "tensor"])
def test_a_segment_result_keeps_its_scan_for_statistics_and_preview(tmp_path, as_tensor):
    """An LPS, axis-swapped input: the kept scan comes back on the input's own grid."""
    from test_cascade import tiny_predictor

    ct = np.full((20, 18, 16), -1000.0, np.float32)
    ct[4:16, 3:15, 3:13] = np.linspace(-50, 150, 12 * 12 * 10, dtype=np.float32).reshape(12, 12, 10)
    affine = np.array([[0, -6.0, 0, 40], [-6.0, 0, 0, 30], [0, 0, 6.0, -20], [0, 0, 0, 1]])
    volume = torch.from_numpy(ct) if as_tensor else ct
    result = tiny_predictor().segment(volume, affine=affine, hu_check="off")
    assert result.scan is not None
    assert isinstance(result.labels, torch.Tensor) == as_tensor
    assert np.array_equal(result.image_hu(), ct)
    stats = result.statistics()
    assert stats == result.statistics(ct=ct)
    labels = np.asarray(result.labels)
    for name, s in stats["organs"].items():
        k = CLASS_NAMES.index(name)
        assert s["voxels"] == int((labels == k).sum())
        if s["voxels"]:
            assert s["hu_mean"] == pytest.approx(ct[labels == k].astype(np.float64).mean())
    assert sum(s["voxels"] for s in stats["organs"].values()) == int((labels > 0).sum()) > 0
    result.preview(tmp_path / "p.png")
    result.scan = None  # freed: then the CT must be given
    with pytest.raises(ValueError, match="pass ct="):
        result.statistics()
