"""CT images synthesized from real label maps, after SynthSeg (Billot et al., 2023).

Billot B, Greve DN, Puonti O, et al. (2023), "SynthSeg: segmentation of brain MRI scans
of any contrast and resolution without retraining", Medical Image Analysis 86:102789,
train on images drawn from label maps: a random deformation of the map, a random
intensity per structure (a Gaussian mixture), a bias field, blur and a random acquisition
resolution. ``synthesize`` does the same for CT with CT-like priors, so the two real
anatomies the project has (cases A and E, with full TotalSegmentator-style label maps)
yield unlimited images of other contrasts, textures, noise levels and slice thicknesses.

Steps (every random number from the caller's ``torch.Generator``, in a fixed order, so a
generator state gives the same image twice):

1. Deformation (``params.deform``): output voxel ``p`` samples the input at
   ``q = c + S^-1 R (p - c) + t + d(p)``, with ``c`` the volume's centre, ``R`` a rotation
   of up to ``max_rotation_deg`` about each axis (``Rz Ry Rx``), ``S`` a per-axis scaling
   in ``1 +- max_scaling`` (the content grows by ``S``), ``t`` a translation of up to
   ``max_translation_vox`` voxels and ``d`` a cubic B-spline field with control points
   every ``grid_spacing`` voxels displaced by up to ``max_displacement`` voxels
   (``fastcascade.ops.warp``). The label map is sampled by nearest neighbour, the original
   HU (when given) trilinearly, both at the same positions; from outside the volume come
   label 0 and air (-1024 HU). Voxel units: rotations are not rigid in millimetres on an
   anisotropic grid.
2. Tissue classes. Every named structure (``names``, id -> name) is one class whose kind
   (table below) is recognised from its name (``structure_kind``). Structures of the
   ``bowel`` kind are split by the original HU: voxels at or below ``split_hu`` (gas) are
   a class of their own on the air side. Label 0 mixes the air around the patient and
   unlabelled body tissue; it is split by the (deformed) original HU into ``air``
   (<= ``split_hu``), ``fat`` (up to -30 HU), ``soft`` (up to 150 HU) and ``dense``
   (above). Without the original HU, label 0 inside the per-axial-slice filled union of
   the labelled structures is one ``body`` class, the rest ``air``.
3. Intensities: per class a mean and a standard deviation drawn uniformly in its kind's
   prior ranges (``KIND_PRIORS``; for the phase-dependent kinds in the ranges of one
   contrast phase drawn per sample from ``fastcascade.train.repaint.PHASE_HU``); with
   probability ``p_random`` a class's mean is instead drawn in ``random_mean_hu`` (air
   side: ``random_air_mean_hu``) and its std in ``random_std_hu``. Every voxel gets its
   class's mean plus its std times an independent standard normal.
4. Partial-volume blur: a Gaussian of ``blur_sigma_mm`` (drawn; in mm, converted per axis
   with ``spacing``).
5. Bias field: smooth fields ``m`` and ``a`` (uniform values on a ``bias_grid`` of control
   points, upsampled trilinearly) scale the attenuation and add an offset,
   ``hu <- (hu + 1000)(1 + m) - 1000 + a``, with ``|m| <= max_bias_mult`` and
   ``|a| <= max_bias_add_hu``. CT has no MR-like bias field, but beam hardening, cupping
   and scatter give slow HU drifts of this size; scaling ``hu + 1000`` (attenuation
   relative to air) leaves air where it is.
6. Acquisition resolution: a slice thickness drawn in ``slice_thickness_mm`` (and, with
   probability ``p_inplane``, an in-plane resolution in ``inplane_mm``). Along each axis
   where it is coarser than the grid, a Gaussian slice profile of that FWHM blurs the
   image, it is resampled to ``round(n * spacing / thickness)`` voxels, noise is added
   there (step 7), and it is resampled back to the original grid (linear,
   ``fastcascade.ops.resample``): the output has the input's shape and spacing.
7. Noise: white Gaussian noise of ``noise_std_hu`` (drawn) at the acquired resolution, so
   thick slices carry noise correlated along z as real reconstructions do.
8. Sides of the body threshold: voxels of air-side classes (label-0 air, lung, airway,
   bowel gas) are clamped to at most ``air_max_hu`` (-500), voxels of every other class
   to at least ``tissue_min_hu`` (-290, above the body mask's -300), and everything to at
   least -1024 HU. So the body mask C1 and the stages' windows ([-1000, 1000] and
   [-200, 400]) mean on a synthetic image what they mean on a real scan. (The clamp
   removes the blur across the skin: the skin edge is a step there.)

Intensity priors (``KIND_PRIORS``: mean range and std range in HU, drawn uniformly):

==========  ==================  ===========  =============================================
kind        mean HU             std HU       names and reasoning
==========  ==================  ===========  =============================================
air         -1024 .. -950       2 .. 20      label-0 air, trachea/bronchi, bowel gas: air
                                             is -1000 HU by definition; scanners read
                                             -1024 .. -980 in air
lung        -900 .. -700        20 .. 90     ``lung*``: normal inspiratory parenchyma is
                                             about -850 (emphysema below -950, Gevenois et
                                             al. 1996); case A's lung bases read -730 ..
                                             -800 with partial volume
fat         -130 .. -70         8 .. 30      label-0 fat, ``*fat*``: adipose tissue is
                                             -190 .. -30 HU (Kvist et al. 1988), -100 on
                                             average
soft        0 .. 60             10 .. 40     label-0 soft tissue (wall muscles, bowel,
                                             unlabelled vessels and organs)
dense       200 .. 700          50 .. 250    label-0 above 150 HU: unlabelled bone,
                                             calcification, contrast
body        -100 .. 40          20 .. 60     label 0 inside the body without original HU
muscle      0 .. 65             8 .. 30      gluteus, autochthon, iliopsoas, ``*muscle*``:
                                             muscle is -29 .. 150 HU (Mitsiopoulos et al.
                                             1998); normal 40 .. 60, lower with fatty
                                             infiltration (case A: 6 .. 48)
bone        120 .. 500          60 .. 250    vertebrae, sacrum, ribs, hips, femurs,
                                             humeri, scapulae, claviculae, sternum, skull:
                                             a label mixes trabecular bone (L1 ~ 100 .. 250
                                             HU, Pickhardt et al. 2013) and cortex (> 1000)
cartilage   70 .. 200           15 .. 60     costal cartilages (case A: 97)
fluid       -5 .. 25            4 .. 15      gallbladder, urinary bladder, cysts: simple
                                             fluid is 0 .. 20 HU (Israel & Bosniak 2005)
bowel       -40 .. 60           10 .. 60     stomach, duodenum, small bowel, colon,
                                             oesophagus, rectum (non-gas part): wall ~40,
                                             fluid 0 .. 20, stool mottled below 0
cns         0 .. 45             4 .. 20      spinal cord, brain (case A's cord: 4, with
                                             CSF around it)
organ       20 .. 100           8 .. 25      any other name (adrenals, prostate, thyroid,
                                             which reads 80 .. 120 natively for its iodine)
heart       phase ``vein`` row  15 .. 60     heart, atrial appendage: chambers of mixed
                                             blood
artery ..   phase row           see below    the ``repaint`` kinds: artery, portal_vein,
pancreas                                     vein, kidney(_cortex/_medulla), spleen,
                                             liver, pancreas, means from ``PHASE_HU``
==========  ==================  ===========  =============================================

Std ranges of the phase-dependent kinds: artery 10 .. 40, portal_vein and vein 10 .. 35,
kidney 20 .. 70 (cortex/medulla 10 .. 40), spleen 8 .. 30, liver 8 .. 25, pancreas
10 .. 35. Sources: Gevenois PA et al. (1996), "Comparison of computed density and
microscopic morphometry in pulmonary emphysema", Am J Respir Crit Care Med 154:187-192;
Kvist H et al. (1988), "Total and visceral adipose-tissue volumes derived from
measurements with computed tomography in adult men and women", Am J Clin Nutr
48:1351-1361; Mitsiopoulos N et al. (1998), "Cadaver validation of skeletal muscle
measurement by magnetic resonance imaging and computerized tomography", J Appl Physiol
85:115-122; Pickhardt PJ et al. (2013), "Opportunistic screening for osteoporosis using
abdominal computed tomography scans obtained for other indications", Ann Intern Med
158:588-595; Israel GM, Bosniak MA (2005), "An update of the Bosniak renal cyst
classification system", Urology 66:484-488; case A's measured label means
(TotalSegmentator's test CT, measured for this table). The ranges are rounded textbook
values widened to whole-label means (partial volume), approximations chosen to cover real
scans, not fits.

The references' volume and page numbers have not been checked against the papers:
verify them before quoting them elsewhere.

Shapes, dtypes and units: ``label_map`` ``(x, y, z)`` of an integer dtype (ids as in the
source's label map; every nonzero id must be in ``names``; the structure -> class mapping
happens elsewhere); ``original_hu`` ``(x, y, z)`` real HU on the same grid and device, or
None; ``spacing`` mm ``(sx, sy, sz)``. ``synthesize`` returns the image float32
``(x, y, z)`` HU and the deformed label map (the input's dtype, the same ids; the input
object itself when ``deform`` is off), both on the label map's device. Random fields are
drawn on the generator's device: give a generator on the tensors' device.

Example::

    >>> labels = torch.zeros(16, 16, 8, dtype=torch.uint8)
    >>> labels[4:12, 4:12, 2:6] = 5
    >>> hu = torch.where(labels > 0, 50.0, -1000.0)
    >>> image, out = synthesize(labels, hu, (1.0, 1.0, 2.0), {5: "liver"},
    ...                         torch.Generator().manual_seed(0))
    >>> image.shape, image.dtype, out.dtype, bool(image[out == 0].max() <= -500)
    (torch.Size([16, 16, 8]), torch.float32, torch.uint8, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..config import AIR_HU
from ..ops._checks import three_positive
from ..ops.morphology import fill_holes_2d
from ..ops.resample import resample
from ..ops.warp import affine_coordinates, control_grid_shape, displacement_field, warp
from .repaint import PHASE_HU, PHASES, check_names, enhancement_kind

__all__ = [
    "KIND_PRIORS",
    "SynthDraw",
    "SynthParams",
    "TissueClass",
    "deformation_coordinates",
    "draw_params",
    "structure_kind",
    "synthesize",
    "tissue_classes",
]

_Range = tuple[float, float]

#: Kind -> (mean HU range, std HU range); ``None`` means: from the phase's row of
#: ``PHASE_HU`` (the ``heart`` takes the ``vein`` row). See the module docstring.
KIND_PRIORS: Mapping[str, tuple[_Range | None, _Range]] = {
    "air": ((-1024.0, -950.0), (2.0, 20.0)),
    "lung": ((-900.0, -700.0), (20.0, 90.0)),
    "fat": ((-130.0, -70.0), (8.0, 30.0)),
    "soft": ((0.0, 60.0), (10.0, 40.0)),
    "dense": ((200.0, 700.0), (50.0, 250.0)),
    "body": ((-100.0, 40.0), (20.0, 60.0)),
    "muscle": ((0.0, 65.0), (8.0, 30.0)),
    "bone": ((120.0, 500.0), (60.0, 250.0)),
    "cartilage": ((70.0, 200.0), (15.0, 60.0)),
    "fluid": ((-5.0, 25.0), (4.0, 15.0)),
    "bowel": ((-40.0, 60.0), (10.0, 60.0)),
    "cns": ((0.0, 45.0), (4.0, 20.0)),
    "organ": ((20.0, 100.0), (8.0, 25.0)),
    "heart": (None, (15.0, 60.0)),
    "artery": (None, (10.0, 40.0)),
    "portal_vein": (None, (10.0, 35.0)),
    "vein": (None, (10.0, 35.0)),
    "kidney_cortex": (None, (10.0, 40.0)),
    "kidney_medulla": (None, (10.0, 40.0)),
    "kidney": (None, (20.0, 70.0)),
    "spleen": (None, (8.0, 30.0)),
    "liver": (None, (8.0, 25.0)),
    "pancreas": (None, (10.0, 35.0)),
}

_AIR_SIDE_KINDS = ("air", "lung")

# Name patterns of the kinds not handled by repaint.enhancement_kind; first match wins.
_NAME_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("lung",), "lung"),
    (("trachea", "bronch", "airway"), "air"),
    (("heart", "atrial_appendage"), "heart"),
    (
        ("stomach", "bowel", "duodenum", "colon", "esophagus", "rectum", "jejunum", "ileum"),
        "bowel",
    ),
    (("bladder", "cyst"), "fluid"),
    (("cartilage",), "cartilage"),
    (
        (
            "vertebra",
            "sacrum",
            "coccyx",
            "rib_",
            "hip_",
            "femur",
            "humerus",
            "scapula",
            "clavic",
            "sternum",
            "skull",
            "bone",
        ),
        "bone",
    ),
    (("gluteus", "autochthon", "psoas", "muscle"), "muscle"),
    (("spinal_cord", "brain"), "cns"),
    (("fat",), "fat"),
)

# Label-0 bins of the original HU: (upper bound, kind); above the last bound: dense.
_FAT_MAX_HU = -30.0
_SOFT_MAX_HU = 150.0


def structure_kind(name: str) -> str:
    """The intensity-prior kind of a structure name (a key of ``KIND_PRIORS``).

    >>> structure_kind("vertebrae_L1"), structure_kind("colon"), structure_kind("aorta")
    ('bone', 'bowel', 'artery')
    >>> structure_kind("kidney_cyst_left"), structure_kind("adrenal_gland_left")
    ('fluid', 'organ')
    """
    kind = enhancement_kind(name)
    if kind is not None:
        return kind
    n = name.lower()
    for patterns, kind in _NAME_RULES:
        if any(p in n for p in patterns):
            return kind
    return "organ"


def _range(value, what: str, lo_min: float | None = None) -> _Range:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be (low, high), got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"{what} must be finite with low <= high, got {value!r}")
    if lo_min is not None and lo < lo_min:
        raise ValueError(f"{what} must be >= {lo_min}, got {value!r}")
    return lo, hi


# The (low, high) fields of SynthParams and the least value their low end may take.
_RANGE_FIELDS: dict[str, float | None] = {
    "random_mean_hu": None,
    "random_air_mean_hu": None,
    "random_std_hu": 0.0,
    "blur_sigma_mm": 0.0,
    "noise_std_hu": 0.0,
    "slice_thickness_mm": 0.0,
    "inplane_mm": 0.0,
}


@dataclass(frozen=True)
class SynthParams:
    """Ranges of the synthesis's random draws (see the module docstring for each step).

    Deformation (voxels of the label map's grid, degrees): ``deform``, ``grid_spacing``,
    ``max_displacement``, ``max_rotation_deg``, ``max_scaling`` (relative),
    ``max_translation_vox``. Intensities (HU): ``p_random``, ``random_mean_hu``,
    ``random_air_mean_hu``, ``random_std_hu``. Blur: ``blur_sigma_mm``. Bias:
    ``bias_grid`` (control points per axis), ``max_bias_mult`` (relative),
    ``max_bias_add_hu``. Acquisition: ``noise_std_hu``, ``slice_thickness_mm``,
    ``p_inplane``, ``inplane_mm``. Sides: ``split_hu`` (splits label 0 and bowel by the
    original HU), ``air_max_hu``, ``tissue_min_hu``. ``backend`` goes to
    ``fastcascade.ops.warp.warp``. Ranges are ``(low, high)``, drawn uniformly.
    """

    deform: bool = True
    grid_spacing: float = 16.0
    max_displacement: float = 3.0
    max_rotation_deg: float = 10.0
    max_scaling: float = 0.1
    max_translation_vox: float = 4.0
    p_random: float = 0.1
    random_mean_hu: _Range = (-250.0, 600.0)
    random_air_mean_hu: _Range = (-1024.0, -600.0)
    random_std_hu: _Range = (0.0, 80.0)
    blur_sigma_mm: _Range = (0.0, 1.0)
    bias_grid: tuple[int, int, int] = (4, 4, 4)
    max_bias_mult: float = 0.03
    max_bias_add_hu: float = 15.0
    noise_std_hu: _Range = (0.0, 25.0)
    slice_thickness_mm: _Range = (0.5, 5.0)
    p_inplane: float = 0.3
    inplane_mm: _Range = (0.5, 2.0)
    split_hu: float = -300.0
    air_max_hu: float = -500.0
    tissue_min_hu: float = -290.0
    backend: str = "auto"

    def __post_init__(self):
        if not isinstance(self.deform, bool):
            raise TypeError(f"deform must be a bool, got {self.deform!r}")
        for name, lo_min in _RANGE_FIELDS.items():
            object.__setattr__(self, name, _range(getattr(self, name), name, lo_min))
        for name in (
            "max_displacement",
            "max_rotation_deg",
            "max_scaling",
            "max_translation_vox",
            "max_bias_mult",
            "max_bias_add_hu",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not self.max_scaling < 1:
            raise ValueError(f"max_scaling must be < 1, got {self.max_scaling!r}")
        if not self.grid_spacing > 0:
            raise ValueError(f"grid_spacing must be > 0 voxels, got {self.grid_spacing!r}")
        for name in ("p_random", "p_inplane"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        object.__setattr__(self, "bias_grid", three_positive(self.bias_grid, "bias_grid", True))
        if not self.air_max_hu < self.split_hu < self.tissue_min_hu:
            raise ValueError(
                "expected air_max_hu < split_hu < tissue_min_hu, got "
                f"{self.air_max_hu}, {self.split_hu}, {self.tissue_min_hu}"
            )


class TissueClass(NamedTuple):
    """One intensity class: a label id (0: background), which part of it (``"all"``;
    ``"gas"`` of a bowel structure; ``"air"``, ``"fat"``, ``"soft"``, ``"dense"`` or
    ``"body"`` of label 0), its prior kind and its side of the body threshold (``"air"``
    or ``"tissue"``)."""

    label: int
    part: str
    kind: str
    side: str


def _check_names(names) -> dict[int, str]:
    """``repaint.check_names`` without label 0, which is always split as the background."""
    return {k: v for k, v in check_names(names).items() if k != 0}


def tissue_classes(names: Mapping[int, str], has_hu: bool) -> tuple[TissueClass, ...]:
    """The intensity classes of a label map with these ``names``, in draw order: label 0's
    parts first, then each named id ascending (and its gas part after a bowel structure
    when the original HU is given).

    >>> [c.part for c in tissue_classes({6: "stomach"}, has_hu=True)]
    ['air', 'fat', 'soft', 'dense', 'all', 'gas']
    """
    names = _check_names(names)
    if has_hu:
        out = [
            TissueClass(0, "air", "air", "air"),
            TissueClass(0, "fat", "fat", "tissue"),
            TissueClass(0, "soft", "soft", "tissue"),
            TissueClass(0, "dense", "dense", "tissue"),
        ]
    else:
        out = [TissueClass(0, "air", "air", "air"), TissueClass(0, "body", "body", "tissue")]
    for label in sorted(names):
        kind = structure_kind(names[label])
        side = "air" if kind in _AIR_SIDE_KINDS else "tissue"
        out.append(TissueClass(label, "all", kind, side))
        if has_hu and kind == "bowel":
            out.append(TissueClass(label, "gas", "air", "air"))
    return tuple(out)


@dataclass(frozen=True)
class SynthDraw:
    """The per-sample parameters of one synthesis (``draw_params``).

    ``rotation_deg``, ``translation_vox``, ``scaling``: ``(3,)`` float32 (degrees, voxels,
    relative); ``control_displacements`` ``(3, gx, gy, gz)`` float32 voxels; ``phase`` a
    name of ``PHASES``; ``classes`` with ``means`` and ``stds`` (HU) one per class;
    ``blur_sigma_mm``; ``bias_mult`` and ``bias_add`` (HU) on ``bias_grid``, float32;
    ``noise_std_hu``; ``slice_thickness_mm``; ``inplane_mm`` (None: in-plane kept).
    Tensors are on the generator's device.
    """

    rotation_deg: torch.Tensor
    translation_vox: torch.Tensor
    scaling: torch.Tensor
    control_displacements: torch.Tensor
    phase: str
    classes: tuple[TissueClass, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]
    blur_sigma_mm: float
    bias_mult: torch.Tensor
    bias_add: torch.Tensor
    noise_std_hu: float
    slice_thickness_mm: float
    inplane_mm: float | None


def _prior(kind: str, phase: str) -> tuple[_Range, _Range]:
    mean, std = KIND_PRIORS[kind]
    if mean is None:
        mean = PHASE_HU[phase]["vein" if kind == "heart" else kind]
    return mean, std


def draw_params(
    shape: Sequence[int],
    names: Mapping[int, str],
    generator: torch.Generator,
    params: SynthParams | None = None,
    *,
    has_hu: bool = True,
) -> SynthDraw:
    """Draw one sample's parameters for a label map of ``shape`` ``(x, y, z)`` voxels.

    Always the same numbers in the same order, whatever the flags say: rotation (3),
    translation (3), scaling (3), control displacements (``3 gx gy gz``), the phase (1),
    five per tissue class (mean, std, the ``p_random`` coin, random mean, random std),
    blur (1), bias fields (``2 prod(bias_grid)``), noise (1), slice thickness (1), the
    in-plane coin and resolution (2). ``synthesize`` calls this first with its generator,
    then draws the voxel fields (class noise, acquisition noise).

    >>> d = draw_params((20, 20, 10), {5: "liver"}, torch.Generator().manual_seed(0))
    >>> len(d.means) == len(d.classes) == 5, d.phase in PHASES
    (True, True)
    """
    params = SynthParams() if params is None else params
    if not isinstance(params, SynthParams):
        raise TypeError(f"params must be SynthParams, got {type(params)}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator)}")
    shape = three_positive(shape, "shape", integer=True)
    classes = tissue_classes(names, has_hu)
    dev = generator.device

    def uniform(size, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(size, generator=generator, device=dev)

    grid = control_grid_shape(shape, params.grid_spacing)
    rotation = uniform(3, -params.max_rotation_deg, params.max_rotation_deg)
    translation = uniform(3, -params.max_translation_vox, params.max_translation_vox)
    scaling = uniform(3, 1.0 - params.max_scaling, 1.0 + params.max_scaling)
    control = uniform((3, *grid), -params.max_displacement, params.max_displacement)
    phase = PHASES[min(int(uniform(1).item() * len(PHASES)), len(PHASES) - 1)]

    u = uniform((len(classes), 5)).tolist()
    r_std = params.random_std_hu
    means, stds = [], []
    for c, (u_mean, u_std, coin, u_rmean, u_rstd) in zip(classes, u, strict=True):
        (m_lo, m_hi), (s_lo, s_hi) = _prior(c.kind, phase)
        if coin < params.p_random:
            m_lo, m_hi = params.random_air_mean_hu if c.side == "air" else params.random_mean_hu
            (s_lo, s_hi), u_mean, u_std = r_std, u_rmean, u_rstd
        means.append(m_lo + u_mean * (m_hi - m_lo))
        stds.append(s_lo + u_std * (s_hi - s_lo))

    blur = float(uniform(1, *params.blur_sigma_mm).item())
    bias_mult = uniform(params.bias_grid, -params.max_bias_mult, params.max_bias_mult)
    bias_add = uniform(params.bias_grid, -params.max_bias_add_hu, params.max_bias_add_hu)
    noise = float(uniform(1, *params.noise_std_hu).item())
    thickness = float(uniform(1, *params.slice_thickness_mm).item())
    coin, u_inplane = uniform(2).tolist()
    lo, hi = params.inplane_mm
    inplane = lo + u_inplane * (hi - lo) if coin < params.p_inplane else None
    return SynthDraw(
        rotation_deg=rotation,
        translation_vox=translation,
        scaling=scaling,
        control_displacements=control,
        phase=phase,
        classes=classes,
        means=tuple(means),
        stds=tuple(stds),
        blur_sigma_mm=blur,
        bias_mult=bias_mult,
        bias_add=bias_add,
        noise_std_hu=noise,
        slice_thickness_mm=thickness,
        inplane_mm=inplane,
    )


def deformation_coordinates(
    shape: Sequence[int],
    draw: SynthDraw,
    grid_spacing: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sample positions ``(3, x, y, z)`` float32 (input voxels) of a draw's deformation:
    ``c + S^-1 R (p - c) + t + d(p)`` (module docstring, step 1)."""
    shape = three_positive(shape, "shape", integer=True)
    rot = draw.rotation_deg.detach().cpu()
    coords = affine_coordinates(shape, rot, (0.0, 0.0, 0.0), device=device)
    centre = torch.tensor([(n - 1) / 2.0 for n in shape], device=coords.device)
    centre = centre.view(3, 1, 1, 1)
    scaling = draw.scaling.to(coords.device, torch.float32).view(3, 1, 1, 1)
    shift = draw.translation_vox.to(coords.device, torch.float32).view(3, 1, 1, 1)
    field = displacement_field(shape, draw.control_displacements.to(coords.device), grid_spacing)
    return centre + (coords - centre) / scaling + shift + field


def _gaussian_blur(volume: torch.Tensor, sigma_vox: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of a float32 ``(x, y, z)`` volume, ``sigma_vox`` per axis
    (0: that axis untouched), edges replicated."""
    out = volume[None, None]
    for axis, sigma in enumerate(sigma_vox):
        if sigma <= 0:
            continue
        radius = max(1, math.ceil(3.0 * sigma))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=volume.device)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = kernel / kernel.sum()
        size = [1, 1, 1]
        size[axis] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]  # F.pad order: z, y, x (last axis first)
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        padded = F.pad(out, pad, mode="replicate")
        out = F.conv3d(padded, kernel.view(1, 1, *size))
    return out[0, 0]


def _check_inputs(label_map, original_hu, spacing, names) -> tuple:
    if not isinstance(label_map, torch.Tensor) or label_map.dim() != 3:
        raise ValueError(
            f"label_map must be an (x, y, z) tensor, got {getattr(label_map, 'shape', label_map)!r}"
        )
    if label_map.is_floating_point() or label_map.is_complex() or label_map.dtype == torch.bool:
        raise TypeError(f"label_map must have an integer dtype, got {label_map.dtype}")
    if original_hu is not None:
        if not isinstance(original_hu, torch.Tensor):
            raise TypeError(f"original_hu must be a torch.Tensor or None, got {type(original_hu)}")
        if tuple(original_hu.shape) != tuple(label_map.shape):
            raise ValueError(
                f"original_hu must be {tuple(label_map.shape)} like label_map, "
                f"got {tuple(original_hu.shape)}"
            )
        if original_hu.is_complex() or original_hu.dtype == torch.bool:
            raise TypeError(f"original_hu must be real HU, got {original_hu.dtype}")
        if original_hu.device != label_map.device:
            raise ValueError(
                f"original_hu is on {original_hu.device}, label_map on {label_map.device}"
            )
    spacing = three_positive(spacing, "spacing", integer=False)
    names = _check_names(names)
    present = [int(v) for v in torch.unique(label_map).tolist() if v != 0]
    missing = [v for v in present if v not in names]
    if missing:
        raise ValueError(f"label_map holds ids {missing} that have no name in names")
    return spacing, names


def _class_index(
    labels: torch.Tensor, hu: torch.Tensor | None, classes, params: SynthParams
) -> torch.Tensor:
    """Per voxel, the index into ``classes`` (int64 ``(x, y, z)``)."""
    index = {(c.label, c.part): k for k, c in enumerate(classes)}
    size = max(c.label for c in classes) + 1
    dev = labels.device
    main = torch.zeros(size, dtype=torch.int64)
    gas = torch.zeros(size, dtype=torch.int64)
    for c in classes:
        if c.label != 0 and c.part == "all":
            main[c.label] = gas[c.label] = index[(c.label, "all")]
    for c in classes:
        if c.part == "gas":
            gas[c.label] = index[(c.label, "gas")]
    lab = labels.long()
    out = main.to(dev)[lab]
    background = lab == 0
    if hu is None:
        body = fill_holes_2d(~background)
        bg = torch.where(body, index[(0, "body")], index[(0, "air")])
        return torch.where(background, bg, out)
    gassy = hu <= params.split_hu
    out = torch.where(gassy, gas.to(dev)[lab], out)
    bins = torch.tensor([params.split_hu, _FAT_MAX_HU, _SOFT_MAX_HU], device=dev)
    parts = torch.tensor([index[(0, p)] for p in ("air", "fat", "soft", "dense")], device=dev)
    # bucketize(right=False): hu <= split_hu -> 0 (air), <= -30 -> 1 (fat), ...
    bg = parts[torch.bucketize(hu.contiguous(), bins)]
    return torch.where(background, bg, out)


def _acquire(
    image: torch.Tensor, spacing: tuple, draw: SynthDraw, generator: torch.Generator
) -> torch.Tensor:
    """Steps 6-7: slice profile, down to the acquired grid, noise, back to the grid."""
    shape = tuple(image.shape)
    low = list(shape)
    sigma = [0.0, 0.0, 0.0]
    wanted = [draw.inplane_mm, draw.inplane_mm, draw.slice_thickness_mm]
    for axis, res in enumerate(wanted):
        if res is not None and res > spacing[axis]:
            low[axis] = max(1, math.floor(shape[axis] * spacing[axis] / res + 0.5))
            sigma[axis] = res / (2.0 * math.sqrt(2.0 * math.log(2.0))) / spacing[axis]
    coarse = tuple(low) != shape
    if coarse:
        image = resample(_gaussian_blur(image, sigma), tuple(low), mode="linear")
    if draw.noise_std_hu > 0:
        noise = torch.randn(image.shape, generator=generator, device=generator.device)
        image = image + draw.noise_std_hu * noise.to(image.device)
    if coarse:
        image = resample(image, shape, mode="linear")
    return image


def synthesize(
    label_map: torch.Tensor,
    original_hu: torch.Tensor | None,
    spacing: Sequence[float],
    names: Mapping[int, str],
    generator: torch.Generator,
    *,
    params: SynthParams | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic CT image drawn from ``label_map`` (see the module docstring).

    ``label_map`` ``(x, y, z)`` integer ids, every nonzero id named in ``names`` (id ->
    structure name); ``original_hu`` ``(x, y, z)`` the real scan's HU on the same grid
    and device, or None; ``spacing`` mm ``(sx, sy, sz)``; ``generator`` seeds everything.
    Returns ``(image_hu, labels)``: float32 ``(x, y, z)`` HU and the deformed label map
    (input dtype and ids), on the label map's device.
    """
    params = SynthParams() if params is None else params
    spacing, names = _check_inputs(label_map, original_hu, spacing, names)
    shape = tuple(label_map.shape)
    dev = label_map.device
    draw = draw_params(shape, names, generator, params, has_hu=original_hu is not None)

    labels, hu = label_map, None
    if original_hu is not None:
        hu = original_hu.to(torch.float32)
    if params.deform:
        coords = deformation_coordinates(shape, draw, params.grid_spacing, device=dev)
        image = hu[None] if hu is not None else torch.zeros((1, *shape), device=dev)
        warped, labels = warp(
            image, label_map, coords, fill_value=AIR_HU, label_fill=0, backend=params.backend
        )
        hu = warped[0] if hu is not None else None

    cls = _class_index(labels, hu, draw.classes, params)
    means = torch.tensor(draw.means, dtype=torch.float32, device=dev)
    stds = torch.tensor(draw.stds, dtype=torch.float32, device=dev)
    white = torch.randn(shape, generator=generator, device=generator.device).to(dev)
    image = means[cls] + stds[cls] * white

    if draw.blur_sigma_mm > 0:
        image = _gaussian_blur(image, [draw.blur_sigma_mm / s for s in spacing])
    if params.max_bias_mult > 0 or params.max_bias_add_hu > 0:
        mult = resample(draw.bias_mult.to(dev), shape, mode="linear")
        add = resample(draw.bias_add.to(dev), shape, mode="linear")
        image = (image + 1000.0) * (1.0 + mult) - 1000.0 + add
    image = _acquire(image, spacing, draw, generator)

    air_side = torch.tensor([c.side == "air" for c in draw.classes], device=dev)[cls]
    image = torch.where(
        air_side,
        image.clamp(max=params.air_max_hu),
        image.clamp(min=params.tissue_min_hu),
    )
    return image.clamp(min=AIR_HU).contiguous(), labels
