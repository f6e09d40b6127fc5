"""Static compile report, no GPU needed: every kernel at the block sizes its launcher picks, for
sm_80 and sm_90a: registers per thread, spill bytes, shared memory, the occupancy those imply,
and which tensor-core instructions the SASS holds (HMMA on sm_80, HGMMA = wgmma on sm_90a).

What to compile comes from each kernel module's ``aot_configs()`` (the list its AOT test uses);
compilation runs in one child interpreter without TRITON_INTERPRET (stableblocks.kernels.aot).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import subprocess

from . import ops

ARCHS = (80, 90)


def kernel_modules() -> dict[str, object | None]:
    """op -> its Triton module (None when the op has no kernel yet)."""
    out = {}
    for op in ops.OPS:
        name = f"stableblocks.kernels.{op}_triton"
        out[op] = importlib.import_module(name) if importlib.util.find_spec(name) else None
    return out


def jobs_for(module) -> list:
    """The module's aot_configs() (aot.CompileJobs). Jobs that name both archs are kept as they are
    (block sizes may differ per arch); otherwise each job is compiled for sm_80 and sm_90a."""
    from stableblocks.kernels import aot

    if not hasattr(module, "aot_configs"):
        raise RuntimeError(f"{module.__name__} has no aot_configs(): the report compiles what that function lists")
    jobs = list(module.aot_configs())
    wrong = [type(job).__name__ for job in jobs if not isinstance(job, aot.CompileJob)]
    if wrong:
        raise TypeError(f"{module.__name__}.aot_configs(): expected aot.CompileJobs, got {sorted(set(wrong))}")
    archs = {job.arch for job in jobs}
    if not set(ARCHS) <= archs:
        jobs = [dataclasses.replace(job, arch=arch) for job in jobs for arch in ARCHS]
    return [job for i, job in enumerate(jobs) if job not in jobs[:i]]


def compile_jobs(jobs: list, timeout: float = 1800.0) -> list[dict]:
    """Compile in one child process; one dict of CompileStats fields per job ("mma": the tensor-core
    mnemonics in its SASS)."""
    from stableblocks.kernels import aot

    return [{**dataclasses.asdict(s), "mma": list(s.mma)} for s in aot.compile_jobs_in_subprocess(jobs, timeout)] \
        if jobs else []


def report(progress=None) -> tuple[list[dict], list[str]]:
    """(rows, notes): one row per compiled kernel and arch; a note per op without a kernel."""
    rows, notes = [], []
    for op, module in kernel_modules().items():
        if module is None:
            notes.append(f"{op}: no kernel yet")
            continue
        if progress:
            progress(f"compile {op}")
        try:
            stats = compile_jobs(jobs_for(module))
        except (RuntimeError, TypeError, subprocess.TimeoutExpired) as exc:  # reported, and the other ops still run
            notes.append(f"{op}: compile report failed: {str(exc).strip().splitlines()[-1][:300]}")
            continue
        rows += [{"op": op, **s} for s in stats]
    return rows, notes
