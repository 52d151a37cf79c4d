// Native CPU kernels of sparsemup's sparse linear layers y = x W^T (sparsemup.sparse.native builds this on first use):
// row-exact unstructured masks (rows_kernels.h) and b x b block masks (blocks_kernels.h), forward and backward,
// fp32 and bf16 storage with fp32 accumulation, threaded through ATen's parallel_for.
//
// ISA: the kernel headers are compiled three times (AVX-512F, AVX2+FMA, baseline x86-64 / generic), each pass inside
// its own namespace under `#pragma GCC target`, and the variant is chosen at run time with __builtin_cpu_supports,
// so one binary is safe on every CPU. Vectors are GCC vector extensions whose width follows the variant (16 / 8 / 4
// floats).


#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>


#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace smu_avx512 {
constexpr int LANES = 16;
#include "simd.h"
#include "rows_kernels.h"
#include "blocks_kernels.h"
}  // namespace smu_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace smu_avx2 {
constexpr int LANES = 8;
#include "simd.h"
#include "rows_kernels.h"
#include "blocks_kernels.h"
}  // namespace smu_avx2
#pragma GCC pop_options
#define SMU_HAVE_X86_VARIANTS 1
#endif

namespace smu_default {
constexpr int LANES = 4;
#include "simd.h"
#include "rows_kernels.h"
#include "blocks_kernels.h"
}  // namespace smu_default


namespace {

enum class Isa { kAvx512, kAvx2, kDefault };

Isa detect_isa() {
#ifdef SMU_HAVE_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

Isa active_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

// Tokens per tile: $SPARSEMUP_ROWS_TILE (16, 32 or 64) when set, else 16 (fastest of the three, fwd + bwd, at
// 2048², 4096 tokens, densities 1/16 and 1/128 on a 2-core AVX-512 EPYC; scripts/kernel_tile_bench.py measures them).
int tile_size() {
  static const int tt = [] {
    const char* env = std::getenv("SPARSEMUP_ROWS_TILE");
    if (env != nullptr) {
      const int v = std::atoi(env);
      if (v == 16 || v == 32 || v == 64) return v;
    }
    return 16;
  }();
  return tt;
}

// The call in the variant of the CPU this process runs on.
#ifdef SMU_HAVE_X86_VARIANTS
#define SMU_DISPATCH(call)                          \
  switch (active_isa()) {                           \
    case Isa::kAvx512: smu_avx512::call; return;    \
    case Isa::kAvx2: smu_avx2::call; return;        \
    default: smu_default::call; return;             \
  }
#else
#define SMU_DISPATCH(call) \
  smu_default::call;       \
  return;
#endif

template <typename S>
void dispatch_forward(const S* x, const float* vals, const int32_t* idx, S* y, int64_t T, int64_t in, int64_t out,
                      int64_t k, int64_t b, int64_t e) {
  SMU_DISPATCH(forward_range<S>(tile_size(), x, vals, idx, y, T, in, out, k, b, e))
}

template <typename S>
void dispatch_backward(const S* gy, const S* x, const float* vals, const int32_t* idx, S* dx, float* dw, int64_t T,
                       int64_t in, int64_t out, int64_t k, int64_t b, int64_t e, bool ndx, bool ndw) {
  SMU_DISPATCH(backward_range<S>(tile_size(), gy, x, vals, idx, dx, dw, T, in, out, k, b, e, ndx, ndw))
}

// Checks both kernels share (`who` names the kernel in the message): CPU, 2-D x, fp32 or bf16 throughout, int32
// index, contiguous.
void check_common(const char* who, const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& index) {
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu() && index.device().is_cpu(), who,
              ": CPU tensors expected");
  TORCH_CHECK(x.dim() == 2, who, ": x must be 2-D (tokens, in), got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, who,
              ": float32 or bfloat16 expected, got ", x.scalar_type());
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), who, ": values dtype ", values.scalar_type(),
              " differs from the input's ", x.scalar_type());
  TORCH_CHECK(index.scalar_type() == at::kInt, who, ": index must be int32, got ", index.scalar_type());
  TORCH_CHECK(x.is_contiguous() && values.is_contiguous() && index.is_contiguous(), who,
              ": contiguous tensors expected");
}

// Every index in [0, limit): cheap next to the product and it keeps every later access in bounds.
void check_index_range(const char* who, const torch::Tensor& index, int64_t limit) {
  if (index.numel() == 0) return;
  const auto [lo, hi] = std::minmax_element(index.data_ptr<int32_t>(), index.data_ptr<int32_t>() + index.numel());
  TORCH_CHECK(*lo >= 0 && *hi < limit, who, ": index out of range [0, ", limit, "): min ", *lo, ", max ", *hi);
}

