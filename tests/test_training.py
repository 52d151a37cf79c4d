"""The trainer: a run's outputs, exact resume, atomic checkpoints, divergence, accumulation, evaluation."""

import json
import math

import pytest
import torch

from helpers import TINY_RTOL, curve, masked_zero_violations, read_metrics, tiny_config
from sparsemup.cli import main
from sparsemup.train import ConfigError, build_model, checkpoint, evaluate_checkpoint, load_config
from sparsemup.train.config import to_toml
from sparsemup.train.trainer import Completed, Schedule, Trainer, train


def test_run_writes_config_metrics_checkpoint_and_result(corpus, tmp_path):
    cfg = tiny_config(corpus)
    result = train(cfg, tmp_path / "run")
    out = tmp_path / "run"
    assert result.status == "completed" and result.steps == 8
    assert json.loads((out / "result.json").read_text()) == json.loads(json.dumps(result.to_json()))
    assert math.isfinite(result.final_val_loss) and result.final_val_loss < math.log(256)
    rows = read_metrics(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert {"step", "train_loss", "val_loss", "lr", "tokens_per_s"} <= set(rows[0])
    assert [r["val_loss"] != "" for r in rows] == [s in (4, 8) for s in range(1, 9)]
    assert float(rows[-1]["val_loss"]) == result.final_val_loss
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])  # it learns
    assert load_config(out / "config.toml").to_dict() == cfg.to_dict()  # the resolved config reloads as is
    state = checkpoint.load(out)
    assert state["step"] == 8
    model = build_model(cfg)
    checkpoint.restore_model(model, state, out)
    assert masked_zero_violations(model) == 0
    assert any(k.endswith("weight_mask") for k in state["model"])


def test_schedule_warms_up_then_decays_linearly_to_the_final_fraction():
    s = Schedule("linear", warmup=10, total=110, final=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == 1.0 and s(10) == 1.0
    assert s(109) == pytest.approx(0.1) and s(59) == pytest.approx(1 - 0.9 * 49 / 99)
    assert all(s(k) >= s(k + 1) for k in range(10, 120))
    assert Schedule("constant", 10, 110, 0.1)(0) == 1.0


def test_cosine_schedule_warms_up_then_follows_half_a_cosine_with_the_group_ratios_kept(corpus, tmp_path):
    s = Schedule("cosine", warmup=10, total=110, final=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == 1.0 and s(10) == 1.0
    assert s(59) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 49 / 99)))
    assert s(109) == pytest.approx(0.1) and all(s(k) >= s(k + 1) for k in range(10, 120))
    trainer = Trainer(tiny_config(corpus, "optim.schedule=cosine", "train.steps=6"), tmp_path / "run")
    tiny = Schedule("cosine", warmup=2, total=6, final=0.1)  # the tiny config's warm-up, 6 steps
    for step in range(5):
        base_lrs = {group["lr"] / group["lr_mult"] for group in trainer.optimizer.param_groups}
        assert max(base_lrs) == pytest.approx(min(base_lrs), rel=1e-12)  # one base LR: the multipliers hold
        assert min(base_lrs) == pytest.approx(2**-6 * tiny(step))
        trainer.train_step()
    trainer.close()


def test_resume_after_a_kill_between_checkpoints_gives_the_uninterrupted_curve(corpus, tmp_path):
    cfg = tiny_config(corpus)
    train(cfg, tmp_path / "whole")
    killed = Trainer(tiny_config(corpus), tmp_path / "split")
    for _ in range(7):  # checkpoint at step 6; step 7 is logged but lost with the "kill"
        assert killed.train_step()
    killed.close()
    assert len(read_metrics(tmp_path / "split")) == 7
    resumed = train(tiny_config(corpus), tmp_path / "split", resume=True)
    assert resumed.status == "completed"
    assert curve(read_metrics(tmp_path / "split")) == curve(read_metrics(tmp_path / "whole"))
    a, b = checkpoint.load(tmp_path / "whole"), checkpoint.load(tmp_path / "split")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(corpus, tmp_path, monkeypatch):
    cfg = tiny_config(corpus, "train.steps=6")
    out = tmp_path / "run"
    real_save = torch.save
    calls = []

    def dying_save(obj, f):
        calls.append(obj["step"])
        if obj["step"] == 6:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise KeyboardInterrupt("killed while saving")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out)
    monkeypatch.setattr(torch, "save", real_save)
    assert calls == [3, 6]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp file left behind
    assert checkpoint.load(out)["step"] == 3
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"left by a SIGKILL")  # what a hard kill leaves
    assert train(tiny_config(corpus, "train.steps=6"), out, resume=True).status == "completed"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # cleaned up on resume
    assert checkpoint.load(out)["step"] == 6


