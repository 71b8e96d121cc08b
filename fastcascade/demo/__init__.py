"""The quick-start job's data: case A when the shared data folder has it, and its
reference labels on the package's classes.

The job itself is the ``fastcascade demo`` command (``fastcascade/cli/demo.py``); running
this module runs it:

    python -m fastcascade.demo --out out
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from ..io.nifti import map_labels
from ..presets import CASE_A_TO_CLASSES

PHANTOM_SEED = 9001  # never used in training the default model


def find_case_a() -> tuple[Path, Path] | None:
    """``(ct, labels)`` of case A under ``$FASTCASCADE_DATA`` (else ``../shared/data`` from
    the working directory), or ``None`` where either file is missing."""
    root = Path(os.environ.get("FASTCASCADE_DATA", Path.cwd().parent / "shared" / "data"))
    ct = root / "ct" / "case_a" / "example_ct.nii.gz"
    seg = root / "ct" / "case_a" / "example_seg_fast_force_split.nii.gz"
    return (ct, seg) if ct.exists() and seg.exists() else None


def case_a_reference(seg_path: Path) -> np.ndarray:
    """Case A's labels mapped onto ``CLASS_NAMES`` (on its own grid), uint8."""
    raw = np.asarray(nib.load(str(seg_path)).dataobj)
    return map_labels(raw, CASE_A_TO_CLASSES).astype(np.uint8)
