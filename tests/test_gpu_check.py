"""The GPU check (``benchmarks/gpu_check.sh``) on the CPU: its plan, its dry run, and what a
timed-out or interrupted run leaves behind.

A GPU machine gives back only a few files and kills a command at its time limit, so the
check must pack everything into one archive plus one summary, after every step and when
stopped. These tests run its smallest area (``smoke``: the warp kernel's tests and
benchmark) as a ``--cpu`` dry run, with the Triton kernels interpreted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check_report  # noqa: E402  (benchmarks/, beside the script)

QUICK_LIMIT_S = 300  # --area all --quick must fit five minutes


def run_plan(*args: str) -> tuple[list[tuple[str, int, str]], int]:
    out = subprocess.run(
        ["bash", str(SCRIPT), "--plan", *args], capture_output=True, text=True, check=True
    ).stdout
    rows = []
    for line in out.splitlines()[1:-1]:
        name, limit, runs = re.match(r"(\S+)\s+(\d+)\s+(.*)", line).groups()
        rows.append((name, int(limit), runs))
    total = int(re.search(r"sum of step limits: (\d+) s", out).group(1))
    return rows, total


def script_env() -> dict:
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("FASTCASCADE_TEST_COMPILE", None)
    return env


def test_quick_run_of_every_area_fits_five_minutes():
    rows, total = run_plan("--area", "all", "--quick")
    assert total == sum(limit for _, limit, _ in rows)
    assert total <= QUICK_LIMIT_S, f"--area all --quick: limits sum to {total} s"
    names = [name for name, _, _ in rows]
    assert names[:2] == ["install", "preflight"]
    # every kernel's tests and benchmark, the body mask, the whole cascade
    runs = " ".join(r for _, _, r in rows)
    for needed in ("test_ops_warp.py", "test_ops_dilate.py", "test_ops_conv_bn_relu_kernel.py"):
        assert needed in runs
    for area in ("kernels", "dilate", "warp", "morphology"):
        assert f"bench {area}" in runs
    assert "e2e" in names and "tests_cascade" in names and "tests_training" in names
    # The sm_90 compile checks are for CPU CI: skipped on a GPU, run in the dry run.
    compile_row = next(r for r in rows if r[0] == "compile_sm90")
    assert compile_row[1] == 0 and "CPU CI" in compile_row[2]
    cpu_rows, _ = run_plan("--area", "kernels", "--quick", "--cpu")
    assert dict((n, lim) for n, lim, _ in cpu_rows)["compile_sm90"] > 0


def test_budget_and_overrides_change_the_plan():
    base, _ = run_plan("--area", "kernels", "--quick")
    rows, total = run_plan("--area", "kernels", "--quick", "--timeout", "bench_kernels=7")
    assert dict((n, lim) for n, lim, _ in rows)["bench_kernels"] == 7
    scaled, scaled_total = run_plan("--area", "kernels", "--quick", "--timeout-scale", "2")
    assert scaled_total == 2 * sum(lim for _, lim, _ in base)
    bad = subprocess.run(["bash", str(SCRIPT), "--plan", "--area", "nope"], capture_output=True)
    assert bad.returncode == 2 and b"unknown area" in bad.stderr


def test_every_test_file_with_gpu_tests_is_in_an_area():
    rows, _ = run_plan("--area", "all")
    tune, _ = run_plan("--area", "tune")
    listed = " ".join(r for _, _, r in rows + tune)
    marked = re.compile(r"^\s*@pytest\.mark\.gpu\b|^pytestmark\b.*\bmark\.gpu\b", re.M)
    with_gpu = [
        p.name for p in sorted((ROOT / "tests").glob("test_*.py")) if marked.search(p.read_text())
    ]
    assert "test_ops_warp.py" in with_gpu
    missing = [name for name in with_gpu if f"tests/{name}" not in listed]
    assert not missing, f"add to an area in benchmarks/gpu_check.sh's area_plan: {missing}"


def test_junit_detail_counts_and_names_failures(tmp_path):
    (tmp_path / "t.xml").write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="1" skipped="1">'
        '<testcase classname="tests.test_a" name="ok"/>'
        '<testcase classname="tests.test_a" name="bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_b" name="boom"><error message="y"/></testcase>'
        '<testcase classname="tests.test_b" name="skip"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    text = gpu_check_report.junit_detail(tmp_path / "t.xml")
    assert text == "1 passed, 1 failed, 1 errors, 1 skipped; failed: test_a::bad, test_b::boom"
    (tmp_path / "none.xml").write_text('<testsuites><testsuite tests="0"/></testsuites>')
    assert gpu_check_report.junit_detail(tmp_path / "none.xml") == "no tests selected"
    assert gpu_check_report.junit_detail(tmp_path / "missing.xml") == "no JUnit file"


def archive_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {
            m.name.removeprefix("gpu_check/"): tar.extractfile(m).read()
            for m in tar.getmembers()
            if m.isfile()
        }


@pytest.mark.slow
def test_cpu_dry_run_leaves_one_archive_and_one_summary(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--area", "smoke", "--quick", "--cpu", "--work", str(work), str(out)]
        + ["--pytest-args", "-k identity"],  # a few of the warp's tests
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "gpu_check_summary.md"]
    files = archive_members(out / "gpu_check.tar.gz")
    for name in (
        "gpu_check.log",
        "preflight.json",
        "pip-freeze.txt",
        "tests-tests_smoke.xml",
        "warp.json",
        "warp.md",
        "warp.short.md",
        "steps.json",
        "summary.md",
    ):
        assert name in files, f"{name} missing from the archive: {sorted(files)}"
    parsed = {n: json.loads(b) for n, b in files.items() if n.endswith(".json")}
    assert parsed["preflight.json"]["ok"] and parsed["preflight.json"]["triton_probe"]["ok"]
    steps = {s["name"]: s for s in parsed["steps.json"]["steps"]}
    assert list(steps) == ["install", "preflight", "tests_smoke", "bench_warp"]
    assert {s["status"] for s in steps.values()} == {"ok"}
    assert re.fullmatch(r"\d+ passed", steps["tests_smoke"]["detail"]), steps["tests_smoke"]
    # The warp benchmark: every provider, each agreeing with the reference.
    results = parsed["warp.json"]["results"]
    assert {r["provider"] for r in results} == {
        "torch_grid_sample",
        "torch_ref",
        "scipy",
        "fastcascade_triton",
        "fastcascade_triton_w4",
        "fastcascade_triton_coords",
    }
    for r in results:
        assert r["all_written"] and r["max_abs_diff"] < 0.05 and r["median_ms"] > 0, r
        if r["provider"] != "torch_grid_sample":  # ties round to even there
            assert r["label_mismatches"] == 0, r
    summary = (out / "gpu_check_summary.md").read_text()
    assert summary.startswith("# gpu_check ok")
    assert "preflight: ok" in summary and "fastcascade_triton" in summary
    assert summary == files["summary.md"].decode()
    print(f"\ngpu_check.sh --area smoke --quick --cpu: {seconds:.0f} s")


@pytest.mark.slow
def test_timeout_then_sigterm_keep_what_finished(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "--area", "smoke", "--quick", "--cpu", "--work", str(work), str(out)]
        + ["--timeout", "tests_smoke=1", "--pack-every", "1"],  # pytest cannot import torch in 1 s
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    current = work / "gpu_check" / "current.tsv"
    try:
        deadline = time.monotonic() + 180
        while not (current.exists() and current.read_text().startswith("bench_warp")):
            assert proc.poll() is None and time.monotonic() < deadline, "bench_warp never ran"
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, log[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "gpu_check_summary.md"]
    files = archive_members(out / "gpu_check.tar.gz")
    assert json.loads(files["preflight.json"])["ok"]
    steps = {s["name"]: s for s in json.loads(files["steps.json"])["steps"]}
    assert steps["tests_smoke"]["status"] == "timeout" and steps["tests_smoke"]["rc"] == 124
    assert steps["bench_warp"]["status"] == "killed"
    summary = (out / "gpu_check_summary.md").read_text()
    assert summary.startswith("# gpu_check INTERRUPTED (SIGTERM)")
    assert "tests_smoke timeout" in summary and "bench_warp killed" in summary
    # No step is left running: the benchmark's process went with the check.
    time.sleep(1.0)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(work) not in ps


@pytest.mark.slow
def test_a_failed_preflight_stops_the_run_with_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the preflight passes on a machine with a GPU")
    out = tmp_path / "out"
    # A GPU run (no --cpu) on a machine without one: the preflight must say so and stop.
    proc = subprocess.run(
        [
            "bash",
            str(SCRIPT),
            "--area",
            "smoke",
            "--quick",
            "--work",
            str(tmp_path / "w"),
            str(out),
        ],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 3, proc.stdout[-3000:]
    summary = (out / "gpu_check_summary.md").read_text()
    assert summary.startswith("# gpu_check FAILED: 1 of 4 steps preflight failed")
    line = next(x for x in summary.splitlines() if x.startswith("preflight: "))
    assert line.startswith("preflight: FAILED") and "no CUDA device" in line
    steps = {
        s["name"]: s for s in json.loads((tmp_path / "w/gpu_check/steps.json").read_text())["steps"]
    }
    assert (
        steps["tests_smoke"]["status"] == "skipped" and steps["bench_warp"]["status"] == "skipped"
    )
    assert "preflight failed" in steps["tests_smoke"]["note"]
