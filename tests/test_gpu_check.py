"""benchmarks.gpu_check without a GPU: arguments, the no-GPU exit, result files, the results page's
measured columns, and the device switch the CUDA test run uses (on the meta device)."""

import json
import subprocess
import time
import sys
from pathlib import Path

import pytest
import torch

from _device import on_device
from benchmarks import gpu_check, ops, report, results


def test_without_a_gpu_it_says_so_writes_nothing_and_exits_0(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu"
    assert gpu_check.main(["--out", str(out)]) == 0
    assert "no CUDA GPU found" in capsys.readouterr().out
    assert not out.exists()


def test_only_a_full_run_writes_to_the_results_folder(tmp_path):
    assert gpu_check.parse_args([]).out == gpu_check.GPU_RESULTS
    for partial in (["--quick"], ["--steps", "tests", "memory"]):
        assert gpu_check.parse_args(partial).out == results.SCRATCH / "gpu_check"
        with pytest.raises(SystemExit) as exc:
            gpu_check.parse_args([*partial, "--out", str(gpu_check.GPU_RESULTS)])
        assert exc.value.code == 2
    assert gpu_check.parse_args(["--quick", "--out", str(tmp_path)]).out == tmp_path
    for inside in (gpu_check.GPU_RESULTS / "2026-12-04-nvidia-h200", results.RESULTS):  # nor any committed folder
        with pytest.raises(SystemExit) as exc:
            gpu_check.parse_args(["--quick", "--out", str(inside)])
        assert exc.value.code == 2
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--steps", "nonsense"])


def test_the_test_child_never_runs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    env = gpu_check.child_env()
    assert "TRITON_INTERPRET" not in env and env["STABLEBLOCKS_TEST_DEVICE"] == "cuda"


def test_main_records_every_step_and_fails_when_one_fails(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(results, "device_name", lambda device: "NVIDIA Test GPU")
    monkeypatch.setattr(gpu_check, "run_tests", lambda out, quick: {"ok": True, "passed": 3})
    monkeypatch.setattr(gpu_check, "run_equivalence", lambda recipes: {"ok": True, "recipes": list(recipes)})
    monkeypatch.setattr(gpu_check, "run_microbench", lambda out, quick: {"ok": False, "errors": ["x"]})

    def broken(recipes):
        raise RuntimeError("out of luck")

    monkeypatch.setattr(gpu_check, "run_memory", broken)
    assert gpu_check.main(["--quick", "--out", str(tmp_path)]) == 1
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["device"] == "NVIDIA Test GPU" and data["quick"] and "torch" in data["versions"]
    assert list(data["steps"]) == ["tests", "equivalence", "microbench", "memory"]
    assert data["steps"]["equivalence"]["recipes"] == list(gpu_check.QUICK_RECIPES)
    assert data["steps"]["memory"] == {"ok": False, "error": "RuntimeError: out of luck",
                                       "seconds": data["steps"]["memory"]["seconds"]}
    assert not gpu_check.is_full(data) and not list(tmp_path.glob("*.tmp"))


def test_junit_summary(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="a" name="ok"/>'
                   '<testcase classname="a" name="bad"><failure message="x"/></testcase>'
                   '<testcase classname="b" name="err"><error message="y"/></testcase>'
                   '<testcase classname="b" name="skip"><skipped/></testcase></testsuite></testsuites>')
    assert gpu_check.junit_summary(xml) == {"passed": 1, "failed": 2, "skipped": 1, "failures": ["a::bad", "b::err"]}
    assert gpu_check.junit_summary(tmp_path / "missing.xml")["failed"] == 0


def _sample_gpu_folder(folder, quick):
    case = next(c for c in ops.CASES if c.name == "layer_norm:affine")
    label = case.shape_label(report.PROJECTION, ops.TRAINING_DTYPE, ops.TRAINING_PARAM_DTYPE)
    stamp = dict(device="NVIDIA Test GPU", versions="v", timestamp="t")
    results.append(folder / "microbench.csv", [
        results.row(case.name, "triton", "forward", label, "time", "ms", 0.0123, 0.012, 0.013, **stamp),
        results.row(case.name, "eager", "forward", label, "time", "ms", 0.0456, 0.045, 0.046, **stamp)])
    steps = dict.fromkeys(("tests", "equivalence", "microbench", "memory"), {"ok": True})
    gpu_check.write_json(folder / "gpu_check.json", {**stamp, "quick": quick, "steps": steps})


@pytest.mark.parametrize("quick", [False, True])
def test_the_measured_columns_come_from_a_full_gpu_check_only(tmp_path, quick):
    _sample_gpu_folder(tmp_path, quick)
    rows, meta = gpu_check.measured_rows(tmp_path)
    data = json.loads((results.RESULTS / "cost_model.json").read_text())
    table = report.projection_table(data, rows)
    line = next(x for x in table.splitlines() if x.startswith("| `layer_norm:affine` | forward"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    if quick:
        assert rows == [] and meta == {} and cells[5:7] == ["—", "—"]
    else:
        assert meta["device"] == "NVIDIA Test GPU" and cells[5:7] == ["12.3", "45.6"]  # µs


def test_test_device_switch_moves_factory_results_and_keeps_their_values():
    gen = torch.Generator().manual_seed(0)
    want = torch.randn(3, generator=torch.Generator().manual_seed(0))
    with on_device("meta"):
        x = torch.randn(3, generator=gen, requires_grad=True)
        kept = torch.zeros(2, device="cpu")
        like = torch.randn_like(x)
    assert x.device.type == "meta" and x.is_leaf and x.requires_grad and like.device.type == "meta"
    assert kept.device.type == "cpu"
    with on_device("cpu"):
        assert torch.equal(torch.randn(3, generator=torch.Generator().manual_seed(0)), want)


def test_each_suite_runs_in_its_own_child_on_cuda(monkeypatch, tmp_path):
    calls = []
    # A previous run's file: a suite that writes none (killed) must not count it.
    (tmp_path / "tests-test_model_triton.xml").write_text('<testsuite><testcase classname="old" name="x"/></testsuite>')

    def fake_run(cmd, timeout):
        calls.append(cmd)
        xml = next(a.split("=", 1)[1] for a in cmd if a.startswith("--junitxml="))
        if "model_triton" in xml:
            return subprocess.CompletedProcess(cmd, "timeout", "partial", "killed after 1200 s")
        failed = "<failure/>" if "fused_attention" in xml else ""
        Path(xml).write_text(f'<testsuite><testcase classname="c" name="a"/><testcase classname="c" name="b">{failed}'
                             '</testcase></testsuite>')
        return subprocess.CompletedProcess(cmd, 1 if failed else 0, "out", "err")

    monkeypatch.setattr(gpu_check, "run_child", fake_run)
    got = gpu_check.run_tests(tmp_path, quick=True)
    assert [c[7] for c in calls] == list(gpu_check.TEST_FILES)
    for cmd in calls:
        assert cmd[cmd.index("not slow") - 1] == "-m" and "slow or not slow" not in cmd
        assert {f"--deselect={t}" for t in gpu_check.CPU_ONLY} <= set(cmd)
    assert not got["ok"] and got["passed"] == 2 * (len(calls) - 1) - 1 and got["failures"] == ["c::b"]
    hung = got["files"]["tests/test_model_triton.py"]
    assert hung["returncode"] == "timeout" and hung["passed"] == 0 and "killed" in hung["tail"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"tests-{Path(f).stem}.xml" for f in gpu_check.TEST_FILES)


def test_a_child_past_its_time_is_killed_with_its_workers(tmp_path):
    marker = tmp_path / "grandchild-alive"
    worker = tmp_path / "worker.py"  # like a pytest-xdist worker: a child of the child
    worker.write_text(f"import pathlib, time\ntime.sleep(3)\npathlib.Path({str(marker)!r}).touch()\n")
    parent = tmp_path / "parent.py"
    parent.write_text(f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, {str(worker)!r}])\ntime.sleep(60)\n")
    proc = gpu_check.run_child([sys.executable, str(parent)], timeout=1)
    assert proc.returncode == "timeout" and "killed after 1 s" in proc.stderr
    time.sleep(4)
    assert not marker.exists(), "the child's own child outlived the kill"


def test_the_child_uses_workers_and_a_time_limit_when_their_plugins_are_installed(monkeypatch):
    present = {"xdist", "pytest_timeout"}
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: object() if name in present else None)
    opts = gpu_check.pytest_options()
    assert opts[0] == "-n" and int(opts[1]) >= 1 and f"--timeout={gpu_check.TEST_TIMEOUT}" in opts
    present.clear()
    assert gpu_check.pytest_options() == []


def test_the_cpu_only_tests_named_exist():
    root = Path(gpu_check.ROOT)
    for node in gpu_check.CPU_ONLY:
        path, name = node.split("::")
        assert f"def {name}(" in (root / path).read_text(), node


def test_the_readme_block_is_the_summary_of_the_newest_stored_run():
    readme = Path(gpu_check.ROOT, "README.md").read_text()
    runs = [p.parent for p in [gpu_check.GPU_RESULTS / "gpu_check.json", *gpu_check.GPU_RESULTS.glob("*/gpu_check.json")]
            if p.exists()]
    assert runs, "no stored GPU run"
    newest = max(runs, key=lambda f: json.loads((f / "gpu_check.json").read_text())["timestamp"])
    assert f"<!-- gpu-check:begin -->\n{gpu_check.summary(newest)}<!-- gpu-check:end -->" in readme


def test_summary_counts_and_flags_a_partial_run(tmp_path):
    folder = tmp_path
    _sample_gpu_folder(folder, quick=False)
    data = json.loads((folder / "gpu_check.json").read_text())
    data["steps"]["tests"] = {"ok": False, "passed": 7, "failed": 1, "skipped": 2, "failures": ["t::bad"], "seconds": 12.4}
    data["steps"]["memory"] = {"ok": True, "shape": {"n_layer": 2, "n_embd": 64, "batch_size": 1, "block_size": 8},
                               "peak_bytes": {"gpt2:reference": 2e9, "gpt2:triton": 1e9}}
    del data["steps"]["equivalence"]
    gpu_check.write_json(folder / "gpu_check.json", data)
    text = gpu_check.summary(folder)
    assert "7 passed, 1 failed, 2 skipped (failed: `t::bad`)" in text and "Time per step: tests 12 s." in text
    assert "a partial run" in text and "does not record: equivalence" in text and "Model equivalence" not in text
    assert "| `gpt2` | 2.00 | 1.00 | 0.50 |" in text
    # Only forward+backward rows are tabulated; the sample has forward rows only.
    assert "Forward + backward" not in text


def test_summarise_needs_a_stored_run(tmp_path):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(["--summarise", str(tmp_path)])
    assert exc.value.code == 2