// grad_y: CPU, contiguous, (tokens, out), in the input's dtype.
void check_grad(const char* who, const torch::Tensor& grad_y, const torch::Tensor& x, int64_t out) {
  TORCH_CHECK(grad_y.device().is_cpu() && grad_y.dim() == 2 && grad_y.size(0) == x.size(0) && grad_y.size(1) == out,
              who, ": grad_y must be (", x.size(0), ", ", out, "), got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), who, ": grad_y dtype ", grad_y.scalar_type(),
              " differs from the input's ", x.scalar_type());
  TORCH_CHECK(grad_y.is_contiguous(), who, ": grad_y must be contiguous");
}

void check_rows(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& index) {
  check_common("sparsemup rows", x, values, index);
  TORCH_CHECK(values.dim() == 2 && index.dim() == 2 && values.sizes() == index.sizes(),
              "sparsemup rows: values and index must be 2-D (out, k) of the same shape, got ", values.sizes(),
              " and ", index.sizes());
  TORCH_CHECK(values.size(1) >= 1, "sparsemup rows: k must be at least 1");
  TORCH_CHECK(values.size(1) <= x.size(1), "sparsemup rows: k = ", values.size(1), " exceeds in = ", x.size(1));
  check_index_range("sparsemup rows", index, x.size(1));
}

torch::Tensor values_f32(const torch::Tensor& values) {
  return values.scalar_type() == at::kFloat ? values : values.to(at::kFloat).contiguous();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

torch::Tensor rows_forward(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& index) {
  check_rows(x, values, index);
  const int64_t T = x.size(0), in = x.size(1), out = values.size(0), k = values.size(1);
  torch::Tensor y = torch::empty({T, out}, x.options());
  if (T == 0 || out == 0) return y;
  const torch::Tensor vf = values_f32(values);
  const float* vals = vf.data_ptr<float>();
  const int32_t* idx = index.data_ptr<int32_t>();
  const int64_t tiles = ceil_div(T, tile_size());
  at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) {
    if (x.scalar_type() == at::kFloat) {
      dispatch_forward<float>(x.data_ptr<float>(), vals, idx, y.data_ptr<float>(), T, in, out, k, b, e);
    } else {
      dispatch_forward<uint16_t>(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), vals, idx,
                                 reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), T, in, out, k, b, e);
    }
  });
  return y;
}

std::tuple<torch::Tensor, torch::Tensor> rows_backward(const torch::Tensor& grad_y, const torch::Tensor& x,
                                                       const torch::Tensor& values, const torch::Tensor& index,
                                                       bool need_dx, bool need_dw) {
  check_rows(x, values, index);
  const int64_t T = x.size(0), in = x.size(1), out = values.size(0), k = values.size(1);
  check_grad("sparsemup rows", grad_y, x, out);
  torch::Tensor dx = need_dx ? torch::zeros({T, in}, x.options()) : torch::empty({0}, x.options());
  torch::Tensor dwv = need_dw ? torch::zeros({out, k}, values.options()) : torch::empty({0}, values.options());
  if (T == 0 || out == 0 || (!need_dx && !need_dw)) return {dx, dwv};
  const torch::Tensor vf = values_f32(values);
  const float* vals = vf.data_ptr<float>();
  const int32_t* idx = index.data_ptr<int32_t>();
  const int64_t tiles = ceil_div(T, tile_size());
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  // One fp32 (out, k) dW accumulator per worker, summed at the end.
  torch::Tensor dw_parts = need_dw ? torch::zeros({nthreads, out, k}, values.options().dtype(at::kFloat))
                                   : torch::empty({0}, values.options().dtype(at::kFloat));
  const int64_t chunk = ceil_div(tiles, nthreads);
  at::parallel_for(0, nthreads, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t part = pb; part < pe; ++part) {
      const int64_t b = part * chunk, e = std::min(tiles, b + chunk);
      if (b >= e) continue;
      float* dw = need_dw ? dw_parts.data_ptr<float>() + part * out * k : nullptr;
      if (x.scalar_type() == at::kFloat) {
        dispatch_backward<float>(grad_y.data_ptr<float>(), x.data_ptr<float>(), vals, idx,
                                 need_dx ? dx.data_ptr<float>() : nullptr, dw, T, in, out, k, b, e, need_dx,
                                 need_dw);
      } else {
        dispatch_backward<uint16_t>(
            reinterpret_cast<const uint16_t*>(grad_y.data_ptr<at::BFloat16>()),
            reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), vals, idx,
            need_dx ? reinterpret_cast<uint16_t*>(dx.data_ptr<at::BFloat16>()) : nullptr, dw, T, in, out, k, b, e,
            need_dx, need_dw);
      }
    }
  });
  if (need_dw) dwv = dw_parts.sum(0).to(values.scalar_type());
  return {dx, dwv};
}

