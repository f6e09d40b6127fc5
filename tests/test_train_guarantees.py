"""What training never loses and always says: only good states are checkpointed, one run per
out-dir, corrupt files are named, config files and data are checked before the first step, a run
that blows up stops as diverged, and the command line answers bad input in one line."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import _faults
from stableblocks import checkpoint, cli, data, rundir
from stableblocks.spikes import DivergenceRule, divergence_threshold
from stableblocks.train import DivergeConfig, SpikeConfig, TrainConfig, command, main, parse_args, run
from stableblocks.trainer import Trainer

from test_train import cache_dir, rows, tiny  # noqa: F401  (cache_dir is a fixture)

TESTS = os.path.dirname(__file__)


def model_of(path):
    return checkpoint.load(path)["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def exit_code(argv) -> int:
    with pytest.raises(SystemExit) as e:
        command(argv)
    return e.value.code


# ---------------------------------------------------------------- a divergence keeps the last good checkpoint


@pytest.mark.parametrize("guard, lr", [("skip", 1e38), ("off", 1e38), ("rollback", 1e38), ("skip", 1e3)])
def test_a_divergence_never_replaces_the_last_good_checkpoint(tmp_path, cache_dir, guard, lr):  # noqa: F811
    run(tiny(tmp_path, cache_dir, steps=10, ckpt_interval=5, eval_interval=0))
    good = model_of(tmp_path / "ckpt.pt")
    cfg = tiny(tmp_path, cache_dir, steps=40, lr=lr, ckpt_interval=1 if guard == "off" else 5, eval_interval=0, resume=True,
               spike=SpikeConfig(guard=guard, window=10, min_history=5), diverge=DivergeConfig(max_skipped=5))
    summary = run(cfg)
    assert summary["diverged"] and summary["diverged_reason"] and summary["steps"] < 40, summary
    assert summary["last_good_checkpoint"] == str(tmp_path / "ckpt.pt")
    state = checkpoint.load(tmp_path / "ckpt.pt")
    assert state["step"] == 10 and same_weights(state["model"], good)  # nothing after the blow-up was kept
    assert json.loads((tmp_path / "summary.json").read_text())["diverged_step"] == summary["diverged_step"]


def test_a_diverged_run_exits_3_and_run_returns_the_summary(tmp_path, cache_dir):  # noqa: F811
    args = ["--steps", "30", "--batch-size", "4", "--seq-len", "32", "--model.n-layer", "2", "--model.n-head", "2",
            "--model.n-embd", "32", "--lr", "1e4", "--grad-clip", "0", "--warmup", "0", "--eval-interval", "0",
            "--no-plot", "--no-progress", "--data.cache-dir", cache_dir]
    assert exit_code([*args, "--out-dir", str(tmp_path / "a")]) == 3
    summary = main([*args, "--out-dir", str(tmp_path / "b")])  # from Python: no exit, the summary
    assert summary["diverged"] and summary["diverged_step"] < 30
    assert exit_code([*args, "--lr", "1e-3", "--steps", "2", "--out-dir", str(tmp_path / "c")]) == 0


# ---------------------------------------------------------------- the divergence rule


def test_divergence_rule_fires_for_each_reason_and_not_for_a_passing_spike():
    threshold = divergence_threshold(5.0, 256, margin=1.5)
    assert threshold == pytest.approx(math.log(256) * 1.5)
    rule = DivergenceRule(256, margin=1.5)
    losses = [5.5, 5.0, 4.0, 30.0, 40.0] + [3.0] * 20  # a two-step spike the run recovers from
    assert all(rule.train_step(i, x, True, False) is None for i, x in enumerate(losses))
    assert rule.healthy() and rule.validation(25, 3.0) is None
    for i in range(25, 80):
        if rule.train_step(i, 50.0, True, False):
            break
    assert "smoothed training loss" in rule.reason and rule.step == i and not rule.healthy()

    assert "validation loss" in DivergenceRule(256).validation(0, math.nan)
    rule = DivergenceRule(256, max_skipped=3)
    rule.train_step(0, 5.5, True, False)
    assert [rule.train_step(i, math.nan, False, True) for i in range(1, 5)][-1].startswith("the spike guard")
    assert "non-finite" in DivergenceRule(256).train_step(0, math.inf, False, False)


def test_a_finite_blow_up_is_diverged_by_the_smoothed_loss(tmp_path, cache_dir):  # noqa: F811
    """A loss far above its start but finite (a constant huge lr, clipping off): a non-finite
    rule alone lets it run on; the smoothed-loss threshold stops it."""
    summary = run(tiny(tmp_path, cache_dir, steps=60, lr=1.0, grad_clip=0.0, warmup=0, min_lr_ratio=1.0, eval_interval=20,
                       ckpt_interval=0, diverge=DivergeConfig(patience=5)))
    assert summary["diverged"] and summary["diverged_reason"].startswith("smoothed training loss"), summary
    assert math.isfinite(summary["final_loss"]) and summary["steps"] < 60


def test_committed_stability_runs_stop_only_far_above_their_best_lr():
    """The default margin stops only runs that were lost anyway: in the committed full benchmark
    every run it let finish ends far below its threshold, and every run it stopped had a learning
    rate more than a rung (3x) above its recipe's best."""
    import csv

    path = os.path.join(TESTS, "..", "benchmarks", "stability", "results", "results.csv")
    rows = list(csv.DictReader(open(path)))
    best = {}
    for r in rows:
        if (r["seed"], r["grad_clip"], r["n_layer"], r["weight_decay"], r["tokenizer"], r["extra"]) == ("0", "1.0", "4", "0.1", "byte", "{}"):
            if r["diverged"] == "False" and float(r["final_val_loss"]) < best.get(r["variant"], (math.inf, 0))[0]:
                best[r["variant"]] = (float(r["final_val_loss"]), float(r["lr"]))
    stopped = [r for r in rows if r["diverged"] == "True"]
    assert stopped and len(best) >= 10
    for r in rows:
        if r["diverged"] == "False":
            assert float(r["final_val_loss"]) < divergence_threshold(float(r["first_loss"]), 256) / 2, r
        else:
            assert float(r["lr"]) > 3 * best[r["variant"]][1], r


