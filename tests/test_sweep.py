"""Sweeps: planning, run ids, random search, bad files, and the store surviving kills without duplicates."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import sweep_base
from sparsemup.cli import main
from sparsemup.train.trainer import train
from sparsemup.tuning.store import ResultStore, StoreError
from sparsemup.tuning.sweep import SweepCounts, SweepError, load_sweep, parse_sweep, resolve, run_sweep


def _spec(corpus, grid=None, **extra):
    return parse_sweep({"base": sweep_base(corpus), "grid": grid or {"optim.lr": ["2**-7", "2**-5"]}, **extra}, "test")


def test_grid_expansion_and_ids_are_deterministic(corpus):
    grid = {"model.scheme": ["sp", "supar"], "model": {"density": [1, "1/4"]}, "optim.lr": ["2**-7", 0.03125]}
    a, b = _spec(corpus, grid), _spec(corpus, dict(reversed(list(grid.items()))))
    assert len(a.points) == 8
    assert sorted(p.id for p in a.points) == sorted(p.id for p in b.points)  # axis order does not matter
    assert a.points[0].overrides == {"model.scheme": "sp", "model.density": 1.0, "optim.lr": 2**-7}
    assert len({p.id for p in a.points}) == 8


def test_linked_axis_sets_keys_together(corpus):
    spec = _spec(corpus, {"model.width,model.density": [[32, 1], [48, 0.5]]})
    assert [p.overrides for p in spec.points] == [{"model.width": 32, "model.density": 1.0},
                                                  {"model.width": 48, "model.density": 0.5}]


def test_random_search_is_reproducible_and_in_range(corpus):
    table = {"seed": 3, "samples": 5, "log_uniform": {"optim.lr": ["2**-10", "2**-4"], "model.init_std": [0.01, 0.1]}}
    a = parse_sweep({"base": sweep_base(corpus), "random": table}, "t")
    b = parse_sweep({"base": sweep_base(corpus), "random": table}, "t")
    c = parse_sweep({"base": sweep_base(corpus), "random": {**table, "seed": 4}}, "t")
    assert [p.overrides for p in a.points] == [p.overrides for p in b.points]
    assert [p.id for p in a.points] != [p.id for p in c.points]
    assert len(a.points) == 5
    for p in a.points:
        lr, std = p.overrides["optim.lr"], p.overrides["model.init_std"]
        assert isinstance(lr, float) and isinstance(std, float)
        assert -10 <= math.log2(lr) <= -4 and 0.01 <= std <= 0.1


@pytest.mark.parametrize("text, message", [
    ('[grid]\n"optim.lrr" = [0.1]', "did you mean 'optim.lr'"),
    ('[grid]\n"optim.lr" = []', "grid axis 'optim.lr' is empty"),
    ("[grid]\n", "[grid] is empty"),
    ("[base.model]\nwidth = 32\n", "nothing to sweep"),
    ('[grids]\n"optim.lr" = [0.1]', "unknown table(s) ['grids']"),
    ('[grid]\n"model.density" = [2]', "model.density = 2.0: must be in (0, 1]"),
    ('[random]\nsamples = 2\n[random.log_uniform]\n"optim.lr" = [0.1, 0.01]', "need 0 < low ≤ high"),
    ('[random]\nsamples = 2\n[random.log_uniform]\n"model.scheme" = ["sp", "mup"]',
     "bad.toml: random range 'model.scheme' = ['sp', 'mup'] is not numeric"),
])
def test_bad_sweep_file_fails_before_any_run(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["sweep", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_kill_and_resume_keep_every_result_once(corpus, tmp_path):
    spec = _spec(corpus, {"optim.lr": ["2**-7", "2**-5", "2**-3", "2**-4"]})
    out = tmp_path / "sweep"
    logs: list[str] = []
    assert run_sweep(spec, out, log=logs.append).completed == 4
    reference = {r["id"]: r["final_val_loss"] for r in _records(out)}
    assert not list(out.glob("runs/*/checkpoint.pt")) and len(list(out.glob("runs/*/metrics.csv"))) == 4

    first, second, third, fourth = spec.points
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    by_id = {json.loads(line)["id"]: line for line in lines}
    # Simulated kills: `first` was recorded, then the store got a torn line; `second` finished (result.json)
    # but was never recorded; `third` was killed midway, after its step-2 checkpoint; `fourth` was killed
    # before its first checkpoint (metrics.csv only).
    (out / "results.jsonl").write_text(by_id[first.id] + by_id[third.id][:40])
    mid = resolve(spec.base, third, 1)
    mid.train.steps = 2
    third_dir = out / "runs" / third.id
    for name in ("metrics.csv", "result.json", "config.toml"):
        (third_dir / name).unlink()
    train(mid, third_dir)
    (third_dir / "result.json").unlink()
    assert (third_dir / "checkpoint.pt").exists()
    (out / "runs" / fourth.id / "result.json").unlink()

    store = ResultStore(out / "results.jsonl")
    assert store.repaired and list(store.records) == [first.id]
    logs.clear()
    counts = run_sweep(spec, out, log=logs.append)
    assert counts == SweepCounts(planned=4, stored=1, completed=3, diverged=0, failed=0)
    records = _records(out)
    assert sorted(r["id"] for r in records) == sorted(reference)  # nothing lost, nothing duplicated
    assert {r["id"]: r["final_val_loss"] for r in records} == reference  # the resumed run matches exactly
    assert [r["seconds"] for r in records if r["id"] == second.id] == [None]  # recorded, not retrained
    assert sum("resumed" in line for line in logs) == 1
    assert run_sweep(spec, out, log=logs.append).stored == 4
    assert len(_records(out)) == 4


def test_diverged_run_is_an_outcome(corpus, tmp_path):
    spec = _spec(corpus, {"optim.lr": [1e6]}, sweep={"keep_checkpoints": True})
    counts = run_sweep(spec, tmp_path / "s", log=lambda s: None)
    assert counts.diverged == 1
    record = _records(tmp_path / "s")[0]
    assert record["status"] == "diverged" and record["final_val_loss"] is None
    assert record["config"]["optim.lr"] == 1e6
    assert record["device"] == "cpu"  # where it ran: train.device=auto is not recorded in the config


@pytest.mark.slow
def test_parallel_workers_write_one_consistent_store(corpus, tmp_path):
    spec = _spec(corpus, {"optim.lr": ["2**-7", "2**-5"], "train.seed": [0, 1]})
    assert run_sweep(spec, tmp_path / "p", workers=2, log=lambda s: None).completed == 4
    records = _records(tmp_path / "p")
    assert sorted(r["id"] for r in records) == sorted(p.id for p in spec.points)
    assert all(r["config"]["train.seed"] in (0, 1) and math.isfinite(r["final_val_loss"]) for r in records)
    assert {r["device"] for r in records} == {"cpu"}


def test_a_store_from_before_the_block_keys_existed_resumes(corpus, tmp_path):
    # Stores written before model.mask_kind/block_size/backend existed lack them in sweep.json and the records.
    spec = _spec(corpus, {"optim.lr": ["2**-7", "2**-5"]})
    out = tmp_path / "sweep"
    run_sweep(spec, out, log=lambda s: None)
    old = ("model.mask_kind", "model.block_size", "model.backend")
    meta = json.loads((out / "sweep.json").read_text())
    meta["base"] = {k: v for k, v in meta["base"].items() if k not in old}
    (out / "sweep.json").write_text(json.dumps(meta))
    records = _records(out)
    kept = records[:1]
    for r in kept:
        r["config"] = {k: v for k, v in r["config"].items() if k not in old}
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    counts = run_sweep(spec, out, log=lambda s: None)
    assert counts.stored == 1 and counts.completed == 1 and counts.failed == 0
    assert sorted(r["id"] for r in _records(out)) == sorted(r["id"] for r in records)


def _line(**changes):
    record = {"id": "a", "overrides": {}, "status": "completed", "final_val_loss": 2.5, "config": {}, **changes}
    return json.dumps({k: v for k, v in record.items() if v is not ...}) + "\n"


def test_store_refuses_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(_line() + "not json\n" + _line(id="b"))
    with pytest.raises(StoreError, match="line 2: not a run record \\(not JSON"):
        ResultStore(path)


@pytest.mark.parametrize("changes, problem", [
    ({"config": ...}, "key 'config' is missing"),
    ({"status": "done"}, "'status' is 'done', not one of completed, diverged"),
    ({"final_val_loss": "2.5"}, "'final_val_loss' is '2.5', not a number"),
    ({"overrides": []}, "'overrides' is list, not dict"),
])
def test_invalid_records_are_named_by_line_in_sweep_and_report_never_counted_or_dropped(tmp_path, corpus, capsys,
                                                                                         changes, problem):
    out = tmp_path / "s"
    out.mkdir()
    store = out / "results.jsonl"
    store.write_text(_line() + _line(id="b", **changes))  # the complete last line too: not taken for a torn one
    assert main(["report", str(out)]) == 2
    assert f"{store}, line 2: not a run record ({problem}" in capsys.readouterr().err
    with pytest.raises(StoreError, match=f"line 2: not a run record \\({re.escape(problem)}"):
        run_sweep(_spec(corpus, {"optim.lr": ["2**-7"]}), out, log=lambda s: None)
    assert store.read_text() == _line() + _line(id="b", **changes)  # nothing dropped


def test_other_base_in_same_directory_is_refused(corpus, tmp_path):
    run_sweep(_spec(corpus, {"optim.lr": ["2**-7"]}), tmp_path / "s", log=lambda s: None)
    base = {**sweep_base(corpus), "optim": {"warmup_steps": 2}}
    other = parse_sweep({"base": base, "grid": {"optim.lr": [0.01]}}, "t")
    with pytest.raises(SweepError, match="another base config"):
        run_sweep(other, tmp_path / "s", log=lambda s: None)


def test_preset_from_best_run_feeds_the_next_sweep(corpus, tmp_path, capsys):
    tune = tmp_path / "tune"
    run_sweep(parse_sweep({"base": sweep_base(corpus), "random": {"samples": 2, "log_uniform": {
        "model.init_std": [0.01, 0.1], "optim.lr": ["2**-8", "2**-5"]}}}, "t"), tune, log=lambda s: None)
    assert main(["report", str(tune), "--preset", str(tmp_path / "presets" / "base.toml")]) == 0
    assert "| best runs: val loss |" in capsys.readouterr().out
    best = min(_records(tune), key=lambda r: r["final_val_loss"])
    sweep = tmp_path / "next.toml"
    sweep.write_text('[sweep]\npreset = "presets/base.toml"\n[grid]\n"train.seed" = [0]\n'
                     f'[base.data]\npath = "{corpus}"\n[base.model]\nwidth = 48\nhead_dim = 16\nbase_width = 16\n')
    spec = load_sweep(sweep)
    assert spec.base.model.init_std == best["overrides"]["model.init_std"] and spec.base.model.width == 48
    assert spec.base.optim.lr == best["overrides"]["optim.lr"]
    sweep.write_text('[sweep]\npreset = "presets/missing.toml"\n[grid]\n"train.seed" = [0]\n')
    assert main(["sweep", "--config", str(sweep), "--out", str(tmp_path / "o")]) == 2
    assert "sparsemup report TUNING_DIR --preset FILE" in capsys.readouterr().err


def test_sweeps_skip_tensorboard_unless_asked(corpus):
    plain = parse_sweep({"base": {"data": {"path": str(corpus)}}, "grid": {"train.seed": [0]}}, "t")
    asked = parse_sweep({"base": {"data": {"path": str(corpus)}, "train": {"tensorboard": True}},
                         "grid": {"train.seed": [0]}}, "t")
    assert plain.base.train.tensorboard is False and asked.base.train.tensorboard is True


def test_a_second_driver_on_the_same_directory_is_refused(corpus, tmp_path):
    from sparsemup.tuning.lock import driver_lock

    out = tmp_path / "locked"
    with driver_lock(out):  # another driver, as far as the lock can tell (a separate open file description)
        with pytest.raises(SweepError, match="being swept by pid"):
            run_sweep(_spec(corpus), out, log=lambda s: None)
    assert not (out / "results.jsonl").exists()
    assert run_sweep(_spec(corpus), out, log=lambda s: None).completed == 2  # free once the holder is gone


def _children(pid):
    """Live (non-zombie) processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
