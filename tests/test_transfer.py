"""``sparsemup transfer``: the target is the proxy's whole config but for the listed changes, and a run from it
refuses any other difference."""

import json
import shutil
from pathlib import Path

import pytest

from helpers import tiny_overrides
from sparsemup.cli import main
from sparsemup.train import load_config
from sparsemup.train.schema import flatten, run_identity
from sparsemup.tuning import write_preset

ROOT = Path(__file__).resolve().parents[1]


def settings(path):
    return run_identity(flatten(load_config(path).to_dict()))


def recipe(corpus, tmp_path, capsys, *proxy_items):
    """Train a tiny proxy, transfer it to width 64 at density 1/2, train the target; return the target config."""
    proxy, target = tmp_path / "proxy", tmp_path / "target.toml"
    assert main(["train", "--out", str(proxy), "--set", *tiny_overrides(corpus, "train.steps=2", *proxy_items)]) == 0
    assert main(["transfer", str(proxy), "--out", str(target), "--set", "model.width=64", "model.density=0.5"]) == 0
    assert "changed model.width: 32 -> 64, model.density: 0.25 -> 0.5" in capsys.readouterr().err
    before, after = settings(proxy / "config.toml"), settings(target)
    assert {k for k in before if before[k] != after[k]} == {"model.width", "model.density"}
    assert main(["train", "--config", str(target), "--out", str(tmp_path / "wide")]) == 0
    assert settings(tmp_path / "wide" / "config.toml") == after  # what ran is what was written
    return target


@pytest.mark.parametrize("arch", [(), ("model.arch=hf:llama", "model.head_dim=16")], ids=["gpt", "hf-llama"])
def test_the_recipe_end_to_end(corpus, tmp_path, capsys, arch):
    if arch:
        pytest.importorskip("transformers")
    target = recipe(corpus, tmp_path, capsys, *arch)
    capsys.readouterr()
    assert main(["train", "--config", str(target), "--out", str(tmp_path / "deeper"), "--set", "model.depth=2"]) == 2
    err = capsys.readouterr().err
    assert "model.depth = 2 differs from the proxy's 1" in err and "--allow model.depth" in err
    assert not (tmp_path / "deeper").exists()
    assert main(["train", "--config", str(target), "--out", str(tmp_path / "longer"), "--set", "train.steps=3"]) == 0
    assert "train.steps = 3 is more than the proxy's 2" in capsys.readouterr().err
    assert main(["train", "--config", str(target), "--out", str(tmp_path / "short"), "--set", "train.steps=1"]) == 2
    assert "train.steps = 1 differs from the proxy's 2" in capsys.readouterr().err  # shorter is not allowed


def test_allowed_keys_and_a_sweep_store_as_the_proxy(tmp_path, capsys):
    store = ROOT / "results" / "tune-base-check"
    records = [json.loads(line) for line in (store / "results.jsonl").read_text().splitlines()]
    best = min((r for r in records if r["status"] == "completed"), key=lambda r: r["final_val_loss"])
    target = tmp_path / "t.toml"
    assert main(["transfer", str(store), "--out", str(target), "--set", "model.width=256",
                 "--allow", "optim.lr"]) == 0
    cfg = load_config(target)
    assert cfg.transfer.allow == "model.width,optim.lr" and cfg.transfer.proxy == str(store)
    assert f"the config of best run {best['id']} of {store}" in capsys.readouterr().err
    written = settings(target)
    assert {k for k in best["config"] if best["config"][k] != written.get(k)} == {"model.width"}
    assert main(["transfer", str(store), "--out", str(target), "--allow", "optim.lrr"]) == 2
    assert "--allow optim.lrr: not a config key" in capsys.readouterr().err


def test_a_preset_says_what_it_holds_and_names_the_transfer_command(tmp_path):
    store = tmp_path / "store"
    shutil.copytree(ROOT / "results" / "tune-base-check", store)
    write_preset(store, tmp_path / "p.toml")
    text = (tmp_path / "p.toml").read_text()
    assert "# holds only the swept keys (model.init_std, model.input_alpha, model.output_alpha, optim.lr)" in text
    assert f"sparsemup transfer {store} --out TARGET.toml" in text