// Tokens per chunk of the block kernels: $SPARSEMUP_BLOCKS_CHUNK (8 to 1024) when set, else 64 (a chunk of fp32
// activations, 64 x 2048 x 4 bytes, stays in L2; 32 and 128 measured no faster on a 2-core AVX-512 EPYC;
// scripts/kernel_tile_bench.py --kernel blocks measures them).
int64_t blocks_chunk() {
  static const int64_t tc = [] {
    const char* env = std::getenv("SPARSEMUP_BLOCKS_CHUNK");
    if (env != nullptr) {
      const int64_t v = std::atoll(env);
      if (v >= 8 && v <= 1024) return v;
    }
    return static_cast<int64_t>(64);
  }();
  return tc;
}


template <typename S>
void dispatch_blocks_forward(const S* x, const float* wt, const int32_t* idx, S* y, int64_t T, int64_t in,
                             int64_t rows, int64_t k, int64_t b, int64_t cb, int64_t ce) {
  SMU_DISPATCH(blocks_forward_range<S>(blocks_chunk(), x, wt, idx, y, T, in, rows, k, b, cb, ce))
}

template <typename S>
void dispatch_blocks_backward(const S* gy, const S* x, const float* vals, const int32_t* idx, const int32_t* colptr,
                              const int32_t* blocks, S* dx, float* dwp, int64_t T, int64_t in, int64_t rows,
                              int64_t k, int64_t b, int64_t cb, int64_t ce) {
  SMU_DISPATCH(blocks_backward_range<S>(blocks_chunk(), gy, x, vals, idx, colptr, blocks, dx, dwp, T, in, rows, k,
                                        b, cb, ce))
}

void check_blocks(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& index) {
  check_common("sparsemup blocks", x, values, index);
  TORCH_CHECK(values.dim() == 4 && values.size(2) == values.size(3) && index.dim() == 2 &&
                  index.size(0) == values.size(0) && index.size(1) == values.size(1),
              "sparsemup blocks: values must be (rows, k, b, b) and index (rows, k), got ", values.sizes(), " and ",
              index.sizes());
  const int64_t b = values.size(2);
  TORCH_CHECK(b >= 1 && x.size(1) % b == 0, "sparsemup blocks: block ", b, " does not divide in = ", x.size(1));
  check_index_range("sparsemup blocks", index, x.size(1) / b);
}

torch::Tensor blocks_forward(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& index) {
  check_blocks(x, values, index);
  const int64_t T = x.size(0), in = x.size(1), rows = values.size(0), k = values.size(1), b = values.size(2);
  torch::Tensor y = torch::empty({T, rows * b}, x.options());
  if (T == 0 || rows == 0) return y;
  if (k == 0) return y.zero_();
  // Each block transposed ([r, j, i, o]): the forward microkernel reads a row of outputs per input feature.
  const torch::Tensor wt = values.to(at::kFloat).transpose(2, 3).contiguous();
  const float* w = wt.data_ptr<float>();
  const int32_t* idx = index.data_ptr<int32_t>();
  at::parallel_for(0, ceil_div(T, blocks_chunk()), 1, [&](int64_t cb, int64_t ce) {
    if (x.scalar_type() == at::kFloat) {
      dispatch_blocks_forward<float>(x.data_ptr<float>(), w, idx, y.data_ptr<float>(), T, in, rows, k, b, cb, ce);
    } else {
      dispatch_blocks_forward<uint16_t>(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), w, idx,
                                        reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), T, in, rows, k, b,
                                        cb, ce);
    }
  });
  return y;
}

