"""Many scans with one model: ``fastcascade.batch`` and ``fastcascade segment IN… -o OUTDIR``.

The CLI tests run the real cascade with a tiny random model on small phantoms (6 mm
voxels), so what a batch writes is compared with what the single-scan command writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from tiny_models import save_tiny_cascade, write_phantoms

from fastcascade import batch, cli
from fastcascade.api import Predictor
from fastcascade.batch import Job, marker_matches, plan_jobs, select_part


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_cascade(tmp_path_factory.mktemp("model") / "tiny", foreground_bias=True)


@pytest.fixture
def count_segments(monkeypatch):
    """The inputs ``Predictor.segment`` was called on, in order (as Scans: their path)."""
    seen: list[str] = []
    original = Predictor.segment

    def spy(self, volume, *args, **kwargs):
        seen.append(Path(getattr(volume, "path", volume)).name)
        return original(self, volume, *args, **kwargs)

    monkeypatch.setattr(Predictor, "segment", spy)
    return seen


def run(*argv: str | Path) -> int:
    return cli.main(["segment", *map(str, argv), "--device", "cpu", "--quiet"])


def test_a_folder_with_a_corrupt_scan_segments_the_others_and_reports_it(
    tmp_path, model, count_segments
):
    scans = tmp_path / "scans"
    write_phantoms(scans, seeds=(1, 3), corrupt="case2.nii.gz")
    out = tmp_path / "segs"
    assert run(scans, "-o", out, "--model", model) == 1
    assert count_segments == ["case1.nii.gz", "case3.nii.gz"]  # the corrupt one never got here
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"case{k}{s}" for k in (1, 3) for s in (".nii.gz", ".json", ".done.json")]
        + ["failures.json"]
    )
    failures = json.loads((out / "failures.json").read_text())
    assert [f["input"] for f in failures] == [str(scans / "case2.nii.gz")]
    assert failures[0]["reason"].startswith("ValueError")
    # the same labels as the single-scan command writes
    single = tmp_path / "single.nii.gz"
    assert run(scans / "case3.nii.gz", "-o", single, "--model", model) == 0
    batch_seg = nib.load(out / "case3.nii.gz")
    np.testing.assert_array_equal(
        np.asarray(batch_seg.dataobj), np.asarray(nib.load(single).dataobj)
    )
    np.testing.assert_allclose(batch_seg.affine, nib.load(scans / "case3.nii.gz").affine)
    marker = json.loads((out / "case3.done.json").read_text())
    assert marker["input"]["path"] == str((scans / "case3.nii.gz").resolve())
    assert marker["outputs"] == ["case3.json", "case3.nii.gz"]


def test_a_rerun_skips_what_is_done_and_redoes_a_differing_marker(tmp_path, model, count_segments):
    scans = tmp_path / "scans"
    write_phantoms(scans, seeds=(1, 2, 3))
    out = tmp_path / "segs"
    assert run(scans, "-o", out, "--model", model) == 0
    assert len(count_segments) == 3
    assert not (out / "failures.json").exists()
    count_segments.clear()
    assert run(scans, "-o", out, "--model", model) == 0
    assert count_segments == []  # everything done already
    marker = out / "case2.done.json"
    record = json.loads(marker.read_text())
    record["options"]["overlap"] = not record["options"]["overlap"]
    marker.write_text(json.dumps(record))
    assert run(scans, "-o", out, "--model", model) == 0
    assert count_segments == ["case2.nii.gz"]
    assert json.loads(marker.read_text())["options"]["overlap"] != record["options"]["overlap"]
    count_segments.clear()
    assert run(scans, "-o", out, "--model", model, "--overwrite") == 0
    assert count_segments == ["case1.nii.gz", "case2.nii.gz", "case3.nii.gz"]
    count_segments.clear()
    (out / "case1.nii.gz").unlink()  # an output gone: the marker no longer describes it
    assert run(scans, "-o", out, "--model", model) == 0
    assert count_segments == ["case1.nii.gz"]


def test_organs_in_another_order_or_repeated_still_skip_on_a_rerun(tmp_path, model, count_segments):
    scans = tmp_path / "scans"
    write_phantoms(scans, seeds=(1,))
    out = tmp_path / "segs"
    assert run(scans, "-o", out, "--model", model, "--organs", "spleen,liver") == 0
    assert count_segments == ["case1.nii.gz"]
    marker = json.loads((out / "case1.done.json").read_text())
    assert marker["postprocess"]["organs"] == ["liver", "spleen"]  # class-id order
    count_segments.clear()
    assert run(scans, "-o", out, "--model", model, "--organs", " liver,spleen,liver") == 0
    assert count_segments == []
    assert run(scans, "-o", out, "--model", model, "--organs", "liver") == 0
    assert count_segments == ["case1.nii.gz"]  # a different selection is redone


def test_two_parts_segment_every_scan_once(tmp_path, model, count_segments):
    paths = write_phantoms(tmp_path / "scans", seeds=(1, 2, 3))
    out = tmp_path / "segs"
    listed = tmp_path / "cases.txt"
    listed.write_text("# three cases\nscans/case3.nii.gz\n\nscans/case1.nii.gz\n")
    parts = []
    for k in (0, 1):
        count_segments.clear()
        argv = ["--list", listed, paths[1], "-o", out, "--model", model]
        assert run(*argv, "--num-parts", "2", "--part-id", str(k)) == 0
        parts.append(list(count_segments))
    assert parts == [["case1.nii.gz", "case3.nii.gz"], ["case2.nii.gz"]]
    assert sorted(p.name for p in out.glob("*.done.json")) == [
        f"case{k}.done.json" for k in (1, 2, 3)
    ]


def test_torchrun_rank_and_world_size_pick_the_part(tmp_path, model, count_segments, monkeypatch):
    scans = tmp_path / "scans"
    write_phantoms(scans, seeds=(1, 2, 3), corrupt="case0.nii.gz")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "segs"
    assert run(scans, "-o", out, "--model", model) == 1  # case0 (corrupt) and case2
    assert count_segments == ["case2.nii.gz"]
    failures = json.loads((out / "failures.part-0-of-2.json").read_text())
    assert [Path(f["input"]).name for f in failures] == ["case0.nii.gz"]
    monkeypatch.setenv("RANK", "1")
    count_segments.clear()
    assert run(scans, "-o", out, "--model", model) == 0
    assert count_segments == ["case1.nii.gz", "case3.nii.gz"]
    assert not (out / "failures.part-1-of-2.json").exists()
    monkeypatch.setenv("RANK", "2")
    assert run(scans, "-o", out, "--model", model) == 2


def test_a_list_naming_missing_scans_reports_them_and_runs_the_rest(
    tmp_path, model, count_segments
):
    write_phantoms(tmp_path, seeds=(1,))
    listed = tmp_path / "cases.txt"
    listed.write_text(f"missing.nii.gz\ncase1.nii.gz\n{tmp_path / 'gone.nii.gz'}\n")
    out = tmp_path / "segs"
    assert run("--list", listed, "-o", out, "--model", model) == 1
    assert count_segments == ["case1.nii.gz"]
    failures = json.loads((out / "failures.json").read_text())
    assert sorted(Path(f["input"]).name for f in failures) == ["gone.nii.gz", "missing.nii.gz"]
    assert {f["reason"] for f in failures} == {"does not exist"}


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--num-parts", "2", "--part-id", "2"], "part 2 of 2"),
        (["--num-parts", "0", "--part-id", "0"], "part 0 of 0"),
        (["--probabilities", "p.nii.gz"], "--probabilities names one file"),
        (["--preview", "p.png"], "--preview names one file"),
    ],
    ids=["part-id-too-large", "no-parts", "probabilities", "preview"],
)
def test_bad_batch_arguments_are_refused_before_any_work(
    tmp_path, model, count_segments, capsys, extra, message
):
    scans = tmp_path / "scans"
    write_phantoms(scans, seeds=(1, 2))
    out = tmp_path / "segs"
    assert run(scans, "-o", out, "--model", model, *extra) == 2
    assert message in capsys.readouterr().err
    assert count_segments == [] and not out.exists()


def test_an_output_folder_inside_an_input_folder_is_refused(tmp_path, model, capsys):
    scans = tmp_path / "scans"
    write_phantoms(scans, seeds=(1, 2))
    assert run(scans, "-o", scans / "segs", "--model", model) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert not (scans / "segs").exists()
    assert run(scans, "-o", scans, "--model", model) == 2
    assert run(scans, "-o", tmp_path / "seg.nii.gz", "--model", model) == 2


def test_a_single_scan_keeps_the_single_scan_command(tmp_path, model):
    (ct,) = write_phantoms(tmp_path / "scans", seeds=(1,))
    out = tmp_path / "seg.nii.gz"
    assert run(ct, "-o", out, "--model", model) == 0
    assert out.is_file() and (tmp_path / "seg.done.json").is_file()


# -- the library ------------------------------------------------------------------------


def test_parts_are_disjoint_cover_every_job_and_do_not_depend_on_input_order(tmp_path):
    names = [f"s{k:02d}.nii.gz" for k in range(11)]
    jobs = plan_jobs([tmp_path / n for n in names], tmp_path / "out")
    shuffled = plan_jobs([tmp_path / n for n in reversed(names)], tmp_path / "out")
    assert jobs == shuffled
    for n in (1, 2, 3, 11, 12):
        parts = [select_part(jobs, n, k) for k in range(n)]
        inputs = [j.input for part in parts for j in part]
        outputs = [j.output for part in parts for j in part]
        assert sorted(inputs) == sorted(j.input for j in jobs)
        assert len(set(outputs)) == len(outputs) == len(jobs)
    with pytest.raises(ValueError, match="part id must be in 0..2"):
        select_part(jobs, 3, 3)


def test_plan_names_outputs_by_stem_and_refuses_collisions(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    dicom = tmp_path / "series1"
    dicom.mkdir()
    (dicom / "IM0001").write_bytes(b"")
    jobs = plan_jobs([tmp_path / "a" / "x.nii", dicom, tmp_path / "c.nrrd"], tmp_path / "out")
    assert [j.output.name for j in jobs] == ["x.nii.gz", "c.nii.gz", "series1.nii.gz"]
    assert [j.error for j in jobs] == ["does not exist", "does not exist", None]
    with pytest.raises(ValueError, match="would both write"):
        plan_jobs([tmp_path / "a" / "x.nii.gz", tmp_path / "b" / "x.nii"], tmp_path / "out")
    assert batch.expand_inputs([dicom]) == [dicom]  # a DICOM folder is one scan


def test_part_from_environment():
    assert batch.part_from_environment({}) is None
    assert batch.part_from_environment({"RANK": "3", "WORLD_SIZE": "4"}) == (4, 3)
    with pytest.raises(ValueError, match="together"):
        batch.part_from_environment({"RANK": "1"})
    with pytest.raises(ValueError, match="integers"):
        batch.part_from_environment({"RANK": "a", "WORLD_SIZE": "2"})


def test_marker_matches_only_the_same_record_with_its_outputs(tmp_path):
    job = Job(tmp_path / "ct.nii.gz", tmp_path / "out" / "ct.nii.gz")
    record = {"input": {"path": "ct", "size": 3}, "options": {"tile": (1, 2)}, "series": None}
    assert not marker_matches(job, record)  # no marker
    job.output.parent.mkdir()
    job.output.write_bytes(b"x")
    saved = {**record, "options": {"tile": [1, 2]}, "series": "1.2.3", "outputs": ["ct.nii.gz"]}
    job.marker.write_text(json.dumps(saved))
    assert marker_matches(job, record)
    assert not marker_matches(job, {**record, "input": {"path": "ct", "size": 4}})
    job.output.unlink()
    assert not marker_matches(job, record)
    job.marker.write_text("{not json")
    assert not marker_matches(job, record)


def test_run_batch_reads_the_next_scan_while_one_runs():
    """The reading thread has read job k+1 before job k's processing ends."""
    import threading

    jobs = [Job(Path(f"s{k}"), Path(f"o{k}")) for k in range(4)]
    read = {j.input: threading.Event() for j in jobs}
    order: list[str] = []

    def load(job):
        read[job.input].set()
        return job.input.name

    def process(job, loaded):
        i = jobs.index(job)
        if i + 1 < len(jobs):
            assert read[jobs[i + 1].input].wait(timeout=10), "next scan not read meanwhile"
        if loaded == "s2":
            raise RuntimeError("boom")
        order.append(loaded)

    report = batch.run_batch(jobs, load, process, show_progress=False)
    assert order == ["s0", "s1", "s3"]
    assert report.failures == [{"input": "s2", "reason": "RuntimeError: boom"}]
    assert report.segmented == [Path("s0"), Path("s1"), Path("s3")]


