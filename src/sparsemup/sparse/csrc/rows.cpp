// Row-exact unstructured sparse linear layer y = x W^T on the CPU (sparsemup.sparse.native builds it on first use).
//
// W (out, in) keeps exactly k entries per row, stored as values (out, k) (float32 or bfloat16) and index (out, k)
// int32 (sorted, unique columns). The token dimension is cut into tiles of TT tokens; each thread owns whole
// tiles, so forward and dX need no atomics. A tile of x is transposed into a thread-local fp32 buffer xb (in, TT):
// one nonzero then costs TT/LANES vector loads and FMAs from L1/L2 (no scalar gathers):
//   forward   yb[o, :]  = sum_j values[o, j] * xb[index[o, j], :]
//   backward  dxb[i, :] += values[o, j] * gb[o, :],  dW[o, j] += <gb[o, :], xb[i, :]>   (i = index[o, j])
// dW is accumulated per thread in fp32 and summed at the end. Per-nonzero dot products are reduced LANES at a time
// with a shuffle butterfly (one vector of LANES sums instead of LANES horizontal reductions).
//
// ISA: the kernel section below is compiled three times (AVX-512F, AVX2+FMA, baseline x86-64 / generic) by
// including this file into itself under `#pragma GCC target`, and the variant is chosen at run time with
// __builtin_cpu_supports, so one binary is safe on every CPU. Vectors are GCC vector extensions whose width
// follows the variant (16 / 8 / 4 floats).

#ifdef SMU_KERNEL_PASS
// ---------------------------------------------------------------------------------------------------------------
// Kernel section: compiled once per ISA, inside namespace SMU_NS, with LANES floats per vector.
// ---------------------------------------------------------------------------------------------------------------

typedef float V __attribute__((vector_size(LANES * 4)));
typedef float VU __attribute__((vector_size(LANES * 4), aligned(4)));  // unaligned access

static inline V vload(const float* p) { return *reinterpret_cast<const V*>(p); }
static inline void vstore(float* p, V v) { *reinterpret_cast<V*>(p) = v; }
static inline V vloadu(const float* p) { return *reinterpret_cast<const VU*>(p); }
static inline void vstoreu(float* p, V v) { *reinterpret_cast<VU*>(p) = v; }
static inline V vbcast(float s) { return V{} + s; }

static inline float hsum(V v) {
  float s = 0.f;
  for (int l = 0; l < LANES; ++l) s += v[l];
  return s;
}

// One butterfly level: a and b hold, in every aligned chunk of 2W lanes, partial sums of one row each; the result
// holds in each chunk a's row (first W lanes) and b's row (last W lanes) with half as many partials.
constexpr int lo_pick(int l, int W) { return (l % (2 * W)) < W ? (l / (2 * W)) * 2 * W + l % (2 * W)
                                                               : LANES + (l / (2 * W)) * 2 * W + l % (2 * W) - W; }
constexpr int hi_pick(int l, int W) { return lo_pick(l, W) + W; }

template <int W, int... I>
static inline V combine(V a, V b, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(a, b, lo_pick(I, W)...) + __builtin_shufflevector(a, b, hi_pick(I, W)...);
}

// p[r] (r < LANES) are vectors; returns s with s[r] = sum of p[r]'s lanes. Level w pairs r with r + w so the
// final lane order is natural.
static inline V reduce_block(V* p) {
  using Seq = std::make_integer_sequence<int, LANES>;
#pragma GCC unroll 16
  for (int r = 0; r < LANES / 2; ++r) p[r] = combine<LANES / 2>(p[r], p[r + LANES / 2], Seq{});
  if constexpr (LANES >= 4) {
#pragma GCC unroll 16
    for (int r = 0; r < LANES / 4; ++r) p[r] = combine<LANES / 4>(p[r], p[r + LANES / 4], Seq{});
  }
  if constexpr (LANES >= 8) {
#pragma GCC unroll 16
    for (int r = 0; r < LANES / 8; ++r) p[r] = combine<LANES / 8>(p[r], p[r + LANES / 8], Seq{});
  }
  if constexpr (LANES >= 16) {
    p[0] = combine<1>(p[0], p[1], Seq{});
  }
  return p[0];
}

