"""The stability benchmark's measurements."""

import json
import math
import multiprocessing
import os
import time

import pytest

from benchmarks.stability import plan, report
from benchmarks.stability.analysis import gradients_at_init, loss_threshold, lr_sensitivity, trained, unigram_loss
from benchmarks.stability.store import Store, StoreError


def test_lr_sensitivity_on_a_hand_made_table():
    # Diverged (nan) and worse-than-init runs both count as the init loss, 5.5.
    losses = {1e-3: 3.0, 3e-3: 2.5, 1e-2: 2.0, 3e-2: math.nan, 1e-1: 9.0}
    assert lr_sensitivity(losses, loss_init=5.5) == pytest.approx((3.0 + 2.5 + 2.0 + 5.5 + 5.5) / 5 - 2.0)
    assert lr_sensitivity({1e-3: 2.0, 1e-2: 2.0}, loss_init=5.5) == 0.0


def test_embedding_fixes_flatten_gradients_at_init():
    """Spike No More: with scaled init, shallow layers get much larger gradients than deep ones;
    Scaled Embed and Embed LN bring the residual stream entering layer 1 to std ~1 and flatten it."""
    out = {r: gradients_at_init(r, n_layer=8, n_embd=64, n_head=2, block_size=32, batch_size=4)
           for r in ("vanilla", "scaled-embed", "embed-ln")}
    ratio = {r: o["grad_norm"][0] / o["grad_norm"][-1] for r, o in out.items()}
    assert ratio["vanilla"] > 1.5 * max(ratio["scaled-embed"], ratio["embed-ln"])
    assert out["vanilla"]["residual_std"][0] < 0.2
    assert out["embed-ln"]["residual_std"][0] == pytest.approx(1.0, abs=0.05)
    # sqrt(2 * 2/5) ~ 0.89 for the token + position sum under the scaled init.
    assert out["scaled-embed"]["residual_std"][0] == pytest.approx(math.sqrt(4 / 5), abs=0.08)


# ---------------------------------------------------------------- the plan, on made-up results

SCALE = plan.QUICK


def record(spec, loss, diverged=False, spikes=0):
    return {"key": spec.key(), "spec": {}, "result": {"final_val_loss": loss, "diverged": diverged, "spikes": spikes,
                                                      "max_grad_norm": 1.0, "max_attn_logit": 5.0}}


def results_from(losses: dict) -> dict:
    """{spec: loss} -> the store's {key: record}; nan = diverged."""
    return {s.key(): record(s, x, diverged=math.isnan(x)) for s, x in losses.items()}


def test_a_run_trains_only_finished_spike_free_and_below_the_threshold():
    s = plan.spec(SCALE, "vanilla", 1e-2)
    assert trained(record(s, 2.0), 3.0)
    assert not trained(record(s, 3.5), 3.0)
    assert not trained(record(s, math.nan, diverged=True), 3.0)
    assert not trained(record(s, 2.0, spikes=1), 3.0)
    # The unigram loss of bytes is below a uniform guess and above what a model learns.
    assert 2.0 < loss_threshold() < unigram_loss() < math.log(256)


def test_the_key_changes_with_anything_that_changes_the_run(monkeypatch):
    s = plan.spec(SCALE, "qk-norm", 1e-2)
    assert s.key() == plan.spec(SCALE, "qk-norm", 1e-2).key()
    others = [plan.spec(SCALE, "qk-norm", 3e-2), plan.spec(SCALE, "qk-norm", 1e-2, seed=1),
              plan.spec(SCALE, "qk-norm", 1e-2, grad_clip=0.0), plan.spec(SCALE, "qk-norm", 1e-2, extra={"z_loss": 1e-4}),
              plan.spec(SCALE, "qk-norm-cap", 1e-2)]
    key = s.key()
    assert len({key, *(o.key() for o in others)}) == 6
    # A recipe whose definition changes gets new keys: its stored runs are not reused.
    changed = {**plan.RECIPES["qk-norm"][2], "softcap": 30.0}
    monkeypatch.setitem(plan.RECIPES, "qk-norm", (*plan.RECIPES["qk-norm"][:2], changed))
    assert s.key() != key


