"""AOT compilation reports for sm_80 / sm_90a, produced without a GPU.

The project's tests run with TRITON_INTERPRET=1, under which kernels cannot be
compiled, so everything goes through a child interpreter.
"""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOY = str(Path(__file__).with_name("_toy_kernels.py"))

try:
    from stableblocks.kernels import aot
except ImportError:  # source checkout that is not installed
    _spec = importlib.util.spec_from_file_location("_aot_under_test", ROOT / "kernels" / "aot.py")
    aot = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = aot
    _spec.loader.exec_module(aot)

ARCHS = {80: "sm_80", 90: "sm_90a"}

ADD_SIGNATURE = {"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"}

JOBS = {
    ("add", arch): aot.CompileJob(TOY, "add_kernel", ADD_SIGNATURE, {"BLOCK": 1024}, arch, num_warps=4)
    for arch in ARCHS
} | {
    ("dot", arch): aot.CompileJob(TOY, "dot_kernel", {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32"},
                                  {"BM": 64, "BN": 64, "BK": 64}, arch, num_warps=4)
    for arch in ARCHS
} | {
    ("spill", arch): aot.CompileJob(TOY, "spill_kernel", {"x_ptr": "*fp32", "out_ptr": "*fp32", "n_iter": "i32"},
                                    {"BLOCK": 8192}, arch, num_warps=1)
    for arch in ARCHS
}


@pytest.fixture(scope="module")
def stats():
    try:
        aot._ptxas(80), aot._ptxas(90)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    # One child for all jobs: importing Triton dominates the cost of a small compile.
    return dict(zip(JOBS, aot.compile_jobs_in_subprocess(list(JOBS.values()))))


@pytest.mark.parametrize("arch", ARCHS)
def test_vector_add(stats, arch):
    s = stats["add", arch]
    assert (s.kernel, s.arch, s.num_warps, s.constexprs) == ("add_kernel", ARCHS[arch], 4, {"BLOCK": 1024})
    assert s.registers > 0
    assert s.spill_stores == s.spill_loads == 0
    assert s.shared_bytes == 0
    assert not s.tensor_core
    assert s.occupancy == 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_dot_uses_tensor_cores(stats, arch):
    s = stats["dot", arch]
    assert s.tensor_core
    assert s.spill_stores == s.spill_loads == 0
    assert s.shared_bytes >= 2 * 64 * 64 * 2  # both fp16 operand tiles are staged through shared memory
    assert 0 < s.occupancy <= 1


@pytest.mark.parametrize("arch", ARCHS)
def test_spills_are_reported(stats, arch):
    s = stats["spill", arch]
    assert s.spill_stores > 0 and s.spill_loads > 0
    assert not s.tensor_core


def test_single_job_helper_matches_batch(stats):
    s = aot.compile_in_subprocess(TOY, "add_kernel", ADD_SIGNATURE, {"BLOCK": 1024}, 90)
    assert s == stats["add", 90]


def test_occupancy_model():
    # 128 regs/thread: 16 warps fit in the register file -> 1/4 of sm_90's 64 warp slots.
    assert aot.occupancy(128, 0, 4, 90) == pytest.approx(0.25)
    # 100 KB of shared memory per CTA: one CTA fits in sm_80's 164 KB, two in sm_90's 228 KB.
    assert aot.occupancy(32, 100 * 1024, 4, 80) == pytest.approx(4 / 64)
    assert aot.occupancy(32, 100 * 1024, 4, 90) == pytest.approx(8 / 64)


def test_ptxas_log_parsing():
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    2208 bytes stack frame, 5956 bytes spill stores, 6980 bytes spill loads\n"
        "ptxas info    : Used 64 registers, used 0 barriers, 392 bytes cmem[0]\n"
    )
    assert aot._parse_ptxas_log(log) == (64, 5956, 6980)


def test_child_failure_is_a_runtime_error():
    with pytest.raises(RuntimeError, match="no_such_kernel"):
        aot.compile_in_subprocess(TOY, "no_such_kernel", {}, {}, 80)


def _plain_kernel(x_ptr):
    pass


def test_interpreted_kernel_is_rejected_in_process():
    from triton.runtime.interpreter import InterpretedFunction

    with pytest.raises(RuntimeError, match="compile_in_subprocess"):
        aot.compile_kernel(InterpretedFunction(_plain_kernel), {"x_ptr": "*fp32"}, {}, 80)


def test_missing_ptxas_is_a_clear_error(monkeypatch):
    def no_ptxas(arch):
        raise RuntimeError("Cannot find ptxas")

    monkeypatch.setattr(aot, "get_ptxas", no_ptxas)
    with pytest.raises(RuntimeError, match="ptxas for sm_90 not found"):
        aot.compile_kernel(_plain_kernel, {"x_ptr": "*fp32"}, {}, 90)