// bf16 <-> fp32 (round to nearest even, NaN kept quiet: the same rounding as c10::BFloat16).
static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <typename S> static inline float to_f32(S v);
template <> inline float to_f32<float>(float v) { return v; }
template <> inline float to_f32<uint16_t>(uint16_t v) { return bf16_to_f32(v); }
template <typename D> static inline D from_f32(float v);
template <> inline float from_f32<float>(float v) { return v; }
template <> inline uint16_t from_f32<uint16_t>(float v) { return f32_to_bf16(v); }

// In-register transpose of a LANES x LANES block held as LANES vectors: stage h exchanges bit h of the row and
// column index (swapping the off-diagonal h x h sub-blocks of every 2h x 2h block); all stages give the transpose.
constexpr int keep_lo(int l, int h) { return (l & h) == 0 ? l : LANES + l - h; }
constexpr int keep_hi(int l, int h) { return (l & h) == 0 ? l + h : LANES + l; }

template <int H, int... I>
static inline void swap_stage(V* r, std::integer_sequence<int, I...>) {
#pragma GCC unroll 16
  for (int i = 0; i < LANES; ++i) {
    if ((i & H) != 0) continue;
    const V a = r[i], b = r[i + H];
    r[i] = __builtin_shufflevector(a, b, keep_lo(I, H)...);
    r[i + H] = __builtin_shufflevector(a, b, keep_hi(I, H)...);
  }
}

static inline void transpose_block(V* r) {
  using Seq = std::make_integer_sequence<int, LANES>;
  swap_stage<1>(r, Seq{});
  if constexpr (LANES >= 4) swap_stage<2>(r, Seq{});
  if constexpr (LANES >= 8) swap_stage<4>(r, Seq{});
  if constexpr (LANES >= 16) swap_stage<8>(r, Seq{});
}

// LANES consecutive values of S as an fp32 vector, and back (bf16: round to nearest even, NaN kept quiet).
typedef uint16_t H16 __attribute__((vector_size(LANES * 2), aligned(2)));
typedef uint32_t U32 __attribute__((vector_size(LANES * 4)));
template <typename S> static inline V load_f32(const S* p);
template <> inline V load_f32<float>(const float* p) { return vloadu(p); }
template <> inline V load_f32<uint16_t>(const uint16_t* p) {
  const U32 u = __builtin_convertvector(*reinterpret_cast<const H16*>(p), U32) << 16;
  V v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}
template <typename D> static inline void store_f32(D* p, V v);
template <> inline void store_f32<float>(float* p, V v) { vstoreu(p, v); }
template <> inline void store_f32<uint16_t>(uint16_t* p, V v) {
  U32 u;
  std::memcpy(&u, &v, sizeof(u));
  const U32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const U32 nan = (u & 0x7fffffffu) > 0x7f800000u;  // all ones where NaN
  *reinterpret_cast<H16*>(p) = __builtin_convertvector((rounded & ~nan) | (nan & 0x7fc0u), H16);
}

// src rows [0, nt) of a (nt, n) row-major block with leading dimension ld -> dst (n, TT) fp32, rows t >= nt zeroed.
// Full LANES x LANES blocks go through registers; the ragged edges element by element.
template <int TT, typename S>
static void load_transposed(const S* __restrict src, int64_t ld, int64_t nt, int64_t n, float* __restrict dst) {
  const int64_t full_t = nt - nt % LANES, full_c = n - n % LANES;
  for (int64_t t0 = 0; t0 < full_t; t0 += LANES) {
    for (int64_t c0 = 0; c0 < full_c; c0 += LANES) {
      V r[LANES];
#pragma GCC unroll 16
      for (int t = 0; t < LANES; ++t) r[t] = load_f32<S>(src + (t0 + t) * ld + c0);
      transpose_block(r);
#pragma GCC unroll 16
      for (int c = 0; c < LANES; ++c) vstore(dst + (c0 + c) * TT + t0, r[c]);
    }
    for (int64_t c = full_c; c < n; ++c)
      for (int t = 0; t < LANES; ++t) dst[c * TT + t0 + t] = to_f32<S>(src[(t0 + t) * ld + c]);
  }
  for (int64_t c = 0; c < n; ++c)
    for (int64_t t = full_t; t < TT; ++t) dst[c * TT + t] = t < nt ? to_f32<S>(src[t * ld + c]) : 0.f;
}

