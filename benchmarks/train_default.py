"""Recipe of the embedded default model: both stages trained on phantoms only.

Each stage trains in its own process so the two can share a machine's cores:

    python benchmarks/train_default.py --stage 1 --out runs/default --iterations 2100
    python benchmarks/train_default.py --stage 2 --out runs/default --iterations 2000
    python benchmarks/train_default.py --assemble --out runs/default \
        --to fastcascade/weights/default

(The shipped model: both stages started with --iterations 4000 and were stopped at a
fixed time; their last checkpoints were at 2,100 and 2,000 iterations.)

Stage 2 trains on candidate regions C2 = ground-truth foreground dilated by r (the
trainer's ``ground_truth_candidates``) so that it need not wait for stage 1; the paper
trains it on stage 1's own candidates (``fastcascade train`` does). Rerunning a command
resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fastcascade.model import UNet3D
from fastcascade.model.checkpoint import save_cascade
from fastcascade.presets import default_config
from fastcascade.train.dataset import PhantomSource
from fastcascade.train.trainer import ground_truth_candidates, train_stage

CONFIG = dict(base_channels=6, levels=4, padding="same", spacing=3.0, tile=64)
SEEDS = {1: 10_000, 2: 20_000}  # phantom seeds; tests and the demo use seeds < 10,000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stage", type=int, choices=(1, 2))
    p.add_argument("--assemble", action="store_true", help="write the cascade from both stages")
    p.add_argument("--to", type=Path, default=None, help="with --assemble (default: OUT/model)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--iterations", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = default_config(**CONFIG)
    if args.assemble:
        nets = []
        for stage in (1, 2):
            ckpt = torch.load(args.out / f"stage{stage}.ckpt", weights_only=True)
            net = UNet3D.from_architecture(config.stage1.architecture)
            net.load_state_dict(ckpt["model"])
            nets.append(net)
        print(save_cascade(args.to or args.out / "model", config, *nets))
        return 0
    source = PhantomSource(
        spacing=config.spacing,
        seed=SEEDS[args.stage],
        pool_size=24,
        refresh_every=50,
        contrast_weights=(0.6, 0.4),
    )
    train_stage(
        args.stage,
        config,
        source,
        args.out,
        args.iterations,
        batch_size=2,
        lr=args.lr,
        seed=args.stage,
        candidate_fn=ground_truth_candidates(config) if args.stage == 2 else None,
        checkpoint_every=50,
        resume=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
