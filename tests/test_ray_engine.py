"""The Ray engine of sweeps on a local Ray instance (2 CPUs): the local engine's records, a killed worker
retried and recorded once, a killed driver resumed, and a clear error without Ray."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import sweep_base
from sparsemup.cli import main
from sparsemup.tuning.sweep import load_sweep, parse_sweep, run_sweep

ray = pytest.importorskip("ray", reason="the Ray engine needs sparsemup[ray]")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    """One private Ray instance for the module (the engine uses a running one, else starts its own)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _spec(corpus, steps=4):
    return parse_sweep({"base": sweep_base(corpus, steps), "grid": {"optim.lr": ["2**-7", "2**-5", "2**-3"]}}, "t")


def _records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_ray_runs_give_the_local_engines_records(corpus, tmp_path, local_ray):
    spec = _spec(corpus)
    assert run_sweep(spec, tmp_path / "local", workers=2, log=lambda s: None).completed == 3
    assert run_sweep(spec, tmp_path / "ray", workers=2, log=lambda s: None, engine="ray").completed == 3
    local = {r["id"]: r["final_val_loss"] for r in _records(tmp_path / "local")}
    on_ray = {r["id"]: r["final_val_loss"] for r in _records(tmp_path / "ray")}
    assert on_ray == local  # same ids, same losses bitwise
    assert run_sweep(spec, tmp_path / "ray", workers=2, log=lambda s: None, engine="ray").stored == 3


def test_an_optuna_search_on_ray_records_the_local_engines_trials(corpus, tmp_path, local_ray):
    pytest.importorskip("optuna", reason="the Optuna samplers need sparsemup[tune]")
    spec = parse_sweep({"base": sweep_base(corpus), "random": {
        "sampler": "tpe", "samples": 4, "batch": 2, "log_uniform": {"optim.lr": ["2**-9", "2**-5"]}}}, "t")
    run_sweep(spec, tmp_path / "local", workers=2, log=lambda s: None)
    run_sweep(spec, tmp_path / "ray", workers=2, log=lambda s: None, engine="ray")  # one Ray session, two batches
    local = {r["id"]: (r["trial"], r["final_val_loss"]) for r in _records(tmp_path / "local")}
    assert {r["id"]: (r["trial"], r["final_val_loss"]) for r in _records(tmp_path / "ray")} == local
    assert sorted(trial for trial, _ in local.values()) == [0, 1, 2, 3]


def test_a_run_asks_ray_for_its_threads_and_a_gpu_when_it_trains_on_cuda():
    from sparsemup.tuning.ray_engine import task_resources

    def ask(device, cluster_gpus):
        return task_resources({"train": {"device": device, "threads": 3}}, cluster_gpus)

    assert ask("cpu", 8) == {"num_cpus": 3.0, "num_gpus": 0.0}
    assert ask("cuda", 0) == {"num_cpus": 3.0, "num_gpus": 1.0}  # Ray waits for a node with a GPU
    assert ask("auto", 8) == {"num_cpus": 3.0, "num_gpus": 1.0} and ask("auto", 0)["num_gpus"] == 0.0


def _task_pids():
    """Ray worker processes currently running a sweep run (their title is ray::_execute)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"ray::_execute" in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            pass
    return pids


def test_a_worker_killed_mid_run_is_retried_and_recorded_once(corpus, tmp_path, local_ray):
    spec = parse_sweep({"base": {**sweep_base(corpus, 300), "train": {**sweep_base(corpus, 300)["train"],
                                                                       "checkpoint_every": 50}},
                        "grid": {"optim.lr": ["2**-7", "2**-6"]}}, "t")
    out = tmp_path / "killed-worker"
    killed: list[int] = []

    def kill_one() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(len(p.read_text().splitlines()) > 60 for p in out.glob("runs/*/metrics.csv")) and _task_pids():
                pid = _task_pids()[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one)
    killer.start()
    counts = run_sweep(spec, out, workers=2, log=lambda s: None, engine="ray")
    killer.join()
    assert killed, "no run was caught mid-training"
    assert counts.completed == 2 and counts.failed == 0
    assert sorted(r["id"] for r in _records(out)) == sorted(p.id for p in spec.points)  # once each
    assert not (out / "failures.jsonl").exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
def test_a_killed_ray_driver_is_resumed_by_its_rerun(corpus, tmp_path):
    base = sweep_base(corpus, 300)
    base["train"]["checkpoint_every"] = 50
    lines = [f"[base.{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
             for section, values in base.items()]
    config = tmp_path / "sweep.toml"
    config.write_text("\n".join(lines) + '\n[grid]\n"optim.lr" = ["2**-7", "2**-6", "2**-5"]\n')
    out = tmp_path / "killed-driver"
    driver = subprocess.Popen([sys.executable, "-m", "sparsemup.cli", "sweep", "--config", str(config), "--out",
                               str(out), "--workers", "2", "--engine", "ray"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not any(len(p.read_text().splitlines()) > 60 for p in out.glob("runs/*/metrics.csv")):
        assert time.monotonic() < deadline and driver.poll() is None, "the sweep never got going"
        time.sleep(0.2)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 30
    while _task_pids() and time.monotonic() < deadline:  # the private instance dies with its driver
        time.sleep(0.5)
    assert not _task_pids()
    assert main(["sweep", "--config", str(config), "--out", str(out), "--workers", "2", "--engine", "ray"]) == 0
    assert sorted(r["id"] for r in _records(out)) == sorted(p.id for p in load_sweep(config).points)


def test_without_ray_the_engine_names_the_extra(corpus, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    config = tmp_path / "s.toml"
    config.write_text('[base.train]\nsteps = 2\n[base.optim]\nwarmup_steps = 1\n[grid]\n"optim.lr" = [0.01]\n')
    assert main(["sweep", "--config", str(config), "--out", str(tmp_path / "o"), "--engine", "ray"]) == 2
    assert "pip install 'sparsemup[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
