// Row-exact unstructured sparse kernels, y = x W^T (one ISA pass; included by kernels.cpp after simd.h).
//
// W (out, in) keeps exactly k entries per row, stored as values (out, k) (float32 or bfloat16) and index (out, k)
// int32 (sorted, unique columns). The token dimension is cut into tiles of TT tokens; each thread owns whole
// tiles, so forward and dX need no atomics. A tile of x is transposed into a thread-local fp32 buffer xb (in, TT):
// one nonzero then costs TT/LANES vector loads and FMAs from L1/L2 (no scalar gathers):
//   forward   yb[o, :]  = sum_j values[o, j] * xb[index[o, j], :]
//   backward  dxb[i, :] += values[o, j] * gb[o, :],  dW[o, j] += <gb[o, :], xb[i, :]>   (i = index[o, j])
// dW is accumulated per thread in fp32 and summed at the end. Per-nonzero dot products are reduced LANES at a time
// with a shuffle butterfly (one vector of LANES sums instead of LANES horizontal reductions).

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