def test_a_nul_tailed_metrics_log_is_repaired_on_resume_and_a_corrupt_middle_named(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(corpus, "train.steps=3"), out)
    rows = read_metrics(out)
    with (out / "metrics.csv").open("ab") as f:
        f.write(b"\0" * 300)  # what a crash can leave on some filesystems
    assert train(tiny_config(corpus, "train.steps=3"), out, resume=True).status == "completed"
    assert f"repaired {out / 'metrics.csv'}: dropped 1 unreadable line(s)" in capsys.readouterr().err
    assert read_metrics(out) == rows
    lines = (out / "metrics.csv").read_text().splitlines(keepends=True)
    (out / "metrics.csv").write_text("".join([*lines[:2], "garbage\n", *lines[2:]]))
    with pytest.raises(ConfigError, match=f"{out / 'metrics.csv'}, line 3: not a metrics row"):
        train(tiny_config(corpus, "train.steps=3"), out, resume=True)


def test_a_run_killed_before_its_first_checkpoint_is_started_over(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("step,train_loss\n1,5.5\n")  # killed at step 1, checkpoints every 3 steps
    with pytest.raises(ConfigError, match="killed before its first checkpoint: there is nothing to resume; run "
                                          "again without --resume"):
        train(tiny_config(corpus, "train.steps=2"), out, resume=True)
    assert train(tiny_config(corpus, "train.steps=2"), out).status == "completed"
    assert f"{out} holds a run killed before its first checkpoint; starting it over" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(out)] == ["1", "2"]


def test_resume_hint_names_the_option_that_was_used(corpus, tmp_path, capsys):
    out, config = tmp_path / "run", tmp_path / "c.toml"
    config.write_text(to_toml(tiny_config(corpus, "train.steps=2")))
    assert main(["train", "--config", str(config), "--out", str(out)]) == 0
    assert main(["train", "--resume", "--out", str(out), "--set", "model.width=64"]) == 2
    err = capsys.readouterr().err
    assert "model.width: checkpoint 32, config 64" in err and "drop --set model.width=..." in err
    assert "--config" not in err  # only --set was used
    wider = tmp_path / "wider.toml"
    wider.write_text(to_toml(tiny_config(corpus, "train.steps=2", "model.width=64")))
    assert main(["train", "--resume", "--out", str(out), "--config", str(wider), "--set", "train.steps=3"]) == 2
    err = capsys.readouterr().err
    assert f"drop --config {wider}" in err and "drop --set" not in err  # the width came from the file


def test_divergence_is_recorded_and_keeps_the_last_good_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--set", f"data.path={corpus}", "model.width=32", "model.base_width=16",
                 "model.depth=1", "model.head_dim=16", "train.batch_size=4", "train.seq_len=16", "train.steps=20",
                 "optim.warmup_steps=0", "train.checkpoint_every=1", "train.tensorboard=false",
                 "train.progress=false", "optim.name=sgd", "optim.lr=1e12", "optim.grad_clip=0"])
    assert code == 0  # a normal outcome in a sweep, not a crash
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "diverged" and result["final_val_loss"] is None
    step = result["diverged_at_step"]
    assert 1 <= step <= 20 and result["steps"] == step - 1
    assert f"diverged at step {step}" in capsys.readouterr().err
    assert len(read_metrics(out)) == step - 1
    if step > 1:
        state = checkpoint.load(out)
        assert state["step"] == step - 1 == result["last_checkpoint_step"]
        assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_gradient_accumulation_matches_the_full_batch(corpus, tmp_path):
    one = train(tiny_config(corpus, "train.steps=4"), tmp_path / "a")
    two = train(tiny_config(corpus, "train.steps=4", "train.grad_accum=2"), tmp_path / "b")
    la = [float(r["train_loss"]) for r in read_metrics(tmp_path / "a")]
    lb = [float(r["train_loss"]) for r in read_metrics(tmp_path / "b")]
    assert la == pytest.approx(lb, rel=1e-5)
    assert one.final_val_loss == pytest.approx(two.final_val_loss, rel=1e-5)


