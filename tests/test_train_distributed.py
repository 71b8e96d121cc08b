"""Training on several processes: two gloo processes on the CPU against one process that
accumulates the gradients of the same per-rank micro-batches; checkpoints written by
rank 0 alone; a resume under two processes continues exactly."""

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from tiny_models import train_config, two_organ_volume

import fastcascade.train.trainer as trainer
from fastcascade.model.checkpoint import load_training_checkpoint
from fastcascade.model.unet3d import UNet3D
from fastcascade.ops.intensity import apply_window
from fastcascade.ops.morphology import body_mask
from fastcascade.train import distributed
from fastcascade.train.dataset import Volume
from fastcascade.train.loss import weighted_cross_entropy
from fastcascade.train.sampling import SubvolumeSampler

SEED = 5
WORLD = 2
BATCH = 2
LR = 1e-2
TILE = 16
SHAPE = (24, 22, 20)


def _volume(seed):
    """A box of soft tissue in air with two organs (distinct HU)."""
    return two_organ_volume(seed, SHAPE, ((4, 12), (4, 12), (3, 10)), ((13, 20), (10, 18), (9, 16)))


class Source:
    """Three volumes on a 3 mm grid, drawn with their own generator."""

    def __init__(self, seed):
        self.volumes = [Volume(*_volume(i), (3.0, 3.0, 3.0), f"v{i}") for i in range(3)]
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self):
        return self.volumes[int(torch.randint(3, (1,), generator=self.generator))]

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def flip_augment(image, labels, generator):
    """A cheap random augmentation that consumes its generator."""
    for axis in range(3):
        if bool(torch.rand((), generator=generator) < 0.5):
            image, labels = image.flip(axis + 1), labels.flip(axis)
    return image, labels


def _train(rank, out, iterations, resume=False, log=None, **kw):
    return trainer.train_stage(
        1,
        train_config(tile=TILE),
        Source(distributed.rank_seed(SEED, rank)),
        out,
        iterations,
        batch_size=BATCH,
        lr=LR,
        seed=SEED,
        checkpoint_every=2,
        log=log,
        resume=resume,
        **kw,
    )


def _worker(rank, port, root):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    root = Path(root)
    saves = []
    real_save = trainer.save_training_checkpoint
    trainer.save_training_checkpoint = lambda path, state: (
        saves.append(state["iteration"]) or real_save(path, state)
    )
    lines = []
    got_rank, world, _ = distributed.init_from_env("cpu")
    assert (got_rank, world) == (rank, WORLD)
    try:
        plain = dict(augment=False, intensity=False, cut_margin=0)
        _train(rank, root / "accumulate", 2, **plain)
        _train(rank, root / "full", 3, augment=flip_augment)
        _train(rank, root / "part", 2, augment=flip_augment)
        _train(rank, root / "part", 3, resume=True, log=lines.append, augment=flip_augment)
    finally:
        distributed.shutdown()
    (root / f"rank{rank}.json").write_text(json.dumps({"saves": saves, "log": lines}))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    return root


def _reference():
    """One process, two micro-batches per step (rank 1's, then rank 0's), each rank's
    data drawn as that rank's trainer draws it; gradients accumulated, mean over ranks;
    BatchNorm running statistics from rank 0's micro-batch alone (as DDP keeps them)."""
    config = train_config(tile=TILE)
    arch = config.stage1.architecture
    torch.manual_seed(SEED)
    model = UNet3D.from_architecture(arch).to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    tile = (TILE,) * 3
    streams = []
    for rank in range(WORLD):
        data_seed = distributed.rank_seed(SEED, rank)
        sampler = SubvolumeSampler(
            tile, model.output_size(tile), seed=trainer._derived_seed(data_seed, 1)
        )
        streams.append((Source(data_seed), sampler))

    def micro_batch(rank):
        source, sampler = streams[rank]
        images, labels, masks = [], [], []
        for _ in range(BATCH):
            v = source.draw()
            region = body_mask(v.image_hu, config.body_threshold)
            patch = sampler.sample(v.image_hu, v.labels, region, region)
            images.append(apply_window(patch.image_hu, config.stage1.window))
            labels.append(patch.labels.long())
            masks.append(patch.region)
        x = torch.stack(images)[:, None].contiguous(memory_format=torch.channels_last_3d)
        return x, torch.stack(labels), torch.stack(masks)

    model.train()
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        before = {k: b.clone() for k, b in model.named_buffers()}
        total = 0.0
        for rank in (1, 0):
            if rank == 0:  # rank 0's statistics are the ones DDP keeps
                for k, b in model.named_buffers():
                    b.copy_(before[k])
            x, y, m = micro_batch(rank)
            loss = weighted_cross_entropy(model(x), y, m) / WORLD
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        losses.append(total)
    return model, losses


