"""Tolerances derived from floating-point arithmetic, for comparing two computations of the same numbers
that sum in different orders (native kernels against MKL's GEMM, sparse storage against masked dense).

A dot product of k terms computed in precision u has a forward error of at most γ_k·Σ|x_i w_i| with
γ_k = k·u / (1 − k·u) (Higham, Accuracy and Stability of Numerical Algorithms, 2002, §3.1); two orders of
the same sum therefore differ by at most 2·γ_k·Σ|x_i w_i|. That bound holds always and is what layer-level
tests use, computed from the data. Rounding errors of long sums behave like random walks: with
probability at least 1 − 2·k·exp(−λ²/2)·(a tiny term) the error stays below γ̃_k = λ·√k·u (Higham & Mary,
"A New Approach to Probabilistic Rounding Error Analysis", SISC 2019); λ = 6 makes a failure less likely
than one in 10⁶ per sum. Model-level tests chain several products, so they use ``model_rtol``.
"""

import math

import torch

U_FP32 = 2.0**-24  # unit roundoff of float32 (round to nearest)
U_BF16 = 2.0**-8  # of bfloat16 (8 significant bits)
LAMBDA = 6.0  # the probabilistic bound's confidence parameter


def gamma(k: int, u: float = U_FP32) -> float:
    """Worst-case relative error bound of a k-term sum (Higham's γ_k)."""
    assert k * u < 1
    return k * u / (1 - k * u)


def gamma_probable(k: int, u: float = U_FP32) -> float:
    """The probabilistic bound λ·√k·u of a k-term sum (Higham & Mary)."""
    return LAMBDA * math.sqrt(k) * u


def matmul_atol(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                u: float = U_FP32) -> torch.Tensor:
    """Elementwise bound on the difference between two summation orders of x @ weightᵀ (+ bias):
    2·γ_k·(|x| @ |weight|ᵀ + |bias|), k = the inner dimension, plus one for the bias (computed in float64)."""
    k = weight.shape[-1] + (bias is not None)
    magnitude = x.double().abs() @ weight.double().abs().t()
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    return 2 * gamma(k, u) * magnitude


def model_rtol(matmuls: int, k: int, steps: int = 1, u: float = U_FP32) -> float:
    """Relative tolerance for a loss (or an RMS of weight changes) after ``steps`` optimizer steps of a model whose
    longest path chains ``matmuls`` products of inner dimension up to k: each product adds at most two orders'
    worth of γ̃_k, and each step adds one forward-backward's worth to the weights (Adam's update m/(√v+ε)
    passes a gradient's relative error through at most unchanged)."""
    return max(steps, 1) * matmuls * 2 * gamma_probable(k, u)
