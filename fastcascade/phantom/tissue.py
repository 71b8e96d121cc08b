"""What the phantom paints: tissue kinds, label ids, HU per contrast, and the finish.

The finish adds tissue texture, the partial-volume blur and CT noise to the painted
HU map (see the package docstring for the HU table and the noise model).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ..config import CLASS_NAMES
from .canvas import _Canvas

_ID = {name: i for i, name in enumerate(CLASS_NAMES)}

# Tissue kinds: which structure may be painted over which (see _Canvas.paint).
# _RETRO is the perirenal fat, which the liver, spleen and bowel may not enter.
_AIR, _TABLE, _SUBCUT, _WALL, _CAVITY, _BONE, _MUSCLE, _LUNG, _ORGAN, _BOWEL, _VESSEL, _RETRO = (
    range(12)
)

_HU = {
    "none": {
        "air": -1000.0,
        "lung": -850.0,
        "fat": -100.0,
        "skin": 20.0,
        "muscle": 48.0,
        "muscle_fatty": 28.0,
        "liver": 50.0,
        "spleen": 36.0,
        "kidney": 24.0,
        "renal_sinus": -60.0,
        "pancreas": 30.0,
        "stomach_wall": 40.0,
        "stomach_content": 15.0,
        "bile": 8.0,
        "aorta": 42.0,
        "ivc": 42.0,
        "portal": 42.0,
        "vessel": 40.0,
        "bowel_wall": 35.0,
        "bowel_fluid": 15.0,
        "urine": 8.0,
        "disc": 90.0,
        "cancellous": 120.0,
        "cortical": 800.0,
        "posterior_elements": 330.0,
        "rib": 330.0,
        "cartilage": 110.0,
        "csf": 15.0,
        "adrenal": 25.0,
        "table": -150.0,
    },
}
_HU["portal_venous"] = dict(
    _HU["none"],
    skin=25.0,
    muscle=60.0,
    muscle_fatty=40.0,
    liver=110.0,
    spleen=120.0,
    kidney=170.0,
    renal_sinus=-40.0,
    pancreas=95.0,
    stomach_wall=90.0,
    aorta=160.0,
    ivc=130.0,
    portal=160.0,
    vessel=150.0,
    bowel_wall=80.0,
)


def _finish(cv: _Canvas, hu: dict, rng: np.random.Generator, noise: bool) -> np.ndarray:
    """Tissue texture, partial-volume blur and CT noise."""
    img = cv.hu
    sp = np.array(cv.spacing)
    tex = rng.standard_normal(cv.shape).astype(np.float32)
    tex = ndi.gaussian_filter(tex, 2.0 / sp)
    tex /= tex.std() + 1e-6
    soft = (cv.kind == _ORGAN) | (cv.kind == _MUSCLE) | (cv.kind == _VESSEL)
    fat = (cv.kind == _CAVITY) | (cv.kind == _SUBCUT) | (cv.kind == _RETRO)
    img[soft] += 4.0 * tex[soft]
    img[fat] += 10.0 * tex[fat]
    if not noise:
        return img
    sigma = np.sqrt((1.0 / sp) ** 2 + 0.35**2)
    img = ndi.gaussian_filter(img, sigma)
    white = rng.standard_normal(cv.shape).astype(np.float32)
    white = ndi.gaussian_filter(white, 0.6)
    white *= 12.0 * (27.0 / float(np.prod(sp))) ** 0.25 / (white.std() + 1e-6)
    img += white
    return img.astype(np.float32)
