"""The CUDA path: same numbers as the CPU, masks stay on the device and exact, the trainer resumes.

Skipped (and reported as skipped) where no CUDA device is visible, as in CI; run on a GPU with
``pytest tests/test_cuda.py``. docs/PERFORMANCE.md records where and when they last ran.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import sparsemup as smp
from helpers import (
    block_gpt,
    curve,
    known,
    lm_loss,
    mask_of,
    masked_zero_violations,
    read_metrics,
    tiny_config,
    tiny_gpt,
    tokens,
    train_steps,
)
from sparsemup.core.masks import block_columns, random_mask
from sparsemup.sparse.blocksparse import block_sparse_linear, to_blocks
from sparsemup.train import evaluate_checkpoint
from sparsemup.train.trainer import Completed, Trainer, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    """Full fp32 GEMMs (no TF32), so CPU and GPU results are comparable at fp32 tolerances."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("scheme", ["sp", "mup", "supar"])
def test_gpu_forward_backward_matches_cpu(scheme):
    cpu = tiny_gpt(density=0.25, scheme=scheme)
    gpu = copy.deepcopy(cpu).to(CUDA)
    assert all(mask_of(gpu, n).device.type == "cuda" for n, i in smp.get_parameterization(gpu).params.items()
               if i.masked)
    x = tokens(seq=17)
    loss_cpu, loss_gpu = lm_loss(cpu, x), lm_loss(gpu, x.to(CUDA))
    loss_cpu.backward()
    loss_gpu.backward()
    assert loss_gpu.item() == pytest.approx(loss_cpu.item(), rel=1e-5)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_gpu_optimizer_steps_match_cpu_and_keep_zeros_exact():
    cpu = tiny_gpt(density=0.25)
    gpu = copy.deepcopy(cpu).to(CUDA)
    x = tokens(seq=17)
    for model, batch in ((cpu, x), (gpu, x.to(CUDA))):
        opt = smp.make_optimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
        before = lm_loss(model, batch).item()
        train_steps(model, opt, 50, batch, clip=1.0)
        assert lm_loss(model, batch).item() < before - 0.5  # it trained
        assert masked_zero_violations(model) == 0
    assert lm_loss(gpu, x.to(CUDA)).item() == pytest.approx(lm_loss(cpu, x).item(), abs=5e-3)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_block_sparse_kernel_on_gpu_matches_masked_dense(dtype, tol):
    shape, block = (256, 512), 32
    mask = random_mask(shape, 0.25, 0, "w", "blocks", block).to(CUDA)
    weight = torch.randn(shape, device=CUDA, dtype=dtype) * mask
    index = known(block_columns(mask, block))
    assert index.device.type == "cuda"
    values = to_blocks(weight, index, block).requires_grad_()
    dense = weight.clone().requires_grad_()
    x = torch.randn(300, shape[1], device=CUDA, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(300, shape[0], device=CUDA, dtype=dtype)
    y, want = block_sparse_linear(x, values, index), F.linear(x2, dense)
    y.backward(g)
    want.backward(g)
    scale = lambda t: t.float().abs().max().item()  # noqa: E731
    assert (y - want).float().abs().max() <= tol * scale(want)
    assert (known(x.grad) - known(x2.grad)).float().abs().max() <= tol * scale(known(x2.grad))
    grad_w = (known(dense.grad) * mask).float()
    assert (to_blocks(grad_w, index, block) - known(values.grad).float()).abs().max() <= tol * grad_w.abs().max()


def test_sparsified_gpt_on_gpu_trains_like_masked_dense_under_bf16_autocast():
    x = tokens(batch=8, seq=17, vocab=64).to(CUDA)
    losses = {}
    for backend in ("masked_dense", "blocks"):
        model = block_gpt(backend).to(CUDA)
        opt = smp.make_optimizer(model, torch.optim.AdamW, lr=3e-3, weight_decay=0.1)
        losses[backend] = train_steps(model, opt, 20, x, autocast="cuda").item()
        if backend == "masked_dense":
            assert masked_zero_violations(model) == 0
    assert losses["blocks"] == pytest.approx(losses["masked_dense"], abs=0.05)


def test_a_gpu_masked_dense_state_dict_loads_into_gpu_block_layers():
    dense = block_gpt(None).to(CUDA)
    with torch.no_grad():
        for p in dense.parameters():
            p.mul_(1.5)  # other weights than the fresh block model's, zeros kept
    blocks = block_gpt("blocks").to(CUDA)
    x = tokens(batch=2, seq=17, vocab=64).to(CUDA)
    assert not torch.allclose(blocks(x[:, :-1]), dense(x[:, :-1]))
    blocks.load_state_dict(dense.state_dict())  # converted on load, on the GPU
    torch.testing.assert_close(blocks(x[:, :-1]), dense(x[:, :-1]), rtol=1e-4, atol=1e-5)


def test_trainer_on_gpu_resumes_and_its_checkpoint_evaluates_on_cpu(corpus, tmp_path):
    overrides = ("train.device=cuda",)
    whole = train(tiny_config(corpus, *overrides), tmp_path / "whole")
    assert whole.status == "completed" and whole.device == "cuda"
    cpu = train(tiny_config(corpus, "train.device=cpu"), tmp_path / "cpu")
    assert cpu.device == "cpu"
    assert whole.final_val_loss == pytest.approx(cpu.final_val_loss, abs=2e-3)  # same run, other device
    killed = Trainer(tiny_config(corpus, *overrides), tmp_path / "split")
    for _ in range(7):
        assert killed.train_step()
    killed.close()
    train(tiny_config(corpus, *overrides), tmp_path / "split", resume=True)
    split, ref = read_metrics(tmp_path / "split"), read_metrics(tmp_path / "whole")
    assert [r[0] for r in curve(split)] == [r[0] for r in curve(ref)]
    for a, b in zip(curve(split, ("train_loss",)), curve(ref, ("train_loss",))):
        assert float(a[0]) == pytest.approx(float(b[0]), abs=1e-4)  # GPU index_add/atomics: not bitwise
    # On the CPU, over the trainer's validation windows (eval_batches × batch_size = 8).
    assert evaluate_checkpoint(tmp_path / "whole", windows=8).val_loss == pytest.approx(whole.final_val_loss,
                                                                                          abs=2e-3)


def test_block_backend_trainer_on_gpu(corpus, tmp_path):
    blocks = ("model.width=64", "model.base_width=32", "model.mask_kind=blocks", "model.block_size=8",
              "train.device=cuda")
    dense = train(tiny_config(corpus, *blocks), tmp_path / "dense")
    sparse = train(tiny_config(corpus, *blocks, "model.backend=blocks"), tmp_path / "blocks")
    assert isinstance(dense, Completed) and isinstance(sparse, Completed)
    assert sparse.backends == {"blocks": 4} and sparse.device == "cuda"
    assert sparse.final_val_loss == pytest.approx(dense.final_val_loss, rel=1e-3)
