"""The layer benchmark: one sparse layer's training step on every backend, side by side.

Each row times forward and backward (dX and the weight gradient on the mask only) of one
layer, side by side in one process, and reports the speedup over masked dense of the same
dtype, over the fastest dense path (the best dtype of masked dense), and the fraction of the
1/ρ ideal. Backends: ``masked_dense`` (what sparsemup runs by default), ``torch_csr`` (torch's
CSR ``mm`` + ``sampled_addmm``), ``rows`` (sparsemup's row-sparse layers on its native kernels,
unstructured masks) and ``blocks`` (sparsemup's block-sparse layers on its native kernels, block masks).
Peak memory is the growth of the process's peak resident set during the step (Linux only), or on
CUDA of the peak memory torch allocated;
``state_mb`` counts the bytes of weights, AdamW state and mask or indices the layer keeps.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch
import torch.nn.functional as F

from ..sparse.timing import DTYPES, LayerStep, Memory, layer_step, masked_weight, time_step

__all__ = ["Grid", "FULL", "QUICK", "GPU", "BENCH_MASKS", "LayerRow", "run_layers", "block_for", "blocks_for",
           "main_table", "derive_thresholds"]


BENCH_MASKS = ("rows", "blocks")  # unstructured row-exact masks; b×b block masks


@dataclass(frozen=True)
class Grid:
    """What to measure: layer shapes (out, in), token counts, densities, dtypes, mask kinds, repetitions,
    and the GPT step (skipped when ``gpt_step`` is False, as with any ``sparsemup bench`` filter)."""

    shapes: tuple[tuple[int, int], ...]
    tokens: tuple[int, ...]
    densities: tuple[float, ...]
    dtypes: tuple[str, ...]
    repeats: int
    gpt_width: int
    gpt_tokens: tuple[int, int]  # (batch, context)
    masks: tuple[str, ...] = BENCH_MASKS
    gpt_step: bool = True


FULL = Grid(shapes=((512, 512), (1024, 1024), (2048, 2048), (4096, 1024)), tokens=(512, 4096),
            densities=(1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128), dtypes=("fp32", "bf16"),
            repeats=3, gpt_width=1024, gpt_tokens=(8, 256))
# On a GPU the layers are bigger (small ones only measure launch overhead) and timings repeat more.
GPU = Grid(shapes=((4096, 4096), (8192, 8192)), tokens=(8192,), densities=(1 / 4, 1 / 16, 1 / 64),
           dtypes=("fp32", "bf16"), repeats=10, gpt_width=2048, gpt_tokens=(16, 512))
QUICK = Grid(shapes=((256, 256),), tokens=(64,), densities=(1 / 4, 1 / 16), dtypes=("fp32", "bf16"),
             repeats=1, gpt_width=128, gpt_tokens=(2, 32))


def block_for(density: float, fan_in: int, cap: int = 64) -> int:
    """The largest power-of-two block ≤ cap that still keeps one block per row: b ≤ ρ·fan_in."""
    block = 1
    while block * 2 <= min(cap, density * fan_in):
        block *= 2
    return block


def blocks_for(density: float, fan_in: int) -> list[int]:
    """Block sizes to measure: 16, 32 and 64 where b ≤ ρ·fan_in, else the largest that fits."""
    sizes = [b for b in (16, 32, 64) if b <= density * fan_in]
    return sizes or [block_for(density, fan_in)]


class _Memory:
    """Peak resident-set growth of this process (Linux) during one step: before it, freed heap memory is handed
    back to the system (``malloc_trim``) and the high-water mark reset, so the step's allocations show as growth.
    The allocator's settings are left alone: timed steps run as they would in training (a fixed mmap threshold
    made every large tensor a fresh mapping and slowed fast kernels and the GPT step measured after them up to 2×)."""

    def __init__(self) -> None:
        self.ok = platform.system() == "Linux"
        if self.ok:
            try:
                self.trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                self.ok = False

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} missing from /proc/self/status")

    def start(self) -> None:
        if self.ok:
            self.trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
            self.base = self._status("VmRSS:")

    def peak_mb(self) -> float | None:
        return round((self._status("VmHWM:") - self.base) / 2**20, 1) if self.ok else None


class _CudaMemory:
    """Peak growth of the memory torch allocated on a CUDA device."""

    def __init__(self, device: torch.device) -> None:
        # A GEMM with backward in each dtype, so one-time allocations (cuBLAS workspaces) happen here
        # rather than inside the first peak-memory reading.
        for dtype in DTYPES.values():
            weight = torch.randn(64, 64, device=device, dtype=dtype, requires_grad=True)
            torch.autograd.backward(F.linear(torch.randn(64, 64, device=device, dtype=dtype), weight).sum())
        self.device = device

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def peak_mb(self) -> float:
        return round((torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20, 1)


class _CSRLinear(torch.autograd.Function):
    """y = x Wᵀ with W in torch CSR; dX with a transposed CSR, dW with sampled_addmm on the pattern."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, values: torch.Tensor, pattern: torch.Tensor,
                transpose: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        weight = torch.sparse_csr_tensor(pattern.crow_indices(), pattern.col_indices(), values, pattern.shape)
        ctx.save_for_backward(x, values)
        ctx.pattern, ctx.transpose = pattern, transpose
        out: torch.Tensor = torch.sparse.mm(weight, x.t()).t()
        return out

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Any, ...]:
        x, values = ctx.saved_tensors
        crow, col, perm, shape = ctx.transpose
        weight_t = torch.sparse_csr_tensor(crow, col, values[perm], tuple(shape.tolist()))
        grad_x = torch.sparse.mm(weight_t, grad_y.t()).t()
        grad_w = torch.sparse.sampled_addmm(ctx.pattern, grad_y.t().contiguous(), x, beta=0.0)
        return grad_x, grad_w.values(), None, None