// src (n, TT) fp32 -> rows [0, nt) of dst (nt, n) with leading dimension ld.
template <int TT, typename D>
static void store_transposed(const float* __restrict src, int64_t n, int64_t nt, D* __restrict dst, int64_t ld) {
  const int64_t full_t = nt - nt % LANES, full_c = n - n % LANES;
  for (int64_t t0 = 0; t0 < full_t; t0 += LANES) {
    for (int64_t c0 = 0; c0 < full_c; c0 += LANES) {
      V r[LANES];
#pragma GCC unroll 16
      for (int c = 0; c < LANES; ++c) r[c] = vload(src + (c0 + c) * TT + t0);
      transpose_block(r);
#pragma GCC unroll 16
      for (int t = 0; t < LANES; ++t) store_f32<D>(dst + (t0 + t) * ld + c0, r[t]);
    }
    for (int64_t c = full_c; c < n; ++c)
      for (int t = 0; t < LANES; ++t) dst[(t0 + t) * ld + c] = from_f32<D>(src[c * TT + t0 + t]);
  }
  for (int64_t t = full_t; t < nt; ++t)
    for (int64_t c = 0; c < n; ++c) dst[t * ld + c] = from_f32<D>(src[c * TT + t]);
}

// yb[o, :] = sum_j vals[o, j] * xb[idx[o, j], :] for every output row o. OB rows at a time for independent FMA
// chains (k is the same for every row).
template <int TT>
static void fwd_tile(const float* __restrict xb, const float* __restrict vals, const int32_t* __restrict idx,
                     float* __restrict yb, int64_t out, int64_t k) {
  constexpr int NV = TT / LANES;
  constexpr int OB = NV >= 8 ? 1 : 8 / NV;
  int64_t o = 0;
  for (; o + OB <= out; o += OB) {
    V acc[OB][NV];
#pragma GCC unroll 16
    for (int b = 0; b < OB; ++b)
#pragma GCC unroll 16
      for (int n = 0; n < NV; ++n) acc[b][n] = V{};
    const float* vr = vals + o * k;
    const int32_t* ir = idx + o * k;
    for (int64_t j = 0; j < k; ++j) {
#pragma GCC unroll 16
      for (int b = 0; b < OB; ++b) {
        const V w = vbcast(vr[b * k + j]);
        const float* xr = xb + static_cast<int64_t>(ir[b * k + j]) * TT;
#pragma GCC unroll 16
        for (int n = 0; n < NV; ++n) acc[b][n] += w * vload(xr + n * LANES);
      }
    }
#pragma GCC unroll 16
    for (int b = 0; b < OB; ++b)
#pragma GCC unroll 16
      for (int n = 0; n < NV; ++n) vstore(yb + (o + b) * TT + n * LANES, acc[b][n]);
  }
  for (; o < out; ++o) {
    V acc[2][NV];
#pragma GCC unroll 16
    for (int n = 0; n < NV; ++n) acc[0][n] = acc[1][n] = V{};
    const float* vr = vals + o * k;
    const int32_t* ir = idx + o * k;
    int64_t j = 0;
    for (; j + 2 <= k; j += 2) {
#pragma GCC unroll 2
      for (int b = 0; b < 2; ++b) {
        const V w = vbcast(vr[j + b]);
        const float* xr = xb + static_cast<int64_t>(ir[j + b]) * TT;
#pragma GCC unroll 16
        for (int n = 0; n < NV; ++n) acc[b][n] += w * vload(xr + n * LANES);
      }
    }
    if (j < k) {
      const V w = vbcast(vr[j]);
      const float* xr = xb + static_cast<int64_t>(ir[j]) * TT;
#pragma GCC unroll 16
      for (int n = 0; n < NV; ++n) acc[0][n] += w * vload(xr + n * LANES);
    }
#pragma GCC unroll 16
    for (int n = 0; n < NV; ++n) vstore(yb + o * TT + n * LANES, acc[0][n] + acc[1][n]);
  }
}

// One nonzero of the backward pass: dxb[i] += w g, and returns the lane-wise partial products g * xb[i].
template <int TT, bool DX, bool DW>
static inline V bwd_one(const V* g, float wv, const float* __restrict xr, float* __restrict dxr) {
  constexpr int NV = TT / LANES;
  V p = V{};
  if constexpr (DX) {
    const V w = vbcast(wv);
#pragma GCC unroll 16
    for (int n = 0; n < NV; ++n) vstore(dxr + n * LANES, vload(dxr + n * LANES) + w * g[n]);
  }
  if constexpr (DW) {
#pragma GCC unroll 16
    for (int n = 0; n < NV; ++n) p += g[n] * vload(xr + n * LANES);
  }
  return p;
}

