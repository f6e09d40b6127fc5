"""The measured cost model, on CPU (no GPU needed), in one command:

    python -m benchmarks.cost_model            # measure everything, rebuild the results page and README numbers
    python -m benchmarks.cost_model --commit   # ... and commit benchmarks/results and README.md

1. bytes moved by each Triton kernel (Triton's interpreter, instrumented) against the unavoidable
   bytes, FlashAttention-2's traffic model (attention) and the eager composition (dispatcher);
2. activation memory per block per token, StableBlock under every recipe vs HF GPT-2's block;
3. the static compile report for sm_80 / sm_90a;
4. CPU training throughput of StableGPT vs nanoGPT, and the diagnostics' overhead in training;
5. memory of the loss step (LM head + cross-entropy): materialising vs fused_linear_cross_entropy.

Ops without a Triton kernel are reported as "no kernel yet". Results: benchmarks/results/
(cost_model.json, cost_model.csv appended, PNGs, README.md); projections to H100 are computed
from these bytes by the results page.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run in the interpreter

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

from tqdm import tqdm  # noqa: E402

from . import activation_memory, bytes_moved, compile_report, loss_memory, ops, report, results, throughput  # noqa: E402

DTYPE, PARAM_DTYPE = ops.TRAINING_DTYPE, ops.TRAINING_PARAM_DTYPE
# Small shapes the interpreter runs in seconds; bytes per token scale linearly in the token count
# (the embedding's vocabulary is 6x the tokens, like GPT-2's 50304 rows against 8192 tokens).
NORM_SHAPE = ops.Shape(B=4, T=256, d=768, vocab=6 * 1024)
ATTENTION_SHAPE = ops.Shape(B=1, T=256, d=128, D=64)  # 2 heads; the FA2 model uses the kernel's blocks
# The loss's kernels are compute-bound (a matmul over the vocabulary): counted in the loss part, on the GPU's
# tiles at GPT-2's width over a vocabulary the interpreter runs in seconds.
BYTES_CASES = [c for c in ops.CASES if c.op != "fused_linear_cross_entropy"]
LOSS_KERNEL_SHAPE = ops.Shape(B=1, T=256, d=768, vocab=2048)
LOSS_KERNEL_QUICK = ops.Shape(B=1, T=64, d=64, vocab=300)
PARTS = ("bytes", "activation", "compile", "throughput", "loss")


def measure_bytes(quick: bool, progress) -> list[dict]:
    out = []
    for case in BYTES_CASES:
        shape = ATTENTION_SHAPE if case.op == "fused_attention" else NORM_SHAPE
        if quick:
            shape = ops.Shape(B=1, T=64, d=64 if case.op == "fused_attention" else 128, D=32, vocab=6 * 64)
        progress(f"bytes {case.name}")
        r = bytes_moved.measure(case, shape, DTYPE, PARAM_DTYPE)
        out.append(bytes_moved.to_dict(r))
    return out


def measure_activation(quick: bool, progress) -> dict:
    kw = dict(d=64, n_head=2, T=64) if quick else dict(d=768, n_head=12, T=1024)
    return {**kw, "dtype": ops.dtype_name(DTYPE), "rows": activation_memory.measure(dtype=DTYPE, progress=progress, **kw)}


def measure_compile(progress) -> dict:
    rows, notes = compile_report.report(progress)
    return {"rows": rows, "notes": notes}


def measure_throughput(quick: bool, progress) -> dict:
    kw = dict(rounds=2, warmup=1) if quick else {}
    return {"training": throughput.training_throughput(progress=progress, **kw),
            "diagnostics": throughput.diagnostics_overhead(progress=progress, **(dict(steps=4, repeats=1) if quick else {}))}


def measure_loss(quick: bool, progress) -> dict:
    # GPT-2 small's head over B = 8 sequences of T = 1024 tokens.
    kw = dict(N=256, d=64, V=1000, check_N=(64,)) if quick else dict(N=8192, d=768, V=50257)
    out = loss_memory.measure(dtype=DTYPE, param_dtype=PARAM_DTYPE, progress=progress, **kw)
    progress("loss kernels' bytes and FLOPs")
    out["kernels"] = bytes_moved.loss_kernels(LOSS_KERNEL_QUICK if quick else LOSS_KERNEL_SHAPE, DTYPE, PARAM_DTYPE)
    kw = dict(rounds=2, warmup=1) if quick else {}
    out["throughput"] = throughput.loss_throughput(progress=progress, **kw)  # the main job's: fused vs eager loss
    return out


def csv_rows(data: dict, parts=PARTS) -> list[dict]:
    """The measured `parts` of the cost model in the results CSV's schema (the value in p50)."""
    stamp = dict(device=data["device"], versions=data["versions"], timestamp=data["timestamp"])
    data = {k: v for k, v in data.items() if k not in PARTS or k in parts}
    rows = []
    for e in data.get("bytes", []):
        for mode in ("forward", "backward"):
            per = lambda n: n / e["tokens"]  # noqa: E731
            rows.append(results.row(e["case"], "unavoidable", mode, e["shape"], "bytes_per_token", "B", per(e["unavoidable"][mode]), **stamp))
            rows.append(results.row(e["case"], "eager", mode, e["shape"], "bytes_per_token", "B", per(e["eager"][mode]["torch"]), **stamp,
                                    note="aten ops at the dispatcher"))
            if e["fa2"]:
                rows.append(results.row(e["case"], "fa2-model", mode, e["shape"], "bytes_per_token", "B", per(e["fa2"][mode]), **stamp,
                                        note=f"blocks {e['blocks']}"))
            if e["triton"] is None:
                rows.append(results.row(e["case"], "triton", mode, e["shape"], "bytes_per_token", "B", **stamp, note=e["note"]))
                continue
            t = e["triton"][mode]
            for model in ("modeled", "requested", "unique"):
                metric = "bytes_per_token" if model == "modeled" else f"bytes_per_token_{model}"
                rows.append(results.row(e["case"], "triton", mode, e["shape"], metric, "B", per(t[model] + t["torch"]),
                                        **stamp, note=f"kernels ({model}) + launcher ops; {e['note']}".strip("; ")))
    act = data.get("activation")
    if act:
        shape = f"B=1 T={act['T']} d={act['d']} {act['dtype']}"
        for r in act["rows"]:
            rows.append(results.row(r["block"], r["backend"], "forward", shape, "saved_bytes_per_token", "B",
                                    r["bytes_per_token"], **stamp, note=r["note"]))
    for s in data.get("compile", {}).get("rows", []):
        shape = " ".join(f"{k}={v}" for k, v in s["constexprs"].items()) + f" warps={s['num_warps']}"
        for metric, unit, value in (("registers", "per thread", s["registers"]), ("spill_bytes", "B", s["spill_stores"] + s["spill_loads"]),
                                    ("shared_memory", "B", s["shared_bytes"]), ("occupancy", "fraction", s["occupancy"]),
                                    ("tensor_core", "bool", int(s["tensor_core"]))):
            rows.append(results.row(f"{s['op']}:{s['kernel']}", s["arch"], "compile", shape, metric, unit, value, **stamp,
                                    note=" ".join(s.get("mma", []))))
    tp = data.get("throughput")
    if tp:
        train = tp["training"]
        shape = " ".join(f"{k}={v}" for k, v in train["shape"].items())
        for name, v in train.items():
            if name == "shape":
                continue
            metric, unit = ("tokens_per_s", "tokens/s") if not name.startswith("ratio") else ("ratio_vs_nanogpt", "x")
            rows.append(results.row("train_step", name, "forward+backward+step", shape, metric, unit, v["p50"], v["p20"], v["p80"], **stamp))
        diag = tp["diagnostics"]
        if diag.get("status") == "measured":
            for name in ("default", "every step", "off"):
                v = diag[name]
                rows.append(results.row("train_command", f"diagnostics {name}", "train", shape, "tokens_per_s", "tokens/s",
                                        v["p50"], v["p20"], v["p80"], **stamp, note=f"default interval {diag['interval']}"))
            for name in ("default", "every step"):
                v = diag[f"ratio:{name}"]
                rows.append(results.row("train_command", f"diagnostics {name} / off", "train", shape, "ratio", "x",
                                        v["p50"], v["p20"], v["p80"], **stamp))
        else:
            rows.append(results.row("train_command", "diagnostics", "train", "", "tokens_per_s", "tokens/s", **stamp,
                                    note=diag["status"]))
    loss = data.get("loss")
    if loss:
        shape = f"N={loss['N']} d={loss['d']} V={loss['V']} {loss['dtype']} params={loss['param_dtype']}"
        for r in loss["rows"]:
            for metric in ("peak", "held_after_forward"):
                rows.append(results.row("loss_step", r["path"], "forward+backward", shape, f"{metric}_bytes", "B", r[metric],
                                        **stamp, note="fake tensors; gradients included" if metric == "peak" else "fake tensors"))
        k = loss.get("kernels")
        for mode, r in (k["passes"].items() if k else ()):
            per = lambda n: n / k["tokens"]  # noqa: E731
            for provider, metric, value in (
                    ("unavoidable", "bytes_per_token", r["unavoidable_bytes"]),
                    ("triton", "bytes_per_token", r["kernel_modeled"] + r["launcher_bytes"]),
                    ("triton", "bytes_per_token_requested", r["kernel_requested"] + r["launcher_bytes"]),
                    ("eager", "bytes_per_token", r["eager_bytes"]), ("math", "flops_per_token", r["math_flops"]),
                    ("triton", "flops_per_token", r["kernel_flops"] + r["launcher_flops"]),
                    ("eager", "flops_per_token", r["eager_flops"])):
                rows.append(results.row("fused_linear_cross_entropy:plain", provider, mode, k["shape"], metric,
                                        "FLOP" if metric.startswith("flops") else "B", per(value), **stamp))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.cost_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=PARTS, help="measure these parts (the others keep their last "
                   "results); a partial run: into runs/benchmarks/cost_model unless --out names a folder")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats: a smoke run, not results")
    p.add_argument("--out", type=Path, help="results folder (default: the committed benchmarks/results for a full "
                   "run; the README's numbers are only updated there)")
    p.add_argument("--commit", action="store_true", help="git commit benchmarks/results and README.md afterwards")
    args = p.parse_args(argv)
    partial = args.quick or args.only is not None
    args.out = results.output_folder(p, results.RESULTS, args.out, partial, "cost_model")
    if args.commit and (partial or args.out.resolve() != results.RESULTS):
        p.error("--commit: only a full run into the committed results folder is committed")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = args.out.resolve()
    path = out / "cost_model.json"
    # A partial run into a fresh folder starts from the committed numbers for the parts it skips.
    committed = results.RESULTS / "cost_model.json"
    seed = path if path.exists() else committed if args.only and committed.exists() else None
    data = json.loads(seed.read_text()) if seed else {}
    data.update(device=results.device_name("cpu"), versions=results.versions(), timestamp=results.now(), quick=args.quick)
    parts = args.only or PARTS
    with tqdm(total=len(parts), desc="cost model") as bar:
        progress = lambda msg: bar.set_postfix_str(msg)  # noqa: E731
        for part in parts:
            if part == "bytes":
                data["bytes"] = measure_bytes(args.quick, progress)
            elif part == "activation":
                data["activation"] = measure_activation(args.quick, progress)
            elif part == "compile":
                data["compile"] = measure_compile(progress)
            elif part == "loss":
                data["loss"] = measure_loss(args.quick, progress)
            else:
                data["throughput"] = measure_throughput(args.quick, progress)
            out.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")  # a later part's failure (or a crash) keeps this one whole
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            tmp.replace(path)
            bar.update()
    results.append(out / "cost_model.csv", csv_rows(data, parts))
    page = report.write_all(out, readme=report.README if out == results.RESULTS.resolve() else None)
    print(report.goals_text(data))
    print(f"results: {page}")
    if args.commit:
        subprocess.run(["git", "add", str(out), "README.md"], check=True, cwd=results.RESULTS.parents[1])
        subprocess.run(["git", "commit", "-m", f"Benchmarks: cost model measured on CPU ({data['timestamp']})"],
                       check=True, cwd=results.RESULTS.parents[1])
    return data


if __name__ == "__main__":
    main()
