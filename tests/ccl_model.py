"""A Python model of ``csrc/ccl.cu``'s kernels, run with interleaved threads.

Each CUDA thread is a generator that mirrors the kernel's code line by line (the same
tiles, steps, ``find_root``/``unite`` with atomicMin, face merges and compression) and
yields before every access to shared or global memory, and at every ``__syncthreads``.
A seeded scheduler then advances one thread of any block at a time, picked at random: the
interleavings a GPU may produce, under sequential consistency (an atomicMin is one step).
Barriers hold a block's threads until all of them arrive.

``label_model`` is what ``tests/test_ops_ccl.py`` puts where the compiled kernels would run
(``fastcascade.ops.ccl.extension``), so that the code around them is tested on the CPU.
The host build of the kernels' own C++ (``tests/csrc/ccl_host.cu``) checks the other half:
that this model and the CUDA source say the same.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

import numpy as np

BARRIER = object()  # what a thread yields at __syncthreads


@dataclass(frozen=True)
class Grid:
    nx: int
    ny: int
    nz: int
    tx: int
    ty: int
    tz: int
    connect: int  # bit 0: x neighbours, bit 1: y, bit 2: z
    invert: bool

    @cached_property
    def tiles(self) -> tuple[int, int, int]:
        """Tiles along x, y and z (edge tiles overhang the volume)."""
        sizes = ((self.nx, self.tx), (self.ny, self.ty), (self.nz, self.tz))
        return tuple(-(-n // t) for n, t in sizes)


@dataclass(frozen=True)
class Voxel:
    x: int
    y: int
    z: int
    i: int
    lx: int
    ly: int
    lz: int
    l: int  # noqa: E741  (the kernel's name)
    inside: bool


def voxel_at(g: Grid, block: int, lx: int, ly: int, lz: int) -> Voxel:
    _, tiles_y, tiles_z = g.tiles
    bz, by, bx = block % tiles_z, (block // tiles_z) % tiles_y, block // (tiles_z * tiles_y)
    x, y, z = bx * g.tx + lx, by * g.ty + ly, bz * g.tz + lz
    inside = x < g.nx and y < g.ny and z < g.nz
    return Voxel(
        x, y, z, (x * g.ny + y) * g.nz + z, lx, ly, lz, (lx * g.ty + ly) * g.tz + lz, inside
    )


def load(array: np.ndarray, index: int):
    yield
    return int(array[index])


def find_root(parent: np.ndarray, a: int, base: int):
    while True:
        p = yield from load(parent, a - base)
        if p == a:
            return a
        a = p


def unite(parent: np.ndarray, a: int, b: int, base: int):
    while True:
        a = yield from find_root(parent, a, base)
        b = yield from find_root(parent, b, base)
        if a == b:
            return
        if a > b:
            a, b = b, a
        yield  # atomicMin: read and write in one step
        old = int(parent[b - base])
        parent[b - base] = min(old, a)
        if old == b:
            return
        b = old


def local_thread(g: Grid, mask: np.ndarray, labels: np.ndarray, tile: np.ndarray, v: Voxel):
    """One thread of ``ccl_local``: init, barrier, union in the tile, barrier, write."""
    yield  # step 1 (local_init)
    foreground = v.inside and bool(mask[v.i]) != g.invert
    tile[v.l] = v.l if foreground else -1
    yield BARRIER
    if (yield from load(tile, v.l)) >= 0:  # step 2 (local_union)
        sx, sy = g.ty * g.tz, g.tz
        for bit, has_neighbour, step in ((1, v.lx > 0, sx), (2, v.ly > 0, sy), (4, v.lz > 0, 1)):
            if g.connect & bit and has_neighbour and (yield from load(tile, v.l - step)) >= 0:
                yield from unite(tile, v.l, v.l - step, 0)
    yield BARRIER
    if not v.inside:  # step 3 (local_write)
        return
    if (yield from load(tile, v.l)) < 0:
        yield
        labels[v.i] = 0
        return
    r = yield from find_root(tile, v.l, 0)
    rx, ry, rz = r // (g.ty * g.tz), (r // g.tz) % g.ty, r % g.tz
    root = ((v.x - v.lx + rx) * g.ny + (v.y - v.ly + ry)) * g.nz + (v.z - v.lz + rz)
    yield
    labels[v.i] = root + 1


def merge_thread(g: Grid, labels: np.ndarray, v: Voxel):
    """One thread of ``ccl_merge`` (``merge_faces``)."""
    if not v.inside or (yield from load(labels, v.i)) == 0:
        return
    a = v.i + 1
    for bit, on_face, stride in (
        (1, v.lx == 0 and v.x > 0, g.ny * g.nz),
        (2, v.ly == 0 and v.y > 0, g.nz),
        (4, v.lz == 0 and v.z > 0, 1),
    ):
        if g.connect & bit and on_face:
            n = v.i - stride
            if (yield from load(labels, n)) != 0:
                yield from unite(labels, a, n + 1, 1)


def compress_thread(labels: np.ndarray, i: int):
    """One thread of ``ccl_compress``."""
    if (yield from load(labels, i)) != 0:
        root = yield from find_root(labels, i + 1, 1)
        yield
        labels[i] = root


def run(blocks: list[list], rng: random.Random) -> None:
    """Run one launch: ``blocks`` is a list of blocks, each a list of thread generators."""
    runnable = [(b, thread) for b, threads in enumerate(blocks) for thread in threads]
    alive = [len(threads) for threads in blocks]
    waiting: list[list] = [[] for _ in blocks]

    def release(b: int) -> None:
        if waiting[b] and len(waiting[b]) == alive[b]:
            runnable.extend((b, t) for t in waiting[b])
            waiting[b].clear()

    while runnable:
        k = int(rng.random() * len(runnable))
        runnable[k], runnable[-1] = runnable[-1], runnable[k]
        b, thread = runnable.pop()
        try:
            event = next(thread)
        except StopIteration:
            alive[b] -= 1
            release(b)
            continue
        if event is BARRIER:
            waiting[b].append(thread)
            release(b)
        else:
            runnable.append((b, thread))
    assert not any(waiting), "a thread waits at a barrier that the others never reach"


def label_model(
    mask: np.ndarray,
    in_plane: bool,
    invert: bool,
    tile: tuple[int, int, int],
    seed: int = 0,
    merge: bool = True,
) -> np.ndarray:
    """int32 labels of ``mask`` (bool ``(x, y, z)``) as ``fc_ccl_label`` computes them;
    ``merge=False`` leaves out ``ccl_merge`` (to show that the tests need it)."""
    nx, ny, nz = mask.shape
    labels = np.full(mask.size, -7, dtype=np.int32)  # a voxel left unwritten shows up
    if mask.size == 0:
        return labels.reshape(mask.shape)
    g = Grid(nx, ny, nz, *tile, connect=3 if in_plane else 7, invert=bool(invert))
    flat = np.ascontiguousarray(mask).reshape(-1)
    rng = random.Random(seed)
    n_blocks = int(np.prod(g.tiles))
    threads = [(lx, ly, lz) for lx in range(g.tx) for ly in range(g.ty) for lz in range(g.tz)]
    tiles = [np.zeros(len(threads), dtype=np.int32) for _ in range(n_blocks)]
    run(
        [
            [local_thread(g, flat, labels, tiles[b], voxel_at(g, b, *t)) for t in threads]
            for b in range(n_blocks)
        ],
        rng,
    )
    if merge:
        run(
            [
                [merge_thread(g, labels, voxel_at(g, b, *t)) for t in threads]
                for b in range(n_blocks)
            ],
            rng,
        )
    block = 256
    run(
        [
            [compress_thread(labels, i) for i in range(s, min(s + block, mask.size))]
            for s in range(0, mask.size, block)
        ],
        rng,
    )
    return labels.reshape(mask.shape)
