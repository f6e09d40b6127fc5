"""The benchmark code: its byte counters on kernels and ops whose traffic is known by
construction, and every benchmark command on tiny shapes."""

import csv
import dataclasses
import json
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from benchmarks import (activation_memory, bytes_moved, compile_report, cost_model, loss_memory, microbench, nanogpt, ops, report,
                        results, throughput)
from stableblocks.kernels import backend

from _toy_kernels import add_kernel, dot_kernel

TOY = str(Path(__file__).with_name("_toy_kernels.py"))


@triton.jit
def scale_rows_kernel(x_ptr,  # (rows, n_cols) input
                      w_ptr,  # (n_cols,) weight every program reads
                      out_ptr,  # (rows, n_cols) output
                      n_cols,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    in_row = cols < n_cols
    w = tl.load(w_ptr + cols, mask=in_row)
    x = tl.load(x_ptr + row * n_cols + cols, mask=in_row)
    tl.store(out_ptr + row * n_cols + cols, x * w, mask=in_row)


@triton.jit
def column_sum_kernel(x_ptr,  # (rows, n_cols) input
                      out_ptr,  # (n_cols,) accumulated with atomics
                      n_cols,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    in_row = cols < n_cols
    tl.atomic_add(out_ptr + cols, tl.load(x_ptr + row * n_cols + cols, mask=in_row), mask=in_row)


# --- the Triton counter ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vector_add_moves_three_vectors(dtype):
    n, block = 1000, 256  # the last program's lanes past n are masked off and must not count
    x, y = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
    out = torch.empty_like(x)
    with bytes_moved.TritonTraffic() as traffic:
        add_kernel[(triton.cdiv(n, block),)](x, y, out, n, BLOCK=block)
    torch.testing.assert_close(out, x + y)
    (launch,) = traffic.launches
    size = n * x.element_size()
    assert (launch.kernel, launch.grid, launch.constexprs) == ("add_kernel", (4, 1, 1), {"BLOCK": block})
    assert {k: (a.read, a.write) for k, a in launch.args.items()} == {"x_ptr": (size, 0), "y_ptr": (size, 0), "out_ptr": (0, size)}
    assert traffic.requested == traffic.unique == 3 * size


def test_shared_weight_is_requested_per_program_but_modeled_once():
    rows, n_cols = 6, 100
    x, w = torch.randn(rows, n_cols), torch.randn(n_cols)
    out = torch.empty_like(x)
    with bytes_moved.TritonTraffic(weights=[w]) as traffic:
        scale_rows_kernel[(rows,)](x, w, out, n_cols, BLOCK=128)
    torch.testing.assert_close(out, x * w)
    args = traffic.launches[0].args
    assert (args["w_ptr"].read, args["w_ptr"].read_unique) == (rows * n_cols * 4, n_cols * 4)
    assert traffic.modeled == traffic.unique == (n_cols + 2 * rows * n_cols) * 4  # the weight once, x and out fully
    assert (args["x_ptr"].read, args["x_ptr"].read_unique) == (rows * n_cols * 4,) * 2
    assert (args["out_ptr"].write, args["out_ptr"].write_unique) == (rows * n_cols * 4,) * 2


def test_atomics_read_and_write():
    rows, n_cols = 5, 70
    x, out = torch.randn(rows, n_cols), torch.zeros(n_cols)
    with bytes_moved.TritonTraffic() as traffic:
        column_sum_kernel[(rows,)](x, out, n_cols, BLOCK=128)
    torch.testing.assert_close(out, x.sum(0))
    a = traffic.launches[0].args["out_ptr"]
    assert (a.read, a.write, a.read_unique, a.write_unique) == (rows * n_cols * 4, rows * n_cols * 4, n_cols * 4, n_cols * 4)


def test_counter_is_removed_on_exit():
    from triton.runtime import interpreter

    before = interpreter.InterpreterBuilder.create_masked_load
    with bytes_moved.TritonTraffic():
        assert interpreter.InterpreterBuilder.create_masked_load is not before
    assert interpreter.InterpreterBuilder.create_masked_load is before


def test_dot_flops_are_counted_per_launch():
    a, b, c = torch.randn(16, 32), torch.randn(32, 64), torch.empty(16, 64)
    with bytes_moved.TritonTraffic() as traffic:
        dot_kernel[(3,)](a, b, c, BM=16, BN=64, BK=32)
    torch.testing.assert_close(c, a @ b)
    (launch,) = traffic.launches
    assert launch.flops == traffic.flops == 3 * 2 * 16 * 32 * 64  # three programs, one 16x32 @ 32x64 each


@pytest.mark.parametrize("shape, padded", [(ops.Shape(B=1, T=128, d=128, vocab=256), False),
                                           (ops.Shape(B=1, T=70, d=64, vocab=300), True)])
def test_loss_kernels_count_the_math_and_the_padding(shape, padded):
    """On tile-aligned sizes the kernels do exactly the math's 2 N V d forward and 6 N V d backward
    FLOPs; past a tile edge they do more (masked lanes are computed), never less."""
    k = bytes_moved.loss_kernels(shape, torch.bfloat16, torch.float32)
    from stableblocks.kernels.fused_linear_cross_entropy_triton import tiles
    gpu = tiles(torch.bfloat16)  # launched with the GPU's tiles, not the interpreter's
    assert k["tiles"]["_linear_cross_entropy_fwd"]["BLOCK_V"] == gpu["fwd"]["BLOCK_V"] != tiles(torch.bfloat16, True)["fwd"]["BLOCK_V"]
    assert k["tiles"]["_linear_cross_entropy_matmul"]["BLOCK_M"] == gpu["matmul"]["BLOCK_M"]
    fwd, bwd = k["passes"]["forward"], k["passes"]["backward"]
    nvd = shape.tokens * shape.vocab * shape.d
    assert (fwd["math_flops"], bwd["math_flops"]) == (2 * nvd, 6 * nvd)
    assert fwd["eager_flops"] == 2 * nvd and bwd["eager_flops"] == 4 * nvd  # eager keeps the logits
    for r in (fwd, bwd):
        assert (r["kernel_flops"] > r["math_flops"]) if padded else (r["kernel_flops"] == r["math_flops"])
        assert r["kernel_modeled"] + r["launcher_bytes"] >= r["unavoidable_bytes"]
        assert r["kernel_requested"] >= r["kernel_modeled"]
    assert fwd["launches"] == ["_linear_cross_entropy_fwd"] and set(bwd["launches"]) == {"_linear_cross_entropy_bwd_logits", "_linear_cross_entropy_matmul"}


# --- the dispatcher counter ------------------------------------------------------------------------


def test_aten_counter_on_ops_of_known_traffic():
    x, b = torch.randn(1000), torch.randn(1)
    table, idx = torch.randn(50, 4), torch.tensor([3, 7])
    dst = torch.empty(1000)
    with bytes_moved.AtenTraffic() as traffic:
        y = x + b  # reads 1000 + 1 floats, writes 1000
        t = y.view(10, 100).t()  # views move nothing
        t.contiguous()  # a copy: reads and writes 1000
        F.embedding(idx, table)  # reads 2 indices and 2 rows, not the table
        dst.copy_(x)  # reads the source only
    got = [(o.name, o.read, o.write) for o in traffic.ops]
    assert got == [("aten::add.Tensor", 4004, 4000), ("aten::clone", 4000, 4000),
                   ("aten::embedding", 16 + 32, 32), ("aten::copy_", 4000, 4000)]


@torch.library.custom_op("sbbench_test::toy_add", mutates_args=())
def toy_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)  # launcher work the dispatcher counter must see (a write of x's size)
    add_kernel[(triton.cdiv(x.numel(), 128),)](x, y, out, x.numel(), BLOCK=128)
    return out


@toy_add.register_fake
def _(x, y):
    return torch.empty_like(x)


def test_launcher_ops_counted_and_interpreter_copies_not():
    x, y = torch.randn(300), torch.randn(300)
    with bytes_moved.TritonTraffic() as kernels, bytes_moved.AtenTraffic() as aten:
        out = toy_add(x, y)
    torch.testing.assert_close(out, x + y)
    assert aten.custom_ops == ["sbbench_test::toy_add"]
    assert aten.total == 300 * 4  # the zero fill; not the interpreter's host copies
    assert kernels.requested == 3 * 300 * 4


def test_eager_bytes_and_the_best_fusion_ratios():
    """The eager composition never moves less than the unavoidable bytes, and the fusion bounds
    come out as counted by hand: add + next norm reads x, z and writes y, n (4 tensors) where eager
    moves 5 (add: 3, norm: 2); with the post-norm too, 4 against 7."""
    shape = ops.Shape(B=1, T=32, d=256, D=32, vocab=64)
    best = {}
    for case in ops.CASES:
        inputs = ops.make_inputs(case, shape, torch.float32)
        eager = bytes_moved.count_passes(ops.reference_fn(case.op), inputs, triton=False)
        unavoidable = ops.unavoidable_bytes(case, shape, torch.float32)
        for mode in ("forward", "backward"):
            assert eager[mode].torch_bytes >= unavoidable[mode], (case.name, mode)
        best[case.name] = unavoidable["forward"] / eager["forward"].torch_bytes
    assert best["fused_add_norm:add+next"] == pytest.approx(4 / 5, rel=0.02)
    assert best["fused_add_norm:post+next"] == pytest.approx(4 / 7, rel=0.02)


def test_fa2_traffic_model_by_hand():
    a, D = 2, 16
    shape = ops.Shape(B=1, T=128, d=16, D=16)
    q = o = 128 * D * a
    lse = 128 * 4
    # Causal, 64-row blocks: query block 0 loads 64 key/value rows, block 1 all 128.
    fwd = q + 2 * (64 + 128) * D * a + o + lse
    # Backward: key block 0 is seen by all 128 query rows, block 1 by the last 64.
    per_q_row = 2 * D * a + 2 * 4 + 2 * D * 4  # Q, dO, LSE, delta in; dQ (fp32) in and out
    bwd = (2 * q + lse) + 2 * (2 * 64 * D * a * 2) + (128 + 64) * per_q_row + (128 * D * 4 + 128 * D * a)
    assert bytes_moved.fa2_model(shape, a, 64, 64) == {"forward": fwd, "backward": bwd}
    assert bytes_moved.fa2_model(shape, a, 64, 64, causal=False)["forward"] == q + 2 * 2 * 128 * D * a + o + lse
    # Unequal blocks: a 128-row query block visits two 64-row key blocks.
    long = ops.Shape(B=1, T=256, d=16, D=16)
    assert bytes_moved.fa2_model(long, a, 128, 64)["forward"] == 2 * 256 * D * a + 2 * (128 + 256) * D * a + 256 * 4


@pytest.mark.parametrize("case", ops.CASES, ids=lambda c: c.name)
def test_kernel_moves_at_least_the_unavoidable_bytes(case):
    if not case.has_kernel():
        pytest.skip("no kernel yet")
    shape = ops.Shape(B=2, T=64, d=64 if case.op == "fused_attention" else 96, D=32, vocab=128)
    r = bytes_moved.measure(case, shape)
    for mode in ("forward", "backward"):
        assert r.triton[mode].launches, f"{case.name} {mode}: no Triton launch was counted"
        assert r.triton[mode].total >= r.unavoidable[mode] * 0.99, (case.name, mode)


# --- activation memory, compile report, throughput -------------------------------------------------


@pytest.mark.parametrize("fake", [True, False])
def test_saved_bytes_of_a_known_module(fake):
    # Linear saves its input (its weight is a parameter); tanh saves its output.
    module = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.Tanh())
    x = torch.randn(4, 8, requires_grad=True)
    assert activation_memory.saved_bytes(module, x, fake=fake) == 4 * 8 * 4 + 4 * 16 * 4


