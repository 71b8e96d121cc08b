"""Tuning the fused conv-BN-ReLU (``benchmarks/run.py --area tune``).

For every layer shape of the committed table, at most 8 block configurations of our
kernel in bf16 against cuDNN fused, at the shape's occurrences in a 132x132x116 tile; the
winner per shape goes into ``table.json`` (in OUTDIR, and on a GPU into the package,
``fastcascade/ops/conv_bn_relu/table.json``, so that later areas of the same run use it:
commit it with the results). A candidate whose result disagrees with PyTorch's is
recorded as an error, never chosen.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
from bench_kernels import CPU_TILE, PAPER_TILE, Layer, _padding, _random_block, _try, unet_layers
from run import markdown_table, measure

from fastcascade.ops import conv_bn_relu as cbr
from fastcascade.ops.conv_bn_relu import configs as cbr_configs
from fastcascade.ops.conv_bn_relu import kernel


def summarize(data: dict) -> str:
    """A short table for the end of gpu_check.sh: per shape, the best of ours and cuDNN."""
    shapes: dict[str, list[dict]] = {}
    for r in data["results"]:
        shapes.setdefault(r["shape"], []).append(r)
    rows = []
    for shape, group in shapes.items():
        timed = [r for r in group if r.get("median_ms")]
        ours = min((r for r in timed if r["provider"] == "triton"), key=_ms, default=None)
        cudnn = next((r for r in timed if r["provider"] == "cudnn"), None)
        best = min(timed, key=_ms, default=None)
        cfg = ours and ours["config"]
        rows.append(
            dict(
                shape=shape,
                triton=ours and ours["median_ms"],
                config=cfg
                and "{BLOCK_M}x{BLOCK_N}x{BLOCK_K} w{num_warps} s{num_stages}".format(**cfg),
                cudnn=cudnn and cudnn["median_ms"],
                chosen=best and best["provider"],
                failed=sum(1 for r in group if r.get("error")),
            )
        )
    columns = [
        ("layer", "shape", ""),
        ("best triton ms", "triton", ".3f"),
        ("config", "config", ""),
        ("cuDNN fused ms", "cudnn", ".3f"),
        ("chosen", "chosen", ""),
        ("failed candidates", "failed", "d"),
    ]
    return markdown_table(rows, columns)


def _ms(record: dict) -> float:
    return record["median_ms"]


# -- tuning ---------------------------------------------------------------------------------
def write_table(path: Path, configs: dict, tuned_on: str | None) -> None:
    """Write the table ``configs`` ``{(C_in, C_out): entry}`` as ``table.json`` at ``path``,
    in the format the package loads (``fastcascade.ops.conv_bn_relu.configs``)."""
    Path(path).write_text(cbr_configs.dump_table(configs, tuned_on))


def _tune_layers(quick: bool, cpu: bool) -> dict[tuple[int, int], list[Layer]]:
    if cpu:
        layers = unet_layers(2, CPU_TILE, levels=2)[:2]
    else:
        bases = [32] if quick else [32, 16, 8]
        layers = [layer for b in bases for layer in unet_layers(b, PAPER_TILE)]
    by_shape: dict[tuple[int, int], list[Layer]] = {}
    for layer in layers:
        by_shape.setdefault((layer.cin, layer.cout), []).append(layer)
    return by_shape


def _total_ms(inputs, run_one, *, cuda: bool, reps: int) -> float:
    """Median time of ``run_one(module, x)`` summed over a shape's occurrences."""
    total = 0.0
    for layer, m, x in inputs:
        timing = measure(lambda m=m, x=x: run_one(m, x), cuda=cuda, warmup=2, reps=reps)
        total += layer.count * timing["median_ms"]
    return total


def _ours(cfg: dict):
    def run_one(m, x):
        f = cbr.folded(m, x.dtype)
        return kernel._launch(x, f.packed, f.bias32, _padding(m), "tf32", cfg)

    return run_one


def _cudnn(m, x):
    return cbr.conv_bn_relu(x, m, backend="cudnn")


def tune_shape(inputs, cin: int, cout: int, *, cuda: bool, reps: int, limit: int) -> list:
    """Time cuDNN fused and our candidates on ``inputs`` [(layer, module, x)]; returns
    ``[(provider, config, total ms or None, error or None)]``. A candidate whose result
    disagrees with the reference is recorded as an error and never chosen."""
    refs = [cbr.conv_bn_relu(x, m, backend="torch").float() for _, m, x in inputs]
    scale = max(r.abs().max().item() for r in refs)
    results = []
    if cuda:
        t, err = _try(lambda: _total_ms(inputs, _cudnn, cuda=cuda, reps=reps))
        results.append(("cudnn", None, t, err))
    for cfg in cbr.candidate_configs(cin, cout, limit):
        run_one = _ours(cfg)
        outs, err = _try(lambda run_one=run_one: [run_one(m, x) for _, m, x in inputs])
        if err is None:
            worst = max((o.float() - r).abs().max().item() for o, r in zip(outs, refs, strict=True))
            if worst > 0.05 * scale + 1e-3:
                err = f"wrong result: max error {worst:.3g} (output scale {scale:.3g})"
        t = None
        if err is None:
            t, err = _try(lambda run_one=run_one: _total_ms(inputs, run_one, cuda=cuda, reps=reps))
        results.append(("triton", cfg, t, err))
    return results


def run_tune(args, rec) -> None:
    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--area tune needs a CUDA device (or --cpu for a dry run)")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter has no bf16
    reps = 10 if cuda else 1
    limit = 4 if args.quick or args.cpu else 8
    table = {k: dict(v) for k, v in cbr.CONFIGS.items()}
    rec.data["meta"]["timed_region"] = "one launch per occurrence in a tile, batch 1, summed"
    for (cin, cout), layers in _tune_layers(args.quick, args.cpu).items():
        inputs = []
        for layer in layers:
            x = torch.randn(1, cin, *layer.size, device=device, dtype=dtype)
            x = x.contiguous(memory_format=torch.channels_last_3d)
            inputs.append((layer, _random_block(layer, device), x))
        with torch.no_grad():
            results = tune_shape(inputs, cin, cout, cuda=cuda, reps=reps, limit=limit)
        for provider, cfg, t, err in results:
            rec.add(
                op="tune",
                shape=f"{cin}→{cout}",
                dtype=str(dtype).replace("torch.", ""),
                provider=provider,
                config=cfg,
                median_ms=t,
                error=err,
            )
        timed = [r for r in results if r[2] is not None]
        if not timed:
            continue
        provider, cfg, t, _ = min(timed, key=lambda r: r[2])
        best_triton = min((r for r in timed if r[0] == "triton"), key=lambda r: r[2], default=None)
        entry = dict(table.get((cin, cout)) or cbr.default_config(cin, cout))
        if best_triton is not None:
            entry.update(best_triton[1])
        entry.update(provider=provider, tuned=cuda)
        table[(cin, cout)] = entry
        print(f"  {cin}→{cout}: {provider} {t:.3f} ms {cfg or ''}")
    out = Path(args.out) / "table.json"
    tuned_on = None
    if cuda:
        date = datetime.date.today().isoformat()
        tuned_on = f"{rec.data['meta']['device']}, {date}, torch {torch.__version__}"
    write_table(out, table, tuned_on)
    print(f"tuned table: {out}")
    if cuda:
        # The editable install reads the package's table: later areas of this run use it.
        target = cbr_configs.TABLE_PATH
        write_table(target, table, tuned_on)
        print(f"written to {target}: commit it with the results")
