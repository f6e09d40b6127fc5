"""Check and time every kernel on a CUDA GPU, in one command:

    python -m benchmarks.gpu_check            # everything; results in benchmarks/results/gpu/
    python -m benchmarks.gpu_check --quick    # the short version, into runs/benchmarks/gpu_check

On a CUDA machine, in order (each step recorded, a failing step does not stop the next):
1. tests: the kernel test suites (tests/test_kernels_ln_family.py, test_kernels_fused_attention.py,
   test_kernels_fused_linear_cross_entropy.py, test_model_triton.py) in a child process with STABLEBLOCKS_TEST_DEVICE=cuda and without
   TRITON_INTERPRET: the same test functions on CUDA tensors with compiled kernels, the tests only a
   GPU can run among them (gradients that repeat bitwise from run to run: the LayerNorm family and
   the embedding backward, the attention weight gradients). --quick leaves out the slow ones.
2. equivalence: StableGPT on the Triton kernels against the reference backend under bf16 autocast,
   per recipe: the loss, and every gradient judged against the largest one.
3. microbench: benchmarks.microbench on CUDA: triton.testing.do_bench times of every kernel against
   eager PyTorch, torch.compile, SDPA and FlexAttention (soft-cap as a score_mod), and flash-attn
   (softcap) and Liger's LayerNorm when installed.
4. memory: peak torch.cuda.max_memory_allocated over one training step (forward, backward, AdamW)
   of StableGPT per recipe, with each backend.

Written: gpu_check.json (device, versions, every step's result), tests-*.xml (JUnit, one per
suite) and microbench.csv. `--summarise FOLDER` runs nothing and rewrites the README's gpu-check
block from the run stored in FOLDER. Only a full run writes to benchmarks/results/gpu/, the folder the results page's
measured columns read. Exit status 0 when every step passed, 1 otherwise; without a CUDA GPU it
says so, writes nothing and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from . import report, results

ROOT = Path(__file__).resolve().parents[1]
GPU_RESULTS = results.RESULTS / "gpu"
TEST_FILES = ("tests/test_kernels_ln_family.py", "tests/test_kernels_fused_attention.py",
              "tests/test_kernels_fused_linear_cross_entropy.py", "tests/test_model_triton.py")
# Tests of what only the CPU path does, in suites that do not skip them on CUDA themselves: an
# out-of-range target there is a device assert, which would end the child's CUDA context.
CPU_ONLY = ("tests/test_kernels_fused_linear_cross_entropy.py::test_bad_input_is_a_clear_error",)
STEPS = ("tests", "equivalence", "microbench", "memory")
QUICK_RECIPES = ("gpt2", "stable", "qk-norm-cap", "qkv-norm")
# Full microbenchmark sweep: GPT-2 small's width (the results page's projection) at two lengths and head widths.
FULL_SWEEP = ["--T", "1024", "4096", "--d", "768", "--D", "64", "128"]
# One step of a GPT-2 small-sized model for the memory step.
MEMORY_SHAPE = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
MEMORY_BATCH = 8
TEST_TIMEOUT = 300  # seconds per test
SUITE_TIMEOUT = 1200  # seconds per test file
MICROBENCH_TIMEOUT = 1800


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="fast tests only, four recipes, one shape per op")
    p.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/gpu for a full run, "
                                            "runs/benchmarks/gpu_check for a quick or partial one)")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="run only these steps")
    p.add_argument("--summarise", type=Path, metavar="FOLDER",
                   help="run nothing: rewrite the README's gpu-check block from the run stored in FOLDER")
    args = p.parse_args(argv)
    if args.summarise is not None and not (args.summarise / "gpu_check.json").exists():
        p.error(f"--summarise {args.summarise}: no gpu_check.json there")
    args.out = results.output_folder(p, GPU_RESULTS, args.out, args.quick or len(set(args.steps)) < 4, "gpu_check")
    return args


def is_full(data: dict) -> bool:
    """A full run: every step, not --quick (only those feed the results page)."""
    return not data.get("quick", True) and set(data.get("steps", {})) == set(STEPS)


def measured_rows(folder: Path = GPU_RESULTS) -> tuple[list[dict], dict]:
    """(microbench rows, gpu_check.json) of the full run stored in `folder`; ([], {}) if none."""
    path = folder / "gpu_check.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if not is_full(data):
        return [], {}
    return results.read(folder / "microbench.csv"), data


def write_json(path: Path, data: dict) -> None:
    """Atomically: a crash mid-write leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def junit_summary(path: Path) -> dict:
    """{passed, failed, skipped, failures: [test ids]} from a pytest JUnit XML file."""
    out = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    if not path.exists():
        return out
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            out["failed"] += 1
            out["failures"].append(name)
        elif case.find("skipped") is not None:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


