"""One patient, drawn part by part in a fixed order (the random draws depend on it)."""

from __future__ import annotations

from .body import _Body
from .bowel import _Bowel
from .viscera import _Viscera


class _Anatomy(_Body, _Viscera, _Bowel):
    """Paints one patient onto a canvas, outside in: body, bones, muscles, organs, bowel."""

    def build(self):
        self.body()
        self.table()
        self.spine()
        self.pelvis()
        self.ribs()
        self.muscles()
        self.spleen_shape()
        self.lungs()
        self.vessels()
        self.organs()
        self.bowel()
