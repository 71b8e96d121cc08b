"""``python -m fastcascade.demo``: the ``fastcascade demo`` command (what ``make demo`` runs)."""

import sys

from ..cli import main

raise SystemExit(main(["demo", *sys.argv[1:]]))
