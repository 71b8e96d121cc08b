"""Benchmarks of the fused conv-BN-ReLU: per layer of UNet3D, the whole tile, and tuning.

Run through ``benchmarks/run.py --area kernels`` or ``--area tune`` (see
``benchmarks/gpu_check.sh``). Providers, timed in the same run:

- ``fastcascade``: our Triton kernel (``conv_bn_relu(..., backend="triton")``; the timed
  region includes the cached BatchNorm fold lookup and the launch);
- ``cudnn_fused``: ``torch.cudnn_convolution_relu`` with BatchNorm folded (same lookup);
  where a fused path has no kernel for a shape it runs conv3d + ReLU instead, and the
  record's ``fallback`` says why (``meta.fallbacks`` lists every such shape of the run);
- ``eager``: ``relu(bn(conv(x)))`` in PyTorch, module and input in the dtype, channels-last;
- ``compile``: ``torch.compile`` of that eager block (a few shapes; cold start recorded).

Whole tile (the paper's network, 132x132x116 → 44x44x28): the network in eval mode under
autocast, input channels-last, through the committed table (``fastcascade``), through our
kernel everywhere (``fastcascade_triton``), through cuDNN fused everywhere
(``fastcascade_cudnn``), PyTorch's path (``eager``) and, at batch 2 in bf16, that path
compiled (``compile``). FLOPs count the convolutions (2 per multiply-add).

Tuning the block sizes (``--area tune``) is ``bench_tune.py``.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import common
import torch
import torch.nn.functional as F
from run import markdown_table, measure

import fastcascade.model.unet3d as unet3d
from fastcascade.model import ConvBNReLU, UNet3D
from fastcascade.ops import conv_bn_relu as cbr
from fastcascade.ops.conv_bn_relu import fallback
from fastcascade.presets import PAPER_CLASS_NAMES

PAPER_TILE = (132, 132, 116)
CPU_TILE = (18, 18, 18)  # smallest input of a 2-level valid U-Net: the dry run's "tile"

#: Dense peaks (FLOP/s by dtype, bytes/s) for the fraction-of-peak and roofline columns.
PEAKS = {
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12, "bw": 2.0e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12, "bw": 3.35e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12, "bw": 4.8e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12, "bw": 2.0e12},
}
DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "tf32": torch.float32,
}


def device_peaks(device_name: str) -> dict | None:
    return next((v for k, v in PEAKS.items() if k in device_name), None)


# -- layer shapes --------------------------------------------------------------------------
@dataclass(frozen=True)
class Layer:
    """One conv-BN-ReLU as it runs in a network: input (C_in, X, Y, Z) → C_out."""

    cin: int
    cout: int
    size: tuple[int, int, int]
    padding: str = "valid"
    count: int = 1  # occurrences in the network at this size
    name: str = ""

    def out_size(self) -> tuple[int, ...]:
        shrink = 0 if self.padding == "same" else 2
        return tuple(s - shrink for s in self.size)

    def flops(self, batch: int) -> float:
        return 2.0 * batch * math.prod(self.out_size()) * self.cout * 27 * self.cin

    def bytes(self, batch: int, element: int) -> float:
        x = batch * self.cin * math.prod(self.size)
        y = batch * self.cout * math.prod(self.out_size())
        return float(element * (x + y + 27 * self.cin * self.cout))

    def label(self) -> str:
        x, y, z = self.size
        return f"{self.name}{self.cin}→{self.cout} @{x}x{y}x{z} {self.padding}"


def unet_layers(base: int, tile: tuple[int, int, int], levels: int = 4) -> list[Layer]:
    """Every conv-BN-ReLU of ``UNet3D(base_channels=base, levels)`` on ``tile``, in order,
    identical ones merged (``count``); shapes traced on the meta device."""
    with torch.device("meta"):
        net = UNet3D(num_classes=len(PAPER_CLASS_NAMES), base_channels=base, levels=levels)
    seen: list[tuple] = []

    def hook(module, inputs, output):
        seen.append((module.conv.in_channels, module.conv.out_channels, tuple(inputs[0].shape[2:])))

    for m in net.modules():
        if isinstance(m, ConvBNReLU):
            m.register_forward_hook(hook)
    with torch.device("meta"):
        net(torch.empty(1, 1, *tile))
    layers: dict[tuple, int] = {}
    for key in seen:
        layers[key] = layers.get(key, 0) + 1
    return [Layer(ci, co, size, count=n, name=f"b{base} ") for (ci, co, size), n in layers.items()]


def tile_flops(tile: tuple[int, int, int], base_channels: int = 32, levels: int = 4) -> float:
    """FLOPs of one forward pass over ``tile`` (3x3x3 convs, up-convolutions, classifier)."""
    with torch.device("meta"):
        net = UNet3D(1, len(PAPER_CLASS_NAMES), base_channels, levels)
    total = [0.0]

    def hook(module, inputs, output):
        k = math.prod(module.kernel_size)
        if isinstance(module, torch.nn.ConvTranspose3d):  # each input voxel feeds k outputs
            total[0] += 2.0 * inputs[0].numel() * module.out_channels * k
        else:
            total[0] += 2.0 * output.numel() * module.in_channels * k

    for m in net.modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            m.register_forward_hook(hook)
    with torch.device("meta"):
        net(torch.empty(1, 1, *tile))
    return total[0]


# -- helpers ----------------------------------------------------------------------------
def _random_block(layer: Layer, device: torch.device, seed: int = 0) -> ConvBNReLU:
    torch.manual_seed(seed)
    m = ConvBNReLU(layer.cin, layer.cout, layer.padding)
    with torch.no_grad():  # running statistics other than (0, 1): folding does real work
        m.bn.running_mean.normal_(0, 0.1)
        m.bn.running_var.uniform_(0.5, 1.5)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.normal_(0, 0.1)
    return m.to(device).eval()


def _derived(rec: dict, flops: float, nbytes: float, peaks: dict | None, precision: str) -> dict:
    t = rec.get("median_ms")
    if t is None:
        return rec
    rec["tflops"] = flops / (t * 1e-3) / 1e12
    if peaks:
        peak = peaks[precision]
        rec["frac_peak"] = rec["tflops"] * 1e12 / peak
        rec["roofline_ms"] = max(flops / peak, nbytes / peaks["bw"]) * 1e3
        rec["frac_roofline"] = rec["roofline_ms"] / t
        rec["bound"] = "compute" if flops / peak >= nbytes / peaks["bw"] else "memory"
    return rec


def _try(fn):
    """Run one provider; a failure is recorded, not raised, so the others still report."""
    try:
        return fn(), None
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return None, f"out of memory: {str(e).splitlines()[0]}"
    except Exception as e:  # noqa: BLE001 - a broken provider must not hide the others' data
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


@contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _eager_block(t, m):
    return F.relu(m.bn(m.conv(t)))


def _padding(m: ConvBNReLU) -> str:
    return "same" if tuple(m.conv.padding) == (1, 1, 1) else "valid"


def _all_providers(provider: str) -> dict:
    return {k: {**v, "provider": provider} for k, v in cbr.CONFIGS.items()}


# -- per layer -----------------------------------------------------------------------------
def bench_layer(layer, batch, dtype_name, rec, *, cuda, peaks, compile_it, reps):
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[dtype_name]
    warmup = 3 if cuda else 1
    m = _random_block(layer, device)
    eager = copy.deepcopy(m).to(dtype)
    x = torch.randn(batch, layer.cin, *layer.size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    precision = "tf32" if dtype_name == "tf32" else "ieee"
    pad = 1 if layer.padding == "same" else 0
    providers = {
        "fastcascade": lambda: cbr.conv_bn_relu(x, m, backend="triton", input_precision=precision),
        "eager": lambda: _eager_block(x, eager),
    }
    if cuda:
        providers["cudnn_fused"] = lambda: cbr.conv_bn_relu(x, m, backend="cudnn")
    if compile_it:
        # On the CPU dry run, aot_eager: the same tracing path without a C++ toolchain.
        backend = "inductor" if cuda else "aot_eager"
        compiled = torch.compile(lambda t: _eager_block(t, eager), backend=backend)
        providers["compile"] = lambda: compiled(x)
    with torch.no_grad():
        ref = providers["eager"]().float()
        base = dict(
            op="conv_bn_relu",
            layer=layer.label(),
            shape=f"{batch}x{layer.cin}x{'x'.join(map(str, layer.size))}→{layer.cout}",
            dtype=dtype_name,
            batch=batch,
            gflop=layer.flops(batch) / 1e9,
        )
        for name, fn in providers.items():
            entry = dict(base, provider=name)
            start = time.perf_counter()
            out, err = _try(fn)  # the first call compiles (torch.compile, Triton's JIT)
            if name == "compile":
                entry["compile_s"] = time.perf_counter() - start
            if err is None:
                entry["max_abs_err_vs_eager"] = (out.float() - ref).abs().max().item()
                timing, err = _try(lambda fn=fn: measure(fn, cuda=cuda, warmup=warmup, reps=reps))
                if timing:
                    entry.update(timing)
            if err:
                entry["error"] = err
            path = {"fastcascade": "triton", "cudnn_fused": "cudnn"}.get(name)
            unfused = path and fallback.reason(path, x, layer.cout, pad)
            if unfused:  # no fused kernel for this shape: the time is conv3d + ReLU's
                entry["fallback"] = unfused
            elt = torch.finfo(dtype).bits // 8
            _derived(entry, layer.flops(batch), layer.bytes(batch, elt), peaks, dtype_name)
            rec.add(**entry)


# -- whole tile -----------------------------------------------------------------------------
def bench_tile(net, tile, batch, dtype_name, rec, *, cuda, peaks, compile_it, reps, flops):
    device = torch.device("cuda" if cuda else "cpu")
    warmup = 2 if cuda else 1
    x = torch.randn(batch, 1, *tile, device=device).contiguous(memory_format=torch.channels_last_3d)
    dtype = DTYPES[dtype_name]
    autocast = dtype != torch.float32
    precision_ctx = torch.backends.cudnn.flags(enabled=True, allow_tf32=dtype_name == "tf32")

    def run():
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            return net(x)

    def through(configs=None, eager=False):
        def fn():
            with _patched(cbr.configs, "CONFIGS", configs if configs is not None else cbr.CONFIGS):
                if eager:
                    with _patched(unet3d, "conv_bn_relu", _eager_block):
                        return run()
                if not cuda:  # the CPU never takes the fused path by itself: force it
                    fused = lambda self, t: cbr.conv_bn_relu(t, self, backend="triton")  # noqa: E731
                    with _patched(ConvBNReLU, "forward", fused):
                        return run()
                return run()

        return fn

    providers = {"fastcascade": through()}
    if cuda:
        providers["fastcascade_triton"] = through(_all_providers("triton"))
        providers["fastcascade_cudnn"] = through(_all_providers("cudnn"))
    providers["eager"] = through(eager=True)
    if compile_it:
        backend = "inductor" if cuda else "aot_eager"
        compiled = torch.compile(run, backend=backend)

        def compiled_eager():
            with _patched(unet3d, "conv_bn_relu", _eager_block):
                return compiled()

        providers["compile"] = compiled_eager
    with torch.no_grad(), precision_ctx:
        ref = providers["eager"]().float()
        base = dict(
            op="unet_tile",
            layer=f"UNet3D tile {'x'.join(map(str, tile))}",
            shape=f"{batch}x1x{'x'.join(map(str, tile))}",
            dtype=dtype_name,
            batch=batch,
            gflop=flops * batch / 1e9,
        )
        for name, fn in providers.items():
            entry = dict(base, provider=name)
            start = time.perf_counter()
            out, err = _try(fn)  # the first call compiles (torch.compile, Triton's JIT)
            if name == "compile":
                entry["compile_s"] = time.perf_counter() - start
            if err is None:
                entry["max_abs_err_vs_eager"] = (out.float() - ref).abs().max().item()
                entry["argmax_agree_vs_eager"] = (
                    (out.argmax(1) == ref.argmax(1)).float().mean().item()
                )
                timing, err = _try(lambda fn=fn: measure(fn, cuda=cuda, warmup=warmup, reps=reps))
                if timing:
                    entry.update(timing)
            if err:
                entry["error"] = err
            _derived(entry, flops * batch, 0.0, peaks, dtype_name)
            rec.add(**entry)


# -- areas ----------------------------------------------------------------------------------
COLUMNS = [
    ("op", "layer", ""),
    ("shape", "shape", ""),
    ("dtype", "dtype", ""),
    ("provider", "provider", ""),
    ("median ms", "median_ms", ".3f"),
    ("p20", "p20_ms", ".3f"),
    ("p80", "p80_ms", ".3f"),
    ("TFLOP/s", "tflops", ".1f"),
    ("% peak", "frac_peak", ".1%"),
    ("roofline ms", "roofline_ms", ".3f"),
    ("× eager", "speedup_vs_eager", ".2f"),
    ("× best baseline", "speedup_vs_best_baseline", ".2f"),
    ("peak MiB", "peak_mem_mib", ".0f"),
    ("unfused (no fused kernel)", "fallback", ""),
    ("note", "error", ""),
]


def run_kernels(args, rec) -> None:
    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--area kernels needs a CUDA device (or --cpu for a dry run)")
    peaks = device_peaks(rec.data["meta"]["device"]) if cuda else None
    rec.data["meta"]["timed_region"] = (
        "one forward of the block / network per rep after warm-up, CUDA events (wall clock "
        "on the CPU dry run); inputs resident, not flushed from L2; the fused providers "
        "include the cached BatchNorm-fold lookup and the launch"
    )
    rec.data["meta"]["peaks"] = peaks
    if args.cpu:
        layers = unet_layers(2, CPU_TILE, levels=2) + [
            Layer(16, 16, (8, 8, 8), "same", name="ref ")
        ]
        batches, dtypes, reps = [1, 2], ["fp32"], 2
        tile, net_args, tile_dtypes = CPU_TILE, dict(base_channels=2, levels=2), ["fp32"]
        compile_layers = {layers[-1]}
    else:
        layers = unet_layers(32, PAPER_TILE)
        # PERFORMANCE.md's reference shapes: 64→64 at 1x64x64³ and 1x64x128³.
        ref64 = Layer(64, 64, (64, 64, 64), "same", name="ref ")
        ref128 = Layer(64, 64, (128, 128, 128), "same", name="ref ")
        layers += [ref64, ref128]
        batches = [1, 2] if args.quick else [1, 2, 4]
        dtypes, reps = ["bf16"], 10
        tile, net_args = PAPER_TILE, dict(base_channels=32, levels=4)
        tile_dtypes = ["bf16"] if args.quick else ["bf16", "fp16", "tf32"]
        compile_layers = {ref64} if args.quick else {ref64, ref128, layers[0], layers[7]}
    print(f"per layer: {len(layers)} shapes x batch {batches} x {dtypes}")
    for layer in layers:
        for batch in batches:
            for dtype_name in dtypes:
                compile_it = layer in compile_layers and batch == 1
                bench_layer(
                    layer,
                    batch,
                    dtype_name,
                    rec,
                    cuda=cuda,
                    peaks=peaks,
                    compile_it=compile_it,
                    reps=reps,
                )
    torch.manual_seed(0)
    device = torch.device("cuda" if cuda else "cpu")
    net = UNet3D(num_classes=len(PAPER_CLASS_NAMES), **net_args).to(device).eval()
    flops = tile_flops(tile, **net_args)
    print(f"whole tile: {tile}, {flops / 1e9:.1f} GFLOP per tile")
    for dtype_name in tile_dtypes:
        main = dtype_name == tile_dtypes[0]  # bf16 on a GPU, fp32 on the CPU dry run
        for batch in batches if main else batches[:1]:
            # torch.compile of the tile at batch 2 in the main dtype (not in --quick).
            compile_it = main and batch == 2 and (args.cpu or not args.quick)
            bench_tile(
                net,
                tile,
                batch,
                dtype_name,
                rec,
                cuda=cuda,
                peaks=peaks,
                compile_it=compile_it,
                reps=reps,
                flops=flops,
            )
    common.add_speedups(rec.data["results"], "eager", by=("op", "shape", "dtype"))
    # Every layer shape a fused path ran unfused in this run (the tile's included).
    rec.data["meta"]["fallbacks"] = {str(k): v for k, v in fallback.fallbacks().items()}
    rec.flush()
    title = f"# conv-BN-ReLU and U-Net tile on {rec.data['meta']['device']}\n\n"
    if args.cpu:
        title += "CPU dry run (Triton interpreter): proves the code paths, times mean nothing.\n\n"
    path = rec.write_markdown(title + markdown_table(rec.data["results"], COLUMNS))
    print(f"table: {path}")


def summarize(data: dict) -> str:
    """A short table for the end of gpu_check.sh: per shape, ours against the best baseline."""
    groups: dict[tuple, list[dict]] = {}
    for r in data["results"]:
        if r.get("op") in ("conv_bn_relu", "unet_tile") and r.get("median_ms"):
            groups.setdefault((r["op"], r["layer"], r["shape"], r["dtype"]), []).append(r)
    rows = []
    for (_op, layer, _shape, dtype), group in groups.items():
        ours = [r for r in group if r["provider"].startswith("fastcascade")]
        base = [r for r in group if not r["provider"].startswith("fastcascade")]
        if not ours or not base:
            continue
        best = min(ours, key=lambda r: r["median_ms"])
        rival = min(base, key=lambda r: r["median_ms"])
        rows.append(
            dict(
                what=layer,
                batch=group[0]["batch"],
                dtype=dtype,
                ours=f"{best['provider']} {best['median_ms']:.3f}",
                best_baseline=f"{rival['provider']} {rival['median_ms']:.3f}",
                speedup=rival["median_ms"] / best["median_ms"],
                frac_peak=best.get("frac_peak"),
            )
        )
    columns = [
        ("what", "what", ""),
        ("batch", "batch", "d"),
        ("dtype", "dtype", ""),
        ("ours (ms)", "ours", ""),
        ("best baseline (ms)", "best_baseline", ""),
        ("speedup", "speedup", ".2f"),
        ("% peak", "frac_peak", ".1%"),
    ]
    return markdown_table(rows, columns)