def test_the_bracket_extends_toward_the_best_lr_until_it_is_interior():
    first = plan.bracket(SCALE, {})
    assert [(s.variant, s.lr) for s in first] == [(v, lr) for v in SCALE.variants for lr in SCALE.start]
    # vanilla is best at the low edge: one rung below is asked for, then nothing more once interior.
    curve = {1e-4: 2.5, 3e-4: 2.2, 1e-3: 2.0, 1e-2: 2.1, 1e-1: 2.4}
    res = results_from({plan.spec(SCALE, v, lr): curve[lr] for v in SCALE.variants for lr in SCALE.start})
    asked = {(s.variant, s.lr) for s in plan.bracket(SCALE, res)}
    assert ("vanilla", 3e-4) in asked and ("vanilla", 1e-4) not in asked
    res.update(results_from({plan.spec(SCALE, v, 3e-4): curve[3e-4] for v in SCALE.variants}))
    assert {(s.variant, s.lr) for s in plan.bracket(SCALE, res)} == asked  # 3e-4 is worse: 1e-3 is interior now
    # Best at the top of the start grid: extended upward, one rung at a time, up to 1.0.
    up = {1e-3: 2.6, 1e-2: 2.4, 1e-1: 2.2, 3e-1: 2.1, 1.0: 2.0}
    res = results_from({plan.spec(SCALE, v, lr): up[lr] for v in SCALE.variants for lr in SCALE.start})
    assert {s.lr for s in plan.bracket(SCALE, res)} == {*SCALE.start, 3e-1}
    res.update(results_from({plan.spec(SCALE, v, 3e-1): up[3e-1] for v in SCALE.variants}))
    assert {s.lr for s in plan.bracket(SCALE, res)} == {*SCALE.start, 3e-1, 1.0}
    # Best at the top of the ladder: marked as on the edge.
    res = results_from({plan.spec(SCALE, v, lr): 3.0 - lr for v in SCALE.variants for lr in plan.LADDER[2:]})
    rows = report.bracket_table(SCALE, report.Runs(res, 3.1))
    assert all(r["best_lr"] == 1.0 and r["edge"] for r in rows)


def test_the_boundary_bisects_between_the_last_rung_that_trains_and_the_first_that_does_not():
    ok = lambda r: trained(r, 3.0)  # noqa: E731
    clip_off = [lr for lr in plan.LADDER if lr >= 1e-2]
    losses = {plan.spec(SCALE, v, lr, grad_clip=c): (2.0 if lr <= 3e-2 else math.nan)
              for v in SCALE.headline for c in (1.0, 0.0) for lr in (clip_off if not c else [1e-1, 3e-1, 1.0])}
    res = results_from(losses)
    mids = [s for s in plan.boundary(SCALE, res, ok) if s.key() not in res]
    assert {(s.lr, s.grad_clip) for s in mids} == {(0.0548, 0.0)}  # sqrt(0.03 * 0.1), clip off only
    res.update(results_from({s: 2.0 for s in mids}))  # it trains: the boundary is 0.0548, fails at 0.1
    assert all(s.key() in res for s in plan.boundary(SCALE, res, ok))  # QUICK bisects once
    rows = report.boundary_table(SCALE, report.Runs(res, 3.0))
    assert all(r["noclip"] == (0.0548, 0.1) and r["clip"] == (None, 0.1) for r in rows)
    res.update(results_from({s: math.nan for s in mids}))  # it fails: the boundary stays at 0.03
    rows = report.boundary_table(SCALE, report.Runs(res, 3.0))
    assert all(r["noclip"] == (0.03, 0.0548) for r in rows)