def child_env() -> dict:
    """The environment of a child that runs compiled kernels: never the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["STABLEBLOCKS_TEST_DEVICE"] = "cuda"
    return env


def pytest_options() -> list[str]:
    """Workers when pytest-xdist is installed (compiling the kernels' variants is CPU-bound), and a
    per-test time limit when pytest-timeout is (a hung kernel fails its test, not the whole check)."""
    opts = []
    if importlib.util.find_spec("xdist"):
        opts += ["-n", str(max(1, min(14, (os.cpu_count() or 2) - 2)))]
    if importlib.util.find_spec("pytest_timeout"):
        opts += [f"--timeout={TEST_TIMEOUT}"]
    return opts


def run_child(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """cmd in its own process group, all of it killed past `timeout` (pytest-xdist workers too, so
    a hung kernel does not hold the GPU through the later steps); returncode "timeout" then."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(cmd, "timeout", out, err + f"\nkilled after {timeout:.0f} s")


def run_tests(out: Path, quick: bool) -> dict:
    """Each suite in its own child: a device assert ends a process's CUDA context, and with it
    every later test in that process."""
    t0 = time.perf_counter()
    total = {"ok": True, "passed": 0, "failed": 0, "skipped": 0, "failures": [], "files": {}}
    for path in TEST_FILES:
        xml = out / f"tests-{Path(path).stem}.xml"
        fresh = xml.with_name(f".{xml.name}.tmp")  # never a previous run's counts; the old file stays whole
        fresh.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={fresh}", path,
               "-m", "not slow" if quick else "slow or not slow", *(f"--deselect={t}" for t in CPU_ONLY), *pytest_options()]
        proc = run_child(cmd, SUITE_TIMEOUT)
        summary = junit_summary(fresh)
        if fresh.exists():
            os.replace(fresh, xml)
        total["files"][path] = {"returncode": proc.returncode, **summary,
                                "tail": "" if proc.returncode == 0 else proc.stdout[-3000:] + proc.stderr[-2000:]}
        total["ok"] &= proc.returncode == 0 and summary["failed"] == 0
        for key in ("passed", "failed", "skipped", "failures"):
            total[key] += summary[key]
    total["seconds"] = time.perf_counter() - t0
    return total


def run_microbench(out: Path, quick: bool) -> dict:
    """benchmarks.microbench in a child, into a scratch folder (a run with a chosen sweep is partial
    to it); the CSV then replaces out/microbench.csv whole."""
    scratch = results.SCRATCH / "gpu_check-microbench"
    csv = scratch / "microbench.csv"
    csv.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.microbench", "--device", "cuda", "--csv", str(csv), "--no-report",
           *(["--quick"] if quick else FULL_SWEEP)]
    t0 = time.perf_counter()
    proc = run_child(cmd, MICROBENCH_TIMEOUT)
    rows = results.read(csv) if csv.exists() else []
    if rows:
        results.write(out / "microbench.csv", rows)
    errors = [f"{r['op']} {r['provider']} {r['mode']} {r['shape']}: {r['note']}" for r in rows
              if r["metric"] == "time" and r["note"].startswith("error")]
    return {"ok": proc.returncode == 0 and not errors, "returncode": proc.returncode,
            "seconds": time.perf_counter() - t0, "rows": len(rows), "errors": errors,
            "tail": proc.stderr[-2000:] if proc.returncode else ""}


