"""``fastcascade evaluate --csv CASES``: the paper's tables, from a model run on CT scans
or from given label files.

$ fastcascade evaluate --model default --csv scans.csv --label-map case_a --out report/
$ fastcascade evaluate --csv predictions.csv --label-map case_a --out report.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import arguments

#: Options that only a model run uses.
_MODEL_ONLY = ("device", "batch_size", "no_plot")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``evaluate`` to the ``fastcascade`` command's subparsers."""
    p = subparsers.add_parser(
        "evaluate",
        help="Dice tables, stage 1 vs stage 2, C2 recall/FPR (a model on CTs, or label files)",
        description="With --model: run the cascade on every CT of the CSV (lines "
        "ct,reference) and score stage 1, stage 2 and stage 2 with overlap against the "
        "references: Dice per organ (mean, std, median, min, max, n), each stage against "
        "the others (Wilcoxon signed-rank p), and the candidate region's recall and "
        "false-positive rate for each r; --out DIR gets report.json, report.md and "
        "candidates.png. Without --model: score given label files (lines "
        "prediction,reference[,stage1]); --out names a JSON file. Paths are relative to "
        "the CSV's folder or absolute. Labels are compared in physical space: on one "
        "grid, or one grid up to flips and axis order (reoriented exactly); other grids "
        "are refused unless --resample.",
    )
    p.add_argument(
        "--csv",
        required=True,
        type=Path,
        help="cases: ct,reference with --model, else prediction,reference[,stage1]",
    )
    p.add_argument(
        "--model",
        default=None,
        help="run this cascade on the CTs: a saved model, or 'default' for the embedded one",
    )
    arguments.add_label_map(
        p, 'reference ids onto classes: case_a, none or a JSON file {"id": class id}'
    )
    p.add_argument(
        "--out",
        type=Path,
        help="with --model: a folder for report.json, report.md, candidates.png; "
        "without: a JSON file for the report",
    )
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
    p.add_argument(
        "--device",
        default=None,
        type=arguments.device,
        help="with --model: auto, cpu, cuda or cuda:N (default: auto)",
    )
    p.add_argument(
        "--batch-size",
        type=arguments.positive_int,
        default=None,
        help="with --model: tiles per network call (default: the model's)",
    )
    p.add_argument("--no-plot", action="store_true", default=None, help="with --model: no PNG")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing report (without it, an existing report stops the command "
        "before any work)",
    )
    p.set_defaults(func=_cmd_evaluate, parser=p)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..presets import read_label_map

    if args.model is None:
        given = [f"--{o.replace('_', '-')}" for o in _MODEL_ONLY if getattr(args, o) is not None]
        if given:
            args.parser.error(f"{', '.join(given)} apply only with --model")
    label_map = read_label_map(args.label_map, arguments.LABEL_MAP_OPTION)
    if args.model is None:
        return _evaluate_files(args, label_map)
    return _evaluate_model(args, label_map)


def _evaluate_files(args: argparse.Namespace, label_map) -> int:
    from ..evaluate import evaluate_cases, read_cases, report_json, report_markdown
    from ..io.atomic import atomic_write

    if args.out is not None and args.out.is_dir():
        raise IsADirectoryError(f"--out {args.out} is a folder; expected a JSON file name")
    if args.out is not None:
        arguments.refuse_existing([args.out], args.overwrite)
    report = evaluate_cases(read_cases(args.csv), label_map, args.radii, resample=args.resample)
    print(report_markdown(report))
    if args.out is not None:
        text = report_json({"csv": str(args.csv), "label_map": args.label_map, **report})
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
        print(f"\nwrote {args.out}")
    return 0


def _evaluate_model(args: argparse.Namespace, label_map) -> int:
    from ..api import load_model
    from ..evaluate import evaluate_model, read_scan_cases, report_markdown, write_report
    from ..evaluate.report import REPORT_FILES

    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise NotADirectoryError(f"--out {args.out} is a file; expected a folder for the report")
    if args.out is not None:
        arguments.refuse_existing([args.out / name for name in REPORT_FILES], args.overwrite)
    plot = not args.no_plot
    if plot and args.out is not None:
        try:
            import matplotlib  # noqa: F401 - only checked for, before any work
        except ImportError:
            raise ValueError(
                "candidates.png needs matplotlib: pip install fastcascade[viz], or pass --no-plot"
            ) from None
    cases = read_scan_cases(args.csv)
    predictor = load_model(
        None if args.model == "default" else args.model,
        device="auto" if args.device is None else args.device,
    )
    if args.batch_size is not None:
        predictor.options = predictor.options.replace(batch_size=args.batch_size)
    report = evaluate_model(
        predictor,
        cases,
        label_map,
        args.radii,
        resample=args.resample,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    report = {
        "model": args.model,
        "csv": str(args.csv),
        "label_map": args.label_map,
        **report,
    }
    print(f"fastcascade evaluate: model {args.model}, {report['n_cases']} cases\n")
    print(report_markdown(report))
    if args.out is not None:
        paths = write_report(args.out, report, plot=plot)
        print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0