// Fused backward over one tile: dxb (in, TT) += W^T-scatter of gb, dw (out, k) += per-nonzero dots.
template <int TT, bool DX, bool DW>
static void bwd_tile(const float* __restrict xb, const float* __restrict gb, float* __restrict dxb,
                     const float* __restrict vals, const int32_t* __restrict idx, float* __restrict dw,
                     int64_t out, int64_t k) {
  constexpr int NV = TT / LANES;
  alignas(64) V p[LANES];
  for (int64_t o = 0; o < out; ++o) {
    V g[NV];
#pragma GCC unroll 16
    for (int n = 0; n < NV; ++n) g[n] = vload(gb + o * TT + n * LANES);
    const float* vr = vals + o * k;
    const int32_t* ir = idx + o * k;
    float* dwr = dw + o * k;
    int64_t j = 0;
    if constexpr (DW) {
      for (; j + LANES <= k; j += LANES) {
#pragma GCC unroll 16
        for (int r = 0; r < LANES; ++r) {
          const int64_t i = ir[j + r];
          p[r] = bwd_one<TT, DX, DW>(g, vr[j + r], xb + i * TT, dxb + i * TT);
        }
        vstoreu(dwr + j, vloadu(dwr + j) + reduce_block(p));
      }
    }
    for (; j < k; ++j) {
      const int64_t i = ir[j];
      const V q = bwd_one<TT, DX, DW>(g, vr[j], xb + i * TT, dxb + i * TT);
      if constexpr (DW) dwr[j] += hsum(q);
    }
  }
}

template <int TT, typename S>
static void forward_tiles(const S* x, const float* vals, const int32_t* idx, S* y, int64_t T, int64_t in,
                          int64_t out, int64_t k, int64_t tile_begin, int64_t tile_end) {
  float* xb = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * in * TT));
  float* yb = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * out * TT));
  TORCH_CHECK(xb != nullptr && yb != nullptr, "sparsemup rows: out of memory");
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t t0 = tile * TT;
    const int64_t nt = std::min<int64_t>(TT, T - t0);
    load_transposed<TT, S>(x + t0 * in, in, nt, in, xb);
    fwd_tile<TT>(xb, vals, idx, yb, out, k);
    store_transposed<TT, S>(yb, out, nt, y + t0 * out, out);
  }
  std::free(xb);
  std::free(yb);
}

template <int TT, bool DX, bool DW, typename S>
static void backward_tiles_t(const S* gy, const S* x, const float* vals, const int32_t* idx, S* dx, float* dw,
                             int64_t T, int64_t in, int64_t out, int64_t k, int64_t tile_begin, int64_t tile_end) {
  float* xb = DW ? static_cast<float*>(std::aligned_alloc(64, sizeof(float) * in * TT)) : nullptr;
  float* dxb = DX ? static_cast<float*>(std::aligned_alloc(64, sizeof(float) * in * TT)) : nullptr;
  float* gb = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * out * TT));
  TORCH_CHECK(gb != nullptr && (!DW || xb != nullptr) && (!DX || dxb != nullptr), "sparsemup rows: out of memory");
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t t0 = tile * TT;
    const int64_t nt = std::min<int64_t>(TT, T - t0);
    if constexpr (DW) load_transposed<TT, S>(x + t0 * in, in, nt, in, xb);
    load_transposed<TT, S>(gy + t0 * out, out, nt, out, gb);
    if constexpr (DX) std::memset(dxb, 0, sizeof(float) * in * TT);
    bwd_tile<TT, DX, DW>(xb, gb, dxb, vals, idx, dw, out, k);
    if constexpr (DX) store_transposed<TT, S>(dxb, in, nt, dx + t0 * in, in);
  }
  std::free(xb);
  std::free(dxb);
  std::free(gb);
}

