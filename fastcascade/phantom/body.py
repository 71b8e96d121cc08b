"""The body from the outside in: skin, fat, abdominal wall, table, skeleton, muscles."""

from __future__ import annotations

import numpy as np

from .geometry import _ellipse_sd, _f, _profile, _superellipse_rho
from .painter import _Painter
from .tissue import _AIR, _BONE, _CAVITY, _MUSCLE, _SUBCUT, _TABLE, _WALL


class _Body(_Painter):
    """Body outline and wall, patient table, spine, pelvis, ribs and trunk muscles."""

    def body(self):
        cv = self.cv
        # The abdominal cavity per level (z, half-width, anterior and posterior extent),
        # measured on case A; the wall and the seed's fat are added outside it.
        rows = _f(
            [
                [-900, 150, 70, -118],
                [-166, 152, 70, -118],
                [-118, 150, 65, -118],
                [-70, 146, 75, -118],
                [-22, 145, 95, -117],
                [26, 147, 108, -116],
                [74, 148, 110, -116],
                [122, 150, 110, -116],
                [170, 148, 104, -118],
                [900, 144, 98, -120],
            ]
        )
        rows[:, 1] *= self.body_w
        rows[:, 2:] *= self.body_d
        z = cv.Z[None, None, :]
        a, ya, yp = _profile(z, rows)
        # Subcutaneous fat is thinner over the rib cage than at the waist.
        fz = np.interp(z, [60, 130], [1.0, 0.6]).astype(np.float32) * self.fat
        t_lat, t_ant, t_post = 14.0 * fz, 20.0 * fz, 20.0 * fz
        m_lat, m_ant, m_post = 12.0 + self.jit(1.5), 10.0 + self.jit(1.5), 8.0
        x, y = cv.X[:, :, None], cv.Y[:, :, None]

        def rho(extra_lat, extra_ant, extra_post):
            lo, hi = yp - extra_post, ya + extra_ant
            cy = (lo + hi) / 2
            return _superellipse_rho(x, y - cy, a + extra_lat, (hi - lo) / 2), cy

        wobble = 0.012 * self.f["low"]
        rho_body, _ = rho(m_lat + t_lat, m_ant + t_ant, m_post + t_post)
        rho_body = rho_body + wobble
        rho_wall, _ = rho(m_lat, m_ant, m_post)
        rho_cav, cy_cav = rho(0.0, 0.0, 0.0)
        body = rho_body < 1.0
        skin = body & (rho_body > 1.0 - 2.5 / (a + m_lat + t_lat))
        self.rho_cav, self.cav_centre_y = rho_cav, cy_cav
        self.y_post = float(np.nanmin(yp - m_post - t_post))
        full = (slice(None),) * 3
        cv.paint(full, body, _SUBCUT, self.hu["fat"], {_AIR})
        cv.paint(full, skin, _SUBCUT, self.hu["skin"], {_SUBCUT})
        # No wall muscle behind the spine: the paraspinal muscles lie under the fat there.
        back = (y < cy_cav) & (np.abs(x) < 0.5 * (cy_cav - y))
        cv.paint(full, body & (rho_wall < 1.0) & ~back, _WALL, self.hu["muscle"], {_SUBCUT})
        cv.paint(full, body & (rho_cav < 1.0), _CAVITY, self.hu["fat"], {_WALL})
        # Linea alba: a fat seam in the anterior wall at the midline.
        alba = (np.abs(x) < 4) & (y > cy_cav) & (rho_cav >= 1.0)
        cv.paint(full, alba, _WALL, self.hu["fat"], {_WALL})

    def table(self):
        cv = self.cv
        y0 = self.y_post - 14.0 - abs(self.jit(6))
        x = cv.X
        yt = y0 - 25.0 + 0.0011 * x**2
        band = (cv.Y > yt - 4.0) & (cv.Y < yt) & (np.abs(x) < 230)
        band = np.broadcast_to(band[:, :, None], cv.shape)
        cv.paint((slice(None),) * 3, band, _TABLE, self.hu["table"], {_AIR})

    # -- skeleton ------------------------------------------------------------------------

    def canal_y(self, z):
        zs = [-160, -100, -40, -22, -4, 14, 40, 68, 94, 122, 148, 166, 230]
        ys = [-104, -95, -81, -61, -49, -44, -44, -48, -56, -63, -70, -74, -82]
        return np.interp(z, zs, ys) + self.spine_dy

    def spine(self):
        cv, hu = self.cv, self.hu
        self.spine_dy = self.jit(4)
        bone_ok = {_SUBCUT, _WALL, _CAVITY}
        # Vertebral levels: (centre z, lateral and AP semi-axes of the body, TP length).
        period = 34.0 * (1 + self.jit(0.03))
        levels = []
        z = -15.0 + self.jit(5)  # L5
        lat = [25, 25, 24, 23, 22, 20, 19, 18, 17]
        tp = [40, 44, 46, 42, 34, 26, 28, 28, 28]
        for i in range(9):  # L5 up to T10
            levels.append((z, lat[i], lat[i] * 0.72, tp[i], i >= 5))
            z += period if i < 5 else period * 0.85
        self.levels = levels
        # Spinal canal and its content, continuous.
        reg = cv.region((-20, -130, -60), (20, 0, 260))
        if reg is not None:
            x, y, zz = cv.coords(reg)
            yc = self.canal_y(zz).astype(np.float32)
            canal = _ellipse_sd(x, y - yc, 10.0, 8.5) < 0
            self.canal = (reg, canal)
        for zc, a, b, tpl, thoracic in levels:
            reg = cv.region((-60, -160, zc - 30), (60, 20, zc + 30))
            if reg is None:
                continue
            x, y, zz = cv.coords(reg)
            yc = self.canal_y(zz).astype(np.float32)
            h = period / 2 - 3.5
            yb = yc + 9.5 + b
            inplane = _ellipse_sd(x, y - yb, a, b)
            body = np.maximum(inplane, np.abs(zz - zc) - h)
            disc = (inplane < 0) & (np.abs(zz - zc) - h >= 0) & (np.abs(zz - zc) < period / 2 + 0.5)
            # Disc above each body (the next body paints its own).
            self.paint(reg, disc & (zz > zc), _BONE, hu["disc"], bone_ok)
            if zc < self.levels[0][0] + 1:
                self.paint(reg, disc & (zz < zc), _BONE, hu["disc"], bone_ok)
            self.bone(reg, body, bone_ok)
            # Posterior arch, pedicles, spinous and transverse processes.
            dz = zz - zc
            ring = (_ellipse_sd(x, y - yc + 2, 17.0, 15.0) < 0) & (y < yc + 4)
            ped = (np.abs(x) > 7) & (np.abs(x) < 15) & (y > yc - 2) & (y < yb)
            sp_len = 30 if thoracic else 34
            spin = (
                (np.abs(x) < 4)
                & (y < yc - 8)
                & (y > yc - 8 - sp_len)
                & (np.abs(dz + 4 + 0.25 * (yc - y)) < 9)
            )
            tpm = (
                (np.abs(x) > 8)
                & (np.abs(x) < 8 + tpl)
                & (np.abs(y - yc - 3 + (0.3 * np.abs(x) if thoracic else 0)) < 4)
            )
            arch = (ring | ped) & (np.abs(dz) < 10)
            procs = spin | (tpm & (np.abs(dz) < 4.5))
            m = (arch | procs) & (_ellipse_sd(x, y - yc, 10.0, 8.5) >= 0)
            self.paint(reg, m, _BONE, hu["posterior_elements"], bone_ok)
        reg, canal = self.canal
        self.paint(reg, canal, _MUSCLE, hu["csf"], {_CAVITY, _WALL, _SUBCUT, _BONE})
        # Sacrum: a plate tilting back, with a cortex.
        s1 = levels[0][0] - period
        tab = [
            [s1 + 14, 0, -40, 25, 16],
            [s1 - 4, 0, -48, 52, 19],
            [s1 - 30, 0, -63, 48, 16],
            [s1 - 55, 0, -78, 38, 12],
            [s1 - 80, 0, -91, 24, 9],
            [s1 - 100, 0, -99, 10, 6],
        ]
        tab = _f(tab)
        tab[:, 2] += self.spine_dy
        reg, sd = self.zcyl(tab)
        self.bone(reg, sd, bone_ok)

    def pelvis(self):
        cv, hu = self.cv, self.hu
        bone_ok = {_SUBCUT, _WALL, _CAVITY}
        dz = self.jit(5)
        self.pelvis_dz = dz
        for side in (-1, 1):
            # Iliac wing: part of an elliptic shell centred in front of the sacrum, from
            # the sacroiliac joint round to the anterior superior iliac spine.
            tab = _f(
                [
                    [10, 10, 30, 122, 118, 7, 70],
                    [-20, 0, 30, 135, 128, 6, 46],
                    [-50, 0, 28, 132, 124, 6, 44],
                    [-75, 10, 20, 104, 100, 8, 46],
                    [-98, 30, 4, 58, 58, 12, 52],
                ]
            )
            tab[:, 0] += dz
            reg = cv.region((-170, -130, -110 + dz), (170, 60, 20 + dz))
            if reg is None:
                continue
            x, y, z = cv.coords(reg)
            cx, cy, ax, ay, t, xmin = _profile(z, tab)
            u = side * x - cx
            sd = _ellipse_sd(u, y - cy, ax, ay)
            quad = (y < cy - 12) & (side * x > xmin)
            self.bone(reg, np.where(quad, np.abs(sd) - t / 2, 1e3), bone_ok)
            # Iliacus: fills the iliac fossa inside the wing.
            fossa = quad & (sd < -t / 2) & (sd > -t / 2 - 22) & (y > -60)
            self.paint(reg, fossa, _MUSCLE, hu["muscle"], {_CAVITY})
            # Gluteus medius and minimus, lateral to and behind the wing.
            tab = _f(
                [
                    [-135, 128, -30, 12, 20, -35],
                    [-112, 134, -35, 20, 32, -35],
                    [-76, 124, -36, 22, 34, -40],
                    [-40, 114, -43, 20, 32, -45],
                    [-14, 104, -52, 14, 24, -50],
                    [2, 100, -54, 6, 10, -50],
                ]
            )
            tab[:, 0] += dz
            tab[:, 1] *= side
            tab[:, 5] *= side
            reg_g, sd_g = self.zcyl(tab, noise=(1.5, 1.5))
            self.paint(reg_g, sd_g < 0, _MUSCLE, hu["muscle_fatty"], {_CAVITY, _WALL})
            # Femoral head, neck, greater trochanter, shaft.
            hc = np.array([side * 88, -22, -136 + dz])
            reg_h, sd_h = self.ellipsoid(hc, (23, 23, 23))
            self.bone(reg_h, sd_h, bone_ok)
            troch = np.array([side * 128, -34, -166 + dz])
            reg_n, sd_n = self.tube([hc, troch, troch + [side * -6, 2, -90]], [15, 19, 15])
            self.bone(reg_n, sd_n, bone_ok)
            # Acetabulum and ilium body.
            if reg_h is not None:
                x, y, z = cv.coords(reg_h)
                cup = (side * (x - hc[0]) < 6) & (z > hc[2] - 18)
                self.bone(reg_h, np.where(cup, np.abs(sd_h - 6.5) - 4.5, 1e3), bone_ok)
            reg_b, sd_b = self.tube(
                [[side * 60, -6, -98 + dz], [side * 78, -20, -118 + dz]], [14, 16]
            )
            self.bone(reg_b, sd_b, bone_ok)
            # Pubic ramus to the symphysis, ischium below and behind.
            reg_p, sd_p = self.tube(
                [[side * 76, 8, -142 + dz], [side * 40, 30, -158 + dz], [side * 6, 38, -168 + dz]],
                [10, 8, 8],
            )
            self.bone(reg_p, sd_p, bone_ok)
            reg_i, sd_i = self.tube(
                [[side * 82, -48, -140 + dz], [side * 70, -58, -200 + dz]], [13, 14]
            )
            self.bone(reg_i, sd_i, bone_ok)
            # Gluteus maximus, behind the pelvis.
            tab = _f(
                [
                    [-240, side * 90, -86, 55, 20],
                    [-170, side * 90, -88, 58, 22],
                    [-120, side * 98, -86, 62, 26],
                    [-80, side * 96, -86, 48, 22],
                    [-45, side * 86, -90, 30, 14],
                    [-25, side * 76, -94, 10, 6],
                ]
            )
            tab[:, 0] += dz
            reg_g, sd_g = self.zcyl(tab, noise=(2.0, 1.5))
            self.paint(reg_g, sd_g < 0, _MUSCLE, hu["muscle_fatty"], {_CAVITY, _WALL})
            # Obturator internus lines the pelvic side wall.
            tab = _f(
                [
                    [-175, side * 62, -18, 9, 26],
                    [-140, side * 64, -14, 10, 30],
                    [-112, side * 62, -10, 5, 14],
                ]
            )
            tab[:, 0] += dz
            reg_o, sd_o = self.zcyl(tab)
            self.paint(reg_o, sd_o < 0, _MUSCLE, hu["muscle"], {_CAVITY})

    def ribs(self):
        cv, hu = self.cv, self.hu
        dz = self.jit(5)
        dzi = [self.jit(2) for _ in range(7)]
        reg = cv.region((-200, -170, 20), (200, 170, 300))
        if reg is None:
            return
        x, y, z = cv.coords(reg)
        rho = self.rho_cav[reg]
        yc = self.cav_centre_y[:, :, reg[2]]
        band = (rho > 0.975) & (rho < 1.022)
        # Only the thin band around the cavity can hold ribs: work on its voxels.
        idx = np.nonzero(band)
        x = np.broadcast_to(x, band.shape)[idx]
        y = np.broadcast_to(y, band.shape)[idx]
        yc = np.broadcast_to(yc, band.shape)[idx]
        z = np.broadcast_to(z, band.shape)[idx]
        # Angle from the posterior midline (0) to the anterior midline (pi), per side.
        alpha = np.arctan2(np.abs(x), -(y - yc))
        # Ribs 12 (lowest, short) up to 7: (z at the spine, how far round, drop to the end).
        ribs = [
            (150, 1.1, 45),
            (178, 1.7, 85),
            (205, 2.3, 105),
            (230, 2.6, 115),
            (255, 2.8, 120),
            (280, 2.95, 125),
            (305, 3.0, 130),
        ]
        mask = np.zeros(alpha.shape, bool)
        cart = np.zeros(alpha.shape, bool)
        for (z0, amax, drop), dzr in zip(ribs, dzi, strict=True):
            # Nearly level behind, steeply down at the side (a smoothstep in the angle).
            ramp = np.clip((alpha - 0.6) / 1.5, 0.0, 1.0)
            zr = z0 + dz + dzr - drop * ramp * ramp * (3 - 2 * ramp)
            on = (np.abs(z - zr) < 4.5) & (alpha > 0.25) & (alpha < amax)
            mask |= on & (alpha < amax - 0.45 * (amax > 2.0))
            cart |= on & (alpha >= amax - 0.45) & (amax > 2.0)
        for m, value in ((mask, hu["rib"]), (cart, hu["cartilage"])):
            full = np.zeros(band.shape, bool)
            full[tuple(i[m] for i in idx)] = True
            self.paint(reg, full, _BONE, value, {_WALL, _CAVITY, _SUBCUT})

    def muscles(self):
        hu = self.hu
        sdy = self.spine_dy
        dz = self.pelvis_dz
        for side in (-1, 1):
            s = 1 + self.jit(0.08)
            # Psoas (joins the iliacus in the pelvis).
            tab = _f(
                [
                    [118, 22, -46, 4, 4],
                    [98, 27, -38, 9, 11],
                    [70, 33, -29, 12, 14],
                    [40, 38, -23, 14, 16],
                    [10, 44, -19, 17, 18],
                    [-15, 54, -18, 21, 19],
                    [-45, 66, -10, 22, 20],
                    [-75, 76, 2, 20, 18],
                    [-105, 84, 22, 16, 14],
                    [-135, 88, 26, 14, 12],
                    [-240, 92, 12, 12, 10],
                ]
            )
            tab[:, 1] *= side
            tab[:, 2] += sdy
            tab[:, 3:] *= s
            tab[tab[:, 0] < -20, 0] += dz
            reg, sd = self.zcyl(tab, noise=(1.5, 1.0))
            self.paint(reg, sd < 0, _MUSCLE, hu["muscle"], {_CAVITY})
            # Quadratus lumborum: lateral and behind the psoas.
            tab = _f(
                [
                    [120, 48, -66, 6, 5],
                    [90, 58, -60, 15, 9],
                    [40, 64, -56, 19, 10],
                    [0, 66, -60, 16, 9],
                    [-25, 60, -70, 6, 5],
                ]
            )
            tab[:, 1] *= side
            tab[:, 2] += sdy
            reg, sd = self.zcyl(tab, noise=(1.0, 1.0))
            self.paint(reg, sd < 0, _MUSCLE, hu["muscle"] - 5, {_CAVITY})
            # Paraspinal muscles (erector spinae, multifidus).
            tab = _f(
                [
                    [-70, 16, -108, 8, 5],
                    [-40, 22, -100, 16, 10],
                    [0, 32, -84, 25, 19],
                    [30, 37, -78, 29, 22],
                    [70, 39, -84, 31, 21],
                    [110, 42, -92, 32, 20],
                    [150, 40, -101, 30, 16],
                    [240, 38, -104, 28, 15],
                ]
            )
            tab[:, 1] *= side
            tab[:, 2] += sdy
            tab[:, 3:] *= 1 + self.jit(0.06)
            reg, sd = self.zcyl(tab, noise=(1.5, 1.0))
            self.paint(reg, sd < 0, _MUSCLE, hu["muscle_fatty"], {_CAVITY, _WALL})