@pytest.mark.parametrize("recipe", ["qk-norm-cap", "qk-fc-norm", "wesar"])
def test_fake_and_real_forwards_save_the_same(recipe):
    """Activation memory is measured on fake tensors; the real forward must save the same bytes,
    with the references and with whichever Triton kernels exist (run by the interpreter)."""
    x = torch.randn(2, 16, 32, dtype=torch.bfloat16, requires_grad=True)
    blocks = [activation_memory.stable_block(recipe, 32, 2, 16, torch.bfloat16),
              activation_memory.hf_block("sdpa", 32, 2, 16, torch.bfloat16)]
    for block in blocks:
        assert activation_memory.saved_bytes(block, x) == activation_memory.saved_bytes(block, x, fake=False) > 0
    if backend.KERNELS:
        backend.set_backend("auto")
        assert activation_memory.saved_bytes(blocks[0], x) == activation_memory.saved_bytes(blocks[0], x, fake=False)


def test_activation_memory_blocks():
    d, H, T = 64, 2, 64
    rows = activation_memory.measure(["gpt2"], d=d, n_head=H, T=T, dtype=torch.bfloat16)
    got = {(r["block"], r["backend"]): r for r in rows}
    assert got["StableBlock:gpt2", "reference"]["bytes_per_token"] > 0
    if not backend.KERNELS:
        assert got["StableBlock:gpt2", "triton"]["note"] == "no kernel yet"
    else:  # the Triton path really took the kernels' ops
        assert got["StableBlock:gpt2", "triton"]["note"].startswith("kernel ops: ") and "none" not in got["StableBlock:gpt2", "triton"]["note"]
    # Building HF's block probed for a top-level `kernels` package without importing kernels/ twice.
    ours = Path(backend.__file__).parent
    assert not [n for n, m in list(sys.modules.items()) if (n == "kernels" or n.startswith("kernels."))
                and Path(getattr(m, "__file__", None) or "/").parent == ours]
    # HF's eager attention keeps the (H, T, T) probabilities: H * T bf16 values per token more than SDPA.
    gap = got["hf:GPT2Block", "eager"]["bytes_per_token"] - got["hf:GPT2Block", "sdpa"]["bytes_per_token"]
    assert gap == pytest.approx(H * T * 2, rel=0.1)


