"""Compile the conv-BN-ReLU, dilation, stitching and warp kernels for sm_90 (H100) without a
GPU and check their resources.

Runs only with ``FASTCASCADE_TEST_COMPILE=1`` (a separate pytest process, where
``TRITON_INTERPRET`` is off: the interpreter and the compiler cannot share a process). Each
variant is compiled through Triton's ahead-of-time API with the argument specialisation
Triton applies at run time (16-byte divisibility of pointers and of integers that are
multiples of 16, integers equal to 1 as constants); ``ptxas -v`` on the PTX gives the
registers and spills, the kernel's metadata its shared memory. Uses only API that Triton 3.6
(the GPU stack) shares with 3.8: ``ASTSource(fn, signature, constexprs, attrs)``,
``GPUTarget``, ``CompiledKernel.asm`` and ``.metadata.shared``.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.compile,
    pytest.mark.skipif(
        os.environ.get("FASTCASCADE_TEST_COMPILE") != "1",
        reason="sm_90 compile checks run with FASTCASCADE_TEST_COMPILE=1 (separate process)",
    ),
]

SM90_SHARED_LIMIT = 232_448  # bytes of shared memory one block may use on an H100
SIZE = (30, 29, 27)  # input voxels: divisibility of the strides then comes from C_in only

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Variant:
    cin: int
    cout: int
    dtype: torch.dtype
    padding: str = "valid"
    precision: str = "tf32"
    int64: bool = False  # sizes and strides passed as i64, as for tensors past 2^31
    config: tuple | None = None  # a tuning candidate's (BLOCK_M, N, K, warps, stages)

    def __str__(self) -> str:
        extra = "-i64" if self.int64 else ""
        if self.config:
            extra += "-cand" + "x".join(map(str, self.config))
        prec = f"-{self.precision}" if self.dtype == torch.float32 else ""
        name = DTYPE_NAMES[self.dtype]
        return f"{self.cin}to{self.cout}-{name}{prec}-{self.padding}{extra}"


def _variants() -> list[Variant]:
    from fastcascade.ops.conv_bn_relu import CONFIGS, candidate_configs

    # Every committed layer shape in bf16 (what the table is tuned for), then the other
    # dtypes, modes, same padding and int64 sizes on a few shapes, first layer included.
    out = [Variant(cin, cout, torch.bfloat16) for cin, cout in sorted(CONFIGS)]
    out += [
        Variant(64, 64, torch.float16),
        Variant(1, 32, torch.float16),
        Variant(64, 64, torch.float32, precision="tf32"),
        Variant(64, 64, torch.float32, precision="ieee"),
        Variant(1, 32, torch.float32, precision="ieee"),
        Variant(768, 256, torch.float32, precision="tf32"),
        Variant(64, 64, torch.bfloat16, padding="same"),
        Variant(1, 32, torch.bfloat16, padding="same"),
        Variant(48, 16, torch.float16, padding="same"),
        Variant(64, 64, torch.bfloat16, int64=True),
    ]
    # The tuning step's candidates for one shape: they must compile (spills are reported,
    # not failed: the tuning run times them and keeps the fastest).
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    for cfg in candidate_configs(64, 64):
        out.append(Variant(64, 64, torch.bfloat16, config=tuple(cfg[k] for k in keys)))
    return out


def _ptxas() -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(bundled) if bundled.exists() else shutil.which("ptxas")


def compile_variant(v: Variant):
    """Compile one variant for sm_90; returns ``(compiled kernel, config)``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastcascade.ops.conv_bn_relu import configs as cbr_configs
    from fastcascade.ops.conv_bn_relu import kernel as cbr_kernel

    kernel = cbr_kernel._conv3x3x3_bias_relu_kernel
    cfg = cbr_configs.kernel_config(v.cin, v.cout, v.dtype)
    if v.config:
        keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
        cfg = dict(zip(keys, v.config, strict=True))
    constexprs = cbr_kernel._constexprs(v.cin, v.padding, v.dtype, v.precision, cfg)
    shrink = 0 if v.padding == "same" else 2
    xi, yi, zi = SIZE
    xo, yo, zo = (s - shrink for s in SIZE)
    ints = {
        "M": xo * yo * zo,
        "CIN": v.cin,
        "COUT": v.cout,
        "WN": -(-v.cout // 16) * 16,
        "XI": xi,
        "YI": yi,
        "ZI": zi,
        "XO": xo,
        "YO": yo,
        "ZO": zo,
        "sxn": v.cin * xi * yi * zi,
        "sxx": v.cin * yi * zi,
        "sxy": v.cin * zi,
        "sxz": v.cin,
    }
    element = DTYPE_NAMES[v.dtype]
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name == "b_ptr" else f"*{element}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif ints[name] == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i64" if v.int64 else "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, signature, constexprs, attrs)
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return compiled, cfg


def resource_report(compiled, tmp_path: Path) -> dict:
    """Registers and spills from ``ptxas -v`` (sm_90a, as Triton builds for H100), shared
    memory from the kernel's metadata, and the instructions that show the fast path."""
    ptx = compiled.asm["ptx"]
    report = {
        "shared_bytes": int(compiled.metadata.shared),
        "wgmma": ptx.count("wgmma.mma_async"),
        "cp_async": len(re.findall(r"cp\.async\.c[ag]", ptx)),
        "cubin_bytes": len(compiled.asm["cubin"]),
    }
    ptxas = _ptxas()
    if ptxas is None:
        return report
    (tmp_path / "k.ptx").write_text(ptx)
    out = subprocess.run(
        [ptxas, "-arch=sm_90a", "-v", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    report["registers"] = int(re.search(r"Used (\d+) registers", out).group(1))
    stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out).groups()
    report["spill_stores"], report["spill_loads"] = int(stores), int(loads)
    return report


@pytest.mark.parametrize("variant", _variants(), ids=str)
def test_kernel_compiles_for_sm90(variant, tmp_path, capsys):
    compiled, cfg = compile_variant(variant)
    assert compiled.asm["cubin"], "no cubin produced"
    r = resource_report(compiled, tmp_path)
    blocks = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}"
    launch = f"w{cfg['num_warps']}s{cfg['num_stages']}"
    with capsys.disabled():
        print(
            f"\n[sm_90] {str(variant):<28} {blocks:>10} {launch}: "
            f"regs {r.get('registers', '?'):>3}  spills {r.get('spill_stores', '?')}/"
            f"{r.get('spill_loads', '?')} B  smem {r['shared_bytes']:>6} B  "
            f"wgmma {r['wgmma']:>2}  cp.async {r['cp_async']:>3}",
            end="",
        )
    assert r["shared_bytes"] <= SM90_SHARED_LIMIT
    if "registers" in r:
        assert r["registers"] <= 255
        if variant.config is None:  # the committed configurations must not spill
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, "the kernel spills"
    flat = variant.cin < 16
    if not flat and not (variant.dtype == torch.float32 and variant.precision == "ieee"):
        # Hopper's tensor cores (exact fp32 multiplies on the FMA units instead) ...
        assert r["wgmma"] > 0, "tl.dot did not lower to wgmma"
    if not flat:
        # ... fed by an asynchronous copy pipeline (the loop was software-pipelined).
        assert r["cp_async"] > 0, "the K loop was not pipelined"


# -- the dilation's two kernels (fastcascade/ops/dilate.py) --------------------------------------
DILATE_PTRS = {
    "pack": {"m_ptr": None, "s_ptr": "*i32", "slot_ptr": "*i32"},
    "columns": {"s_ptr": "*i32", "col_ptr": "*i32", "out_ptr": "*u8"},
}
TRITON_POINTER_TYPES = {
    torch.uint8: "*u8",  # bool masks are passed as their bytes
    torch.int8: "*i8",
    torch.int16: "*i16",
    torch.int32: "*i32",
    torch.int64: "*i64",
}


@dataclass(frozen=True)
class DilateVariant:
    kernel: str  # "pack" or "columns"
    shape: tuple[int, int, int]
    radius: int
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    dtype: torch.dtype = torch.uint8  # the input's (pack kernel)
    int64: bool = False  # sizes passed as i64, as for volumes past 2^31 voxels

    def __str__(self) -> str:
        size = "x".join(map(str, self.shape))
        aniso = "" if self.spacing == (1.0, 1.0, 1.0) else "-" + "x".join(map(str, self.spacing))
        dtype = f"-{str(self.dtype).removeprefix('torch.')}" if self.kernel == "pack" else ""
        return f"{self.kernel}-{size}-r{self.radius}{aniso}{dtype}{'-i64' if self.int64 else ''}"


def _dilate_variants() -> list[DilateVariant]:
    out = []
    for kernel in ("pack", "columns"):
        out += [
            DilateVariant(kernel, (256, 256, 256), 3),  # aligned rows: vector accesses
            DilateVariant(kernel, (122, 101, 112), 3),  # case A's grid
            DilateVariant(kernel, (13, 9, 11), 1),  # odd sizes, wmax = 1 (a constant)
            DilateVariant(kernel, (13, 9, 11), 0),  # r = 0: one column, no z steps
            DilateVariant(kernel, (256, 256, 256), 3, int64=True),
        ]
    # the half-resolution working grid (unaligned rows), every HALO the launcher picks
    # (4, 8, 16, 32) on aligned and unaligned rows, every label dtype
    out += [DilateVariant(k, (256, 256, 150), 3, (1.5, 1.5, 2.0)) for k in ("pack", "columns")]
    out += [
        DilateVariant("pack", (40, 41, z), r, spacing)
        for z in (128, 130)
        for r, spacing in ((7, (8.0, 8.0, 1.0)), (9, (4.0, 4.0, 1.0)), (31, (40.0, 40.0, 1.0)))
    ]
    out += [
        DilateVariant("pack", (122, 101, 112), 3, dtype=d)
        for d in (torch.int8, torch.int16, torch.int32, torch.int64)
    ]
    return out


def compile_dilate_variant(v: DilateVariant):
    """Compile one of the dilation's kernels for sm_90 with the launcher's arguments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastcascade.ops import dilate as d

    element = d.structuring_element(v.radius, v.spacing)
    slot_of_w, columns = d._tables(element)
    wmax = len(slot_of_w) - 1
    x, y, z = v.shape
    nw = -(-z // 32)
    ints = {
        "X": x,
        "Y": y,
        "Z": z,
        "NW": nw,
        "plane_words": y * nw,
        "n_words": x * y * nw,
        "wmax": wmax,
        "n_cols": len(columns),
    }
    bx, bp, warps = d.gpu_blocks(v.kernel, aligned=z % 16 == 0)
    constexprs = {"BX": bx, "BP": bp}
    kernel = d._pack_z_kernel if v.kernel == "pack" else d._or_columns_kernel
    if v.kernel == "pack":
        constexprs["HALO"] = d._halo_voxels(wmax)
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = DILATE_PTRS[v.kernel][name] or TRITON_POINTER_TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif ints[name] == 1 and not v.int64:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i64" if v.int64 else "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


@pytest.mark.parametrize("variant", _dilate_variants(), ids=str)
def test_dilate_kernel_compiles_for_sm90(variant, tmp_path, capsys):
    compiled = compile_dilate_variant(variant)
    assert compiled.asm["cubin"], "no cubin produced"
    r = resource_report(compiled, tmp_path)
    ptx = compiled.asm["ptx"]
    vector = len(re.findall(r"(?:ld|st)\.global(?:\.\w+)*\.v[24]", ptx))
    with capsys.disabled():
        print(
            f"\n[sm_90] {str(variant):<44}: regs {r.get('registers', '?'):>3}  spills "
            f"{r.get('spill_stores', '?')}/{r.get('spill_loads', '?')} B  smem "
            f"{r['shared_bytes']:>5} B  vector accesses {vector:>2}",
            end="",
        )
    assert r["shared_bytes"] <= SM90_SHARED_LIMIT
    if "registers" in r:
        assert r["registers"] <= 255
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, "the kernel spills"
    if variant.shape[2] % 16 == 0 and variant.dtype == torch.uint8:
        # Rows that start 16-byte aligned: the voxels move as 16-byte vectors (the input
        # bytes in the pack kernel, the output bytes in the columns kernel).
        access = r"ld\.global\.v4" if variant.kernel == "pack" else r"st\.global\.v4"
        assert re.search(access, ptx), "the voxel accesses are not vectorised"


# -- the stitching kernels (fastcascade/ops/stitch.py) -------------------------------------------
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


@dataclass(frozen=True)
class StitchVariant:
    kernel: str  # "accumulate" or "finalize"
    channels: int
    shape: tuple[int, int, int]  # acc's spatial shape
    tile: tuple[int, int, int] = (0, 0, 0)  # accumulate: the tiles' size
    dtype: torch.dtype = torch.float32  # accumulate: the tiles'; finalize: out's
    weight: bool = True  # accumulate: a per-voxel weight
    mask: bool = False  # finalize: a candidate mask
    probs: bool = False  # finalize: probabilities written
    int64: bool = False  # sizes and strides passed as i64

    def __str__(self) -> str:
        size = "x".join(map(str, self.shape))
        if self.kernel == "accumulate":
            tile = "x".join(map(str, self.tile))
            extra = f"-{DTYPE_NAMES[self.dtype]}" + ("-w" if self.weight else "-now")
            name = f"accumulate-c{self.channels}-{tile}-into-{size}{extra}"
        else:
            extra = ("-mask" if self.mask else "") + (
                f"-probs-{DTYPE_NAMES[self.dtype]}" if self.probs else "-labels"
            )
            name = f"finalize-c{self.channels}-{size}{extra}"
        return name + ("-i64" if self.int64 else "")


def _stitch_variants() -> list[StitchVariant]:
    acc = [
        # the goal's 2,178 tiles of 44x44x28 into 8x256^3, and its dtypes
        StitchVariant("accumulate", 8, (256, 256, 256), (44, 44, 28)),
        StitchVariant("accumulate", 8, (256, 256, 256), (44, 44, 28), weight=False),
        StitchVariant("accumulate", 8, (256, 256, 256), (44, 44, 28), torch.float16),
        StitchVariant("accumulate", 8, (256, 256, 256), (44, 44, 28), torch.bfloat16),
        # the default model's 11 classes on odd sizes; a slab pass as one "tile"
        StitchVariant("accumulate", 11, (37, 29, 151), (13, 9, 7)),
        StitchVariant("accumulate", 11, (256, 256, 150), (256, 256, 150), weight=False),
        StitchVariant("accumulate", 8, (256, 256, 256), (44, 44, 28), int64=True),
    ]
    fin = [
        StitchVariant("finalize", 8, (256, 256, 256)),
        StitchVariant("finalize", 8, (256, 256, 256), mask=True),
        StitchVariant("finalize", 8, (256, 256, 256), mask=True, probs=True),
        StitchVariant("finalize", 11, (37, 29, 151), mask=True, probs=True),
        StitchVariant("finalize", 11, (256, 256, 150), probs=True, dtype=torch.float16),
        StitchVariant("finalize", 256, (64, 64, 64), mask=True, probs=True),
        StitchVariant("finalize", 8, (256, 256, 256), mask=True, probs=True, int64=True),
    ]
    return acc + fin


def _strides(shape) -> list[int]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return out[::-1]


def compile_stitch_variant(v: StitchVariant):
    """Compile one of the stitching kernels for sm_90 with its launcher's arguments
    (contiguous tensors, the GPU's block sizes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastcascade.ops import stitch as s

    c, (x, y, z) = v.channels, v.shape
    if v.kernel == "accumulate":
        tx, ty, tz = v.tile
        br, bz = s.blocks(tx * ty, tz)
        n_zb = -(-tz // bz)
        names = ("stb", "stc", "stx", "sty", "stz", "sac", "sax", "say", "saz", "swx", "swy")
        values = [c * tx * ty * tz, *_strides((c, tx, ty, tz)), *_strides((c, x, y, z))]
        strides = dict(zip(names + ("swz",), values + _strides((x, y, z)), strict=True))
        ints = dict(
            C=c, X=x, Y=y, Z=z, TY=ty, TZ=tz, n_rows=tx * ty, n_zb=n_zb,
            n_blocks=-(-tx * ty // br) * n_zb, **strides,
        )  # fmt: skip
        ptrs = {
            "tile_ptr": POINTER_TYPES[v.dtype],
            "origin_ptr": "*i64",
            "w_ptr": "*fp32",
            "acc_ptr": "*fp32",
            "wsum_ptr": "*fp32",
        }
        constexprs = {"HAS_WEIGHT": v.weight, "BR": br, "BZ": bz}
        kernel = s._accumulate_kernel
    else:
        br, bz = s.blocks(x * y, z)
        volume, channels = _strides((x, y, z)), _strides((c, x, y, z))
        names = ("sac", "sax", "say", "saz", "swx", "swy", "swz", "smx", "smy", "smz")
        names += ("spc", "spx", "spy", "spz")
        values = channels + volume + (volume if v.mask else [0, 0, 0])
        values += channels if v.probs else [0, 0, 0, 0]
        ints = dict(C=c, Y=y, Z=z, n_rows=x * y, n_zb=-(-z // bz))
        ints |= dict(zip(names, values, strict=True))
        out_type = POINTER_TYPES[v.dtype] if v.probs else "*fp32"
        ptrs = {
            "acc_ptr": "*fp32",
            "wsum_ptr": "*fp32",
            "mask_ptr": "*u8",
            "prob_ptr": out_type,
            "label_ptr": "*u8",
        }
        constexprs = {"HAS_MASK": v.mask, "PROBS": v.probs, "BR": br, "BZ": bz}
        kernel = s._finalize_kernel
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ptrs:
            signature[name] = ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif ints[name] == 1 and not v.int64:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i64" if v.int64 else "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, signature, constexprs, attrs)
    options = {"num_warps": s.GPU_WARPS}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


@pytest.mark.parametrize("variant", _stitch_variants(), ids=str)
def test_stitch_kernel_compiles_for_sm90(variant, tmp_path, capsys):
    compiled = compile_stitch_variant(variant)
    assert compiled.asm["cubin"], "no cubin produced"
    r = resource_report(compiled, tmp_path)
    ptx = compiled.asm["ptx"]
    atomics = re.findall(r"(?:atom|red)(?:\.\w+)*\.add\.f32", ptx)
    with capsys.disabled():
        print(
            f"\n[sm_90] {str(variant):<56}: regs {r.get('registers', '?'):>3}  spills "
            f"{r.get('spill_stores', '?')}/{r.get('spill_loads', '?')} B  smem "
            f"{r['shared_bytes']:>5} B  f32 atomic adds {len(atomics):>2}",
            end="",
        )
    assert r["shared_bytes"] <= SM90_SHARED_LIMIT
    if "registers" in r:
        assert r["registers"] <= 255
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, "the kernel spills"
    if variant.kernel == "accumulate":
        # Relaxed atomics: no fence or acquire/release ordering around each add.
        assert atomics and all(".relaxed" in a for a in atomics)
        assert "fence" not in ptx and "membar" not in ptx
    else:
        assert not atomics
        # IEEE division, as PyTorch divides (Triton's "/" would give div.full, 2 ulp).
        assert ("div.rn.f32" in ptx) == variant.probs


# -- the warp kernel (fastcascade/ops/warp.py) -----------------------------------------------------
WARP_POINTER_TYPES = {"fp32": "*fp32", "bf16": "*bf16", "u8": "*u8", "i64": "*i64"}


@dataclass(frozen=True)
class WarpVariant:
    mode: str  # "coords" (given positions), "fused" (rotation + B-spline), "rigid" (rotation)
    shape: tuple[int, int, int]
    image: str = "fp32"
    labels: str | None = "u8"

    def __str__(self) -> str:
        size = "x".join(map(str, self.shape))
        return f"{self.mode}-{size}-{self.image}-{self.labels or 'nolabels'}"


WARP_VARIANTS = [
    WarpVariant("fused", (256, 256, 256)),  # training: rotation + elastic, image + labels
    WarpVariant("coords", (256, 256, 256)),
    WarpVariant("fused", (132, 132, 116), labels="i64"),  # the paper's tile, unaligned rows
    WarpVariant("fused", (256, 256, 150)),
    WarpVariant("rigid", (256, 256, 256), image="bf16", labels=None),
    WarpVariant("fused", (1300, 1300, 1300)),  # past 2^31 voxels: int64 offsets
    WarpVariant("coords", (1300, 1300, 1300)),
]


def compile_warp_variant(v: WarpVariant):
    """Compile the warp kernel for sm_90 with the launcher's constants and the argument
    specialisation Triton applies at run time; returns ``(compiled, int64)``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastcascade.ops import warp

    tile = warp._tile(v.shape)
    grid = warp.control_grid_shape(v.shape, 32)
    int64 = warp._needs_int64(v.shape, v.shape, tile)
    tiles = [-(-n // b) for n, b in zip(v.shape, tile, strict=True)]
    n = math.prod(v.shape)
    ints = dict(zip(("X", "Y", "Z"), v.shape, strict=True))
    ints |= dict(zip(("OX", "OY", "OZ"), v.shape, strict=True))
    ints |= {"C": 1, "GY": grid[1], "GZ": grid[2], "n_in": n, "n_out": n}
    ints |= {"n_ctrl": math.prod(grid), "tiles_y": tiles[1], "tiles_z": tiles[2], "label_fill": 0}
    constexprs = {
        "HAS_LABELS": v.labels is not None,
        "HAS_COORDS": v.mode == "coords",
        "HAS_ELASTIC": v.mode == "fused",
        "INT64": int64,
        **dict(zip(("BX", "BY", "BZ"), tile, strict=True)),
    }
    pointers = {"img_ptr": v.image, "out_img_ptr": v.image}
    pointers |= {"lab_ptr": v.labels or "u8", "out_lab_ptr": v.labels or "u8"}
    kernel = warp._warp_kernel
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = WARP_POINTER_TYPES[pointers.get(name, "fp32")]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("inv_spacing", "fill_value"):
            signature[name] = "fp32"
        elif ints[name] == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i64" if ints[name] > 2**31 - 1 else "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, signature, constexprs, attrs)
    options = {"num_warps": warp._NUM_WARPS}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options), int64


@pytest.mark.parametrize("variant", WARP_VARIANTS, ids=str)
def test_warp_kernel_compiles_for_sm90(variant, tmp_path, capsys):
    compiled, int64 = compile_warp_variant(variant)
    assert compiled.asm["cubin"], "no cubin produced"
    assert int64 == (math.prod(variant.shape) > 2**31 - 1)
    r = resource_report(compiled, tmp_path)
    ptx = compiled.asm["ptx"]
    divisions = len(re.findall(r"\b(?:div|rem)\.[su]64", ptx))
    vector = len(re.findall(r"(?:ld|st)\.global(?:\.\w+)*\.v[24]", ptx))
    with capsys.disabled():
        print(
            f"\n[sm_90] warp {str(variant):<36}{' int64' if int64 else ' int32'}: regs "
            f"{r.get('registers', '?'):>3}  spills {r.get('spill_stores', '?')}/"
            f"{r.get('spill_loads', '?')} B  64-bit div/rem {divisions}  vector accesses {vector}",
            end="",
        )
    assert r["shared_bytes"] <= SM90_SHARED_LIMIT
    if "registers" in r:
        assert r["registers"] <= 255
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, "the kernel spills"
        # At most 128 registers per thread keeps two blocks of 8 warps on each SM: the
        # gathers need warps in flight.
        assert r["registers"] <= 128
    if not int64:
        # Voxel indices come from the tile's axes, not from dividing a flat index.
        assert divisions == 0, "64-bit division in the int32 variant"
    if variant.mode == "coords" and variant.shape[2] % 16 == 0:
        # Aligned rows: each thread reads its voxels' positions as one vector (2 voxels
        # per thread with 8 warps: 8 bytes).
        assert re.search(r"ld\.global(?:\.\w+)*\.v[24]", ptx), "positions not vectorised"
