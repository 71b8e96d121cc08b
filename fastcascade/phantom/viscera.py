"""The labelled organs and vessels, with the lungs, crura and adrenals around them."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .geometry import _ellipsoid_sd, _f, _rot
from .painter import _Painter
from .tissue import _CAVITY, _ID, _LUNG, _MUSCLE, _ORGAN, _RETRO, _VESSEL


class _Viscera(_Painter):
    """Spleen shape, lung bases and diaphragm, great vessels, organs and liver veins."""

    def spleen_shape(self):
        """The spleen: a crescent against the left posterolateral wall (not painted yet).

        It is drawn before the lungs so that the costophrenic recess and the diaphragm
        wrap round it instead of cutting into it.
        """
        j = self.jit
        ss = 1 + j(0.06)
        sdz = j(5)
        tab = _f(
            [
                [72, -128, -25, 5, 4, 110],
                [88, -126, -28, 35, 12, 100],
                [110, -122, -30, 48, 17, 105],
                [130, -115, -40, 55, 22, 120],
                [150, -102, -45, 60, 24, 135],
                [172, -95, -45, 52, 22, 140],
                [188, -90, -45, 30, 14, 140],
                [196, -88, -45, 6, 4, 140],
            ]
        )
        tab[:, 0] = 130 + (tab[:, 0] - 130) * ss + sdz
        tab[:, 3:5] *= ss * 1.03
        tab[:, 1] += j(5)
        tab[:, 2] += j(5) + self.spine_dy
        tab[:, 5] += j(8)
        self.spleen = self.zcyl(tab, noise=(2.0, 2.0))

    def lungs(self):
        cv, hu = self.cv, self.hu
        dz = self.jit(6)
        reg = cv.region((-220, -170, 100), (220, 170, 300))
        if reg is None:
            return
        x, y, z = cv.coords(reg)
        rho = self.rho_cav[reg]
        yc = self.cav_centre_y[:, :, reg[2]]
        # The diaphragm: lung in the outer ring of the cavity, deeper higher up and
        # wrapping from the back round to the front.
        thr = np.interp(z - dz, [135, 155, 175, 200, 240], [1.0, 0.95, 0.86, 0.68, 0.35]).astype(
            np.float32
        )
        ylim = np.interp(z - dz, [125, 160, 200], [-30, 30, 90]).astype(np.float32)
        thr = thr + 0.03 * self.f["mid"][reg]
        yrel = y - yc
        # The costophrenic recess is deepest at the back.
        thr = thr - 0.14 * np.clip(-yrel / 90.0, 0.0, 1.0) * np.clip((1.0 - thr) / 0.06, 0.0, 1.0)
        lung = (rho > thr) & (rho < 1.0) & (yrel < ylim)
        dia = (rho > thr - 0.05) & (rho <= thr) & (yrel < ylim + 10)
        # Keep the spleen whole: the lung stops 5 mm short of it, diaphragm in between.
        sreg, ssd = self.spleen
        if sreg is not None:
            near = np.full(cv.shape, 1e3, np.float32)
            near[sreg] = ssd
            near = near[reg]
            dia = (dia | (lung & (near < 5.0))) & (near >= 0.0)
            lung &= near >= 5.0
        self.paint(reg, lung, _LUNG, hu["lung"], {_CAVITY})
        self.paint(reg, dia, _MUSCLE, hu["muscle"], {_CAVITY})

    def vessels(self):
        hu, j = self.hu, self.jit
        ok = {_CAVITY}
        sdy = self.spine_dy
        self.v_shift = np.array([j(3), sdy + j(2), j(4)])
        sh = self.v_shift
        # Aorta down to the bifurcation.
        zb = 8.0 + j(8)
        ra = float(np.clip(10.5 * (1 + j(0.06)), 9.0, 11.5))
        aorta = np.array(
            [
                [-13, -18, 230],
                [-13, -16, 166],
                [-14, -4, 124],
                [-15, 4, 98],
                [-15, 12, 62],
                [-14, 13, zb + 10],
                [-12, 12, zb],
            ]
        )
        reg, sd = self.tube(
            aorta + sh,
            [ra, ra, ra * 0.98, ra * 0.95, ra * 0.9, ra * 0.85, ra * 0.8],
            noise=(0.0, 0.5),
        )
        m = self.paint(reg, sd < 0, _VESSEL, hu["aorta"], ok, _ID["aorta"])
        if m is not None and m.any():
            # Calcified plaques in the wall (case A's aorta: 42 +- 34 HU at 3 mm).
            spots = ndi.gaussian_filter(self.tex.standard_normal(m.shape).astype(np.float32), 0.7)
            wall = m & (sd > -2.5)
            cut = (
                np.quantile(spots[wall], 1.0 - self.tex.uniform(0.02, 0.08))
                if wall.any()
                else np.inf
            )
            self.cv.hu[reg][wall & (spots > cut)] = 500.0
        # IVC: a slightly flattened tube to the right of the aorta.
        rv = float(np.clip(10.3 * (1 + j(0.05)), 9.0, 10.8))
        ivc = np.array(
            [
                [19, 2, 230],
                [18, 2, 166],
                [19, 7, 140],
                [17, 11, 122],
                [17, 13, 104],
                [15, 10, 86],
                [12, 11, 50],
                [9, 11, 22],
                [8, 10, zb - 2],
            ]
        )
        reg, sd = self.tube(
            ivc + sh, [rv] * 8 + [rv * 0.85], squash=(1.15, 0.85, 1.0), noise=(0.0, 0.5)
        )
        self.paint(reg, sd < 0, _VESSEL, hu["ivc"], ok, _ID["inferior_vena_cava"])
        # Common and external iliac arteries and veins (unlabelled, as in case A).
        for side in (-1, 1):
            art = np.array(
                [
                    [-12, 12, zb],
                    [-20, 5, zb - 18],
                    [-34, -14, zb - 40],
                    [-41, -20, zb - 60],
                    [-47, -9, zb - 78],
                    [-57, 20, zb - 106],
                    [-68, 34, zb - 132],
                    [-75, 32, zb - 170],
                ]
            )
            if side > 0:
                art[:, 0] = -art[:, 0] - 24
                art[0, 0] = -12
            reg, sd = self.tube(art + sh, [7, 6, 5.5, 5, 5, 4.5, 4.5, 4.5])
            self.paint(reg, sd < 0, _VESSEL, hu["vessel"], ok)
            vein = np.array(
                [
                    [8, 10, zb - 4],
                    [-6, 4, zb - 14],
                    [-16, -8, zb - 30],
                    [-32, -22, zb - 42],
                    [-46, -28, zb - 62],
                    [-48, -14, zb - 84],
                    [-50, 4, zb - 102],
                    [-58, 22, zb - 120],
                    [-64, 28, zb - 168],
                ]
            )
            if side > 0:
                vein[:, 0] = -vein[:, 0] + 16
                vein[:, 1] -= 4
            reg, sd = self.tube(vein + sh, [8, 7, 7, 6.5, 6.5, 6.5, 6.5, 6.5, 6])
            self.paint(reg, sd < 0, _VESSEL, hu["vessel"], ok)
        # Superior mesenteric artery and vein, renal veins (unlabelled).
        sma = np.array([[-14, 8, 112], [-12, 28, 102], [-8, 40, 80], [-4, 46, 50], [0, 50, 10]])
        reg, sd = self.tube(sma + sh, [4, 3.5, 3.5, 3, 2.5])
        self.paint(reg, sd < 0, _VESSEL, hu["vessel"], ok)
        smv = np.array([[6, 32, 110], [9, 37, 92], [10, 42, 70], [12, 48, 45], [14, 52, 10]])
        reg, sd = self.tube(smv + sh, [5.5, 5, 4.5, 4, 3])
        self.paint(reg, sd < 0, _VESSEL, hu["vessel"], ok)
        self.smv = smv + sh

    def organs(self):
        hu, j, r = self.hu, self.jit, self.rng
        ok = {_CAVITY}
        sh = self.v_shift
        # Diaphragmatic crura beside the aorta (unlabelled muscle).
        for tab in (
            [
                [92, 12, -16, 4, 7],
                [130, 15, -14, 7, 12],
                [170, 19, -10, 8, 13],
                [205, 20, -6, 6, 9],
            ],
            [
                [98, -32, -20, 4, 7],
                [135, -35, -17, 6, 11],
                [170, -35, -13, 7, 12],
                [205, -31, -9, 5, 8],
            ],
        ):
            tab = _f(tab)
            tab[:, 1:3] += sh[:2]
            tab[:, 0] += sh[2]
            reg, sd = self.zcyl(tab)
            self.paint(reg, sd < 0, _MUSCLE, hu["muscle"], ok)
        # Adrenal glands: two thin limbs each, above and medial to the kidneys.
        for c, a1, a2 in (([32, -14, 138], 20, -35), ([-44, -10, 140], -25, 30)):
            cen = np.array(c, float) + sh + [j(3), j(3), j(5)]
            for az in (a1, a2):
                reg, sd = self.ellipsoid(cen + [0, 0, -4], (2.5, 13, 15), _rot(0, 0, az + j(5)))
                self.paint(reg, sd < 0, _MUSCLE, hu["adrenal"], ok)
        # Portal and splenic vein (labelled), behind the pancreas.
        pv = _f(
            [
                [-100, -12, 128],
                [-75, 2, 125],
                [-45, 18, 120],
                [-15, 27, 116],
                [6, 31, 112],
                [22, 35, 122],
                [36, 35, 132],
                [52, 30, 142],
                [62, 26, 150],
            ]
        )
        pv[:, 2] += j(5)
        reg, sd = self.tube(pv + sh, [5.5, 6, 6, 6, 7.5, 8.5, 8.5, 7.5, 5.5], noise=(0.0, 0.4))
        self.paint(reg, sd < 0, _VESSEL, hu["portal"], ok, _ID["portal_splenic_vein"])
        smv_top = np.array([[6, 31, 112], [7, 34, 100]]) + sh
        reg, sd = self.tube(smv_top, [7, 6])
        self.paint(reg, sd < 0, _VESSEL, hu["portal"], ok, _ID["portal_splenic_vein"])

        # Kidneys: tilted ellipsoids with a medial hilum; the right one lower.
        kz = j(8)
        for side, name, c, rad in (
            (1, "kidney_right", [74, -28, 84], [30, 25, 57]),
            (-1, "kidney_left", [-79, -34, 98], [27, 22, 52]),
        ):
            s = 1 + j(0.05)
            cen = np.array(c, float) + [j(5), j(4) + self.spine_dy, kz + j(6)]
            rad = np.array(rad) * s
            rot = _rot(16 + j(5), side * (-18 + j(5)), side * (-35 + j(8)))
            reg, sd = self.ellipsoid(cen, rad, rot, noise=(1.0, 1.2))
            if reg is None:
                continue
            p = self.cv.coords(reg)
            # Hilum: the local -x axis points medially and a little anteriorly.
            hil_c = cen + rot[:, 0] * (-side) * rad[0] * 0.95
            sd_h = _ellipsoid_sd(p, hil_c, (rad[0] * 0.45, rad[1] * 0.45, rad[2] * 0.42), rot)
            kid = (sd < 0) & (sd_h > 0)
            m = self.paint(reg, kid, _ORGAN, hu["kidney"], ok, _ID[name])
            sin_c = cen + rot[:, 0] * (-side) * rad[0] * 0.35
            sd_s = _ellipsoid_sd(p, sin_c, (rad[0] * 0.38, rad[1] * 0.42, rad[2] * 0.5), rot)
            sinus = m & (sd_s < 0)
            self.cv.hu[reg][sinus] = hu["renal_sinus"]
            reg_p, sd_p = self.ellipsoid(cen + [0, -5, 0], rad + [6, 7, 6], rot)
            self.paint(reg_p, sd_p < 0, _RETRO, hu["fat"], ok)
            # Renal vein towards the IVC (unlabelled).
            ivc_pt = np.array([17, 10, cen[2] + 4]) + sh * [1, 1, 0]
            reg_v, sd_v = self.tube([hil_c, (hil_c + ivc_pt) / 2 + [0, 6, 0], ivc_pt], [5, 5, 5])
            self.paint(reg_v, sd_v < 0, _VESSEL, hu["vessel"], {_CAVITY, _RETRO})

        # Gallbladder under the liver.
        gb_c = np.array([66, 50, 100]) + [j(6), j(6), j(8)]
        gs = float(np.clip(1 + j(0.06), 0.88, 1.12))
        reg, sd = self.ellipsoid(
            gb_c,
            np.array([16, 24, 22]) * gs,
            _rot(-30 + j(10), 10 + j(10), j(15)),
            noise=(0.3, 0.6),
        )
        self.paint(reg, sd < 0, _ORGAN, hu["bile"], ok, _ID["gallbladder"])

        # Pancreas: a flattened, lobulated tube from the duodenal C-loop to the spleen.
        pz = j(5)
        pts = (
            _f(
                [
                    [24, 34, 82],
                    [18, 38, 100],
                    [-8, 40, 112],
                    [-40, 30, 118],
                    [-70, 12, 124],
                    [-96, -6, 130],
                ]
            )
            + sh
        )
        pts[:, 2] += pz
        ps = 1 + j(0.06)
        reg, sd = self.tube(
            pts,
            np.array([16.5, 15.5, 13, 12.5, 12, 10]) * ps,
            squash=(1.0, 0.75, 1.25),
            noise=(0.3, 0.8),
        )
        m = self.paint(reg, sd < 0, _ORGAN, hu["pancreas"], ok, _ID["pancreas"])
        if m is not None and m.any():
            # Fatty lobulation: a seed-dependent share of the gland is fat.
            lob = ndi.gaussian_filter(self.tex.standard_normal(m.shape).astype(np.float32), 0.8)
            lob += 0.1 * self.f["mid"][reg]
            cut = np.quantile(lob[m], 1.0 - self.tex.uniform(0.2, 0.35))
            self.cv.hu[reg][m & (lob > cut)] = hu["fat"] + 20

        # Duodenum (unlabelled bowel) around the pancreas head.
        duo = (
            np.array(
                [
                    [28, 58, 98],
                    [44, 44, 96],
                    [50, 26, 78],
                    [46, 20, 58],
                    [20, 18, 50],
                    [-16, 20, 54],
                    [-30, 26, 70],
                    [-22, 36, 84],
                ]
            )
            + sh
        )
        reg, sd = self.tube(duo, [11, 12, 12, 11, 11, 11, 10, 9], noise=(0.0, 1.5))
        self.bowel_fill(reg, sd, air=0.15)

        # Spleen (its shape was drawn before the lungs, which make room for it).
        reg, sd = self.spleen
        self.paint(reg, sd < 0, _ORGAN, hu["spleen"], ok, _ID["spleen"])

        # Stomach: a J-shaped tube, fundus high at the back, antrum crossing the midline.
        st = np.array(
            [
                [-58, 4, 172],
                [-58, 24, 155],
                [-52, 44, 136],
                [-38, 64, 119],
                [-16, 76, 104],
                [8, 72, 94],
                [24, 60, 97],
            ]
        )
        st = st + [j(6), j(6), j(5)]
        srad = np.array([22.5, 21.5, 19.5, 16.5, 13.5, 11, 9]) * (1 + j(0.07))
        gas = r.uniform(0.0, 0.25)
        reg, sd = self.tube(st, srad, noise=(0.8, 1.2))
        m = self.paint(reg, sd < 0, _ORGAN, hu["stomach_wall"], ok, _ID["stomach"])
        if m is not None:
            x, y, z = self.cv.coords(reg)
            lumen = m & (sd < -3.5)
            self.cv.hu[reg][lumen] = hu["stomach_content"]
            # Air rises anteriorly (the patient lies supine): an air-fluid level in y.
            level = (
                np.percentile(np.broadcast_to(y, m.shape)[lumen], 100 - 100 * gas)
                if lumen.any()
                else 0.0
            )
            air = lumen & (y > level)
            self.cv.hu[reg][air] = hu["air"]

        # Liver: right lobe against the wall plus a left lobe in front of the stomach.
        ls = 1 + j(0.045)
        ldz = j(8)
        right = _f(
            [
                [36, 126, 18, 4, 8],
                [50, 124, 20, 10, 26],
                [68, 118, 14, 17, 40],
                [84, 108, 14, 24, 50],
                [100, 96, 18, 32, 60],
                [116, 84, 22, 46, 70],
                [130, 72, 22, 60, 80],
                [146, 62, 22, 72, 88],
                [166, 56, 24, 76, 86],
                [190, 50, 20, 66, 72],
                [215, 46, 20, 10, 10],
            ]
        )
        left = _f(
            [
                [90, 8, 70, 6, 6],
                [104, 0, 68, 20, 14],
                [120, -8, 62, 36, 22],
                [145, -16, 56, 50, 30],
                [170, -18, 48, 52, 30],
                [200, -12, 40, 30, 18],
                [212, -10, 36, 6, 6],
            ]
        )
        for tab in (right, left):
            tab[:, 0] = 130 + (tab[:, 0] - 130) * ls + ldz
            tab[:, 3:5] *= ls * 0.97
            tab[:, 1] += j(4)
            tab[:, 2] += j(4)
        reg1, sd1 = self.zcyl(right, noise=(3.0, 2.5))
        self.paint(reg1, sd1 < 0, _ORGAN, hu["liver"], ok, _ID["liver"])
        reg2, sd2 = self.zcyl(left, noise=(3.0, 2.5))
        self.paint(reg2, sd2 < 0, _ORGAN, hu["liver"], ok, _ID["liver"])
        # Intrahepatic portal and hepatic veins: part of the liver label, blood HU.
        hv = sh + [0, 0, ldz]
        branches = [
            ([[52, 30, 142], [85, 14, 150], [112, 2, 138]], [5.5, 4.5, 3]),
            ([[52, 30, 142], [20, 48, 150], [-15, 60, 158]], [5, 4, 3]),
            ([[85, 14, 150], [95, 30, 118], [100, 35, 95]], [4, 3.5, 2.5]),
            ([[18, 4, 185], [60, -10, 178], [105, -15, 165]], [6.5, 5, 3.5]),
            ([[18, 4, 185], [45, 35, 178], [60, 65, 160]], [5.5, 4.5, 3]),
            ([[18, 4, 185], [-10, 40, 178], [-35, 55, 170]], [5, 4, 3]),
        ]
        for pts, rad in branches:
            pts = _f(pts) + hv + r.normal(0, 3, (3, 3))
            reg, sd = self.tube(pts, rad)
            if reg is not None:
                inside = (sd < 0) & (self.cv.labels[reg] == _ID["liver"])
                self.cv.hu[reg][inside] = hu["portal"]
