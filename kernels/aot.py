"""Ahead-of-time compilation of Triton kernels for NVIDIA targets, no GPU needed.

Compiles a ``@triton.jit`` kernel for sm_80 / sm_90a, then reports what the
hardware will see: registers and spills (``ptxas -v``), shared memory, whether
the SASS uses tensor cores, and the occupancy those resources allow.

A kernel decorated while ``TRITON_INTERPRET=1`` is set cannot be compiled, so
``compile_in_subprocess`` re-imports it in a fresh interpreter without that
variable. The same path backs the command line::

    python -m stableblocks.kernels.aot path/or/module:kernel \\
        --signature 'x:*fp32,y:*fp32,n:i32' --constexpr BLOCK=1024 --arch 80 --arch 90
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, KernelInterface


@dataclass(frozen=True)
class CompileStats:
    kernel: str
    arch: str  # "sm_80", "sm_90a"
    num_warps: int
    constexprs: dict
    registers: int  # per thread
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared_bytes: int  # per CTA: Triton's dynamic allocation + static .nv.shared in the cubin
    tensor_core: bool
    occupancy: float  # resident warps / max warps per SM, from registers and shared memory only
    mma: tuple[str, ...] = ()  # the tensor-core mnemonics in the SASS: HMMA (mma.sync), HGMMA (wgmma), ...


@dataclass(frozen=True)
class CompileJob:
    """One compilation, in a form that can cross a process boundary as JSON."""

    module: str  # dotted module name or path to a .py file
    kernel: str  # attribute name of the jitted kernel in that module
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    arch: int = 90
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: list[str] | None = None


@dataclass(frozen=True)
class _SmLimits:
    smem_per_sm: int
    max_warps: int
    max_ctas: int


# From the CUDA programming guide's compute-capability table.
_SM_LIMITS = {
    80: _SmLimits(smem_per_sm=164 * 1024, max_warps=64, max_ctas=32),
    86: _SmLimits(smem_per_sm=100 * 1024, max_warps=48, max_ctas=16),
    89: _SmLimits(smem_per_sm=100 * 1024, max_warps=48, max_ctas=24),
    90: _SmLimits(smem_per_sm=228 * 1024, max_warps=64, max_ctas=32),
}
_REGS_PER_SM = 65536
_REG_ALLOC_UNIT = 256  # registers are handed out per warp in chunks of this size
_SMEM_ALLOC_UNIT = 128
_SMEM_RESERVED_PER_CTA = 1024  # the driver keeps 1 KB per CTA for itself on sm_80+

# fp16/bf16/tf32 (HMMA), int (IMMA), fp64 (DMMA), and Hopper's warpgroup forms.
_TENSOR_CORE_OPS = re.compile(r"\b(?:HMMA|IMMA|DMMA|HGMMA|IGMMA|QGMMA|BGMMA)\b")


def occupancy(registers: int, shared_bytes: int, num_warps: int, arch: int) -> float:
    """Fraction of the SM's warp slots one kernel can fill (registers and shared memory only)."""
    limits = _SM_LIMITS[arch]
    regs_per_warp = math.ceil(max(registers, 1) * 32 / _REG_ALLOC_UNIT) * _REG_ALLOC_UNIT
    ctas_by_regs = (_REGS_PER_SM // regs_per_warp) // num_warps
    smem_per_cta = math.ceil((shared_bytes + _SMEM_RESERVED_PER_CTA) / _SMEM_ALLOC_UNIT) * _SMEM_ALLOC_UNIT
    ctas_by_smem = limits.smem_per_sm // smem_per_cta
    ctas = min(ctas_by_regs, ctas_by_smem, limits.max_ctas, limits.max_warps // num_warps)
    return ctas * num_warps / limits.max_warps


def compile_kernel(
    fn: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    arch: int,
    num_warps: int = 4,
    num_stages: int = 3,
    divisible_by_16: Iterable[str] | None = None,
) -> CompileStats:
    """Compile ``fn`` for ``sm_<arch>`` in this process and measure the result.

    ``signature`` maps runtime argument names to Triton types ("*fp32", "i32");
    constexpr arguments may be left out of it. ``divisible_by_16`` names the
    arguments to treat as 16-aligned, as the JIT does for real tensors; by
    default every pointer, so the code matches what a launch would produce.
    """
    if arch not in _SM_LIMITS:
        raise ValueError(f"unsupported arch {arch}; expected one of {sorted(_SM_LIMITS)}")
    ptxas = _ptxas(arch)
    jit_fn = _unwrap(fn)

    signature = dict(signature)
    for name in constexprs:
        signature.setdefault(name, "constexpr")
    missing = [a for a in jit_fn.arg_names if a not in signature]
    if missing:
        raise ValueError(f"{jit_fn.__name__}: no type given for arguments {missing}")
    if divisible_by_16 is None:
        divisible_by_16 = [a for a, t in signature.items() if t.startswith("*")]
    attrs = {(jit_fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible_by_16}

    compiled = triton.compile(
        ASTSource(jit_fn, signature, constexprs, attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    meta = compiled.metadata
    gpu_name = sm_arch_from_capability(arch)

    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = Path(tmp, "kernel.ptx")
        cubin_path = Path(tmp, "kernel.cubin")
        ptx_path.write_text(compiled.asm["ptx"])
        cubin_path.write_bytes(compiled.asm["cubin"])
        # Triton runs ptxas -v itself but discards the log, so repeat its invocation.
        line_info = ["-lineinfo"]
        if triton.knobs.compilation.disable_line_info:
            line_info.append("-suppress-debug-info")
        cmd = [ptxas, "-v", *line_info, "--regAllocOptLevel=2", f"--gpu-name={gpu_name}"]
        if not meta.enable_fp_fusion:
            cmd.append("--fmad=false")
        if meta.ptx_options:
            cmd += meta.ptx_options.split()
        log = _run([*cmd, str(ptx_path), "-o", str(Path(tmp, "check.cubin"))])
        res_usage = _run([_tool("cuobjdump"), "-res-usage", str(cubin_path)])
        sass = _disassemble(cubin_path)

    registers, spill_stores, spill_loads = _parse_ptxas_log(log)
    cubin_regs = _res_usage_field(res_usage, "REG")
    if cubin_regs is not None and cubin_regs != registers:
        warnings.warn(f"{meta.name}: ptxas -v says {registers} registers, the cubin {cubin_regs}", stacklevel=2)
    # Triton's buffers are dynamic shared memory; ptxas may add static .nv.shared on top.
    shared = int(meta.shared or 0) + (_res_usage_field(res_usage, "SHARED") or 0)
    warps = int(meta.num_warps)  # warp specialization can change it
    return CompileStats(
        kernel=meta.name,
        arch=gpu_name,
        num_warps=warps,
        constexprs=dict(constexprs),
        registers=registers,
        spill_stores=spill_stores,
        spill_loads=spill_loads,
        shared_bytes=shared,
        tensor_core=bool(_TENSOR_CORE_OPS.search(sass)),
        occupancy=occupancy(registers, shared, warps, arch),
        mma=tuple(sorted(set(_TENSOR_CORE_OPS.findall(sass)))),
    )


def compile_in_subprocess(
    module: str,
    kernel: str,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    arch: int,
    num_warps: int = 4,
    num_stages: int = 3,
    divisible_by_16: Iterable[str] | None = None,
    timeout: float = 600.0,
) -> CompileStats:
    """``compile_kernel`` on ``module.kernel``, run in a fresh interpreter without TRITON_INTERPRET.

    ``module`` is a dotted module name or a path to a .py file. Constexpr values
    must be JSON scalars; the string "tl.float16" (etc.) stands for that dtype.
    """
    job = CompileJob(module, kernel, dict(signature), dict(constexprs), arch, num_warps, num_stages,
                     None if divisible_by_16 is None else list(divisible_by_16))
    return compile_jobs_in_subprocess([job], timeout=timeout)[0]


def compile_jobs_in_subprocess(jobs: Sequence[CompileJob], timeout: float = 600.0) -> list[CompileStats]:
    """Run several compilations in one child process, paying for its start-up once."""
    jobs = [_absolute_module(job) for job in jobs]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    bootstrap = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('_stableblocks_aot_worker', sys.argv[1])\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "sys.modules[spec.name] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "mod._worker()\n"
    )
    # -c instead of running this file: a script's folder goes first on sys.path,
    # where sibling kernel modules could shadow real packages.
    proc = subprocess.run(
        [sys.executable, "-c", bootstrap, str(Path(__file__).resolve())],
        input=json.dumps([dataclasses.asdict(job) for job in jobs]),
        capture_output=True, text=True, env=env, timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return [CompileStats(**{**stats, "mma": tuple(stats["mma"])}) for stats in out]


def format_report(stats: Iterable[CompileStats]) -> str:
    header = (f"{'kernel':<28} {'arch':<7} {'warps':>5} {'regs':>5} {'spill st/ld':>12} "
              f"{'smem':>8} {'TC':>3} {'occ':>5}  constexprs")
    lines = [header, "-" * len(header)]
    for s in stats:
        consts = " ".join(f"{k}={v}" for k, v in s.constexprs.items())
        lines.append(
            f"{s.kernel:<28} {s.arch:<7} {s.num_warps:>5} {s.registers:>5} "
            f"{f'{s.spill_stores}/{s.spill_loads}':>12} {s.shared_bytes:>8} {'y' if s.tensor_core else 'n':>3} "
            f"{s.occupancy:>5.2f}  {consts}"
        )
    return "\n".join(lines)


def _unwrap(fn: Any) -> JITFunction:
    # Autotuner / Heuristics wrap the JITFunction in .fn.
    while not isinstance(fn, JITFunction) and isinstance(getattr(fn, "fn", None), KernelInterface):
        fn = fn.fn
    if isinstance(fn, JITFunction):
        return fn
    if type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("kernel was decorated with TRITON_INTERPRET=1 set and cannot be compiled; "
                           "use compile_in_subprocess")
    raise TypeError(f"expected a @triton.jit function, got {type(fn).__name__}")


def _ptxas(arch: int) -> str:
    try:
        return get_ptxas(arch).path
    except RuntimeError as exc:
        raise RuntimeError(f"ptxas for sm_{arch} not found ({exc}); Triton's bundled ptxas is missing "
                           "and TRITON_PTXAS_PATH / TRITON_PTXAS_BLACKWELL_PATH do not point at one") from exc


def _tool(name: str) -> str:
    """A CUDA binutil: Triton's bundled copy first, then PATH, then the usual toolkit folders."""
    try:
        return getattr(triton.knobs.nvidia, name).path
    except RuntimeError:
        pass
    found = shutil.which(name) or next(
        (str(p) for p in sorted(Path("/usr/local").glob(f"cuda*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(f"{name} not found (Triton bundle, PATH, /usr/local/cuda*/bin)")
    return found


def _disassemble(cubin: Path) -> str:
    try:
        return _run([_tool("cuobjdump"), "-sass", str(cubin)])
    except RuntimeError:
        return _run([_tool("nvdisasm"), "-c", str(cubin)])


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr  # ptxas -v writes its report to either, depending on version


def _parse_ptxas_log(log: str) -> tuple[int, int, int]:
    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:
        raise RuntimeError(f"no register count in ptxas output:\n{log}")
    # Summed so that spills in non-inlined device functions count too.
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return int(regs.group(1)), sum(int(s) for s, _ in spills), sum(int(l) for _, l in spills)


def _res_usage_field(res_usage: str, key: str) -> int | None:
    found = re.search(rf"\b{key}:(\d+)", res_usage)
    return int(found.group(1)) if found else None


def _absolute_module(job: CompileJob) -> CompileJob:
    # The child may not share our notion of "relative"; pin file paths down now.
    if job.module.endswith(".py"):
        return dataclasses.replace(job, module=str(Path(job.module).resolve()))
    return job


def _load_module(module: str):
    if not module.endswith(".py"):
        return importlib.import_module(module)
    name = "_aot_" + re.sub(r"\W", "_", Path(module).stem)
    spec = importlib.util.spec_from_file_location(name, module)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses and pickling look modules up here
    spec.loader.exec_module(mod)
    return mod


def _decode_constexpr(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("tl."):
        return getattr(tl, value[3:])
    return value


def _compile_job(job: CompileJob) -> CompileStats:
    fn = getattr(_load_module(job.module), job.kernel)
    consts = {k: _decode_constexpr(v) for k, v in job.constexprs.items()}
    stats = compile_kernel(fn, job.signature, consts, job.arch, job.num_warps, job.num_stages,
                           job.divisible_by_16)
    return dataclasses.replace(stats, constexprs=dict(job.constexprs))  # keep them JSON-encodable


def _worker() -> None:
    jobs = [CompileJob(**job) for job in json.load(sys.stdin)]
    results = [dataclasses.asdict(_compile_job(job)) for job in jobs]
    sys.stdout.write("\n" + json.dumps(results) + "\n")  # last line; anything printed before is ignored


def _parse_signature(text: str) -> dict[str, str]:
    pairs = (item.split(":", 1) for item in text.split(",") if item.strip())
    return {name.strip(): ty.strip() for name, ty in pairs}


def _parse_constexpr(text: str) -> tuple[str, Any]:
    name, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # e.g. tl.float16
    return name.strip(), value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="module.path:kernel or path/to/file.py:kernel")
    parser.add_argument("--signature", required=True, help="'x:*fp32,n:i32' (constexprs may be omitted)")
    parser.add_argument("--constexpr", action="append", default=[], type=_parse_constexpr, help="NAME=VALUE")
    parser.add_argument("--arch", action="append", type=int, help="80 or 90; repeatable (default both)")
    parser.add_argument("--num-warps", type=int, default=4)
    parser.add_argument("--num-stages", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    module, _, kernel = args.target.rpartition(":")
    jobs = [
        CompileJob(module, kernel, _parse_signature(args.signature), dict(args.constexpr), arch,
                   args.num_warps, args.num_stages)
        for arch in (args.arch or [80, 90])
    ]
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        stats = compile_jobs_in_subprocess(jobs)  # kernels imported here would be interpreted
    else:
        stats = [_compile_job(_absolute_module(job)) for job in jobs]
    print(json.dumps([dataclasses.asdict(s) for s in stats], indent=2) if args.json else format_report(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