template <int TT, typename S>
static void backward_tiles(const S* gy, const S* x, const float* vals, const int32_t* idx, S* dx, float* dw,
                           int64_t T, int64_t in, int64_t out, int64_t k, int64_t b, int64_t e, bool ndx,
                           bool ndw) {
  if (ndx && ndw) backward_tiles_t<TT, true, true, S>(gy, x, vals, idx, dx, dw, T, in, out, k, b, e);
  else if (ndx) backward_tiles_t<TT, true, false, S>(gy, x, vals, idx, dx, dw, T, in, out, k, b, e);
  else if (ndw) backward_tiles_t<TT, false, true, S>(gy, x, vals, idx, dx, dw, T, in, out, k, b, e);
}

// Entry points of this variant (tile size chosen at run time among the compiled ones).
template <typename S>
void forward_range(int tt, const S* x, const float* vals, const int32_t* idx, S* y, int64_t T, int64_t in,
                   int64_t out, int64_t k, int64_t b, int64_t e) {
  switch (tt) {
    case 32: forward_tiles<32, S>(x, vals, idx, y, T, in, out, k, b, e); break;
    case 64: forward_tiles<64, S>(x, vals, idx, y, T, in, out, k, b, e); break;
    default: forward_tiles<16, S>(x, vals, idx, y, T, in, out, k, b, e); break;
  }
}

template <typename S>
void backward_range(int tt, const S* gy, const S* x, const float* vals, const int32_t* idx, S* dx, float* dw,
                    int64_t T, int64_t in, int64_t out, int64_t k, int64_t b, int64_t e, bool ndx, bool ndw) {
  switch (tt) {
    case 32: backward_tiles<32, S>(gy, x, vals, idx, dx, dw, T, in, out, k, b, e, ndx, ndw); break;
    case 64: backward_tiles<64, S>(gy, x, vals, idx, dx, dw, T, in, out, k, b, e, ndx, ndw); break;
    default: backward_tiles<16, S>(gy, x, vals, idx, dx, dw, T, in, out, k, b, e, ndx, ndw); break;
  }
}

template void forward_range<float>(int, const float*, const float*, const int32_t*, float*, int64_t, int64_t,
                                   int64_t, int64_t, int64_t, int64_t);
template void forward_range<uint16_t>(int, const uint16_t*, const float*, const int32_t*, uint16_t*, int64_t,
                                      int64_t, int64_t, int64_t, int64_t, int64_t);
template void backward_range<float>(int, const float*, const float*, const float*, const int32_t*, float*, float*,
                                    int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, bool);
template void backward_range<uint16_t>(int, const uint16_t*, const uint16_t*, const float*, const int32_t*,
                                       uint16_t*, float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool,
                                       bool);

#else  // ------------------------------------------------------------------------------------------------------
// Host section: includes, the three ISA passes, dispatch, checks and bindings.
// ---------------------------------------------------------------------------------------------------------------

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#define SMU_KERNEL_PASS 1

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace smu_avx512 {
constexpr int LANES = 16;
#include __FILE__
}  // namespace smu_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace smu_avx2 {
constexpr int LANES = 8;
#include __FILE__
}  // namespace smu_avx2
#pragma GCC pop_options
#define SMU_HAVE_X86_VARIANTS 1
#endif

namespace smu_default {
constexpr int LANES = 4;
#include __FILE__
}  // namespace smu_default

#undef SMU_KERNEL_PASS

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
// 2048², 4096 tokens, densities 1/16 and 1/128 on a 2-core AVX-512 EPYC; scripts/rows_tile_bench.py measures them).
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

template <typename S>
void dispatch_forward(const S* x, const float* vals, const int32_t* idx, S* y, int64_t T, int64_t in, int64_t out,
                      int64_t k, int64_t b, int64_t e) {
  const int tt = tile_size();
  switch (active_isa()) {
#ifdef SMU_HAVE_X86_VARIANTS
    case Isa::kAvx512: smu_avx512::forward_range<S>(tt, x, vals, idx, y, T, in, out, k, b, e); return;
    case Isa::kAvx2: smu_avx2::forward_range<S>(tt, x, vals, idx, y, T, in, out, k, b, e); return;
#endif
    default: smu_default::forward_range<S>(tt, x, vals, idx, y, T, in, out, k, b, e); return;
  }
}

