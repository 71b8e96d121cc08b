"""Test configuration: CPU by default; Triton kernels run in the interpreter.

``TRITON_INTERPRET`` must be set before any module defining kernels is imported; the
sm_90 compile checks run in a separate pytest invocation with FASTCASCADE_TEST_COMPILE=1
(see ``.ci/run``), where the interpreter must stay off.
"""

import os
from pathlib import Path

if os.environ.get("FASTCASCADE_TEST_COMPILE") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DATA_DIR = Path(
    os.environ.get(
        "FASTCASCADE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"
    )
)
CASE_A_CT = DATA_DIR / "ct" / "case_a" / "example_ct.nii.gz"
CASE_A_SEG = DATA_DIR / "ct" / "case_a" / "example_seg_fast_force_split.nii.gz"


@pytest.fixture(scope="session")
def case_a_paths():
    if not CASE_A_CT.exists():
        pytest.skip(f"case A not found at {CASE_A_CT} (set FASTCASCADE_DATA)")
    return CASE_A_CT, CASE_A_SEG


CASE_A_NAMES = DATA_DIR / "ct" / "case_a" / "class_map_total_v2.json"
CASE_E_CT = DATA_DIR / "ct" / "case_e" / "ct.nii.gz"
CASE_E_SEG = DATA_DIR / "ct" / "case_e" / "seg.nii.gz"
CASE_E_NAMES = DATA_DIR / "ct" / "case_e" / "structures.csv"


@pytest.fixture(scope="session")
def real_cases():
    """``{"case_a": (ct, labels, names), "case_e": (...)}``: both real anatomies."""
    cases = {
        "case_a": (CASE_A_CT, CASE_A_SEG, CASE_A_NAMES),
        "case_e": (CASE_E_CT, CASE_E_SEG, CASE_E_NAMES),
    }
    missing = [str(p) for files in cases.values() for p in files if not p.exists()]
    if missing:
        pytest.skip(f"real cases not found: {missing[0]} (set FASTCASCADE_DATA)")
    return cases
