"""``fastcascade train`` and ``fastcascade finetune``: train a cascade, or adapt one to
another class list.

    $ fastcascade train --out runs/phantoms --iterations 2000
    $ fastcascade train --out runs/ct --csv pairs.csv --label-map case_a --resume
    $ fastcascade finetune --model runs/ct/model.safetensors --classes background,liver \\
          --csv pairs.csv --label-map map.json --out runs/ft --iterations 500

The CSV format is ``train/sources.py``'s; the model options of ``train`` default to the
shipped model's recipe (``presets.default_config``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..presets import default_config
from . import arguments


def _source(args: argparse.Namespace, spacing, seed: int):
    from ..presets import read_label_map
    from ..train.sources import training_source

    if args.csv is None:  # phantoms: a --label-map given anyway is not read
        label_map = None
    else:
        label_map = read_label_map(args.label_map, arguments.LABEL_MAP_OPTION)
    return training_source(
        spacing,
        seed,
        csv=args.csv,
        label_map=label_map,
        pool_size=args.pool_size,
        refresh_every=args.refresh_every,
        contrasts=args.contrasts.split(","),
    )


def _common(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    data.add_argument("--csv", type=Path, help="CSV of ct,labels NIfTI pairs (default: phantoms)")
    arguments.add_label_map(data, "label ids onto classes: case_a, none or a JSON file")
    data.add_argument("--pool-size", type=int, default=4, help="phantoms kept in memory")
    data.add_argument("--refresh-every", type=int, default=8, help="draws between new phantoms")
    data.add_argument(
        "--contrasts", default="none,portal_venous", help="phantom contrast phases to mix"
    )
    run = p.add_argument_group("optimisation")
    run.add_argument("--batch-size", type=int, default=2)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--checkpoint-every", type=int, default=50, help="iterations")
    run.add_argument("--no-augment", action="store_true", help="no elastic/rigid augmentation")
    run.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    run.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    run.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    run.add_argument("--quiet", action="store_true", help="no per-iteration lines")
    run.add_argument("--progress", action="store_true", help="a tqdm progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``finetune`` to the ``fastcascade`` command's subparsers."""
    p = subparsers.add_parser(
        "train",
        help="train both stages of a cascade (phantoms or NIfTI pairs)",
        description="Train stage 1 on the body mask, then stage 2 on the candidate regions "
        "of the trained stage 1, and write OUT/model.safetensors + OUT/model.json.",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--iterations", type=int, default=1000, help="per stage")
    p.add_argument("--iterations2", type=int, default=None, help="stage 2 (default: same)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    # The defaults are the shipped model's recipe (presets.default_config).
    preset = default_config()
    shipped = preset.stage1.architecture
    arch = p.add_argument_group("model (defaults: the shipped model's)")
    arch.add_argument(
        "--base-channels",
        type=int,
        default=shipped.base_channels,
        help="width of the first convolution (default: %(default)s)",
    )
    arch.add_argument(
        "--levels", type=int, default=shipped.levels, help="U-Net levels (default: %(default)s)"
    )
    arch.add_argument(
        "--padding",
        choices=("same", "valid"),
        default=shipped.padding,
        help="convolution padding (default: %(default)s)",
    )
    arch.add_argument(
        "--spacing",
        type=float,
        default=preset.spacing[0],
        help="working grid, mm (default: %(default)s)",
    )
    arch.add_argument(
        "--tile",
        type=int,
        default=preset.stage1.tile[0],
        help="sub-volume edge, voxels (default: %(default)s)",
    )
    arch.add_argument(
        "--stage2-regions",
        choices=("stage1", "labels"),
        default="stage1",
        help="stage 2 trains on trained stage 1's candidates (the paper) or on the "
        "dilated ground truth (faster, an approximation)",
    )
    _common(p)
    p.set_defaults(func=_cmd_train, parser=p)

    f = subparsers.add_parser(
        "finetune",
        help="fine-tune a cascade to another class list",
        description="Keep a cascade's weights and the classifier rows of classes kept by "
        "name, train both stages with the learning rate scaled by --lr-scale, write "
        "OUT/model.*.",
    )
    f.add_argument("--model", required=True, type=Path, help="cascade (.safetensors + .json)")
    f.add_argument(
        "--classes", required=True, help="new class names, comma-separated, or a JSON list file"
    )
    f.add_argument("--out", required=True, type=Path, help="output folder")
    f.add_argument("--iterations", type=int, default=500, help="per stage")
    f.add_argument("--lr", type=float, default=1e-3, help="learning rate before scaling")
    f.add_argument("--lr-scale", type=float, default=0.1, help="the paper: 0.1")
    _common(f)
    f.set_defaults(func=_cmd_finetune, parser=f)


def _setup(args) -> None:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)


def _run_options(args: argparse.Namespace) -> dict:
    """The training-run options ``train`` and ``finetune`` share (see ``_common``)."""
    return dict(
        batch_size=args.batch_size,
        seed=args.seed,
        augment=not args.no_augment,
        checkpoint_every=args.checkpoint_every,
        log=None if args.quiet else print,
        resume=args.resume,
        device=args.device,
        progress=args.progress,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from ..model.checkpoint import save_cascade
    from ..train.trainer import ground_truth_candidates, stage1_candidates, train_stage

    _setup(args)
    config = default_config(args.base_channels, args.levels, args.padding, args.spacing, args.tile)
    common = dict(lr=args.lr, **_run_options(args))
    # One source for both stages: NIfTI pairs are read once, phantoms drawn on from where
    # stage 1 stopped (each stage's checkpoint holds the source's state).
    source = _source(args, config.spacing, args.seed)
    stage1 = train_stage(1, config, source, args.out, args.iterations, **common)
    if args.stage2_regions == "stage1":
        candidates = stage1_candidates(stage1, config)
    else:
        candidates = ground_truth_candidates(config)
    stage2 = train_stage(
        2,
        config,
        source,
        args.out,
        args.iterations if args.iterations2 is None else args.iterations2,
        candidate_fn=candidates,
        **common,
    )
    weights, cfg = save_cascade(args.out / "model", config, stage1, stage2)
    print(f"wrote {weights} and {cfg}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from ..model.checkpoint import load_config
    from ..train.finetune import finetune

    _setup(args)
    if args.csv is None:
        raise ValueError("finetune needs --csv with the new classes' training data")
    classes = args.classes
    if Path(classes).exists():
        names = json.loads(Path(classes).read_text())
    else:
        names = [c.strip() for c in classes.split(",") if c.strip()]
    spacing = load_config(args.model).spacing
    finetune(
        args.model,
        names,
        _source(args, spacing, args.seed),
        args.out,
        args.iterations,
        lr_scale=args.lr_scale,
        lr=args.lr,
        **_run_options(args),
    )
    print(f"wrote {args.out / 'model.safetensors'} and {args.out / 'model.json'}")
    return 0