def test_the_rule_for_stable():
    def row(v, score, spread, techniques, speed=1.0):
        return {"variant": v, "score": score, "spread": spread, "techniques": techniques, "tokens_per_s": speed}

    # Within the spread of the best: a tie, which fewer techniques win.
    assert report.choose_stable([row("a", 2.00, 0.02, 2), row("b", 2.01, 0.01, 1), row("c", 2.10, 0.02, 0)], 3.0) == ("b", ["a", "b"])
    # Beyond it: the best alone.
    assert report.choose_stable([row("a", 2.00, 0.005, 2), row("b", 2.02, 0.005, 1)], 3.0) == ("a", ["a"])
    # Equal techniques: the faster one.
    assert report.choose_stable([row("a", 2.00, 0.02, 1, 10.0), row("b", 2.01, 0.02, 1, 12.0)], 3.0)[0] == "b"
    # Nothing trains (every score is the threshold): no winner, rather than the fewest techniques.
    assert report.choose_stable([row("a", 3.0, 0.0, 2), row("b", 3.0, 0.0, 0)], 3.0) == (None, [])
    assert report.techniques("vanilla") == 0 and report.techniques("qk-norm-cap") == 2
    assert report.techniques("embed-ln+qkv-norm") == 2


def test_the_store_keeps_every_record_and_detects_damage(tmp_path):
    store = Store(tmp_path)
    store.add({"key": "a", "result": {"final_val_loss": math.nan}})
    store.add({"key": "b", "result": {"final_val_loss": 1.5}})
    again = Store(tmp_path)
    assert set(again.records) == {"a", "b"} and math.isnan(again.records["a"]["result"]["final_val_loss"])
    assert not list(tmp_path.glob(".*.tmp*"))
    lines = store.path.read_text().splitlines()
    store.path.write_text(lines[0] + "\n" + lines[1].replace("1.5", "1.4") + "\n")
    with pytest.raises(StoreError, match=r"runs.jsonl:2: checksum mismatch"):
        Store(tmp_path)
    store.path.write_text(lines[0] + "\n" + lines[1][:20] + "\n")
    with pytest.raises(StoreError, match=r"runs.jsonl:2: not a JSON record"):
        Store(tmp_path)
    from benchmarks.stability.store import _sha

    keyless = {"result": {}}
    store.path.write_text(lines[0] + "\n" + json.dumps({**keyless, "sha": _sha(keyless)}) + "\n")
    with pytest.raises(StoreError, match=r"runs.jsonl:2: a record without a key"):
        Store(tmp_path)


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
    from benchmarks.stability.__main__ import main

    out = main(["--quick", "--out", str(tmp_path), "--workers", "2"])
    assert out["complete"]
    specs = plan.plan(SCALE, out["records"], lambda r: trained(r, loss_threshold()))
    assert {s.key() for s in specs} == set(out["records"])  # every run of the plan, and nothing else
    for name in ("results.csv", "results.md", "init.json", "loss_vs_lr.png", "largest_trainable_lr.png",
                 "attn_logit_growth.png", "output_logits.png", "grad_norm_at_init.png", "runs.jsonl"):
        assert (tmp_path / name).stat().st_size > 0, name
    md = (tmp_path / "results.md").read_text()
    assert all(f"| {v} |" in md for v in SCALE.variants) and f"The rule picks `{out['stable']}`" in md
    # A rerun trains nothing: every run is stored under its spec's hash.
    before = (tmp_path / "runs.jsonl").read_bytes()
    assert main(["--quick", "--out", str(tmp_path)])["complete"] and (tmp_path / "runs.jsonl").read_bytes() == before


def fake_train(spec, out):
    """A made-up run, instant: loss falls then rises with the lr; lr 1.0 diverges."""
    loss = math.nan if spec.lr >= 1.0 else 2.0 + abs(math.log10(spec.lr) + 2) / 10
    return {**record(spec, loss, diverged=math.isnan(loss)), "spec": {"variant": spec.variant, "lr": spec.lr}}


def failing_train(spec, out):
    if spec.variant == "qk-norm" and spec.lr == 1e-2:
        raise RuntimeError("out of memory")
    return fake_train(spec, out)


def crashing_train(spec, out):
    if spec.variant == "qk-norm" and spec.lr == 1e-2:
        os._exit(1)  # a worker killed for memory
    return fake_train(spec, out)


def interrupted_train(spec, out):
    """The plan's first run (vanilla, lr 0.1, clipped) takes a minute; its second is interrupted."""
    if spec.variant == "vanilla" and spec.grad_clip and spec.lr == 1e-1:
        time.sleep(60)
    if spec.variant == "vanilla" and spec.grad_clip and spec.lr == 3e-1:
        raise KeyboardInterrupt
    return fake_train(spec, out)