template <typename S>
void dispatch_backward(const S* gy, const S* x, const float* vals, const int32_t* idx, S* dx, float* dw, int64_t T,
                       int64_t in, int64_t out, int64_t k, int64_t b, int64_t e, bool ndx, bool ndw) {
  const int tt = tile_size();
  switch (active_isa()) {
#ifdef SMU_HAVE_X86_VARIANTS
    case Isa::kAvx512:
      smu_avx512::backward_range<S>(tt, gy, x, vals, idx, dx, dw, T, in, out, k, b, e, ndx, ndw);
      return;
    case Isa::kAvx2:
      smu_avx2::backward_range<S>(tt, gy, x, vals, idx, dx, dw, T, in, out, k, b, e, ndx, ndw);
      return;
#endif
    default: smu_default::backward_range<S>(tt, gy, x, vals, idx, dx, dw, T, in, out, k, b, e, ndx, ndw); return;
  }
}

void check_layout(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& index) {
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu() && index.device().is_cpu(),
              "sparsemup rows: CPU tensors expected");
  TORCH_CHECK(x.dim() == 2, "sparsemup rows: x must be 2-D (tokens, in), got ", x.dim(), "-D");
  TORCH_CHECK(values.dim() == 2 && index.dim() == 2 && values.sizes() == index.sizes(),
              "sparsemup rows: values and index must be 2-D (out, k) of the same shape, got ", values.sizes(),
              " and ", index.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "sparsemup rows: float32 or bfloat16 expected, got ", x.scalar_type());
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), "sparsemup rows: values dtype ", values.scalar_type(),
              " differs from the input's ", x.scalar_type());
  TORCH_CHECK(index.scalar_type() == at::kInt, "sparsemup rows: index must be int32, got ", index.scalar_type());
  TORCH_CHECK(x.is_contiguous() && values.is_contiguous() && index.is_contiguous(),
              "sparsemup rows: contiguous tensors expected");
  TORCH_CHECK(values.size(1) >= 1, "sparsemup rows: k must be at least 1");
  TORCH_CHECK(values.size(1) <= x.size(1), "sparsemup rows: k = ", values.size(1), " exceeds in = ", x.size(1));
  // Cheap next to the product (out*k reads) and it keeps every later access in bounds.
  if (index.numel() > 0) {
    const int32_t* p = index.data_ptr<int32_t>();
    const int64_t n = index.numel();
    int32_t lo = p[0], hi = p[0];
    for (int64_t q = 1; q < n; ++q) {
      lo = std::min(lo, p[q]);
      hi = std::max(hi, p[q]);
    }
    TORCH_CHECK(lo >= 0 && hi < x.size(1), "sparsemup rows: index out of range [0, ", x.size(1), "): min ", lo,
                ", max ", hi);
  }
}

torch::Tensor values_f32(const torch::Tensor& values) {
  return values.scalar_type() == at::kFloat ? values : values.to(at::kFloat).contiguous();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& index) {
  check_layout(x, values, index);
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

std::tuple<torch::Tensor, torch::Tensor> backward(const torch::Tensor& grad_y, const torch::Tensor& x,
                                                  const torch::Tensor& values, const torch::Tensor& index,
                                                  bool need_dx, bool need_dw) {
  check_layout(x, values, index);
  const int64_t T = x.size(0), in = x.size(1), out = values.size(0), k = values.size(1);
  TORCH_CHECK(grad_y.device().is_cpu() && grad_y.dim() == 2 && grad_y.size(0) == T && grad_y.size(1) == out,
              "sparsemup rows: grad_y must be (", T, ", ", out, "), got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "sparsemup rows: grad_y dtype ", grad_y.scalar_type(),
              " differs from the input's ", x.scalar_type());
  TORCH_CHECK(grad_y.is_contiguous(), "sparsemup rows: grad_y must be contiguous");
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

std::string isa() {
  switch (active_isa()) {
    case Isa::kAvx512: return "avx512f";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsemup row-exact sparse linear kernels (forward, fused dX/dW backward)";
  m.def("forward", &forward, "y = x W^T for row-sparse W given as (values, index)", pybind11::arg("x"),
        pybind11::arg("values"), pybind11::arg("index"));
  m.def("backward", &backward, "(dx or empty, dvalues or empty) of y = x W^T", pybind11::arg("grad_y"),
        pybind11::arg("x"), pybind11::arg("values"), pybind11::arg("index"), pybind11::arg("need_dx"),
        pybind11::arg("need_dw"));
  m.def("isa", &isa, "SIMD variant in use: avx512f, avx2 or default");
  m.def("tile", &tile_size, "tokens per tile");
}

#endif  // SMU_KERNEL_PASS
