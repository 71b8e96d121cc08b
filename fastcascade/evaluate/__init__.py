"""The paper's evaluation: Dice per organ for stage 1, stage 2 and stage 2 with overlap,
stage 2 against stage 1 (Wilcoxon signed-rank test), and the candidate region's recall
and false-positive rate against the dilation radius r (the paper's Fig. 6).

- ``metrics``: Dice, summary statistics, the Wilcoxon test, C2's recall / FPR, which
  organs a reference holds and which its field of view cuts;
- ``geometry``: label maps compared in physical space (one grid, one grid up to
  orientation, or resampled on request; anything else refused);
- ``scans``: a model run on CT scans, ``ct,reference`` a line (``evaluate_model``);
- ``predictions``: given label files, ``prediction,reference[,stage1]`` a line
  (``evaluate_cases``);
- ``report``: the tables, as a dict, JSON, markdown and a folder with a plot.

Label maps are integer arrays ``(x, y, z)`` with class ids ``0 .. num_classes - 1``
(0 = background, see ``fastcascade.config.CLASS_NAMES``); Dice values are fractions in
[0, 1]. The ``fastcascade evaluate`` command runs either mode:

    $ fastcascade evaluate --model default --csv scans.csv --label-map case_a --out report/
    $ fastcascade evaluate --csv predictions.csv --label-map case_a --out report.json
"""

from .geometry import LINEAR_RTOL, TRANSLATION_ATOL_MM, Grid, align_labels, check_grids
from .metrics import (
    candidate_recall_fpr,
    compare_stages,
    confusion_matrix,
    dice,
    dice_from_confusion,
    reference_coverage,
    scored_dice,
    summarize,
)
from .predictions import DEFAULT_RADII, evaluate_cases, read_cases, read_reference
from .report import markdown_table, report_json, report_markdown, summary_report, write_report
from .scans import ScanCase, evaluate_model, evaluate_scan, read_scan_cases

__all__ = [
    "DEFAULT_RADII",
    "LINEAR_RTOL",
    "TRANSLATION_ATOL_MM",
    "Grid",
    "ScanCase",
    "align_labels",
    "candidate_recall_fpr",
    "check_grids",
    "compare_stages",
    "confusion_matrix",
    "dice",
    "dice_from_confusion",
    "evaluate_cases",
    "evaluate_model",
    "evaluate_scan",
    "markdown_table",
    "read_cases",
    "read_reference",
    "read_scan_cases",
    "reference_coverage",
    "report_json",
    "report_markdown",
    "scored_dice",
    "summarize",
    "summary_report",
    "write_report",
]