def test_an_output_folder_made_meanwhile_by_another_part_is_used_and_kept(tmp_path, monkeypatch):
    from fastcascade.io.atomic import output_folders

    target = tmp_path / "segs" / "sub"
    real_mkdir = Path.mkdir

    def another_process_first(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        raise FileExistsError(str(self))

    monkeypatch.setattr(Path, "mkdir", another_process_first)
    with pytest.raises(RuntimeError, match="later"):
        with output_folders([target]) as created:
            assert created == []
            raise RuntimeError("a later failure")
    assert target.is_dir()  # not created by us, so not removed by us


EXTS = (".nii.gz", ".json", ".done.json")


def test_two_torchrun_processes_at_once_write_every_output_once(tmp_path, model):
    """The torchrun path with two CPU processes started together (the environment
    torchrun gives each): every scan segmented by exactly one of them, nothing left over."""
    import os
    import subprocess
    import sys

    scans = tmp_path / "scans"
    write_phantoms(scans, seeds=(1, 2, 3))
    out = tmp_path / "segs"
    argv = [sys.executable, "-m", "fastcascade", "segment", str(scans), "-o", str(out)]
    argv += ["--model", str(model), "--device", "cpu", "--quiet", "--threads", "1"]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True))
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], results
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"case{k}{ext}" for k in (1, 2, 3) for ext in EXTS)
    markers = [json.loads((out / f"case{k}.done.json").read_text()) for k in (1, 2, 3)]
    assert [Path(m["input"]["path"]).name for m in markers] == [
        f"case{k}.nii.gz" for k in (1, 2, 3)
    ]
