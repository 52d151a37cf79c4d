"""sparsemup.hf: transformers causal LMs built, parameterized, saved for plain transformers and restored."""

import json
import math
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", reason="transformers is not installed: pip install 'sparsemup[hf]'")

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import sparsemup as smp  # noqa: E402
import sparsemup.hf as hf  # noqa: E402
from helpers import curve, mask_of, masked_zero_violations, read_metrics, tiny_config  # noqa: E402
from sparsemup.cli import main  # noqa: E402
from sparsemup.core import explain_rows  # noqa: E402
from sparsemup.train import ConfigError, build_model, checkpoint  # noqa: E402
from sparsemup.train.trainer import Completed, Trainer, train  # noqa: E402


def llama_template(tied: bool = False):
    return AutoConfig.for_model("llama", vocab_size=256, num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=32, intermediate_size=172, max_position_embeddings=64,
                                tie_word_embeddings=tied)


def gpt2_template():
    return AutoConfig.for_model("gpt2", vocab_size=256, n_layer=2, n_embd=64, n_head=2, n_positions=64,
                                bos_token_id=0, eos_token_id=0)


def tokens(batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


OPTIONS: dict[str, Any] = dict(scheme="supar", density=0.25, input_alpha=2.0, output_alpha=0.5)


def test_config_scaling_keeps_head_dim_and_ratios():
    cfg = hf.scale_config(llama_template(), 256)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (256, 8, 4, 32)
    assert cfg.intermediate_size == 688 and cfg.vocab_size == 256
    gpt2 = hf.scale_config(gpt2_template(), 128)
    assert (gpt2.n_embd, gpt2.n_head, gpt2.n_inner) == (128, 4, None)
    with pytest.raises(ValueError, match="multiple of the head dim 32"):
        hf.scale_config(llama_template(), 80)
    with pytest.raises(ValueError, match="does not scale in proportion"):
        hf.scale_config(llama_template(), 96)  # 3 heads: half a KV head
    with pytest.raises(ValueError, match=r"'nope' is not a transformers model type.*llama"):
        hf.load_config("nope")
    with pytest.raises(ValueError, match=r"'lama' is not a transformers model type.*did you mean 'llama'") as err:
        hf.load_config("lama")
    assert "gpt2" not in str(err.value)  # a suggestion, not the whole list
    with pytest.raises(ValueError, match="no integer 'hidden_size'"):
        hf.scale_config(PretrainedConfig(), 128)


def test_a_config_file_is_used_as_written(tmp_path, corpus):
    file = tmp_path / "config.json"
    file.write_text(llama_template().to_json_string())  # 2 layers, vocabulary 256
    assert hf.small_config(str(file), 256, 2).num_hidden_layers == 2
    assert hf.small_config("llama", 256, 3).num_hidden_layers == 3  # a model type is a template
    with pytest.raises(ConfigError, match=r"num_hidden_layers = 2 but the depth asked for is 3 \(model.depth"):
        train(tiny_config(corpus, f"model.arch=hf:{file}", "model.depth=3", "model.head_dim=32", "model.width=64",
                          "model.base_width=32"), tmp_path / "run")
    fields = json.loads(file.read_text())
    file.write_text(json.dumps({**fields, "vocab_size": 32000}))
    with pytest.raises(ValueError, match=r"vocab_size = 32000 but the data has 256 tokens"):
        hf.small_config(str(file), 256, 2)
    assert not (tmp_path / "run").exists()


def test_head_dim_error_names_the_option():
    with pytest.raises(ValueError, match=r"width 64 must be a positive multiple of the head dim 128 .*head_dim="):
        hf.build("llama", 128, 64, device="meta")


def test_llama_build_roles_and_masks():
    model = hf.build(llama_template(), 128, 64, density=0.25)
    rec = smp.get_parameterization(model)
    k = rec.info("model.layers.0.self_attn.k_proj.weight")
    assert k.role is smp.Role.HIDDEN and k.multipliers.width == 2 and k.masked
    assert rec.info("model.embed_tokens.weight").role is smp.Role.INPUT
    assert rec.info("lm_head.weight").role is smp.Role.OUTPUT
    mask = mask_of(model, "model.layers.0.mlp.down_proj.weight")
    assert (mask.sum(dim=1) == round(0.25 * 344)).all()  # exact fan-in per output neuron


def linear_twin(model: nn.Module) -> nn.Module:
    """``model`` with every Conv1D replaced by the nn.Linear that computes the same thing."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            parent, _, child = name.rpartition(".")
            in_features, out_features = module.weight.shape
            linear = nn.Linear(in_features, out_features, device=module.weight.device)
            setattr(model.get_submodule(parent), child, linear)
    return model


def test_gpt2_conv1d_matches_the_equivalent_linear_model():
    template = gpt2_template()
    base_cfg, model_cfg = hf.scale_config(template, 64), hf.scale_config(template, 128)
    conv = hf.build(template, 128, 64, density=0.25)
    with torch.device("meta"):
        base = linear_twin(AutoModelForCausalLM.from_config(base_cfg))
    linear = linear_twin(AutoModelForCausalLM.from_config(model_cfg))
    smp.parameterize(linear, base, density=0.25)
    rec_c, rec_l = smp.get_parameterization(conv), smp.get_parameterization(linear)
    conv1d = [n for n, m in conv.named_modules() if isinstance(m, Conv1D)]
    assert len(conv1d) == 8
    for module_name in conv1d:
        name = module_name + ".weight"
        c, ln = rec_c.info(name), rec_l.info(name)
        assert c.role is ln.role is smp.Role.HIDDEN
        assert c.multipliers == ln.multipliers and c.density == ln.density
        mask_c, mask_l = mask_of(conv, name), mask_of(linear, name)
        assert torch.equal(mask_c.T, mask_l)  # (in, out) vs (out, in): the same mask, transposed
        fan_in = mask_c.shape[0]
        assert (mask_c.sum(dim=0) == round(0.25 * fan_in)).all()
    for family in ("sgd", "adam"):
        rows_c = {r["name"]: r["lr_mult"] for r in explain_rows(conv, family)}
        rows_l = {r["name"]: r["lr_mult"] for r in explain_rows(linear, family)}
        assert rows_c == rows_l


@pytest.mark.parametrize("kind", ["llama-untied", "llama-tied", "gpt2"])
def test_save_pretrained_loads_in_plain_transformers(tmp_path, kind):
    template = gpt2_template() if kind == "gpt2" else llama_template(tied=kind == "llama-tied")
    model = hf.build(template, 128, 64, **OPTIONS).eval()  # eval: GPT-2's dropout is on in training mode
    x = tokens()
    with torch.no_grad():
        expected = model(x).logits
    out = hf.save_pretrained(model, tmp_path / "saved")
    assert {"config.json", "sparsemup.json", "sparsemup_masks.safetensors"} <= {p.name for p in out.iterdir()}
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.config.tie_word_embeddings is False
    keys = set(plain.state_dict())
    assert not any(k.endswith("_mask") or "sparsemup" in k for k in keys)
    with torch.no_grad():
        got = plain(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def adam_steps(model: nn.Module, steps: int, seed: int) -> float:
    model.eval()  # no dropout: the two models must see the same function
    opt = smp.make_optimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.0)
    loss = torch.tensor(0.0)
    for step in range(steps):
        x = tokens(seed=seed + step)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


@pytest.mark.parametrize("kind", ["llama-tied", "gpt2"])
def test_from_pretrained_continues_training_like_the_unsaved_model(tmp_path, kind):
    template = gpt2_template() if kind == "gpt2" else llama_template(tied=True)
    model = hf.build(template, 128, 64, **OPTIONS)
    adam_steps(model, 3, seed=0)
    hf.save_pretrained(model, tmp_path / "saved")
    restored = hf.from_pretrained(tmp_path / "saved")
    rec, rec2 = smp.get_parameterization(model), smp.get_parameterization(restored)
    assert rec2.params == rec.params and rec2.scheme == rec.scheme
    assert torch.equal(model.get_buffer("_sparsemup_signature"), restored.get_buffer("_sparsemup_signature"))
    for name in rec.params:
        torch.testing.assert_close(restored.get_parameter(name), model.get_parameter(name), rtol=1e-6, atol=1e-7)
    if kind == "llama-tied":
        assert restored.lm_head.weight is restored.model.embed_tokens.weight
    continued, unsaved = adam_steps(restored, 3, seed=10), adam_steps(model, 3, seed=10)
    assert continued == pytest.approx(unsaved, rel=1e-5)


def test_save_refusals_and_the_own_save_trap(tmp_path):
    model = hf.build(llama_template(), 128, 64, density=0.5)
    with pytest.raises(RuntimeError, match=r"sparsemup\.hf\.save_pretrained\(model, directory\)"):
        model.save_pretrained(tmp_path / "own")
    assert not (tmp_path / "own").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="overwrite=True"):
        hf.save_pretrained(model, tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    hf.save_pretrained(model, tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "sparsemup.json").exists() and not (tmp_path / "busy" / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    plain = AutoModelForCausalLM.from_config(hf.scale_config(llama_template(), 128))
    with pytest.raises(ValueError, match="not parameterized"):
        hf.save_pretrained(plain, tmp_path / "plain")
    with pytest.raises(ValueError, match="takes a transformers PreTrainedModel"):
        hf.save_pretrained(nn.Linear(2, 2), tmp_path / "linear")
    with pytest.raises(ValueError, match="no sparsemup.json"):
        hf.from_pretrained(tmp_path / "nothing")


def test_missing_transformers_names_the_extra():
    code = "import sys; sys.modules['transformers'] = None\nimport sparsemup.hf"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "pip install 'sparsemup[hf]'" in result.stderr


# --- the CLI and the trainer on transformers models --------------------------------------------------------

def test_coord_check_cli_on_a_transformers_model(tmp_path, capsys):
    out = tmp_path / "cc"
    code = main(["coord-check", "--model", "hf:llama", "--widths", "64,128", "--densities", "1,0.25",
                 "--head-dim", "32", "--steps", "2", "--seeds", "1", "--base-width", "64", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "coord.json").read_text())
    assert result["settings"]["model"] == "hf:llama" and result["settings"]["head_dim"] == 32
    assert result["settings"]["lr"] == 2**-10  # the hf grid's default LR
    assert len(result["losses"]) == 5 and all(len(c["losses"]) == 3 for c in result["losses"])
    assert [c["base"] for c in result["losses"]] == [True, False, False, False, False]  # the base first
    assert {r["layer"] for r in result["measurements"]} >= {"model.embed_tokens", "lm_head",
                                                           "model.layers.0.mlp.down_proj"}
    assert "verdict" in capsys.readouterr().out


def test_coord_check_cli_rejects_an_unknown_type_and_the_reference_only_flags(tmp_path, capsys):
    assert main(["coord-check", "--model", "hf:nope", "--out", str(tmp_path / "x")]) == 2
    assert "valid types" in capsys.readouterr().err
    assert main(["coord-check", "--model", "gpt", "--depth", "3", "--out", str(tmp_path / "y")]) == 2
    assert "--model hf:TYPE only" in capsys.readouterr().err


def test_cli_explain_builds_a_transformers_model(capsys):
    assert main(["explain", "--model", "hf:llama", "--width", "128", "--base-width", "64", "--head-dim", "32"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj.weight" in out and "lm_head.weight" in out and "hidden" in out
    assert main(["explain", "--model", "hf:lama"]) == 2
    assert "did you mean 'llama'" in capsys.readouterr().err


def test_cli_without_transformers_exits_2_naming_the_extra(tmp_path):
    code = ("import sys; sys.modules['transformers'] = None\nfrom sparsemup.cli import main\n"
            f"sys.exit(main(['coord-check', '--model', 'hf:llama', '--out', {str(tmp_path / 'x')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "pip install 'sparsemup[hf]'" in result.stderr


def hf_train_config(corpus):
    return tiny_config(corpus, "model.arch=hf:llama", "model.width=64", "model.base_width=32", "model.head_dim=32")


def test_trainer_runs_a_transformers_model_and_resumes_exactly(corpus, tmp_path):
    result = train(hf_train_config(corpus), tmp_path / "whole")
    assert isinstance(result, Completed) and math.isfinite(result.final_val_loss)
    killed = Trainer(hf_train_config(corpus), tmp_path / "split")
    for _ in range(7):
        assert killed.train_step()
    killed.close()
    train(hf_train_config(corpus), tmp_path / "split", resume=True)
    assert curve(read_metrics(tmp_path / "split")) == curve(read_metrics(tmp_path / "whole"))
    model = build_model(hf_train_config(corpus))
    assert type(model).__name__ == "LlamaForCausalLM"
    checkpoint.restore_model(model, checkpoint.load(tmp_path / "whole"), tmp_path / "whole")
    assert masked_zero_violations(model) == 0


def test_a_bad_hf_arch_is_refused_before_anything_runs(corpus, tmp_path):
    with pytest.raises(ConfigError, match="model.arch = 'hf:nope'.*valid types"):
        train(tiny_config(corpus, "model.arch=hf:nope"), tmp_path / "run")
    with pytest.raises(ConfigError, match="model.arch = 'llama': use gpt or hf:TYPE"):
        train(tiny_config(corpus, "model.arch=llama"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_block_masks_run_block_sparse_on_llama_and_conv1d_is_refused_by_name():
    model = hf.build(llama_template(), 128, 64, density=0.25, mask_kind="blocks", block_size=8).eval()
    x = tokens()
    with torch.no_grad():
        dense = model(x).logits
    smp.sparsify(model, "blocks")
    assert set(smp.sparse.get_backends(model).values()) == {"blocks"}
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense, rtol=1e-5, atol=1e-5)
    gpt2 = hf.build(gpt2_template(), 128, 64, density=0.25, mask_kind="blocks", block_size=8)
    with pytest.raises(ValueError, match="its owner is a Conv1D"):
        smp.sparsify(gpt2, "blocks")


def test_from_pretrained_refuses_weights_outside_their_masks(tmp_path):
    from safetensors.torch import load_file, save_file

    model = hf.build(llama_template(), 128, 64, density=0.25)
    out = hf.save_pretrained(model, tmp_path / "saved")
    weights = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    outside = mask_of(model, name) == 0
    weights[name] = weights[name] + outside.float()  # fill the pruned entries
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{name} has nonzero weights outside its mask"):
        hf.from_pretrained(out)


@pytest.mark.parametrize("steps", [2, 4])  # mid-schedule and after its last update
def test_a_gmp_pruned_model_round_trips_at_any_step(tmp_path, steps):
    from sparsemup.dynamic import GMP, DynamicSparsity

    model = hf.build(llama_template(), 128, 64, scheme="supar", density=1.0, mask_dense=True)
    dyn = DynamicSparsity(model, GMP(final_density=0.25, stop_step=4, update_every=2))
    opt = smp.make_optimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.0)
    dyn.attach(opt)
    for step in range(1, steps + 1):
        x = tokens(seed=step)
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        dyn.update(step, opt)
    name = "model.layers.0.mlp.up_proj.weight"
    assert 0.25 <= float(mask_of(model, name).float().mean()) < 1.0
    restored = hf.from_pretrained(hf.save_pretrained(model, tmp_path / "saved"))
    assert torch.equal(mask_of(restored, name), mask_of(model, name))
    saved = json.loads((tmp_path / "saved" / "sparsemup.json").read_text())["params"][name]
    assert smp.get_parameterization(restored).params[name].density == saved["density"] < 1.0
    for n in smp.get_parameterization(model).params:
        torch.testing.assert_close(restored.get_parameter(n), model.get_parameter(n), rtol=1e-6, atol=1e-7)


def _tamper_meta(meta, case):
    if case == "missing key":
        del meta["tie_word_embeddings"]
    elif case == "wrong type":
        meta["options"]["input_alpha"] = "2"
    elif case == "unknown option":
        meta["options"]["sparsity"] = 0.5
    elif case == "empty params":
        meta["params"] = {}
    elif case == "empty params, other alpha":
        meta["params"], meta["options"]["input_alpha"] = {}, 8.0
    elif case == "a param missing":
        meta["params"].pop(next(iter(meta["params"])))
    return meta


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    return hf.save_pretrained(hf.build(llama_template(), 128, 64, **OPTIONS), tmp_path_factory.mktemp("hf") / "saved")


@pytest.mark.parametrize("case, message", [
    ("truncated", "sparsemup.json is not valid JSON"),
    ("missing key", "sparsemup.json: key 'tie_word_embeddings' is missing"),
    ("wrong type", "sparsemup.json: in 'options': 'input_alpha' is \"2\", not int or float"),
    ("unknown option", "sparsemup.json: unknown option(s) ['sparsity'] in 'options'"),
    ("empty params", "sparsemup.json: 'params' is empty"),
    ("empty params, other alpha", "sparsemup.json: 'params' is empty"),
    ("a param missing", "sparsemup.json: 'params' lacks"),
    ("garbage masks", "sparsemup_masks.safetensors cannot be read"),
    ("truncated weights", "the weights (model.safetensors) cannot be read"),
])
def test_a_tampered_saved_directory_is_refused_naming_the_file(saved_llama, tmp_path, case, message):
    import shutil

    out = shutil.copytree(saved_llama, tmp_path / "copy")
    meta_path, weights = out / "sparsemup.json", out / "model.safetensors"
    if case == "truncated":
        meta_path.write_text(meta_path.read_text()[:100])
    elif case == "garbage masks":
        (out / "sparsemup_masks.safetensors").write_bytes(b"\x07garbage" * 10)
    elif case == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        meta_path.write_text(json.dumps(_tamper_meta(json.loads(meta_path.read_text()), case)))
    with pytest.raises(ValueError) as caught:
        hf.from_pretrained(out)
    assert message in str(caught.value) and str(out) in str(caught.value)


def test_a_save_cleans_what_killed_saves_left_beside_it(tmp_path):
    model = hf.build(llama_template(), 128, 64, density=0.5)
    for left in (".saved.k2j4_x9a.tmp", ".saved.old.ab12cd34"):  # a staging and an old directory of killed saves
        (tmp_path / left).mkdir()
        (tmp_path / left / "model.safetensors").write_bytes(b"a full model")
    (tmp_path / ".saved.old.txt").write_text("not ours")
    (tmp_path / ".other.k2j4_x9a.tmp").mkdir()  # another directory's: not ours either
    hf.save_pretrained(model, tmp_path / "saved")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.k2j4_x9a.tmp", ".saved.old.txt", "saved"]


def test_a_layer_the_config_scaling_missed_is_an_error_naming_it():
    from sparsemup.hf.build import _check_roles

    template = llama_template()
    wide, narrow = hf.scale_config(template, 128), hf.scale_config(template, 64)
    wide.intermediate_size = narrow.intermediate_size  # as if the FFN size had a field name hf does not scale
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(narrow)
    model = AutoModelForCausalLM.from_config(wide)
    record = smp.parameterize(model, base)
    with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight .* reads as an output weight"):
        _check_roles(model, record)


def test_opt_style_ffn_dim_scales_and_saved_directories_are_readable(tmp_path):
    import os
    import stat

    opt = AutoConfig.for_model("opt", hidden_size=64, num_attention_heads=2, ffn_dim=256)
    assert hf.scale_config(opt, 128).ffn_dim == 512  # OPT names its FFN size ffn_dim
    out = hf.save_pretrained(hf.build(llama_template(), 128, 64, density=0.5), tmp_path / "saved")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