def test_a_killed_driver_leaves_no_process_behind_and_the_rerun_records_every_run_once(corpus, tmp_path):
    base = sweep_base(corpus, steps=400)
    base["train"]["checkpoint_every"] = 50
    lines = [f"[base.{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
             for section, values in base.items()]
    lines.append('[grid]\n"optim.lr" = ["2**-7", "2**-6", "2**-5"]\n')
    config = tmp_path / "sweep.toml"
    config.write_text("\n".join(lines))
    out = tmp_path / "killed"
    driver = subprocess.Popen([sys.executable, "-m", "sparsemup.cli", "sweep", "--config", str(config), "--out",
                               str(out), "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(len(p.read_text().splitlines()) > 20 for p in out.glob("runs/*/metrics.csv")):
        assert time.monotonic() < deadline and driver.poll() is None, "the sweep never got going"
        time.sleep(0.2)
    children = _children(driver.pid)
    assert len(children) >= 2  # two pool workers (and spawn's resource tracker)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if _alive(pid)]
    counts = run_sweep(load_sweep(config), out, log=lambda s: None)
    assert counts.planned == 3 and counts.stored + counts.completed == 3 and counts.failed == 0
    assert sorted(r["id"] for r in _records(out)) == sorted(p.id for p in load_sweep(config).points)


def test_a_run_that_raises_goes_to_failures_not_results_and_is_retried(corpus, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    spec = _spec(data)
    shutil.rmtree(data)  # the corpus disappears after planning: every run raises
    out = tmp_path / "f"
    logs: list[str] = []
    counts = run_sweep(spec, out, log=logs.append)
    assert counts.failed == 2 and not (out / "results.jsonl").exists()
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["id"] for f in failures) == sorted(p.id for p in spec.points)
    assert all("ConfigError" in f["error"] and f["overrides"] for f in failures)
    assert any("[1/2, 1 failed, ETA" in line for line in logs) and any("[2/2, 2 failed]" in line for line in logs)
    shutil.copytree(corpus, data)
    assert run_sweep(spec, out, log=lambda s: None).completed == 2  # retried on the rerun
    assert len((out / "failures.jsonl").read_text().splitlines()) == 2 and len(_records(out)) == 2


def test_an_unreadable_sweep_json_is_named_not_a_traceback(corpus, tmp_path):
    out = tmp_path / "s"
    (out).mkdir()
    (out / "sweep.json").write_text("")  # e.g. a copy cut short
    with pytest.raises(SweepError, match=r"sweep\.json is unreadable .*Delete it"):
        run_sweep(_spec(corpus, {"optim.lr": ["2**-7"]}), out, log=lambda s: None)
    assert not (out / "results.jsonl").exists()


def test_an_unreachable_ray_address_fails_within_the_bound_naming_it(corpus, tmp_path, capsys, monkeypatch):
    pytest.importorskip("ray", reason="the Ray engine needs sparsemup[ray]")
    from sparsemup.tuning import ray_engine

    monkeypatch.setattr(ray_engine, "CONNECT_TIMEOUT_S", 2.0)
    sweep = tmp_path / "s.toml"
    sweep.write_text(f'[base.data]\npath = "{corpus}"\n[grid]\n"optim.lr" = [0.01]\n')
    for address in ("127.0.0.1:1", "192.0.2.1:6379"):  # refused; TEST-NET-1, never routed: times out or unreachable
        start = time.monotonic()
        assert main(["sweep", "--config", str(sweep), "--out", str(tmp_path / "out"), "--engine", "ray",
                     "--address", address]) == 2
        assert time.monotonic() - start < 15
        assert f"no Ray cluster answers at {address} within 2 s" in capsys.readouterr().err