def _train_step(recipe: str, which: str, shape: dict, batch: int, seed: int = 0):
    """One autocast training step on CUDA -> (loss, {name: grad}, peak bytes of the step)."""
    import stableblocks as sb
    from stableblocks.kernels import backend

    torch.manual_seed(seed)
    with backend.using(which):
        model = sb.StableGPT(sb.recipe(recipe, **shape)).cuda()
        opt = model.configure_optimizers(0.1, 1e-3)
        gen = torch.Generator(device="cuda").manual_seed(seed + 1)
        x = torch.randint(0, shape["vocab_size"], (batch, shape["block_size"]), device="cuda", generator=gen)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, torch.roll(x, -1, 1))
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    return loss.item(), grads, peak


def run_equivalence(recipes) -> dict:
    """Triton against the reference under bf16 autocast: loss within 2%, every gradient within 5%
    of the largest (the bf16 noise of two different summation orders)."""
    shape = dict(n_layer=2, n_head=4, n_embd=128, block_size=128, vocab_size=512)
    out = {"ok": True, "recipes": {}}
    for recipe in recipes:
        ref_loss, ref_grads, _ = _train_step(recipe, "reference", shape, 4)
        loss, grads, _ = _train_step(recipe, "triton", shape, 4)
        scale = max(g.abs().max().item() for g in ref_grads.values())
        worst = max(((g.float() - ref_grads[n].float()).abs().max().item() / scale, n) for n, g in grads.items())
        ok = abs(loss - ref_loss) <= 0.02 * abs(ref_loss) and worst[0] <= 0.05 and grads.keys() == ref_grads.keys()
        out["recipes"][recipe] = {"ok": ok, "loss": loss, "reference_loss": ref_loss, "worst_grad": worst[1],
                                  "worst_grad_error_vs_largest": worst[0]}
        out["ok"] &= ok
    return out


def run_memory(recipes) -> dict:
    out = {"ok": True, "shape": {**MEMORY_SHAPE, "batch_size": MEMORY_BATCH}, "peak_bytes": {}}
    for recipe in recipes:
        for which in ("reference", "triton"):
            try:
                _, _, peak = _train_step(recipe, which, MEMORY_SHAPE, MEMORY_BATCH)
            except torch.OutOfMemoryError:
                peak = None
                out["ok"] = False
            out["peak_bytes"][f"{recipe}:{which}"] = peak
            torch.cuda.empty_cache()
    return out


def _gb(n) -> str:
    return "—" if n is None else f"{n / 1e9:.2f}"


def _ms(rows: dict, key) -> str:
    return f"{rows[key]:.3g}" if key in rows else "—"


