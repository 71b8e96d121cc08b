"""``fastcascade export --model M --out DIR``: each stage's network as a ``torch.export``
program (``stage1.pt2``, ``stage2.pt2``), as ONNX where ``onnx`` and ``onnxscript`` are
installed, and the model's JSON config (``model.json``) beside them.

$ fastcascade export --out exported/
$ fastcascade export --model my_model.safetensors --out exported/ --onnx no
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import arguments


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export`` to the ``fastcascade`` command's subparsers."""
    p = sub.add_parser(
        "export",
        help="write a model's networks as torch.export programs (and ONNX)",
        description="Write each stage's network of a saved cascade as a torch.export "
        "program (STAGE.pt2), and as ONNX (STAGE.onnx) where onnx and onnxscript are "
        "installed, with the model's JSON config (model.json) beside them. The fused GPU "
        "kernels are replaced by plain PyTorch operators (conv, batch norm, ReLU). Input: "
        "float32 (N, 1, *tile), windowed intensities; output: logits.",
    )
    p.add_argument("--model", default=None, help="saved cascade (default: the embedded model)")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument(
        "--onnx",
        choices=("auto", "yes", "no"),
        default="auto",
        help="auto: ONNX where onnx and onnxscript are installed (pip install onnx "
        "onnxscript); yes: required; no: never (default: auto)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from ..api import DEFAULT_MODEL
    from ..model.export import STAGES, export_cascade

    names = [f"{s}{ext}" for s in STAGES for ext in (".pt2", ".onnx")] + ["model.json"]
    arguments.refuse_existing([args.out / n for n in names], args.overwrite)
    written = export_cascade(
        DEFAULT_MODEL if args.model is None else args.model, args.out, args.onnx
    )
    print("wrote " + ", ".join(str(p) for p in written))
    if args.onnx == "auto" and not any(p.suffix == ".onnx" for p in written):
        print("no ONNX: onnx and onnxscript are not installed (pip install onnx onnxscript)")
    return 0
