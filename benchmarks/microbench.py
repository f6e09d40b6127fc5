"""Kernel microbenchmarks: each op forward, backward and forward+backward, against its eager
composition, torch.compile of it, and (attention) SDPA, FlexAttention and flash-attn.

    python -m benchmarks.microbench                    # the full sweep on CUDA, a small one on CPU
    python -m benchmarks.microbench --quick --ops fused_attention

On CUDA the times are triton.testing.do_bench medians with 20th/80th percentiles; GB/s is the
case's unavoidable bytes over the time (the same numerator for every provider) and TFLOP/s the
attention matmul FLOPs over it. On CPU the reference providers are timed with wall clocks;
the Triton provider is skipped there (Triton's interpreter runs in numpy: its timings mean
nothing) and so is any provider that cannot run (recorded with the reason, never faked).
Rows are appended to benchmarks/results/microbench.csv; the PNGs and the results page are rebuilt.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import ops, report, results

CUDA_SWEEP = dict(B=8, T=[128, 256, 512, 1024, 2048, 4096, 8192], d=[768, 1024, 1600, 2048], D=[64, 128], dtype="bf16",
                  param_dtype="fp32")  # autocast training: bf16 activations, fp32 weights
CPU_SWEEP = dict(B=1, T=[128, 512], d=[768], D=[64], dtype="fp32", param_dtype="fp32")
QUICK = dict(T=[1024], d=[768], D=[64])  # on CPU: T=128


def shapes(case: ops.Case, B: int, Ts, ds, Ds, vocab: int = 50304) -> list[ops.Shape]:
    Ds = Ds if case.op == "fused_attention" else Ds[:1]
    out = [ops.Shape(B, T, d, D, vocab) for d in ds for D in Ds for T in Ts]
    return [s for s in out if case.valid(s)]


def time_cpu(fn, warmup: int = 2, min_time: float = 0.3, max_reps: int = 50) -> tuple[float, float, float]:
    """(p50, p20, p80) in ms of wall-clock calls."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < max_reps and (len(times) < 5 or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    p50, p20, p80 = np.percentile(times, [50, 20, 80])
    return float(p50), float(p20), float(p80)


def time_cuda(fn) -> tuple[float, float, float]:
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return p50, p20, p80


def bench_case(case: ops.Case, shape_list, providers, modes, dtype, param_dtype, device, stamp: dict) -> list[dict]:
    """Rows for one case over its shapes; unavailable providers give one row each with the reason."""
    rows, fns, runs = [], {}, []
    for provider in providers:
        for mode in modes:
            why = ops.unavailable(case, provider, device, mode)
            if why:
                rows.append(results.row(case.name, provider, mode, "", "time", "ms", **stamp, note=why))
                continue
            if provider not in fns:
                fns[provider] = ops.provider_fn(case, provider, device)
            runs.append((provider, mode))
    timer = time_cuda if device == "cuda" else time_cpu
    for shape in shape_list:
        label = case.shape_label(shape, dtype, param_dtype)
        need = ops.unavoidable_bytes(case, shape, dtype, param_dtype)
        flops = ops.attention_flops(shape) if case.op == "fused_attention" else None
        for provider, mode in runs:
            try:
                inputs = ops.make_inputs(case, shape, dtype, device, param_dtype=param_dtype)
                p50, p20, p80 = timer(ops.step_fn(fns[provider], inputs, mode))
            except torch.OutOfMemoryError:
                rows.append(results.row(case.name, provider, mode, label, "time", "ms", **stamp, note="out of memory"))
                continue
            except Exception as exc:  # recorded and reported; one failing provider does not end a long sweep
                note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                tqdm.write(f"{case.name} {provider} {mode} {label}: {note}")
                rows.append(results.row(case.name, provider, mode, label, "time", "ms", **stamp, note=note))
                continue
            finally:
                inputs = None
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            rows.append(results.row(case.name, provider, mode, label, "time", "ms", p50, p20, p80, **stamp))
            # Throughputs: the fastest time (p20) gives the highest rate (p80).
            rate = lambda n, scale: (n / scale / p50, n / scale / p80, n / scale / p20)  # noqa: E731
            rows.append(results.row(case.name, provider, mode, label, "bandwidth", "GB/s", *rate(need[mode], 1e6), **stamp,
                                    note="unavoidable bytes / time"))
            if flops:
                rows.append(results.row(case.name, provider, mode, label, "throughput", "TFLOP/s",
                                        *rate(flops[mode], 1e9), **stamp))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.microbench", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", nargs="+", help=f"ops or cases (default all): {', '.join(ops.OPS)}")
    p.add_argument("--providers", nargs="+", help="default: every provider that applies")
    p.add_argument("--modes", nargs="+", choices=ops.MODES, default=list(ops.MODES))
    p.add_argument("--B", type=int, help="batch size (default 8 on CUDA, 1 on CPU)")
    p.add_argument("--T", type=int, nargs="+", metavar="LENGTH", help="sequence lengths")
    p.add_argument("--d", type=int, nargs="+", metavar="WIDTH", help="model widths")
    p.add_argument("--D", type=int, nargs="+", metavar="HEAD_WIDTH", help="attention head widths")
    p.add_argument("--dtype", choices=sorted(ops.DTYPES), help="activations (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--param-dtype", choices=sorted(ops.DTYPES), help="weights (default fp32)")
    p.add_argument("--quick", action="store_true", help="one GPT-2 small shape per op")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--csv", type=Path, help="results CSV (default: the committed benchmarks/results/microbench.csv "
                   "for a full run, runs/benchmarks/microbench/microbench.csv for --quick or any selection)")
    p.add_argument("--no-report", action="store_true", help="do not rebuild the PNGs and the results page")
    args = p.parse_args(argv)
    selected = args.ops or args.providers or args.modes != list(ops.MODES) or any(
        getattr(args, k) is not None for k in ("B", "T", "d", "D", "dtype", "param_dtype"))
    partial = args.quick or bool(selected)
    csv_dir = None if args.csv is None else args.csv.parent
    args.csv = results.output_folder(p, results.RESULTS, csv_dir, partial, "microbench") / (
        "microbench.csv" if args.csv is None else args.csv.name)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    sweep = dict(CUDA_SWEEP if args.device == "cuda" else CPU_SWEEP)
    if args.quick:
        sweep.update(QUICK if args.device == "cuda" else dict(QUICK, T=[128]))
    for key in ("B", "T", "d", "D", "dtype", "param_dtype"):
        if getattr(args, key) is not None:
            sweep[key] = getattr(args, key)
    dtype, param_dtype = ops.DTYPES[sweep["dtype"]], ops.DTYPES[sweep["param_dtype"]]
    if args.device == "cuda":
        torch._dynamo.config.recompile_limit = 64  # one compiled function serves every shape of a case
    stamp = dict(device=results.device_name(args.device), versions=results.versions(), timestamp=results.now())
    rows = []
    todo = ops.cases(args.ops)
    for case in tqdm(todo, desc="microbench"):
        providers = [p for p in ops.providers(case, args.device) if not args.providers or p in args.providers]
        case_shapes = shapes(case, sweep["B"], sweep["T"], sweep["d"], sweep["D"])
        case_rows = bench_case(case, case_shapes, providers, args.modes, dtype, param_dtype, args.device, stamp)
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        results.append(args.csv, case_rows)
        rows += case_rows
    print(report.microbench_table(rows))
    if not args.no_report:
        report.write_all(args.csv.parent, readme=None)
    return rows


if __name__ == "__main__":
    main()