std::tuple<torch::Tensor, torch::Tensor> blocks_backward(const torch::Tensor& grad_y, const torch::Tensor& x,
                                                         const torch::Tensor& values, const torch::Tensor& index,
                                                         bool need_dx, bool need_dw) {
  check_blocks(x, values, index);
  const int64_t T = x.size(0), in = x.size(1), rows = values.size(0), k = values.size(1), b = values.size(2);
  const int64_t out = rows * b, cols = in / b;
  check_grad("sparsemup blocks", grad_y, x, out);
  torch::Tensor dx = need_dx ? torch::empty({T, in}, x.options()) : torch::empty({0}, x.options());
  torch::Tensor dwv = need_dw ? torch::zeros(values.sizes(), values.options()) : torch::empty({0}, values.options());
  if (T == 0 || (!need_dx && !need_dw)) return {dx, dwv};
  if (rows == 0 || k == 0) {
    if (need_dx) dx.zero_();
    return {dx, dwv};
  }
  // The transposed block index: for block-column c, the ids r k + j of its blocks at [colptr[c], colptr[c + 1]).
  const int32_t* idx = index.data_ptr<int32_t>();
  std::vector<int32_t> colptr(cols + 1, 0), blocks(need_dx ? rows * k : 0);
  if (need_dx) {
    for (int64_t e = 0; e < rows * k; ++e) ++colptr[idx[e] + 1];
    for (int64_t c = 0; c < cols; ++c) colptr[c + 1] += colptr[c];
    std::vector<int32_t> fill(colptr.begin(), colptr.end() - 1);
    for (int64_t e = 0; e < rows * k; ++e) blocks[fill[idx[e]]++] = static_cast<int32_t>(e);
  }
  const torch::Tensor vf = values_f32(values);
  const float* vals = vf.data_ptr<float>();
  const int64_t chunks = ceil_div(T, blocks_chunk());
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks));
  // One fp32 dW partial per worker, summed at the end.
  torch::Tensor dw_parts = need_dw ? torch::zeros({nthreads, rows, k, b, b}, values.options().dtype(at::kFloat))
                                   : torch::empty({0}, values.options().dtype(at::kFloat));
  const int64_t per = ceil_div(chunks, nthreads);
  at::parallel_for(0, nthreads, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t part = pb; part < pe; ++part) {
      const int64_t cb = part * per, ce = std::min(chunks, cb + per);
      if (cb >= ce) continue;
      float* dwp = need_dw ? dw_parts.data_ptr<float>() + part * rows * k * b * b : nullptr;
      if (x.scalar_type() == at::kFloat) {
        dispatch_blocks_backward<float>(grad_y.data_ptr<float>(), x.data_ptr<float>(), vals, idx, colptr.data(),
                                        blocks.data(), need_dx ? dx.data_ptr<float>() : nullptr, dwp, T, in, rows, k,
                                        b, cb, ce);
      } else {
        dispatch_blocks_backward<uint16_t>(
            reinterpret_cast<const uint16_t*>(grad_y.data_ptr<at::BFloat16>()),
            reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), vals, idx, colptr.data(), blocks.data(),
            need_dx ? reinterpret_cast<uint16_t*>(dx.data_ptr<at::BFloat16>()) : nullptr, dwp, T, in, rows, k, b, cb,
            ce);
      }
    }
  });
  if (need_dw) dwv = (nthreads == 1 ? dw_parts[0] : dw_parts.sum(0)).to(values.scalar_type());
  return {dx, dwv};
}

std::string isa() {
  switch (active_isa()) {
    case Isa::kAvx512: return "avx512f";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsemup sparse linear kernels: row-exact and block masks (forward, backward)";
  m.def("rows_forward", &rows_forward, "y = x W^T for row-sparse W given as (values, index)", pybind11::arg("x"),
        pybind11::arg("values"), pybind11::arg("index"));
  m.def("rows_backward", &rows_backward, "(dx or empty, dvalues or empty) of y = x W^T", pybind11::arg("grad_y"),
        pybind11::arg("x"), pybind11::arg("values"), pybind11::arg("index"), pybind11::arg("need_dx"),
        pybind11::arg("need_dw"));
  m.def("blocks_forward", &blocks_forward, "y = x W^T for block-sparse W given as (values, index)",
        pybind11::arg("x"), pybind11::arg("values"), pybind11::arg("index"));
  m.def("blocks_backward", &blocks_backward, "(dx or empty, dvalues or empty) of y = x W^T for block-sparse W",
        pybind11::arg("grad_y"), pybind11::arg("x"), pybind11::arg("values"), pybind11::arg("index"),
        pybind11::arg("need_dx"), pybind11::arg("need_dw"));
  m.def("isa", &isa, "SIMD variant in use: avx512f, avx2 or default");
  m.def("tile", &tile_size, "tokens per tile of the row kernels");
  m.def("chunk", &blocks_chunk, "tokens per chunk of the block kernels");
}

