"""``python -m fastcascade.demo``: the ``fastcascade demo`` command (what ``make demo`` runs)."""

import sys

from ..cli import run

raise SystemExit(run(["demo", *sys.argv[1:]]))