def git_commit() -> str | None:
    """HEAD's short hash, "+changes" when the tree differs from it; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def summary(folder: Path) -> str:
    """Markdown of one stored GPU run (gpu_check.json and microbench.csv in `folder`): the README's
    gpu-check block, written by --summarise."""
    data = json.loads((folder / "gpu_check.json").read_text())
    steps = data["steps"]
    missing = [s for s in STEPS if s not in steps]
    rel = folder.resolve()
    rel = rel.relative_to(ROOT) if rel.is_relative_to(ROOT) else rel
    kind = "a quick run" if data.get("quick") else "a partial run" if missing else "a full run"
    commit = f", code at {data['commit']}" if data.get("commit") else ""
    lines = [f"Last GPU run: {data['device']}, {data['timestamp'][:10]} ({data['versions']}{commit}); {kind}, stored "
             f"in [{rel}]({rel}/)" + (f"; steps its gpu_check.json does not record: {', '.join(missing)} (see that "
                                      f"folder's README)." if missing else "."),
             "", "Time per step: " + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in steps.items() if "seconds" in v) + ".",
             ""]
    lines += [f"- **{k}:** failed: {v['error']}" for k, v in steps.items() if "error" in v]
    steps = {k: v for k, v in steps.items() if "error" not in v}
    if "tests" in steps:
        t = steps["tests"]
        lines.append(f"- **Tests on compiled kernels:** {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
                     + (f" (failed: {', '.join(f'`{f}`' for f in t['failures'])})" if t["failures"] else "") + ".")
    if "equivalence" in steps:
        eq = steps["equivalence"]["recipes"]
        worst = max(eq, key=lambda r: eq[r]["worst_grad_error_vs_largest"])
        lines.append(f"- **Model equivalence (bf16 autocast):** {sum(r['ok'] for r in eq.values())} of {len(eq)} recipes "
                     f"within bounds; largest gradient difference {eq[worst]['worst_grad_error_vs_largest']:.2%} of the "
                     f"largest gradient (`{worst}`, `{eq[worst]['worst_grad']}`).")
    if "memory" in steps:
        mem = steps["memory"]
        shape = mem["shape"]
        lines += ["", f"Peak memory of one training step (GB; {shape['n_layer']} layers, d = {shape['n_embd']}, "
                      f"B = {shape['batch_size']}, T = {shape['block_size']}, bf16 autocast, AdamW):", "",
                  "| recipe | reference | triton | triton / reference |", "| --- | --- | --- | --- |"]
        for recipe in dict.fromkeys(k.split(":")[0] for k in mem["peak_bytes"]):
            ref, tri = mem["peak_bytes"][f"{recipe}:reference"], mem["peak_bytes"][f"{recipe}:triton"]
            ratio = f"{tri / ref:.2f}" if ref and tri else "—"
            lines.append(f"| `{recipe}` | {_gb(ref)} | {_gb(tri)} | {ratio} |")
    rows = [r for r in results.read(folder / "microbench.csv") if r["metric"] == "time" and not r["note"]] \
        if (folder / "microbench.csv").exists() else []
    times = {(r["op"], r["shape"], r["provider"]): float(r["p50"]) for r in rows if r["mode"] == "forward+backward"}
    if times:
        others = ("compile", "sdpa", "flex", "flash_attn", "liger")
        lines += ["", "Forward + backward, `do_bench` median (ms; launch overhead included):", "",
                  "| case | shape | triton | eager | " + " | ".join(others) + " | triton / eager |",
                  "| --- | --- | --- | --- | " + " | ".join("---" for _ in others) + " | --- |"]
        for op, shape in dict.fromkeys((k[0], k[1]) for k in times):
            if (op, shape, "triton") not in times:
                continue
            eager = times.get((op, shape, "eager"))
            ratio = f"{times[(op, shape, 'triton')] / eager:.2f}" if eager else "—"
            cells = [_ms(times, (op, shape, p)) for p in ("triton", "eager", *others)]
            lines.append(f"| `{op}` | {shape} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarise:
        report.replace_block(report.README, "gpu-check", "\n" + summary(args.summarise))
        print(f"gpu_check: README's gpu-check block rewritten from {args.summarise}")
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU found; nothing was run and nothing was written.")
        return 0
    import stableblocks as sb

    recipes = QUICK_RECIPES if args.quick else tuple(sb.recipes())
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = {"device": results.device_name("cuda"), "versions": results.versions(), "timestamp": results.now(),
            "commit": git_commit(), "quick": args.quick, "steps": {}}
    steps = {"tests": lambda: run_tests(out, args.quick), "equivalence": lambda: run_equivalence(recipes),
             "microbench": lambda: run_microbench(out, args.quick), "memory": lambda: run_memory(recipes)}
    for name in args.steps:
        print(f"gpu_check: {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            data["steps"][name] = steps[name]()
        except Exception as exc:  # recorded; the other steps still run
            data["steps"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        data["steps"][name].setdefault("seconds", time.perf_counter() - t0)
        write_json(out / "gpu_check.json", data)
        print(f"gpu_check: {name}: {'ok' if data['steps'][name]['ok'] else 'FAILED'} "
              f"({data['steps'][name]['seconds']:.0f} s)", flush=True)
    print(f"gpu_check: results in {out}")
    return 0 if all(s["ok"] for s in data["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