# ---------------------------------------------------------------- one run per out-dir


HOLDER = """
import sys
from stableblocks import rundir
try:
    rundir.RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
except rundir.RunDirError:
    print("refused", flush=True)
sys.stdin.read()  # hold the lock until the test closes stdin (or kills us)
"""


def _holders(folder, n):
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(n)]
    return procs, [p.stdout.readline().strip() for p in procs]


def test_a_second_run_into_a_live_out_dir_fails_at_once(tmp_path, cache_dir):  # noqa: F811
    (holder,), said = _holders(tmp_path, 1)
    try:
        assert said == ["held"]
        with pytest.raises(rundir.RunDirError, match=f"another run \\(pid {holder.pid}"):
            run(tiny(tmp_path, cache_dir, steps=2))
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()  # kill -9: no clean-up, the lock file stays behind
        holder.wait()
    assert json.loads((tmp_path / rundir.LOCK).read_text())["pid"] == holder.pid
    run(tiny(tmp_path, cache_dir, steps=2, ckpt_interval=0))  # the kernel dropped the dead run's lock
    assert not (tmp_path / rundir.LOCK).exists() and len(rows(tmp_path)) == 2


def test_runs_racing_for_a_dead_runs_lock_get_it_once(tmp_path):
    # Left by a killed run whose pid now belongs to a live process (this one): neither the pid
    # nor its liveness decides, only whether a process holds the lock.
    (tmp_path / rundir.LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    procs, said = _holders(tmp_path, 4)
    try:
        assert sorted(said) == ["held", "refused", "refused", "refused"], said
        with pytest.raises(rundir.RunDirError, match="another run"):
            rundir.RunLock(tmp_path).acquire()
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=30)
    with rundir.RunLock(tmp_path):  # every holder gone: free again
        assert (tmp_path / rundir.LOCK).exists()
    assert not (tmp_path / rundir.LOCK).exists()


