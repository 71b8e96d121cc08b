"""``fastcascade segment``'s outputs beyond the labels: ``--preview``, ``--statistics``,
``--split``, ``--organs``, ``--largest-component``; written with the labels in one group,
listed by the marker, refused when they exist (unless ``--overwrite``) or when a name is
wrong, before any work.

``segment()`` is replaced by the fake of ``test_cli.py``: labels 1 (liver) where the CT is
above 0 HU, plus one voxel of 10 (portal_splenic_vein) at (0, 0, 0).
"""

from __future__ import annotations

import json
import sys

import nibabel as nib
import numpy as np
import pytest
from test_cli import ct_file, fake  # noqa: F401,F811  (fixtures)

from fastcascade import cli
from fastcascade.config import CLASS_NAMES


def run(ct, out, *extra) -> int:
    return cli.main(["segment", str(ct), "-o", str(out), "--quiet", *map(str, extra)])


def test_all_outputs_in_one_group_listed_by_the_marker(ct_file, fake, tmp_path):  # noqa: F811
    from matplotlib.image import imread

    out = tmp_path / "out"
    extra = ["--preview", out / "seg.png", "--statistics", out / "stats.json"]
    extra += ["--split", out / "masks", "--organs", "liver,spleen", "--largest-component"]
    assert run(ct_file, out / "seg.nii.gz", *extra) == 0
    marker = json.loads((out / "seg.done.json").read_text())
    assert marker["outputs"] == [
        "masks/liver.json", "masks/liver.nii.gz", "masks/spleen.json", "masks/spleen.nii.gz",
        "stats.json", "stats.csv", "seg.png", "seg.json", "seg.nii.gz",
    ]  # fmt: skip
    assert marker["postprocess"] == {"organs": ["liver", "spleen"], "largest_component": True}

    ct = nib.load(ct_file).get_fdata()
    liver = (ct > 0).astype(np.uint8)  # the fake's labels without id 10 (not selected)
    seg = np.asarray(nib.load(out / "seg.nii.gz").dataobj)
    assert np.array_equal(seg, liver)
    assert np.array_equal(np.asarray(nib.load(out / "masks" / "liver.nii.gz").dataobj), liver)
    assert not np.asarray(nib.load(out / "masks" / "spleen.nii.gz").dataobj).any()
    stats = json.loads((out / "stats.json").read_text())["organs"]
    assert list(stats) == ["liver", "spleen"]
    voxel_ml = abs(np.linalg.det(nib.load(ct_file).affine[:3, :3])) / 1000
    assert stats["liver"]["voxels"] == liver.sum()
    assert stats["liver"]["volume_ml"] == pytest.approx(liver.sum() * voxel_ml)
    assert stats["liver"]["hu_mean"] == pytest.approx(ct[liver == 1].mean())
    assert stats["spleen"]["voxels"] == 0
    assert imread(out / "seg.png").shape[-1] in (3, 4)


def test_largest_component_flag(ct_file, fake, tmp_path):  # noqa: F811
    assert run(ct_file, tmp_path / "a.nii.gz", "--largest-component") == 0
    seg = np.asarray(nib.load(tmp_path / "a.nii.gz").dataobj)
    assert seg[0, 0, 0] == 10  # a single voxel is its own largest component


def test_organs_subset_names_are_checked_before_any_work(ct_file, fake, tmp_path, capsys):  # noqa: F811
    assert run(ct_file, tmp_path / "s.nii.gz", "--organs", "liver,livr") == 2
    err = capsys.readouterr().err
    assert "unknown organ(s) 'livr'" in err and "spleen" in err
    assert fake.calls == [] and [p.name for p in tmp_path.iterdir()] == ["ct.nii.gz"]


@pytest.mark.parametrize(
    "extra, message",
    [
        pytest.param(["--preview", "p.jpg"], ".png", id="preview-suffix"),
        pytest.param(["--statistics", "s.csv"], ".json", id="statistics-suffix"),
        pytest.param(["--split", "ct.nii.gz"], "is a file", id="split-a-file"),
        pytest.param(["--statistics", "s.json"], "name the same file", id="stats-is-label-names"),
        pytest.param(
            ["--split", "m", "--probabilities", "m/liver.nii.gz"], "name the same file", id="clash"
        ),
    ],
)
def test_bad_output_names_stop_before_any_work(
    extra,
    message,
    ct_file,  # noqa: F811
    fake,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run(ct_file, "s.nii.gz", *extra) == 2
    assert message in capsys.readouterr().err
    assert fake.calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_existing_outputs_are_refused_unless_overwrite(ct_file, fake, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "s.nii.gz"
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "spleen.nii.gz").write_bytes(b"old")
    (tmp_path / "stats.csv").write_text("old")
    extra = ["--statistics", tmp_path / "stats.json", "--split", tmp_path / "masks"]
    assert run(ct_file, out, *extra) == 2
    err = capsys.readouterr().err
    assert "spleen.nii.gz" in err and "stats.csv" in err and "--overwrite" in err
    assert fake.calls == [] and not out.exists()
    assert run(ct_file, out, *extra, "--overwrite") == 0
    assert (tmp_path / "stats.csv").read_text().startswith("id,name,")
    assert nib.load(tmp_path / "masks" / "spleen.nii.gz").shape == (12, 10, 8)
    # other files in the split folder are not outputs: left alone, no refusal
    (tmp_path / "masks" / "notes.txt").write_text("mine")
    assert run(ct_file, tmp_path / "t.nii.gz", "--split", tmp_path / "masks2") == 0
    assert (tmp_path / "masks" / "notes.txt").read_text() == "mine"


def test_split_without_organs_writes_every_class(ct_file, fake, tmp_path):  # noqa: F811
    assert run(ct_file, tmp_path / "s.nii", "--split", tmp_path / "m") == 0
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == sorted(
        [f"{n}.json" for n in CLASS_NAMES[1:]] + [f"{n}.nii.gz" for n in CLASS_NAMES[1:]]
    )


def test_preview_without_matplotlib_stops_before_any_work(
    ct_file,  # noqa: F811
    fake,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert run(ct_file, tmp_path / "s.nii.gz", "--preview", tmp_path / "p.png") == 2
    assert "pip install fastcascade[viz]" in capsys.readouterr().err
    assert fake.calls == [] and [p.name for p in tmp_path.iterdir()] == ["ct.nii.gz"]


def test_a_failed_preview_leaves_no_output(ct_file, fake, tmp_path, monkeypatch, capsys):  # noqa: F811
    from fastcascade import viz

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(viz, "preview_png", broken)
    out = tmp_path / "new" / "s.nii.gz"
    extra = ["--preview", out.parent / "p.png", "--statistics", out.parent / "stats.json"]
    assert run(ct_file, out, *extra, "--split", tmp_path / "new" / "m") == 1
    assert "No space left" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["ct.nii.gz"]  # the folders it made are gone