def test_sgd_trains_and_keeps_masked_weights_zero(corpus, tmp_path):
    cfg = tiny_config(corpus, "optim.name=sgd", "optim.lr=2**-2", "train.steps=6")
    result = train(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert result.status == "completed" and float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    model = build_model(cfg)
    checkpoint.restore_model(model, checkpoint.load(tmp_path / "run"), tmp_path)
    assert masked_zero_violations(model) == 0


def test_resume_refuses_a_different_config_and_a_fresh_run_refuses_a_used_directory(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(corpus, "train.steps=3"), out)
    with pytest.raises(ConfigError, match=r"model\.width: checkpoint 32, config 64"):
        train(tiny_config(corpus, "train.steps=3", "model.width=64"), out, resume=True)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train(tiny_config(corpus, "train.steps=3"), out)
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(tiny_config(corpus), tmp_path / "empty", resume=True)
    # train.steps may change: extending a finished run continues it; shortening below the checkpoint cannot
    with pytest.raises(ConfigError, match="at step 3, beyond train.steps = 2"):
        train(tiny_config(corpus, "train.steps=2"), out, resume=True)
    first = json.loads((out / "result.json").read_text())
    again = train(tiny_config(corpus, "train.steps=3"), out, resume=True)  # already complete: validates, same result
    assert again.steps == 3 and again.final_val_loss == first["final_val_loss"]
    assert train(tiny_config(corpus, "train.steps=5"), out, resume=True).steps == 5


def test_a_checkpoint_from_before_the_block_keys_existed_resumes_to_the_same_curve(corpus, tmp_path):
    # Checkpoints written before model.mask_kind/block_size/backend existed lack them: their defaults apply.
    whole = train(tiny_config(corpus, "train.steps=6"), tmp_path / "whole")
    out = tmp_path / "old"
    train(tiny_config(corpus, "train.steps=3"), out)
    state = checkpoint.load(out)
    for key in ("mask_kind", "block_size", "backend"):
        del state["config"]["model"][key]
    torch.save(state, out / checkpoint.CHECKPOINT_NAME)
    resumed = train(tiny_config(corpus, "train.steps=6"), out, resume=True)
    assert resumed.final_val_loss == whole.final_val_loss
    # A key that is missing is taken at its default, so a non-default setting is still refused.
    torch.save(state, out / checkpoint.CHECKPOINT_NAME)
    with pytest.raises(ConfigError, match="model.mask_kind: checkpoint 'rows', config 'blocks'"):
        train(tiny_config(corpus, "train.steps=6", *BLOCKS), out, resume=True)


def test_loading_a_checkpoint_into_another_density_is_refused(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(corpus, "train.steps=2"), out)
    other = build_model(tiny_config(corpus, "model.density=0.5"))
    with pytest.raises(ConfigError, match="does not fit this model"):
        checkpoint.restore_model(other, checkpoint.load(out), out)


def test_eval_reports_loss_and_bits_per_byte(corpus, tmp_path, capsys):
    cfg = tiny_config(corpus, "train.steps=4")
    result = train(cfg, tmp_path / "run")
    windows = cfg.train.eval_batches * cfg.train.batch_size
    ev = evaluate_checkpoint(tmp_path / "run", windows=windows)
    assert ev.val_loss == pytest.approx(result.final_val_loss, rel=1e-6)
    assert ev.bits_per_byte == pytest.approx(ev.val_loss / math.log(2))
    assert main(["eval", str(tmp_path / "run" / "checkpoint.pt"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["step"] == 4 and printed["val_tokens"] > windows * 16
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_yaml_config_tensorboard_and_progress(corpus, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sparsemup.train.config import to_yaml

    config = tmp_path / "run.yaml"
    config.write_text(to_yaml(tiny_config(corpus, "train.steps=4", "train.tensorboard=true", "train.progress=true")))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out)]) == 0
    assert load_config(out / "config.yaml").to_dict() == load_config(config).to_dict()
    assert "train: 100%" in capsys.readouterr().err  # the progress bar reached the end
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val_loss")] == [4]
    assert {"lr", "tokens_per_s"} <= set(events.Tags()["scalars"])


def test_a_non_finite_validation_loss_is_a_divergence_too(corpus, tmp_path, monkeypatch):
    import sparsemup.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "validation_loss", lambda *args: float("nan"))
    result = train(tiny_config(corpus), tmp_path / "run")  # validation at step 4, checkpoint at 3
    assert result.status == "diverged" and result.diverged_at_step == 4
    assert result.last_checkpoint_step == 3 and checkpoint.load(tmp_path / "run")["step"] == 3
    assert json.loads((tmp_path / "run" / "result.json").read_text())["final_val_loss"] is None


BLOCKS = ("model.width=64", "model.base_width=32", "model.mask_kind=blocks", "model.block_size=8")


ROWS = ("model.width=64", "model.base_width=32")


@pytest.mark.parametrize("masks, backend", [(BLOCKS, "blocks"), (ROWS, "rows")])
def test_sparse_backends_train_like_masked_dense_and_resume_bitwise(corpus, tmp_path, masks, backend):
    dense = train(tiny_config(corpus, *masks), tmp_path / "dense")
    whole = train(tiny_config(corpus, *masks, f"model.backend={backend}"), tmp_path / "whole")
    assert isinstance(dense, Completed) and isinstance(whole, Completed)
    assert whole.backends == {backend: 4} and dense.backends == {}
    assert whole.final_val_loss == pytest.approx(dense.final_val_loss, rel=TINY_RTOL)
    assert whole.mask_sha256 != dense.mask_sha256  # same masks, but the digest covers the backend too
    killed = Trainer(tiny_config(corpus, *masks, f"model.backend={backend}"), tmp_path / "split")
    for _ in range(7):
        assert killed.train_step()
    killed.close()
    train(tiny_config(corpus, *masks, f"model.backend={backend}"), tmp_path / "split", resume=True)
    assert curve(read_metrics(tmp_path / "split")) == curve(read_metrics(tmp_path / "whole"))
    saved = checkpoint.load(tmp_path / "whole")
    assert set(saved["backends"].values()) == {backend}
    stored = saved["model"]["blocks.0.mlp.fc.weight"]  # ρ of the dense bytes: blocks (n, m, b, b), rows (out, k)
    assert stored.dim() == 4 if backend == "blocks" else "blocks.0.mlp.fc.weight_index" in saved["model"]
    # The checkpoint evaluates, and its weights load into the masked-dense model as well.
    assert evaluate_checkpoint(tmp_path / "whole").val_loss > 0
    masked = build_model(tiny_config(corpus, *masks))
    masked.load_state_dict(saved["model"])
    fc = masked.get_parameter("blocks.0.mlp.fc.weight")
    assert fc.dim() == 2 and fc.shape[1] == 64


def test_block_settings_are_checked_before_anything_runs(corpus, tmp_path):
    with pytest.raises(ConfigError, match="needs mask_kind = blocks|set model.mask_kind = 'blocks'"):
        train(tiny_config(corpus, "model.backend=blocks"), tmp_path / "a")
    with pytest.raises(ConfigError, match="must divide model.width"):
        train(tiny_config(corpus, *BLOCKS, "model.block_size=48"), tmp_path / "b")
    with pytest.raises(ConfigError, match="lower model.block_size"):
        train(tiny_config(corpus, *BLOCKS, "model.density=1/32"), tmp_path / "c")
    assert not any(tmp_path.iterdir())


def test_a_masked_dense_resume_keeps_its_digest_and_blocks_round_half_up(corpus):
    from sparsemup.train import validate
    from sparsemup.train.distributed import mask_digest

    cfg = tiny_config(corpus)
    assert mask_digest(build_model(cfg, backends={})) == mask_digest(build_model(cfg))
    # density·width/b = 0.5 keeps one block per row (round half up, as the masks do)
    validate(tiny_config(corpus, *BLOCKS, "model.density=1/16", "model.block_size=8"))