def test_the_trainer_api_keeps_the_command_s_folder_rules(tmp_path, cache_dir):  # noqa: F811
    from stableblocks import distributed

    run(tiny(tmp_path, cache_dir, steps=4, ckpt_interval=4))
    before = {name: (tmp_path / name).read_bytes() for name in ("ckpt.pt", "metrics.jsonl", "run.json")}
    d = distributed.setup("cpu", False)
    with pytest.raises(rundir.RunDirError, match="already holds a run"):
        Trainer(tiny(tmp_path, cache_dir, steps=2), d)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    trainer = Trainer(tiny(tmp_path, cache_dir, steps=6, ckpt_interval=4, resume=True), d)
    with pytest.raises(rundir.RunDirError, match="another run"):  # held from set-up to the end of fit
        run(tiny(tmp_path, cache_dir, steps=6, resume=True))
    assert trainer.fit()["steps"] == 6 and (tmp_path / "summary.json").exists()
    assert not (tmp_path / rundir.LOCK).exists()


def test_an_existing_run_is_resumed_or_overwritten_only_when_asked(tmp_path, cache_dir):  # noqa: F811
    run(tiny(tmp_path, cache_dir, steps=4, ckpt_interval=4))
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(rundir.RunDirError, match="--resume to continue it, --overwrite to replace it"):
        run(tiny(tmp_path, cache_dir, steps=6))
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    run(tiny(tmp_path, cache_dir, steps=3, ckpt_interval=0, overwrite=True))
    assert [r["step"] for r in rows(tmp_path)] == [0, 1, 2] and not (tmp_path / "ckpt.pt").exists()
    with pytest.raises(ValueError, match="resume, overwrite"):
        run(tiny(tmp_path, cache_dir, resume=True, overwrite=True))


# ---------------------------------------------------------------- corruption is named


