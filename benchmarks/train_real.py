"""Recipe of the default model trained on real anatomy (leave one patient out, then both).

One process per cascade; each trains stage 1, then stage 2, and rerunning the same
command resumes from the last checkpoint (``--iterations`` is the total per stage, so a
larger number continues a finished run):

    # fold "A": trained with case A as the only real patient, evaluated on case E
    python benchmarks/train_real.py --cases runs/cases/case_a.csv --out runs/lopo_a
    # fold "E": the other way round
    python benchmarks/train_real.py --cases runs/cases/case_e.csv --out runs/lopo_e
    # the shipped model: both patients
    python benchmarks/train_real.py --cases runs/cases/both.csv --out runs/both
    # a CSV per case (ct,labels,names rows) for the commands above
    python benchmarks/train_real.py --write-csvs runs/cases

Recipe (fixed before any left-out patient was scored; nothing was chosen on one):
- both stages start from the phantom-trained weights (``--init``, the shipped phantom
  model) with the same architecture, and train with Adam at ``--lr``;
- the mix ``phantom=1,synth=2,repaint=1,real=1``: phantoms keep what the phantom model
  knew, the real cases as they are, images synthesized from their full label maps
  (SynthSeg-style) and the cases re-painted to other contrast phases;
- elastic, rotation and intensity augmentation, cut-face margin 3 (the trainer's
  defaults); batch 2 of 64^3 sub-volumes on the 3 mm grid;
- stage 2 trains on the dilated ground truth (``ground_truth_candidates``), so it need
  not run stage 1 on every new synthesized image (an approximation of the paper, which
  trains it on stage 1's own candidates).

``--device cuda`` trains on a GPU with the same command.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import torch

from fastcascade.api import DEFAULT_MODEL
from fastcascade.model.checkpoint import load_cascade, save_cascade
from fastcascade.presets import read_label_map
from fastcascade.train.sources import mixed_source, parse_mix, read_cases
from fastcascade.train.trainer import ground_truth_candidates, train_stage, training_record

MIX = "phantom=1,synth=2,repaint=1,real=1"
CASES = {  # case -> (ct, labels, names) under the data folder's ct/
    "case_a": (
        "case_a/example_ct.nii.gz",
        "case_a/example_seg_fast_force_split.nii.gz",
        "case_a/class_map_total_v2.json",
    ),
    "case_e": ("case_e/ct.nii.gz", "case_e/seg.nii.gz", "case_e/structures.csv"),
}


def write_csvs(folder: Path, data: Path) -> None:
    """``case_a.csv``, ``case_e.csv`` and ``both.csv`` (``ct,labels,names`` rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = {k: ",".join(str((data / "ct" / f).resolve()) for f in v) for k, v in CASES.items()}
    for name, keys in (("case_a", ["case_a"]), ("case_e", ["case_e"]), ("both", list(CASES))):
        text = "ct,labels,names\n" + "".join(rows[k] + "\n" for k in keys)
        (folder / f"{name}.csv").write_text(text)
        print(folder / f"{name}.csv")


def assemble(out: Path) -> int:
    """``out/model.*`` from ``out/stage1.ckpt`` and ``out/stage2.ckpt`` as they are; the
    ``training`` record says how many iterations each stage had."""
    from fastcascade.config import CascadeConfig
    from fastcascade.model import UNet3D
    from fastcascade.model.checkpoint import load_training_checkpoint

    nets, done = [], []
    for stage in (1, 2):
        ckpt = load_training_checkpoint(out / f"stage{stage}.ckpt")
        config = CascadeConfig.from_dict(ckpt["config"])
        arch = (config.stage1 if stage == 1 else config.stage2).architecture
        net = UNet3D.from_architecture(arch)
        net.load_state_dict(ckpt["model"])
        nets.append(net.eval())
        done.append(int(ckpt["iteration"]))
        record = dict(ckpt["training"])
    record.update(iterations=done, stage2_regions="labels", batch_size=2)
    config = dataclasses.replace(config, training=record)
    print(save_cascade(out / "model", config, *nets))
    return 0


def record_dice(model: Path, cases: dict[str, tuple[Path, Path]]) -> dict:
    """Dice per organ of ``model`` (default options) on each named ``(ct, labels)`` case,
    written into the model JSON's ``training["dice"]``, labelled as cases seen in
    training; the shipped model's regression test compares against these numbers. With
    the run's ``stage2.ckpt`` beside the model, the phantom seeds its mix drew,
    ``[first, next)``, go into ``training["phantom_seeds"]``."""
    import json

    import nibabel as nib
    import numpy as np

    import fastcascade
    from fastcascade.evaluate import dice
    from fastcascade.io.atomic import atomic_write
    from fastcascade.io.nifti import map_labels
    from fastcascade.model.checkpoint import model_paths

    predictor = fastcascade.load_model(model, device="cpu")
    names = predictor.config.class_names
    scores = {}
    for case, (ct, labels) in cases.items():
        ref = map_labels(np.asarray(nib.load(str(labels)).dataobj), read_label_map("case_a"))
        got = dice(predictor.segment(str(ct)).labels, ref, len(names))
        present = [k for k in range(1, len(names)) if (ref == k).any()]
        scores[case] = {names[k]: round(float(got[k]), 4) for k in present}
        print(case, scores[case])
    _, cfg_path = model_paths(model)
    data = json.loads(cfg_path.read_text())
    ckpt = Path(model).parent / "stage2.ckpt"  # where stage 2's draws ended
    if ckpt.exists():
        from fastcascade.model.checkpoint import load_training_checkpoint

        state = load_training_checkpoint(ckpt)["source"]["sources"]["phantom"]
        data.setdefault("training", {})["phantom_seeds"] = [state["seed"], state["next_seed"]]
    data.setdefault("training", {})["dice"] = {
        "note": "cases seen in training; stage 2 with the default options (slabs, 4x overlap)",
        **scores,
    }
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(cfg_path, lambda tmp: Path(tmp).write_text(text))
    return scores


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", type=Path, help="CSV of ct,labels,names rows")
    p.add_argument("--out", type=Path)
    p.add_argument("--init", default="default", help="cascade to start from (default: shipped)")
    p.add_argument("--iterations", type=int, default=1500, help="per stage, total")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--sources", default=MIX)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--assemble",
        action="store_true",
        help="write OUT/model.* from the stages' last checkpoints (a run stopped early)",
    )
    p.add_argument("--write-csvs", type=Path, default=None, metavar="FOLDER")
    p.add_argument(
        "--record-dice",
        type=Path,
        default=None,
        metavar="MODEL",
        help="write the Dice of MODEL on case A and case E into its JSON (seen in training)",
    )
    p.add_argument(
        "--data", type=Path, default=Path(os.environ.get("FASTCASCADE_DATA", "../shared/data"))
    )
    args = p.parse_args(argv)
    if args.record_dice is not None:
        cases = {k: tuple(args.data / "ct" / f for f in v[:2]) for k, v in CASES.items()}
        record_dice(args.record_dice, cases)
        return 0
    if args.write_csvs is not None:
        write_csvs(args.write_csvs, args.data)
        return 0
    if args.assemble and args.out is not None:
        return assemble(args.out)
    if args.cases is None or args.out is None:
        p.error("--cases and --out are required")
    torch.set_num_threads(args.threads)
    config, init1, init2 = load_cascade(DEFAULT_MODEL if args.init == "default" else args.init)
    source = mixed_source(
        parse_mix(args.sources),
        config.spacing,
        args.seed,
        cases=read_cases(args.cases),
        label_map=read_label_map("case_a"),
        num_classes=config.num_classes,
        device=args.device,
    )
    common = dict(batch_size=2, lr=args.lr, seed=args.seed, checkpoint_every=25, resume=True)
    common.update(device=args.device)
    stage1 = train_stage(
        1, config, source, args.out, args.iterations, init_state=init1.state_dict(), **common
    )
    stage2 = train_stage(
        2,
        config,
        source,
        args.out,
        args.iterations,
        init_state=init2.state_dict(),
        candidate_fn=ground_truth_candidates(config),
        **common,
    )
    record = training_record(source)
    record.update(
        initialised_from=Path(args.init).name,
        iterations=[args.iterations, args.iterations],
        stage2_regions="labels",
        batch_size=2,
        lr=args.lr,
        seed=args.seed,
    )
    config = dataclasses.replace(config, training=record)
    print(save_cascade(args.out / "model", config, stage1, stage2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
