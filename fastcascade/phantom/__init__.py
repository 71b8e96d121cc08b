"""Synthetic abdominal CT phantom: a labelled CT volume generated from a seed.

There is one real labelled abdominal CT available to the project (case A, a non-contrast
scan from T11 to the proximal femur, 122 x 101 x 112 voxels of 3 mm). The phantom fills
the gap for training and testing: it draws an abdomen whose organ positions, sizes and
intensities follow case A's measurements, and surrounds the organs with what a network
could confuse with them: skin, subcutaneous and visceral fat, the abdominal wall, psoas,
quadratus lumborum, paraspinal and gluteal muscles, vertebrae with discs and spinal canal,
ribs and costal cartilage, sacrum, iliac wings, acetabula and femoral heads, lung bases
and diaphragm, colon with stool and air, small-bowel loops, duodenum, bladder, unlabelled
vessels (iliac, renal, mesenteric) and a patient table below the body.

Geometry. The volume is indexed ``(x, y, z)`` in canonical RAS (axis 0 towards the
patient's right, axis 1 anterior, axis 2 superior); spacings are millimetres in that
order. The anatomy is defined in millimetres and centred in the field of view
``shape * spacing``, so any grid (isotropic or not) shows the same patient; the default
grid equals case A's. Each seed varies body size and fat, organ positions, sizes,
orientations and shapes (smooth random fields added to implicit surfaces), bowel
content, bladder filling and the tissue intensities by a few HU.

Labels are ids of ``fastcascade.config.CLASS_NAMES``; every unlabelled structure
(bowel, bladder, muscles, bones, iliac and renal vessels, ...) is background, as in
case A's mapping ``fastcascade.presets.CASE_A_TO_CLASSES``.

Intensities (HU, before partial-volume blur and noise). Each seed shifts every soft
tissue (|HU| < 300) by a normal offset of 4 HU standard deviation, and every small-bowel
loop's fluid by 8 HU:

=============================  ============  =====================
tissue                         ``"none"``    ``"portal_venous"``
=============================  ============  =====================
air (outside, bowel gas)       -1000         -1000
lung base                      -850          -850
fat (subcutaneous, visceral)   -100          -100
skin                           20            25
muscle (psoas, wall, crura)    48            60
muscle (paraspinal, gluteal)   28            40
liver                          50            110
spleen                         36            120
kidney parenchyma              24            170
renal sinus (in the label)     -60           -40
pancreas; its fatty lobules    30; -80       95; -80
stomach wall; content          40; 15        90; 15
gallbladder bile               8             8
aorta; its calcified plaques   42; 500       160; 500
inferior vena cava             42            130
portal/splenic, liver veins    42            160
other vessels                  40            150
adrenal glands                 25            25
bowel wall; fluid              35; 15        80; 15
colon stool (mottled)          -60 +- 90     -60 +- 90
gas pockets in the stool       -850          -850
bladder urine                  8             8
intervertebral disc            90            90
bone marrow; cortex            120; 800      120; 800
vertebral arch; rib            330; 330      330; 330
costal cartilage               110           110
spinal canal                   15            15
table                          -150          -150
=============================  ============  =====================

Noise: a partial-volume blur (Gaussian, 1 mm scanner PSF plus the voxel footprint) and
mildly correlated Gaussian noise of 12 HU standard deviation at 3 mm voxels (growing as
the fourth root of the voxel-volume ratio on finer grids).

Example::

    >>> from fastcascade.phantom import make_phantom
    >>> ph = make_phantom(seed=3)
    >>> ph.image.shape, ph.image.dtype, ph.labels.dtype
    ((122, 101, 112), dtype('float32'), dtype('uint8'))
    >>> ct, seg = ph.to_nifti()

Layout: ``tissue`` (tissue kinds, label ids, the HU table above, texture, blur and
noise), ``geometry`` (smooth random fields and implicit shapes in mm), ``canvas`` (the
grid, the patient's pose and painting with priorities), ``painter`` (drawing helpers
shared by the anatomy's parts), ``body`` (skin, fat, wall, table, skeleton, muscles),
``viscera`` (spleen, lungs, vessels, organs), ``bowel`` (bladder, colon, small bowel,
mesenteric vessels) and ``anatomy`` (the order in which they are drawn).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from .anatomy import _Anatomy
from .canvas import _Canvas
from .geometry import _smooth_field
from .tissue import _HU, _finish

__all__ = ["Phantom", "make_phantom", "CONTRASTS"]

CONTRASTS = ("none", "portal_venous")


@dataclass
class Phantom:
    """One synthetic CT with its labels.

    ``image``: float32 HU, shape ``(X, Y, Z)`` in canonical RAS. ``labels``: uint8 ids of
    ``CLASS_NAMES``, same shape. ``spacing``: voxel size in mm ``(x, y, z)``. ``affine``:
    4 x 4 float64 voxel-to-RAS-mm matrix, ``diag(spacing)`` with the field of view's
    centre at the origin.
    """

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray

    def to_nifti(self) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
        """The CT (int16 HU, unit scaling) and the labels (uint8) as NIfTI images.

        Both carry ``affine`` as sform and qform (code 1, scanner) and millimetre units.

        >>> ct, seg = make_phantom(shape=(40, 40, 40), seed=0).to_nifti()
        >>> str(ct.get_data_dtype()), str(seg.get_data_dtype())
        ('int16', 'uint8')
        """
        ct = np.clip(np.rint(self.image), -32768, 32767).astype(np.int16)
        out = []
        for data in (ct, self.labels.astype(np.uint8)):
            img = nib.Nifti1Image(data, self.affine)
            img.header.set_data_dtype(data.dtype)
            img.header.set_slope_inter(1.0, 0.0)
            img.header.set_xyzt_units("mm", "sec")
            img.set_sform(self.affine, code=1)
            img.set_qform(self.affine, code=1)
            out.append(img)
        return out[0], out[1]


#: Field of view (mm) the anatomy is always drawn on: case A's, 122 x 101 x 112 voxels of 3 mm.
_MIN_FOV_MM = (366.0, 303.0, 336.0)


def make_phantom(
    shape: tuple[int, int, int] = (122, 101, 112),
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0),
    seed: int = 0,
    contrast: str = "none",
    noise: bool = True,
) -> Phantom:
    """Draw one synthetic abdominal CT and its labels.

    Args:
        shape: grid size ``(X, Y, Z)`` in voxels; the default is case A's.
        spacing: voxel size in mm ``(x, y, z)``; any positive values (anisotropic too).
        seed: the random seed (``numpy.random.default_rng(seed)``); the same seed gives
            the same phantom, and the same anatomy on every grid.
        contrast: ``"none"`` (like case A) or ``"portal_venous"`` (see the module's HU
            table).
        noise: add partial-volume blur and CT noise; ``False`` gives the piecewise
            constant tissue map (still with tissue texture).

    Returns:
        A ``Phantom`` with ``image`` float32 HU and ``labels`` uint8 of ``shape``.

    Example::

        >>> ph = make_phantom(shape=(61, 51, 56), spacing=(6.0, 6.0, 6.0), seed=1)
        >>> int(ph.labels.max()) <= 10
        True
    """
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive voxel counts (x, y, z), got {shape}")
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive millimetre sizes, got {spacing}")
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")

    # The anatomy is drawn on a grid covering at least case A's field of view, then the
    # centre of the requested size is kept (same parity, so voxel centres coincide): a
    # field of view smaller than the body shows the part of it inside.
    full = tuple(
        max(n, math.ceil(f / s) + (math.ceil(f / s) - n) % 2)
        for n, s, f in zip(shape, spacing, _MIN_FOV_MM, strict=True)
    )
    # Centred on the world origin, whatever the grid.
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape, spacing, strict=True)]
    if full != shape:
        big = make_phantom(full, spacing, seed, contrast, noise)
        crop = tuple(
            slice((m - n) // 2, (m - n) // 2 + n) for m, n in zip(full, shape, strict=True)
        )
        return Phantom(
            image=np.ascontiguousarray(big.image[crop]),
            labels=np.ascontiguousarray(big.labels[crop]),
            spacing=spacing,
            affine=affine,
        )

    rng = np.random.default_rng(int(seed))
    offsets = np.clip(rng.normal(0.0, 4.0, len(_HU[contrast])), -8.0, 8.0)
    hu = {
        k: v + (float(o) if abs(v) < 300 else 0.0)
        for (k, v), o in zip(_HU[contrast].items(), offsets, strict=True)
    }
    cv = _Canvas(shape, spacing, rng)
    fields = {
        "low": _smooth_field(rng, cv.axes, 60.0),
        "mid": _smooth_field(rng, cv.axes, 25.0),
    }
    # Draws whose size depends on the grid come from a second generator, so that the
    # geometry (drawn from ``rng`` in a fixed order) is the same on every grid.
    tex_rng = np.random.default_rng([int(seed), 1])
    _Anatomy(cv, rng, tex_rng, hu, fields).build()
    image = _finish(cv, hu, tex_rng, noise)
    return Phantom(image=image, labels=cv.labels, spacing=spacing, affine=affine)
