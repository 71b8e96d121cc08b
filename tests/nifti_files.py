"""NIfTI files for the I/O tests: a small CT, saving with chosen header fields, raw
header access and deliberately damaged files (nibabel would 'fix' them on save)."""

from __future__ import annotations

import gzip
import struct

import nibabel as nib
import numpy as np
from nibabel import orientations

SPACING = (1.5, 2.0, 3.0)
RAS_AFFINE = np.array(
    [[1.5, 0, 0, -10.0], [0, 2.0, 0, 20.0], [0, 0, 3.0, 30.0], [0, 0, 0, 1]], dtype=np.float64
)


def ct_volume(shape=(6, 7, 5), seed=0) -> np.ndarray:
    """A small int16 'CT': air, soft tissue and bone values, hundreds of distinct values."""
    return np.random.default_rng(seed).integers(-1024, 1500, size=shape).astype(np.int16)


def save(path, data, affine=RAS_AFFINE, **fields):
    img = nib.Nifti1Image(data, affine)
    for key, value in fields.items():
        img.header[key] = value
    nib.save(img, path)
    return path


def raw_header(path) -> nib.Nifti1Header:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        return nib.Nifti1Header.from_fileobj(f, check=False)


def patch_pixdim(path, values):
    """Overwrite pixdim[1:4] in the stored header (nibabel would 'fix' it on save)."""
    gz = str(path).endswith(".gz")
    data = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    data[80:92] = struct.pack("<3f", *values)  # pixdim is float32[8] at byte 76
    path.write_bytes(gzip.compress(bytes(data)) if gz else bytes(data))
    return path


def reoriented(axcodes):
    """The RAS test image re-stored with axes ``axcodes``, by nibabel itself."""
    ras = nib.Nifti1Image(ct_volume(), RAS_AFFINE)
    ornt = orientations.ornt_transform(
        orientations.axcodes2ornt("RAS"), orientations.axcodes2ornt(axcodes)
    )
    img = ras.as_reoriented(ornt)
    assert nib.aff2axcodes(img.affine) == tuple(axcodes)
    return img


def write_blob(path, blob: bytes):
    path.write_bytes(blob)
    return path


def truncated(tmp_path, suffix, keep):
    data = np.random.default_rng(3).integers(-1024, 2000, (32, 32, 32)).astype(np.int16)
    path = save(tmp_path / f"full{suffix}", data)
    blob = path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(blob[: int(len(blob) * keep)] if keep < 1 else blob[:10])
    return cut