def test_corrupt_checkpoints_are_named_and_never_used(tmp_path, cache_dir):  # noqa: F811
    run(tiny(tmp_path, cache_dir, steps=4, ckpt_interval=4))
    path = tmp_path / "ckpt.pt"
    raw = path.read_bytes()
    weight = checkpoint.load(path)["model"]["embed.wte.weight"]
    at = raw.find(weight.numpy().tobytes()[:64])
    assert at > 0
    flipped = bytearray(raw)
    flipped[at + 40 : at + 44] = bytes(b ^ 0x5A for b in flipped[at + 40 : at + 44])  # inside the tensor data
    for content, match in ((bytes(flipped), "corrupt checkpoint"), (b"", "not a readable checkpoint"),
                           (raw[: len(raw) // 2], "not a readable checkpoint")):
        path.write_bytes(content)
        with pytest.raises(checkpoint.CheckpointError, match=match) as e:
            run(tiny(tmp_path, cache_dir, steps=8, resume=True))
        assert str(path) in str(e.value)
        assert path.read_bytes() == content  # left for the user to inspect
    assert exit_code(["--out-dir", str(tmp_path), "--resume", "--data.cache-dir", cache_dir, "--no-progress"]) == 2


def test_stale_temp_files_and_a_torn_metrics_line_are_repaired_on_resume(tmp_path, cache_dir, capsys):  # noqa: F811
    run(tiny(tmp_path, cache_dir, steps=8, ckpt_interval=4))
    (tmp_path / ".ckpt.pt.tmp999999").write_bytes(b"half a checkpoint")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "loss": 2.')  # a kill in the middle of a row
    run(tiny(tmp_path, cache_dir, steps=10, ckpt_interval=4, resume=True))
    err = capsys.readouterr().err
    assert "truncated to the last whole row" in err and ".ckpt.pt.tmp999999" in err
    assert not (tmp_path / ".ckpt.pt.tmp999999").exists()
    assert [r["step"] for r in rows(tmp_path)] == list(range(10))


# ---------------------------------------------------------------- config files


@pytest.mark.parametrize("values, match", [
    ({"spike": {"metric": "los", "guard": "skip"}}, r"spike\.metric: expected one of \['loss', 'grad_norm', 'both'\].*'los'.*did you mean 'loss'"),
    ({"spike": {"guard": "rolback"}}, r"spike\.guard: .*'rollback'"),
    ({"precision": "fp16"}, r"precision: expected one of \['auto', 'fp32', 'bf16'\], got 'fp16'"),
    ({"lr": "0.1"}, r"lr: expected a number, got '0.1'"),
    ({"stepz": 3}, r"unknown key 'stepz' \(did you mean 'steps'\?\)"),
    ({"model": {"n_layers": 3}}, r"model: unknown key 'n_layers' \(did you mean 'n_layer'\?\)"),
    ({"model": {"init": "scaeld"}}, r"model\.init: expected one of \['gpt2', 'scaled', 'wesar'\]"),
    ({"data": {"source": ""}}, r"data\.source: expected 'bundled'"),
])
def test_config_files_are_validated_like_the_command_line(tmp_path, values, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match=match) as e:
        parse_args(["--config", str(path)])
    assert str(path) in str(e.value)
    assert exit_code(["--config", str(path)]) == 2


def test_a_config_object_from_python_is_validated_too(tmp_path):
    with pytest.raises(ValueError, match="lr: expected a number"):
        run(TrainConfig(lr="0.1", out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="spike.guard"):
        run(TrainConfig(spike=SpikeConfig(guard="rolback"), out_dir=str(tmp_path)))


# ---------------------------------------------------------------- data, before the first step


def _never_steps(monkeypatch):
    monkeypatch.setattr(Trainer, "step", lambda self: pytest.fail("trained before checking the data"))


@pytest.mark.parametrize("make, match", [
    (lambda d: (d / "empty.txt").write_text(""), "empty.txt is empty"),
    (lambda d: (d / "train.bin").write_bytes(b""), "train.bin is empty"),
    (lambda d: data.write_shard(d / "fineweb_train_000001.bin", []), "holds no tokens"),
    (lambda d: ((d / "a.txt").write_text("x" * 5000), (d / "b.bin").write_bytes(b"\0\0" * 100)), "mixes .bin token files"),
    (lambda d: (data.write_nanogpt_bin(d / "train.bin", [1] * 5000), data.write_nanogpt_bin(d / "val.bin", [1] * 20)),
     r"validation split .* too short for --seq-len 32: its longest piece .*val.bin\) has 20 tokens"),
])
def test_data_errors_are_caught_before_the_first_step(tmp_path, monkeypatch, make, match):
    src = tmp_path / "data"
    src.mkdir()
    make(src)
    _never_steps(monkeypatch)
    cfg = tiny(tmp_path / "run", None)
    cfg.data.source, cfg.data.tokenizer = str(src), "byte"
    with pytest.raises(ValueError, match=match):
        run(cfg)


def test_resume_refuses_a_changed_data_stream_unless_allowed(tmp_path, cache_dir, monkeypatch):  # noqa: F811
    run(tiny(tmp_path, cache_dir, steps=4, ckpt_interval=4))
    config_before = (tmp_path / "config.json").read_text()
    for field, value in (("batch_size", 8), ("seed", 7), ("grad_accum", 2)):
        with pytest.raises(ValueError, match=f"resume: {field} .* -> {value}.*--allow-changes"):
            run(tiny(tmp_path, cache_dir, steps=6, resume=True, **{field: value}))
    cfg = tiny(tmp_path, cache_dir, steps=6, resume=True)
    cfg.data.source = str(tmp_path / "elsewhere.txt")
    (tmp_path / "elsewhere.txt").write_text("In the beginning " * 400)
    with pytest.raises(ValueError, match="data.source"):
        run(cfg)
    assert (tmp_path / "config.json").read_text() == config_before
    run_before = (tmp_path / "run.json").read_text()
    metrics = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        run(tiny(tmp_path, cache_dir, steps=6, resume=True, lr=1e-2))
    # A refused resume leaves the run's records as they were.
    assert (tmp_path / "config.json").read_text() == config_before and (tmp_path / "run.json").read_text() == run_before
    (tmp_path / "metrics.jsonl").write_text(metrics)
    run(tiny(tmp_path, cache_dir, steps=6, resume=True, allow_changes=True, seed=7, lr=1e-3))  # lr: always free
    changes = json.loads((tmp_path / "run.json").read_text())["resumes"][-1]["changes"]
    assert changes == {"seed": [1337, 7], "lr": [3e-3, 1e-3], "steps": [4, 6], "ckpt_interval": [4, 8]}


def test_resumed_optimizer_settings_take_effect(tmp_path, cache_dir, monkeypatch):  # noqa: F811
    run(tiny(tmp_path, cache_dir, steps=4, ckpt_interval=4))
    seen = []
    update = Trainer.update
    monkeypatch.setattr(Trainer, "update", lambda self, *a: (seen.append(
        [(g["weight_decay"], g["betas"], g["eps"]) for g in self.opt.param_groups]), update(self, *a))[1])
    run(tiny(tmp_path, cache_dir, steps=6, resume=True, weight_decay=0.5, beta2=0.5, eps=1e-3))
    # The decayed group takes the new decay, the others keep none; every group the new betas and eps.
    assert seen and all(groups == [(0.5, (0.9, 0.5), 1e-3), (0.0, (0.9, 0.5), 1e-3)] for groups in seen), seen
    changes = json.loads((tmp_path / "run.json").read_text())["resumes"][-1]["changes"]
    assert changes["weight_decay"] == [0.1, 0.5] and changes["beta2"] == [0.95, 0.5] and changes["eps"] == [1e-8, 1e-3]


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("error, code, said", [
    (OSError(28, "No space left on device"), 2, "stableblocks train: error: [Errno 28] No space left on device writing "),
    (KeyboardInterrupt(), 130, "stableblocks train: interrupted; the last checkpoint on disk is whole"),
])
def test_a_failed_write_or_an_interrupt_is_one_line(tmp_path, cache_dir, monkeypatch, capsys, error, code, said):  # noqa: F811
    argv = ["--out-dir", str(tmp_path), "--batch-size", "4", "--seq-len", "32", "--warmup", "4", "--eval-interval", "0",
            "--ckpt-interval", "4", "--model.n-layer", "2", "--model.n-head", "2", "--model.n-embd", "32",
            "--data.cache-dir", cache_dir, "--no-progress", "--no-plot"]
    assert exit_code(argv + ["--steps", "4"]) == 0
    good = (tmp_path / "ckpt.pt").read_bytes()

    def failing(f):
        raise error

    write = checkpoint.atomic_write
    monkeypatch.setattr(checkpoint, "atomic_write", lambda path, _: write(path, failing))
    capsys.readouterr()
    assert exit_code(argv + ["--steps", "8", "--resume"]) == code
    err = capsys.readouterr().err
    assert err.startswith(said) and err.count("\n") == 1 and "Traceback" not in err, err
    assert (tmp_path / "ckpt.pt").read_bytes() == good and not (tmp_path / rundir.LOCK).exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]




def test_bad_input_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "STABLEBLOCKS_BACKEND": "reference"}
    proc = subprocess.run([sys.executable, "-m", "stableblocks.train", "--batch-size", "0", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == "stableblocks train: error: batch_size: expected a positive int, got 0"


def test_an_unknown_sub_command_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["trian"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "stableblocks: unknown command 'trian' (did you mean 'train'?); expected one of: train, plot"


def test_every_train_option_has_a_help_text(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    lines = [line.strip("│").rstrip() for line in capsys.readouterr().out.splitlines()]
    indent = lambda line: len(line) - len(line.lstrip())  # noqa: E731
    options = [i for i, line in enumerate(lines) if line.lstrip().startswith("--") and indent(line) <= 2]
    assert len(options) > 50
    for i in options:  # the first line under an option is its help, not just its default
        first = next(line for line in lines[i + 1 :] if indent(line) >= 6)
        assert not first.lstrip().startswith("(default:"), lines[i]


# ---------------------------------------------------------------- faults, together


KILLED = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import _faults, test_train
    _faults.install(setattr, nan_at={nan}, spike_at={spike}, kill_saving={kill})
    cfg = test_train.tiny({out!r}, {cache!r}, **{kw!r})
    cfg.spike = test_train.SpikeConfig(**{spike_cfg!r})
    test_train.run(cfg)
""")


def test_fault_injection(tmp_path, cache_dir, monkeypatch):  # noqa: F811
    """A NaN gradient, a loss spike, a kill -9 during a save and a corrupt file in one short run:
    the last good checkpoint survives each; the killed run, resumed, ends bitwise equal to the
    uninterrupted one; a skipped NaN step ends bitwise equal to a run that skips the same batch."""
    kw = dict(steps=24, lr=1e-2, ckpt_interval=4, eval_interval=12, diag_interval=0)
    spike_cfg = dict(guard="skip", window=10, min_history=5)
    faults = dict(nan_at={6}, spike_at={14})
    saved = []
    real_save = checkpoint.save

    def recording_save(state, path):
        saved.append((state["step"], checkpoint.all_finite(state["model"])))
        real_save(state, path)

    # Uninterrupted, with the NaN step and the spike.
    with monkeypatch.context() as m:
        _faults.install(m.setattr, **faults)
        m.setattr(checkpoint, "save", recording_save)
        full = run(tiny(tmp_path / "full", cache_dir, **kw, spike=SpikeConfig(**spike_cfg)))
    assert full["skipped_steps"] == [6, 14] and not full["diverged"], full
    # Every state written was finite (the skipped steps left the weights as they were).
    assert saved == [(s, True) for s in (4, 8, 12, 16, 20, 24)], saved

    # The same run killed by SIGKILL while writing the step-20 checkpoint.
    out = tmp_path / "killed"
    script = KILLED.format(tests=TESTS, nan=faults["nan_at"], spike=faults["spike_at"], kill=20, out=str(out),
                           cache=cache_dir, kw=kw, spike_cfg=spike_cfg)
    env = {**os.environ, "STABLEBLOCKS_BACKEND": "reference"}  # as this process (same threads: same sums)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert checkpoint.load(out / "ckpt.pt")["step"] == 16  # the last good one survives the kill
    assert any(p.name.startswith(".ckpt.pt.tmp") for p in out.iterdir()) and (out / rundir.LOCK).exists()
    with monkeypatch.context() as m:
        _faults.install(m.setattr, **faults)
        resumed = run(tiny(out, cache_dir, **kw, spike=SpikeConfig(**spike_cfg), resume=True))
    assert same_weights(model_of(out / "ckpt.pt"), model_of(tmp_path / "full" / "ckpt.pt"))
    assert [r["loss"] for r in rows(out)] == [r["loss"] for r in rows(tmp_path / "full")]
    assert resumed["final_val_loss"] == full["final_val_loss"]
    assert not any(p.name.startswith(".") for p in out.iterdir())  # temp file and lock gone

    # A run with no NaN, told to skip the same step, ends bitwise equal.
    with monkeypatch.context() as m:
        _faults.install(m.setattr, spike_at={14}, skip_at={6})
        run(tiny(tmp_path / "skip", cache_dir, **kw, spike=SpikeConfig(**spike_cfg)))
    assert same_weights(model_of(tmp_path / "skip" / "ckpt.pt"), model_of(tmp_path / "full" / "ckpt.pt"))

    # A corrupt checkpoint: named, refused, and left as it was.
    path = out / "ckpt.pt"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match=str(path)):
        run(tiny(out, cache_dir, **{**kw, "steps": 30}, spike=SpikeConfig(**spike_cfg), resume=True))
    assert path.read_bytes() == bytes(raw)


# ---------------------------------------------------------------- healthy runs never diverge


@pytest.mark.slow
def test_the_main_job_does_not_diverge(tmp_path):
    summary = run(TrainConfig(out_dir=str(tmp_path), plot=False, progress=False))
    assert not summary["diverged"] and summary["diverged_reason"] is None and summary["spikes"] == 0
