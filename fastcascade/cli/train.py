"""``fastcascade train`` and ``fastcascade finetune``: train a cascade, or adapt one to
another class list.

    $ fastcascade train --out runs/phantoms --iterations 2000
    $ fastcascade train --out runs/ct --csv pairs.csv --label-map case_a --resume
    $ fastcascade train --out runs/mix --sources phantom=1,synth=2,repaint=1,real=1 \\
          --real-csv cases.csv --names class_map_total_v2.json --label-map case_a
    $ fastcascade finetune --model runs/ct/model.safetensors --classes background,liver \\
          --csv pairs.csv --label-map map.json --out runs/ft --iterations 500

Both stages draw from one mix of sources (``--sources``, ``train/sources.py``: phantoms,
the real cases, images synthesized from their label maps, the cases re-painted to other
contrast phases); the cases come from a CSV of ``ct,labels[,names]`` rows. The mix, the
augmentations and the cut margin are recorded in every checkpoint and in the model's
JSON (its ``training`` field). The model options of ``train`` default to the shipped
model's recipe (``presets.default_config``).

Several GPUs: ``torchrun --nproc-per-node N -m fastcascade train ...`` (each process on
the GPU ``LOCAL_RANK``, NCCL; gloo processes on the CPU) trains with
``DistributedDataParallel`` (``train/distributed.py``): ``--batch-size`` per process,
rank 0 writing the checkpoints and the model. ``finetune`` runs in one process.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..io.atomic import output_folders
from ..presets import default_config
from . import arguments


def _source(args: argparse.Namespace, spacing, seed: int, num_classes: int):
    """The mix both stages draw from; every case is read and checked here, before any
    training (errors name the case)."""
    from ..presets import read_label_map
    from ..train.sources import CASE_KINDS, mixed_source, parse_mix, read_cases

    mix = parse_mix(args.sources or ("real=1" if args.csv is not None else "phantom=1"))
    needs = [k for k in mix if k in CASE_KINDS]
    if needs and args.csv is None:
        raise ValueError(f"--sources {','.join(needs)} needs the cases: --real-csv CSV")
    cases, label_map = [], None
    if needs:  # phantoms alone: a --label-map or --names given anyway is not read
        cases = read_cases(args.csv, args.names)
        label_map = read_label_map(args.label_map, arguments.LABEL_MAP_OPTION)
    return mixed_source(
        mix,
        spacing,
        seed,
        cases=cases,
        label_map=label_map,
        num_classes=num_classes,
        device=args.device,
        pool_size=args.pool_size,
        refresh_every=args.refresh_every,
        contrasts=args.contrasts.split(","),
        phases=[p.strip() for p in args.phases.split(",") if p.strip()],
    )


def _common(p: argparse.ArgumentParser) -> None:
    from ..train.repaint import PHASES
    from ..train.trainer import CUT_MARGIN

    data = p.add_argument_group("data")
    data.add_argument(
        "--sources",
        default=None,
        help="the mix both stages draw from, kind=weight of phantom, real, synth, repaint, "
        "e.g. phantom=1,synth=2,repaint=1,real=1 (default: real=1 with --real-csv, "
        "else phantom=1)",
    )
    data.add_argument(
        "--csv",
        "--real-csv",
        dest="csv",
        type=Path,
        help="CSV of the real cases, ct,labels[,names] NIfTI paths per row",
    )
    data.add_argument(
        "--names",
        type=Path,
        default=None,
        help="structure names (JSON id->name, or CSV with id,structure) for the cases "
        "without a names column; synth and repaint need them",
    )
    arguments.add_label_map(data, "label ids onto classes: case_a, none or a JSON file")
    data.add_argument("--pool-size", type=int, default=4, help="phantoms kept in memory")
    data.add_argument("--refresh-every", type=int, default=8, help="draws between new phantoms")
    data.add_argument(
        "--contrasts", default="none,portal_venous", help="phantom contrast phases to mix"
    )
    data.add_argument(
        "--phases",
        default=",".join(PHASES),
        help="contrast phases the repaint source draws from (default: %(default)s)",
    )
    data.add_argument(
        "--cut-margin",
        type=int,
        default=CUT_MARGIN,
        help="voxels at faces where labels touch the scan's edge left out of the loss "
        "(default: %(default)s; 0: none)",
    )
    run = p.add_argument_group("optimisation")
    run.add_argument("--batch-size", type=int, default=2)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--checkpoint-every", type=int, default=50, help="iterations")
    run.add_argument("--no-augment", action="store_true", help="no elastic/rigid augmentation")
    run.add_argument(
        "--no-intensity",
        action="store_true",
        help="no intensity augmentation (window level/width, gamma, noise)",
    )
    run.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --out folder that holds a run (without it, or --resume, an "
        "existing run stops the command before any work)",
    )
    run.add_argument(
        "--device",
        default="cpu",
        type=arguments.device,
        help="cpu, cuda, cuda:N or auto (a GPU if present) (default: cpu)",
    )
    run.add_argument(
        "--threads", type=arguments.positive_int, default=None, help="torch.set_num_threads"
    )
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
    f.add_argument(
        "--new-classes",
        default=None,
        help="the names in --classes that the model does not have yet (required for each: "
        "an unknown name is otherwise refused as a likely typo)",
    )
    f.add_argument("--out", required=True, type=Path, help="output folder")
    f.add_argument("--iterations", type=int, default=500, help="per stage")
    f.add_argument("--lr", type=float, default=1e-3, help="learning rate before scaling")
    f.add_argument("--lr-scale", type=float, default=0.1, help="the paper: 0.1")
    _common(f)
    f.set_defaults(func=_cmd_finetune, parser=f)


def _setup(args) -> None:
    import torch

    from ..api import resolve_device

    args.device = str(resolve_device(args.device))  # a GPU asked for must be there
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if args.out.exists() and not args.out.is_dir():
        raise NotADirectoryError(f"--out {args.out} is a file; expected a folder")
    held = sorted(p.name for p in _run_files(args.out))
    if held and not (args.resume or args.overwrite):
        raise FileExistsError(
            f"--out {args.out} holds a run ({', '.join(held)}); pass --resume to continue "
            "it or --overwrite to start over"
        )


def _run_files(out: Path) -> list[Path]:
    """The files of a run in ``out``: checkpoints and the written model."""
    names = ("stage1.ckpt", "stage2.ckpt", "model.safetensors", "model.json")
    return [out / n for n in names if (out / n).exists()]


def _run_options(args: argparse.Namespace) -> dict:
    """The training-run options ``train`` and ``finetune`` share (see ``_common``)."""
    return dict(
        batch_size=args.batch_size,
        seed=args.seed,
        augment=not args.no_augment,
        intensity=not args.no_intensity,
        cut_margin=args.cut_margin,
        checkpoint_every=args.checkpoint_every,
        log=None if args.quiet else print,
        resume=args.resume,
        device=args.device,
        progress=args.progress,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from ..train.distributed import init_from_env, shutdown

    _setup(args)  # every process checks --out before any writes to it
    rank, _, device = init_from_env(args.device)  # torchrun's processes, where WORLD_SIZE > 1
    args.device = str(device)
    try:
        with output_folders([args.out]):  # a run that fails before writing leaves no folder
            return _train(args, rank)
    finally:
        shutdown()


def _train(args: argparse.Namespace, rank: int = 0) -> int:
    import dataclasses

    from ..model.checkpoint import save_cascade
    from ..train.distributed import rank_and_world, rank_seed
    from ..train.trainer import (
        ground_truth_candidates,
        stage1_candidates,
        train_stage,
        training_record,
    )

    world = rank_and_world()[1]
    config = default_config(args.base_channels, args.levels, args.padding, args.spacing, args.tile)
    common = dict(lr=args.lr, **_run_options(args))
    # One source for both stages: the cases are read once, the mix drawn on from where
    # stage 1 stopped (each stage's checkpoint holds the source's state). Each process
    # of a run on several draws from its own (seeded from --seed and its rank).
    source = _source(args, config.spacing, rank_seed(args.seed, rank), config.num_classes)
    iterations = (
        args.iterations,
        args.iterations if args.iterations2 is None else args.iterations2,
    )
    stage1 = train_stage(1, config, source, args.out, iterations[0], **common)
    if args.stage2_regions == "stage1":
        candidates = stage1_candidates(stage1, config)
    else:
        candidates = ground_truth_candidates(config)
    stage2 = train_stage(
        2, config, source, args.out, iterations[1], candidate_fn=candidates, **common
    )
    record = training_record(source, common["augment"], common["intensity"], args.cut_margin)
    record.update(
        iterations=list(iterations),
        stage2_regions=args.stage2_regions,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )
    if world > 1:  # --batch-size is per process
        record["processes"] = world
    if rank != 0:  # rank 0 writes the model
        return 0
    config = dataclasses.replace(config, training=record)
    weights, cfg = save_cascade(args.out / "model", config, stage1, stage2)
    print(f"wrote {weights} and {cfg}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from ..model.checkpoint import load_config
    from ..train.distributed import world_size_from_env

    if world_size_from_env() > 1:
        raise ValueError("finetune runs in one process; start it without torchrun")
    _setup(args)
    if args.csv is None:
        raise ValueError("finetune needs --csv with the new classes' training data")
    names = _names_list(args.classes, "--classes")
    declared = _names_list(args.new_classes, "--new-classes") if args.new_classes else []
    old = load_config(args.model).class_names
    new = [n for n in names if n not in old]
    undeclared = [n for n in new if n not in declared]
    if undeclared:
        raise ValueError(
            f"--classes names {undeclared}, which the model {args.model} does not have "
            f"(its classes: {', '.join(old)}); declare new classes with --new-classes "
            f"{','.join(undeclared)}, or correct a misspelt name"
        )
    stray = [n for n in declared if n not in names or n in old]
    if stray:
        raise ValueError(
            f"--new-classes names {stray}, which are not new classes of --classes "
            "(each must be in --classes and not already a class of the model)"
        )
    with output_folders([args.out]):
        return _finetune(args, names, load_config(args.model).spacing)


def _finetune(args: argparse.Namespace, names: list[str], spacing) -> int:
    from ..train.finetune import finetune

    finetune(
        args.model,
        names,
        _source(args, spacing, args.seed, len(names)),
        args.out,
        args.iterations,
        lr_scale=args.lr_scale,
        lr=args.lr,
        **_run_options(args),
    )
    print(f"wrote {args.out / 'model.safetensors'} and {args.out / 'model.json'}")
    return 0


def _names_list(text: str, option: str) -> list[str]:
    """Comma-separated names, or a JSON list file of them."""
    if Path(text).is_file():
        try:
            names = json.loads(Path(text).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{option} {text}: not a JSON list of class names ({e})") from e
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{option} {text}: expected a JSON list of class names")
        return names
    return [c.strip() for c in text.split(",") if c.strip()]
