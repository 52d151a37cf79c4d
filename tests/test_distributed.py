"""Multi-process training on CPU: DDP and FSDP2 under torchrun (2 processes, gloo) match one process."""

from pathlib import Path

import pytest
import torch

import sparsemup as smp
from helpers import TINY_RTOL, mask_of, read_metrics, tiny_config, tiny_overrides, torchrun
from sparsemup.train import build_model, checkpoint
from sparsemup.train.distributed import check_same_masks, mask_digest
from sparsemup.train.trainer import Completed, train

# Constant LR so that a run stopped at step 4 and extended to 8 is the 8-step run.
COMMON = ("optim.schedule=constant", "train.eval_every=4")


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> tuple[Path, Completed]:
    out = tmp_path_factory.mktemp("single") / "run"
    result = train(tiny_config(corpus, *COMMON), out)
    assert isinstance(result, Completed)
    return out, result


def torchrun_train(out, *args):
    torchrun(["-m", "sparsemup.cli", "train", "--out", str(out), *args], out.parent)


def losses(out):
    rows = read_metrics(out)
    assert len(rows) == 8 and sum(bool(r["val_loss"]) for r in rows) == 2
    return [float(r["train_loss"]) for r in rows], [float(r["val_loss"]) for r in rows if r["val_loss"]]


def assert_masks_exact(out, corpus):
    """The checkpoint's masks are the single-process ones and every masked weight is exactly zero."""
    model = build_model(tiny_config(corpus, *COMMON))
    expected = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_mask")}
    checkpoint.restore_model(model, checkpoint.load(out), out)
    for name, info in smp.get_parameterization(model).params.items():
        if info.masked:
            mask = mask_of(model, name)
            assert torch.equal(mask, expected[name + "_mask"])
            assert int((model.get_parameter(name).detach()[mask == 0] != 0).sum()) == 0


@pytest.mark.slow
def test_ddp_on_two_processes_matches_one_process(corpus, reference, tmp_path):
    ref_out, ref = reference
    out = tmp_path / "ddp"
    torchrun_train(out, "--set", *tiny_overrides(corpus, *COMMON))
    assert losses(out)[0] == pytest.approx(losses(ref_out)[0], rel=TINY_RTOL)
    assert losses(out)[1] == pytest.approx(losses(ref_out)[1], rel=TINY_RTOL)
    result = (out / "result.json").read_text()
    assert '"world_size":2' in result and '"fsdp":false' in result
    assert ref.mask_sha256 in result  # both ranks hashed the masks; they equal the single-process ones
    assert_masks_exact(out, corpus)
    # A checkpoint from 2 processes resumes in 1 (the format and the global batch do not depend on it).
    before = read_metrics(out)
    assert train(tiny_config(corpus, *COMMON, "train.steps=10"), out, resume=True).world_size == 1
    after = read_metrics(out)
    assert len(after) == 10 and after[:8] == before and float(after[-1]["train_loss"]) < float(before[0]["train_loss"])


@pytest.mark.slow
def test_fsdp2_on_two_processes_matches_one_process_across_a_resume(corpus, reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "fsdp"
    torchrun_train(out, "--fsdp", "--set", *tiny_overrides(corpus, *COMMON, "train.steps=4"))
    assert checkpoint.load(out)["step"] == 4 and checkpoint.load(out)["world_size"] == 2
    # The config comes from the run directory; the rest runs with 2 accumulation micro-steps per process.
    torchrun_train(out, "--fsdp", "--resume", "--set", "train.steps=8", "train.grad_accum=2")
    assert losses(out)[0] == pytest.approx(losses(ref_out)[0], rel=TINY_RTOL)
    assert losses(out)[1] == pytest.approx(losses(ref_out)[1], rel=TINY_RTOL)
    assert '"fsdp":true' in (out / "result.json").read_text()
    assert_masks_exact(out, corpus)


def test_a_mask_mismatch_between_ranks_is_an_error(corpus):
    model = build_model(tiny_config(corpus))
    digest = mask_digest(model)
    check_same_masks([digest, digest])
    name = next(n for n, i in smp.get_parameterization(model).params.items() if i.masked)
    mask = mask_of(model, name)
    mask.view(-1)[0] = 1 - mask.view(-1)[0]
    assert mask_digest(model) != digest
    with pytest.raises(RuntimeError, match=r"masks differ across ranks \(ranks \[0\].*ranks \[1\]"):
        check_same_masks([digest, mask_digest(model)])


@pytest.mark.slow
@pytest.mark.parametrize("backend, fsdp", [("blocks", False), ("blocks", True), ("rows", False)])
def test_sparse_backend_on_two_processes_matches_one_process(corpus, tmp_path, backend, fsdp):
    # rows under DDP: its int16 index buffers are not broadcast at start (gloo has no int16).
    masks = ("model.mask_kind=blocks", "model.block_size=8") if backend == "blocks" else ()
    sparse = (*COMMON, "model.width=64", "model.base_width=32", *masks, f"model.backend={backend}")
    single = train(tiny_config(corpus, *sparse), tmp_path / "single")
    assert isinstance(single, Completed)
    out = tmp_path / "multi"
    torchrun_train(out, *(["--fsdp"] if fsdp else []), "--set", *tiny_overrides(corpus, *sparse))
    assert losses(out)[0] == pytest.approx(losses(tmp_path / "single")[0], rel=TINY_RTOL)
    result = (out / "result.json").read_text()
    assert single.mask_sha256 in result and f'"backends":{{"{backend}":4}}' in result
    assert checkpoint.load(out)["model"]["blocks.0.attn.qkv.weight"].dim() == (4 if backend == "blocks" else 2)
