"""The inputs of the end-to-end benchmark: phantoms, case A, case A on a fine grid and
case E.

Each case is an in-memory float32 HU volume with its affine and, where one exists, the
reference labels on the same grid (``Case``); ``iter_cases`` builds them one at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from common import ROOT

from fastcascade.demo import case_a_reference
from fastcascade.memory import available_memory
from fastcascade.ops.resample import resample, working_shape
from fastcascade.phantom import make_phantom

CASES = ("phantom", "case_a", "case_a_08mm", "case_e", "phantom_small")
DEFAULT_CASES = ("phantom", "case_a", "case_a_08mm", "case_e")
PHANTOM_SEEDS = (9001, 9002)  # never used to train the default model
FINE_MM = 0.8


def data_dir() -> Path:
    """``$FASTCASCADE_DATA``, else ``../shared/data`` beside the repository root."""
    return Path(os.environ.get("FASTCASCADE_DATA", ROOT.parent / "shared" / "data"))


@dataclass
class Case:
    """One input scan: ``volume`` float32 HU ``(x, y, z)`` on the grid of ``affine``
    (4x4 voxel → RAS mm), ``reference`` uint8 ids of ``CLASS_NAMES`` on the same grid or
    ``None``."""

    name: str
    volume: np.ndarray
    affine: np.ndarray
    reference: np.ndarray | None
    description: str

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def resample_to_spacing(
    volume: np.ndarray, affine: np.ndarray, spacing_mm: float
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Trilinear resampling of ``volume`` (x, y, z) to about ``spacing_mm`` isotropic.

    Keeps the field of view (outer voxel edges), so the output has ``round(n·s/t)``
    voxels per axis with spacing ``n·s/m``; the affine is scaled accordingly. Returns
    ``(float32 volume, affine, shape)``; ``F.interpolate(trilinear, align_corners=False)``.

    >>> v, a, shape = resample_to_spacing(np.zeros((4, 4, 2), np.float32), np.eye(4), 0.5)
    >>> shape, float(a[0, 0]), float(a[0, 3])
    ((8, 8, 4), 0.5, -0.25)
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    shape = working_shape(volume.shape, spacing, (spacing_mm,) * 3)
    t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    # Output voxel i sits at input voxel (i + 0.5)·n/m − 0.5 (edges kept).
    scale = np.array(volume.shape, dtype=np.float64) / np.array(shape, dtype=np.float64)
    to_input = np.diag([*scale, 1.0])
    to_input[:3, 3] = 0.5 * scale - 0.5
    return out, affine @ to_input, shape


#: Real cases: (folder, CT, labels) under the data folder; both use case A's label ids.
_REAL = {
    "case_a": ("case_a", "example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"),
    "case_e": ("case_e", "ct.nii.gz", "seg.nii.gz"),
}


def _real_case(root: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A real CT (float32 HU), its affine and its reference on our classes."""
    folder, ct, seg = _REAL[name]
    ct_path, seg_path = (root / "ct" / folder / f for f in (ct, seg))
    if not (ct_path.exists() and seg_path.exists()):
        raise FileNotFoundError(f"{name} not found under {root} (set FASTCASCADE_DATA)")
    img = nib.load(str(ct_path))
    return np.asarray(img.dataobj, dtype=np.float32), img.affine, case_a_reference(seg_path)


def iter_cases(names: list[str], root: Path, quick: bool, notes: list[str]) -> Iterator[Case]:
    """Build the cases one at a time (the 0.8 mm one holds ~0.4 GB), in ``names`` order;
    a missing case A is skipped with a note."""
    for name in names:
        if name == "phantom":
            for seed in PHANTOM_SEEDS[: 1 if quick else None]:
                ph = make_phantom(seed=seed)
                yield Case(
                    f"phantom_{seed}",
                    ph.image,
                    ph.affine,
                    ph.labels,
                    f"phantom seed {seed}, default size at 3 mm",
                )
        elif name == "phantom_small":
            ph = make_phantom(shape=(61, 51, 56), spacing=(6.0, 6.0, 6.0), seed=PHANTOM_SEEDS[0])
            yield Case(
                "phantom_small",
                ph.image,
                ph.affine,
                ph.labels,
                f"phantom seed {PHANTOM_SEEDS[0]}, 61x51x56 at 6 mm",
            )
        elif name in ("case_a", "case_a_08mm"):
            try:
                volume, affine, reference = _real_case(root, "case_a")
            except FileNotFoundError as err:
                notes.append(f"{name} skipped: {err}")
                print(f"skipping {name}: {err}", flush=True)
                continue
            if name == "case_a":
                yield Case(name, volume, affine, reference, "case A CT as it is (3 mm)")
                continue
            need = 6 * int(np.prod(working_shape(volume.shape, (3.0,) * 3, (FINE_MM,) * 3))) * 4
            free = available_memory()
            if free is not None and free < need:
                notes.append(
                    f"{name} skipped: needs about {need / 2**30:.1f} GiB, "
                    f"{free / 2**30:.1f} GiB available"
                )
                continue
            fine, fine_affine, shape = resample_to_spacing(volume, affine, FINE_MM)
            ref = resample(torch.from_numpy(reference), shape, mode="nearest").numpy()
            del volume
            yield Case(
                name,
                fine,
                fine_affine,
                ref,
                f"case A resampled trilinearly to {FINE_MM} mm (labels: nearest)",
            )
        elif name == "case_e":
            try:
                volume, affine, reference = _real_case(root, "case_e")
            except FileNotFoundError as err:
                notes.append(f"{name} skipped: {err}")
                print(f"skipping {name}: {err}", flush=True)
                continue
            yield Case(name, volume, affine, reference, "case E CT as it is (0.7×0.7×2.5 mm)")
        else:
            raise ValueError(f"unknown case {name!r}; expected one of {CASES}")