def test_two_processes_equal_one_accumulating_the_same_micro_batches(runs):
    state = load_training_checkpoint(runs / "accumulate" / "stage1.ckpt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same reductions, the same rounding
    try:
        reference, losses = _reference()
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(state["losses"], losses, rtol=1e-5)
    ref = reference.state_dict()
    assert state["model"].keys() == ref.keys()
    initial = UNet3D.from_architecture(train_config(tile=TILE).stage1.architecture).state_dict()
    checked = off = count = 0
    for k, value in ref.items():
        # A convolution's bias right before BatchNorm (training mode) cancels: its true
        # gradient is zero, Adam turns the rounding noise into steps of +-lr, and the
        # running mean carries them. Neither changes the training-mode output (below).
        if k.endswith(("conv.bias", "bn.running_mean")):
            continue
        # Adam steps every weight by about lr (1e-2) whatever its gradient's size, so
        # rounding noise in a tiny gradient moves a few weights by a fraction of lr;
        # other micro-batches would move most weights by up to 2 lr.
        diff = (state["model"][k].float() - value.float()).abs()
        assert float(diff.max()) < LR / 10, k
        off += int((diff > 1e-4).sum())
        count += diff.numel()
        checked += int(not torch.equal(value, initial[k]))
    assert off < 0.02 * count, (off, count)
    assert checked > len(ref) // 3  # the weights did train
    ddp = UNet3D.from_architecture(train_config(tile=TILE).stage1.architecture)
    ddp.load_state_dict(state["model"])
    x = torch.randn(2, 1, TILE, TILE, TILE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference.train()(x)
        change = float((want - initial_output(x)).abs().max())
        err = float((ddp.train()(x) - want).abs().max())
    assert change > 1e-2 and err < 0.1 * change, (err, change)  # training moved it alike


def initial_output(x):
    torch.manual_seed(SEED)
    return UNet3D.from_architecture(train_config(tile=TILE).stage1.architecture).train()(x)


def test_rank0_alone_writes_checkpoints_holding_every_rank_state(runs):
    logs = [json.loads((runs / f"rank{r}.json").read_text()) for r in range(WORLD)]
    # accumulate: the end (2); full: 2 and 3; part: 2; the resume: 3
    assert logs[0]["saves"] == [2, 2, 3, 2, 3]
    assert logs[1]["saves"] == []
    state = load_training_checkpoint(runs / "full" / "stage1.ckpt")
    assert state["world_size"] == WORLD and len(state["ranks"]) == WORLD
    a, b = state["ranks"]
    assert not torch.equal(a["source"]["generator"], b["source"]["generator"])
    assert not torch.equal(a["augment_generator"], b["augment_generator"])
    assert torch.equal(a["sampler"]["generator"], state["sampler"]["generator"])
    assert not torch.equal(a["sampler"]["generator"], b["sampler"]["generator"])


def test_resume_under_two_processes_continues_exactly(runs):
    logs = [json.loads((runs / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert any("resumed from" in line for line in logs[0]["log"])
    assert logs[1]["log"] == []  # one process speaks for all
    full = load_training_checkpoint(runs / "full" / "stage1.ckpt")
    part = load_training_checkpoint(runs / "part" / "stage1.ckpt")
    assert part["iteration"] == full["iteration"] == 3
    assert part["losses"] == full["losses"]
    for k, value in full["model"].items():
        assert torch.equal(part["model"][k], value), k


def test_a_checkpoint_of_two_processes_is_not_resumed_by_one(runs):
    with pytest.raises(ValueError, match="written by 2 training process"):
        _train(0, runs / "full", 4, resume=True, augment=flip_augment)


def test_rank_seed():
    assert distributed.rank_seed(9, 0) == 9
    seeds = {distributed.rank_seed(9, r) for r in range(4)}
    assert len(seeds) == 4
    assert distributed.rank_seed(9, 1) == distributed.rank_seed(9, 1)
    with pytest.raises(ValueError, match="rank"):
        distributed.rank_seed(9, -1)


def test_environment_without_a_world_initialises_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env("cpu") == (0, 1, torch.device("cpu"))
    assert distributed.rank_and_world() == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "zero")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        distributed.world_size_from_env()


def _cli_worker(rank, port, out):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from fastcascade import cli

    argv = ["train", "--out", out, "--base-channels", "2", "--levels", "2", "--padding"]
    argv += ["same", "--tile", "16", "--iterations", "2", "--pool-size", "1", "--threads"]
    argv += ["1", "--batch-size", "1", "--quiet", "--device", "cpu"]
    assert cli.main(argv) == 0


def test_the_train_command_under_two_processes(tmp_path):
    """``fastcascade train`` as ``torchrun`` starts it: the process group from the
    environment, each rank on its own phantoms, one model written."""
    out = tmp_path / "run"
    mp.spawn(_cli_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    record = json.loads((out / "model.json").read_text())["training"]
    assert record["processes"] == WORLD and record["batch_size"] == 1
    for stage in (1, 2):
        state = load_training_checkpoint(out / f"stage{stage}.ckpt")
        assert state["iteration"] == 2 and state["world_size"] == WORLD
        a, b = (r["source"] for r in state["ranks"])
        assert a["seed"] != b["seed"]  # each rank's own mix of sources...
        assert a["sources"]["phantom"]["seed"] == 0  # rank 0's: --seed, as one process
        assert b["sources"]["phantom"]["pool_seeds"] != a["sources"]["phantom"]["pool_seeds"]
