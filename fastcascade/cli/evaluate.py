"""``fastcascade evaluate --csv CASES``: the paper's tables from label files.

$ fastcascade evaluate --csv cases.csv --label-map case_a --out report.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``evaluate`` to the ``fastcascade`` command's subparsers."""
    p = subparsers.add_parser(
        "evaluate",
        help="Dice tables, stage 1 vs stage 2, C2 recall/FPR from label files",
        description="Compare predicted label maps with references: Dice per organ (mean, "
        "std, median, min, max); with stage-1 maps also their Dice, the Wilcoxon "
        "signed-rank p-value per organ and the candidate region's recall and false-positive "
        "rate for each r. CSV lines: prediction,reference[,stage1] (paths relative to the "
        "CSV's folder or absolute). Labels are compared in physical space: on one grid, "
        "or one grid up to flips and axis order (reoriented exactly); other grids are "
        "refused unless --resample.",
    )
    p.add_argument("--csv", required=True, type=Path, help="CSV of prediction,reference[,stage1]")
    arguments.add_label_map(
        p, 'reference ids onto classes: case_a, none or a JSON file {"id": class id}'
    )
    p.add_argument("--out", type=Path, help="also write the report as JSON")
    p.add_argument(
        "--radii",
        type=arguments.radii,
        default="0,1,2,3,4,5,6",
        help="dilation radii r for C2, voxels (default: %(default)s)",
    )
    p.add_argument(
        "--resample",
        action="store_true",
        help="resample labels on other grids onto the reference's by nearest neighbour "
        "instead of refusing them",
    )
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate_cases, read_cases, report_json, report_markdown
    from ..io.atomic import atomic_write
    from ..presets import read_label_map

    if args.out is not None and args.out.is_dir():
        raise IsADirectoryError(f"--out {args.out} is a folder; expected a JSON file name")
    label_map = read_label_map(args.label_map, arguments.LABEL_MAP_OPTION)
    report = evaluate_cases(read_cases(args.csv), label_map, args.radii, resample=args.resample)
    print(report_markdown(report))
    if args.out is not None:
        text = report_json({"csv": str(args.csv), "label_map": args.label_map, **report})
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
        print(f"\nwrote {args.out}")
    return 0