def test_compile_report_finds_tensor_core_instructions():
    from stableblocks.kernels import aot

    try:
        aot._ptxas(80), aot._ptxas(90)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    module = types.SimpleNamespace(__name__="toy", aot_configs=lambda: [aot.CompileJob(
        TOY, "dot_kernel", {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32"}, {"BM": 64, "BN": 64, "BK": 64})])
    jobs = compile_report.jobs_for(module)
    assert [j.arch for j in jobs] == [80, 90]
    per_arch = types.SimpleNamespace(__name__="toy", aot_configs=lambda: [dataclasses.replace(jobs[0], num_warps=8), jobs[1]])
    assert compile_report.jobs_for(per_arch) == [dataclasses.replace(jobs[0], num_warps=8), jobs[1]]  # kept per arch
    stats = compile_report.compile_jobs(jobs)
    assert [(s["arch"], s["mma"]) for s in stats] == [("sm_80", ["HMMA"]), ("sm_90a", ["HGMMA"])]
    assert all(s["spill_stores"] == s["spill_loads"] == 0 for s in stats)
    rows, notes = compile_report.report() if not backend.KERNELS else ([], [])
    if not backend.KERNELS:
        assert rows == [] and notes == [f"{op}: no kernel yet" for op in ops.OPS]


def test_nanogpt_baseline_and_throughput():
    shape = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=2, vocab_size=256)
    model = nanogpt.GPT(nanogpt.GPTConfig(block_size=16, vocab_size=256, n_layer=1, n_head=2, n_embd=32))
    _, loss = model(torch.randint(256, (4, 16)), torch.randint(256, (4, 16)))
    assert loss.item() == pytest.approx(math.log(256), abs=0.3)  # uniform predictions at init
    out = throughput.training_throughput(shape, recipes=("gpt2",), rounds=2, warmup=1)
    assert len(out["nanogpt"]["runs"]) == len(out["stablegpt:gpt2"]["runs"]) == 2
    ratios = [s / n for s, n in zip(out["stablegpt:gpt2"]["runs"], out["nanogpt"]["runs"])]
    assert out["ratio:gpt2"]["runs"] == pytest.approx(ratios)


# --- the commands ----------------------------------------------------------------------------------


def test_microbench_command_on_cpu(tmp_path):
    out = tmp_path / "microbench.csv"
    microbench.main(["--device", "cpu", "--ops", "layer_norm", "fused_attention:causal", "--providers", "triton", "eager", "sdpa",
                     "--modes", "forward", "forward+backward", "--T", "32", "64", "--d", "64", "--D", "32", "--csv", str(out)])
    with open(out) as f:
        assert tuple(csv.DictReader(f).fieldnames) == results.COLUMNS
    rows = results.read(out)
    triton_rows = [r for r in rows if r["provider"] == "triton"]
    assert triton_rows and all(r["p50"] is None and r["note"] for r in triton_rows)  # recorded, not timed
    times = [r for r in rows if r["metric"] == "time" and r["p50"] is not None]
    assert {(r["op"], r["provider"]) for r in times} == {("layer_norm:affine", "eager"), ("fused_attention:causal", "eager"),
                                                         ("fused_attention:causal", "sdpa")}
    assert len(times) == 3 * 2 * 2  # (case, provider) x T x mode
    for r in times:
        assert 0 < r["p20"] <= r["p50"] <= r["p80"]
        bw = next(b for b in rows if b["metric"] == "bandwidth" and (b["op"], b["provider"], b["mode"], b["shape"]) ==
                  (r["op"], r["provider"], r["mode"], r["shape"]))
        case = next(c for c in ops.CASES if c.name == r["op"])
        shape = results.parse_shape(r["shape"])
        s = ops.Shape(shape["B"], shape["T"], shape.get("d", shape.get("H", 0) * shape.get("D", 0)), shape.get("D", 64))
        assert bw["p50"] == pytest.approx(ops.unavoidable_bytes(case, s, torch.float32)[r["mode"]] / r["p50"] / 1e6, rel=1e-4)
    assert sorted(p.name for p in tmp_path.glob("microbench_cpu_*.png")) == [
        "microbench_cpu_fused-attention-causal.png", "microbench_cpu_layer-norm-affine.png"]
    assert "| `layer_norm:affine` | eager |" in (tmp_path / "README.md").read_text()


def test_cost_model_command(tmp_path):
    data = cost_model.main(["--quick", "--only", "bytes", "--out", str(tmp_path)])
    stored = json.loads((tmp_path / "cost_model.json").read_text())
    assert [e["case"] for e in stored["bytes"]] == [c.name for c in cost_model.BYTES_CASES] == [e["case"] for e in data["bytes"]]
    rows = results.read(tmp_path / "cost_model.csv")
    for case in cost_model.BYTES_CASES:
        kernel = [r for r in rows if r["op"] == case.name and r["provider"] == "triton"]
        if case.has_kernel():
            assert all(r["p50"] > 0 for r in kernel)
        else:
            assert kernel and all(r["p50"] is None and r["note"] == "no kernel yet" for r in kernel)
    page = (tmp_path / "README.md").read_text()
    assert "quick smoke run, not results" in page and (tmp_path / "bytes_moved.png").exists()
    assert report.BEGIN not in page  # the README block goes to the project's README only


def test_readme_block_is_replaced_in_place(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\nrest\n")
    report.update_readme(readme, {"timestamp": "2026-01-01T00:00:00+00:00"})
    text = readme.read_text()
    assert text.startswith("intro\n" + report.BEGIN) and text.endswith(report.END + "\nrest\n") and "old" not in text


def _tracked_state(root: Path) -> str:
    """What git sees of the tracked files: status plus the diff's content."""
    import subprocess

    run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, check=True).stdout  # noqa: E731
    return run("status", "--porcelain", "--untracked-files=no") + run("diff", "HEAD")


@pytest.mark.slow
def test_quick_and_partial_runs_leave_committed_results_alone():
    import shutil
    import subprocess

    root = Path(__file__).parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    before = _tracked_state(root)
    shutil.rmtree(results.SCRATCH, ignore_errors=True)
    commands = [
        ["benchmarks.microbench", "--quick", "--device", "cpu", "--ops", "layer_norm:affine", "fused_attention:causal",
         "--providers", "eager", "flex", "--modes", "forward"],
        ["benchmarks.cost_model", "--quick", "--only", "bytes"],
        ["benchmarks.cost_model", "--only", "activation"],
        ["benchmarks.stability", "--quick", "--workers", "1"],
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs them: reference on CPU
    for cmd in commands:
        out = subprocess.run([sys.executable, "-m", *cmd], cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-2000:]
    assert _tracked_state(root) == before
    assert (results.SCRATCH / "microbench" / "microbench.csv").exists()
    assert (results.SCRATCH / "cost_model" / "cost_model.json").exists()
    assert (results.SCRATCH / "stability-quick" / "results.md").exists()
    # On CPU FlexAttention's forward is timed (it has no CPU backward).
    rows = [r for r in results.read(results.SCRATCH / "microbench" / "microbench.csv") if r["provider"] == "flex"]
    assert rows and all(r["p50"] for r in rows if r["metric"] == "time"), rows


@pytest.mark.parametrize("module, args", [
    (microbench, ["--quick", "--csv", str(results.RESULTS / "microbench.csv")]),
    (cost_model, ["--quick", "--out", str(results.RESULTS)]),
    (cost_model, ["--only", "bytes", "--commit"]),
])
def test_a_quick_run_may_not_name_the_committed_results(module, args, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(args)
    assert exit_.value.code == 2
    assert "--" in capsys.readouterr().err


def test_stability_quick_may_not_name_the_committed_results(capsys):
    from benchmarks.stability.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["--quick", "--out", str(Path(__file__).parents[1] / "benchmarks" / "stability" / "results")])
    assert exit_.value.code == 2 and "never writes into the committed results" in capsys.readouterr().err


def test_readme_figures_come_from_the_commands_that_wrote_them():
    from benchmarks import main_job

    readme = report.README.read_text()
    # The main job's figures: the sentence main_job writes from its stored summary.
    stored = json.loads(main_job.PATH.read_text())
    assert f"<!-- main-job:begin -->{main_job.sentence(stored)}<!-- main-job:end -->" in readme
    assert not stored["diverged"] and stored["best_val_loss"] < stored["first_loss"]
    # The stability table: what the full stability run wrote into results.md beside its plots.
    sweep = (Path(report.README).parent / "benchmarks/stability/results/results.md").read_text().split("\n\nGradients")[0]
    assert f"<!-- stability:begin -->\n{sweep}\n<!-- stability:end -->" in readme
    # The headline numbers: the block the cost model renders from its stored results.
    data = json.loads((results.RESULTS / "cost_model.json").read_text())
    assert report.readme_block(data) in readme


def test_replace_block_rewrites_only_its_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("a <!-- x:begin -->old<!-- x:end --> b <!-- y:begin -->keep<!-- y:end -->\n")
    report.replace_block(readme, "x", "new")
    assert readme.read_text() == "a <!-- x:begin -->new<!-- x:end --> b <!-- y:begin -->keep<!-- y:end -->\n"
    with pytest.raises(RuntimeError, match="no <!-- z:begin -->"):
        report.replace_block(readme, "z", "new")


# --- the loss step ---------------------------------------------------------------------------------


def test_live_bytes_counts_storages_until_freed():
    x = torch.randn(100)
    with loss_memory.LiveBytes(existing=[x]) as mem:
        y = x * 2  # 400 B
        v = y.view(10, 10)  # a view: nothing new
        z = torch.empty(50, dtype=torch.float64)  # 400 B
        x.reshape(4, 25)  # a view of an input: not counted
        assert mem.live == mem.peak == 800
        del y, v
        assert mem.live == 400
        del z
    assert (mem.live, mem.peak) == (0, 800)


@pytest.mark.parametrize("path", loss_memory.PATHS)
def test_loss_memory_fake_matches_real(path):
    """The loss step's bytes are measured on fake tensors; a real run allocates the same (the Triton
    path's kernels run in the interpreter, whose launches leave their outputs to the cycle collector:
    at most its two unsaved fp32 outputs per token more)."""
    N, d, V = 100, 48, 300
    fake, real = (loss_memory.measure_step(path, N, d, V, fake=f) for f in (True, False))
    assert fake["gradients"] == real["gradients"] == N * d * 2 + V * d * 4
    if path == "triton":
        assert 0 <= real["peak"] - fake["peak"] <= 2 * 4 * N and real["peak"] > real["gradients"]
    else:
        assert fake == real


def test_fused_loss_holds_and_peaks_less_than_eager(monkeypatch):
    from stableblocks.kernels import fused_linear_cross_entropy_triton as tri

    N, d, V = 512, 64, 4000
    # Chunks of 64 rows, as GPT-2's 8192 tokens take about 50 of them at V = 50257.
    monkeypatch.setattr(loss_memory.flce, "_REFERENCE_CHUNK", 64 * V)
    monkeypatch.setattr(tri, "CHUNK_ELEMENTS", 64 * V)
    got = {p: loss_memory.measure_step(p, N, d, V) for p in loss_memory.PATHS}
    logits_fp32 = N * V * 4
    assert got["eager"]["held_after_forward"] >= logits_fp32  # log-softmax's output, at least
    for path in ("reference", "triton"):
        assert got[path]["held_after_forward"] < 4 * 4 * N  # a few fp32 values per token
        assert got[path]["peak"] < got["eager"]["peak"] / 2


def test_cost_model_loss_part(tmp_path):
    data = cost_model.main(["--quick", "--only", "loss", "--out", str(tmp_path)])
    loss = json.loads((tmp_path / "cost_model.json").read_text())["loss"]
    assert [r["path"] for r in loss["rows"]] == list(loss_memory.PATHS) and loss == json.loads(json.dumps(data["loss"]))
    assert all(c["fake_peak"] == c["real_peak"] for c in loss["checks"])
    assert loss["throughput"]["ratio"]["p50"] > 0
    goals = {g: status for g, _, status in report.goals(data)}
    assert any(g.startswith("loss step memory") for g in goals)
    page = (tmp_path / "README.md").read_text()
    assert "## Loss step memory" in page and "Cut Cross-Entropy" in page
    rows = [r for r in results.read(tmp_path / "cost_model.csv") if r["op"] == "loss_step"]
    assert {r["provider"] for r in rows} == set(loss_memory.PATHS) and all(r["p50"] > 0 for r in rows)


def test_microbench_times_the_loss_providers_on_cpu(tmp_path):
    out = tmp_path / "microbench.csv"
    microbench.main(["--device", "cpu", "--ops", "fused_linear_cross_entropy", "--providers", "triton", "reference", "eager",
                     "--modes", "forward+backward", "--T", "16", "--d", "32", "--csv", str(out), "--no-report"])
    rows = results.read(out)
    times = {r["provider"]: r for r in rows if r["metric"] == "time"}
    assert times["triton"]["p50"] is None and times["triton"]["note"]
    assert times["reference"]["p50"] > 0 and times["eager"]["p50"] > 0
    assert times["eager"]["shape"] == "B=1 T=16 d=32 V=50304 fp32"


def test_diagnostics_overhead_reruns_the_training_command_in_one_folder():
    # Every variant trains into the same throwaway folder: the command's one-run-per-folder rule
    # must see the benchmark's overwrite, not refuse the second run.
    out = throughput.diagnostics_overhead(steps=2, repeats=1)
    assert out["status"] == "measured" and out["ratio:default"]["p50"] > 0