def _train_plan(tmp_path, train, budget_s=None, workers=2):
    from benchmarks.stability.__main__ import train_plan

    store = Store(tmp_path)
    ok = lambda r: trained(r, 3.0)  # noqa: E731
    return train_plan(SCALE, store, tmp_path, workers, budget_s, ok, train=train), store, ok


def test_a_budget_stops_new_runs_and_a_rerun_continues(tmp_path, monkeypatch):
    import benchmarks.stability.__main__ as main_mod

    complete, store, _ = _train_plan(tmp_path, fake_train, budget_s=0.0)
    assert not complete and not store.records  # nothing starts past the budget
    # The budget ends while the first two runs train: both are stored, nothing else starts.
    store = Store(tmp_path)
    monkeypatch.setattr(main_mod, "monotonic", lambda: 1e9 if store.records else 0.0)
    ok = lambda r: trained(r, 3.0)  # noqa: E731
    assert not main_mod.train_plan(SCALE, store, tmp_path, 2, 60.0, ok, train=fake_train)
    first = Store(tmp_path).records
    assert len(first) == 2
    monkeypatch.undo()
    complete, store, ok = _train_plan(tmp_path, fake_train)
    assert complete and {s.key() for s in plan.plan(SCALE, store.records, ok)} == set(store.records)
    assert all(store.records[k] == r for k, r in first.items())  # kept, not trained again


def test_a_failed_run_costs_only_itself(tmp_path, capsys):
    complete, store, ok = _train_plan(tmp_path, failing_train)
    bad = plan.spec(SCALE, "qk-norm", 1e-2)
    assert not complete and bad.key() not in store
    assert f"run {bad.name()} failed and is not stored: RuntimeError: out of memory\n" in capsys.readouterr().err
    assert {s.key() for s in plan.plan(SCALE, store.records, ok)} - set(store.records) >= {bad.key()}
    assert len(store.records) > 10  # the rest of the plan went on
    complete, store, _ = _train_plan(tmp_path, fake_train)  # a rerun trains what failed
    assert complete and bad.key() in store


def test_a_dead_worker_costs_only_the_runs_in_flight(tmp_path, capsys):
    complete, store, ok = _train_plan(tmp_path, crashing_train)
    missing = {s.key() for s in plan.plan(SCALE, store.records, ok)} - set(store.records)
    assert not complete and plan.spec(SCALE, "qk-norm", 1e-2).key() in missing
    assert "BrokenProcessPool" in capsys.readouterr().err
    # At most the other run in flight (2 workers) per crash; a fresh pool trained the rest.
    crashes = sum(s.variant == "qk-norm" and s.lr == 1e-2 for s in plan.plan(SCALE, store.records, ok))
    assert len(missing) <= 2 * crashes and len(store.records) > 10


def test_an_interrupt_kills_the_runs_under_way(tmp_path):
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        _train_plan(tmp_path, interrupted_train)
    assert time.monotonic() - start < 30  # not the minute the first run takes
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children()  # the sleeping worker was killed
    assert plan.spec(SCALE, "vanilla", 1e-1).key() not in Store(tmp_path)


def test_the_command_reports_a_damaged_store_and_an_interrupt_in_one_line(tmp_path, monkeypatch, capsys):
    import benchmarks.stability.__main__ as main_mod

    (tmp_path / "runs.jsonl").write_text("{not json\n")
    with pytest.raises(SystemExit) as exit_:
        main_mod.main(["--quick", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("stability: ") and "runs.jsonl:1: not a JSON record" in err
    assert err.count("\n") == 1
    (tmp_path / "runs.jsonl").unlink()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(main_mod, "train_plan", interrupted)
    with pytest.raises(SystemExit) as exit_:
        main_mod.main(["--quick", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and err.strip().startswith("stability: interrupted; 0 runs stored")
    assert err.strip().count("\n") == 0
    monkeypatch.undo()  # and the folder's lock was released: the next call runs
    assert main_mod.main(["--quick", "--out", str(tmp_path), "--budget", "0"])["complete"] is False