def _csr_layer(weight: torch.Tensor, mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    pattern = (weight * mask).to_sparse_csr()
    values = pattern.values().clone().requires_grad_()
    # Transposed pattern, and where each of its values sits in the original order.
    order = torch.arange(1, values.numel() + 1, dtype=torch.float64, device=weight.device)  # exact in any dtype
    numbered = torch.sparse_csr_tensor(pattern.crow_indices(), pattern.col_indices(), order, pattern.shape)
    trans = numbered.to_dense().t().to_sparse_csr()
    perm = trans.values().long() - 1
    transpose = (trans.crow_indices(), trans.col_indices(), perm, torch.tensor(trans.shape))

    def forward(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _CSRLinear.apply(x, values, pattern, transpose)  # type: ignore[no-untyped-call]
        return out

    return forward


def _layer(backend: str, shape: tuple[int, int], density: float, dtype: torch.dtype, block: int,
           device: torch.device) -> LayerStep:
    """``sparse.timing.layer_step``, and torch's CSR kernels as a baseline (``torch_csr``, on a rows mask)."""
    if backend != "torch_csr":
        return layer_step(backend, shape, density, dtype, block, device)  # type: ignore[arg-type]
    weight, mask = masked_weight(shape, density, dtype, device)
    csr_bytes = int(mask.sum()) * (3 * weight.element_size() + 8) + 8 * (shape[0] + 1)
    return _csr_layer(weight, mask), lambda: None, csr_bytes


class _LayerRowBase(TypedDict):
    mask: str
    shape: list[int]
    tokens: int
    density: float
    dtype: str
    backend: str
    block: int | None
    fwd_ms: float | None
    bwd_ms: float | None
    total_ms: float | None  # None: this backend cannot run the case (``error`` says why)
    peak_mem_mb: float | None
    state_mb: float | None


class LayerRow(_LayerRowBase, total=False):
    """A row of the layer table: one backend's forward + backward of one layer (``_measure``), and where it ran
    its speedups (``_speedups``)."""

    error: str
    speedup_vs_masked_dense: float
    speedup_vs_fastest_dense: float
    fraction_of_ideal: float


def run_layers(grid: Grid, progress: Callable[[LayerRow], None] | None = None,
               device: torch.device | str = "cpu") -> list[LayerRow]:
    """Every (shape, tokens, dtype, density, backend) of the grid; rows as in the module docstring."""
    device = torch.device(device)
    memory = _CudaMemory(device) if device.type == "cuda" else _Memory()
    rows: list[LayerRow] = []
    for shape in grid.shapes:
        for tokens in grid.tokens:
            group: list[LayerRow] = []
            for dtype_name in grid.dtypes:
                dtype = DTYPES[dtype_name]
                x = torch.randn(tokens, shape[1]).to(device, dtype).requires_grad_()
                grad_y = torch.randn(tokens, shape[0]).to(device, dtype)
                dense: LayerRow | None = None
                for density in grid.densities:
                    runs: list[tuple[str, str, int]] = []  # (mask, backend, block)
                    if "rows" in grid.masks:
                        runs += [("rows", "masked_dense", 0), ("rows", "torch_csr", 0), ("rows", "rows", 0)]
                    if "blocks" in grid.masks:
                        runs += [("blocks", "masked_dense", 0)]
                        runs += [("blocks", "blocks", b) for b in blocks_for(density, shape[1])]
                    for mask, backend, block in runs:
                        if backend == "masked_dense" and dense is not None:
                            # Masked dense does the same work for every mask and density: measured once
                            # per shape, tokens and dtype, and reported beside each mask kind.
                            row = dense.copy()
                            row["density"], row["mask"] = density, mask
                        else:
                            row = _measure(mask, backend, shape, tokens, density, dtype_name, block, x, grad_y,
                                           grid.repeats, memory)
                            if backend == "masked_dense":
                                dense = row
                        group.append(row)
                        if progress:
                            progress(row)
            rows += _speedups(group)
    return rows


def _measure(mask: str, backend: str, shape: tuple[int, int], tokens: int, density: float, dtype_name: str,
             block: int, x: torch.Tensor, grad_y: torch.Tensor, repeats: int, memory: Memory) -> LayerRow:
    row: LayerRow = {"mask": mask, "shape": list(shape), "tokens": tokens, "density": density, "dtype": dtype_name,
                     "backend": backend, "block": block if backend == "blocks" else None, "fwd_ms": None,
                     "bwd_ms": None, "total_ms": None, "peak_mem_mb": None, "state_mb": None}
    try:
        forward, after, weight_bytes = _layer(backend, shape, density, DTYPES[dtype_name], block, x.device)
        fwd, bwd, peak = time_step(forward, after, x, grad_y, repeats, memory)
    except (RuntimeError, NotImplementedError) as err:  # e.g. a dtype torch's CSR kernels lack
        row["error"] = str(err).splitlines()[0][:160]
        return row
    row.update({"fwd_ms": round(fwd, 3), "bwd_ms": round(bwd, 3), "total_ms": round(fwd + bwd, 3),
                "peak_mem_mb": peak, "state_mb": round(weight_bytes / 2**20, 3)})
    return row


def _speedups(group: list[LayerRow]) -> list[LayerRow]:
    """Add speedups over masked dense (same dtype) and over the fastest dense path, and % of 1/ρ."""
    dense = {r["dtype"]: _ran(r) for r in group if r["backend"] == "masked_dense"}
    fastest = min(dense.values())
    for r in group:
        if total := r["total_ms"]:
            same = dense[r["dtype"]] / total
            r["speedup_vs_masked_dense"] = round(same, 3)
            r["speedup_vs_fastest_dense"] = round(fastest / total, 3)
            r["fraction_of_ideal"] = round(same * r["density"], 3)
    return group


def _ran(row: LayerRow) -> float:
    """The time of a row that must have run (masked dense runs every case)."""
    if row["total_ms"] is None:
        raise RuntimeError(f"masked dense failed on {row['shape']} {row['dtype']}: {row.get('error')}")
    return row["total_ms"]


def derive_thresholds(rows: Iterable[LayerRow]) -> dict[tuple[str, str], float]:
    """{(dtype, "rows" or "blocks b=B"): the highest density at or below which every measured row of that sparse
    backend beat masked dense} (keys without such a density are left out). Documentation of a run's crossovers:
    ``auto`` times the model's own layers instead (``calibration``)."""
    by_key: dict[tuple[str, str], list[LayerRow]] = {}
    for r in rows:
        if r["backend"] in ("blocks", "rows") and r["total_ms"] is not None:
            kind = "rows" if r["backend"] == "rows" else f"blocks b={r['block']}"
            by_key.setdefault((r["dtype"], kind), []).append(r)
    out = {}
    for key, group in sorted(by_key.items()):
        best = None
        for density in sorted({r["density"] for r in group}):
            if all(r["speedup_vs_masked_dense"] >= 1.0 for r in group if r["density"] <= density):
                best = density
        if best is not None:
            out[key] = best
    return out


def main_table(rows: Iterable[LayerRow]) -> str:
    """A plain-text table of the layer rows."""
    head = f"{'shape':>11} {'tokens':>6} {'rho':>7} {'dtype':>5} {'mask':>6} {'backend':>12} {'b':>3} {'fwd':>8} " \
           f"{'bwd':>8} {'total':>8} {'mem MB':>7} {'x mdense':>8} {'x best':>7} {'%ideal':>6}"
    lines = [head]
    for r in rows:
        if r.get("total_ms") is None:
            lines.append(f"{'x'.join(map(str, r['shape'])):>11} {r['tokens']:>6} 1/{round(1 / r['density']):<5} "
                         f"{r['dtype']:>5} {r.get('mask', ''):>6} {r['backend']:>12}  unsupported: "
                         f"{r.get('error', '')[:60]}")
            continue
        lines.append(
            f"{'x'.join(map(str, r['shape'])):>11} {r['tokens']:>6} 1/{round(1 / r['density']):<5} {r['dtype']:>5} "
            f"{r.get('mask', ''):>6} {r['backend']:>12} {r['block'] or '':>3} {r['fwd_ms']:8.2f} {r['bwd_ms']:8.2f} "
            f"{r['total_ms']:8.2f} "
            f"{r['peak_mem_mb'] if r['peak_mem_mb'] is not None else '':>7} {r['speedup_vs_masked_dense']:8.2f} "
            f"{r['speedup_vs_fastest_dense']:7.2f} {100 * r['fraction_of_ideal']:5.1f}%")
    return "\n".join(lines)
