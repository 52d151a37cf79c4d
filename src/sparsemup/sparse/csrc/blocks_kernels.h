// Block-sparse kernels, y = x W^T for W made of b x b blocks (one ISA pass; included by kernels.cpp after simd.h).
//
// Block-row r of W keeps k blocks, at block-columns index[r, j]; values (R, k, b, b) hold W[r b + o, c_j b + i] at
// [r, j, o, i]. Each phase is one register-blocked microkernel reading the activations in their own (tokens,
// features) layout, nothing gathered: MR scalars of an A operand are broadcast against NV vectors of NL floats of a
// B row into MR x NV accumulators that stay in registers for the whole reduction.
//   forward  y[t, r b + o]  = sum_{j, i} x[t, c_j b + i] Wt[r, j, i, o]      (Wt: blocks transposed on the host)
//   dX       dx[t, c b + i] = sum_{(r, j) in column c} sum_o g[t, r b + o] W[r, j, o, i]   (the transposed index)
//   dW       dW[r, j, o, i] = sum_t g[t, r b + o] x[t, c_j b + i]            (reduction over a chunk of tokens)
// Tokens are cut into chunks of TC; a thread owns whole chunks, so forward and dX write disjoint rows and dW goes
// to a per-thread fp32 partial (summed on the host). Each chunk of activations is first copied (bf16: widened) into a
// thread-local fp32 buffer.

template <int NL> struct Lanes {
  typedef float type __attribute__((vector_size(NL * 4)));
};
template <int NL> using VN = typename Lanes<NL>::type;

template <int NL> static inline VN<NL> nload(const float* p) {
  VN<NL> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// acc[q][v] += a[q * lda] * b[v * NL : (v + 1) * NL]: one broadcast per A scalar, NV vector loads per step.
template <int NL, int MR, int NV>
static inline __attribute__((always_inline)) void step(VN<NL> (&acc)[MR][NV], const float* __restrict a,
                                                       int64_t lda, const float* __restrict b) {
  VN<NL> w[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) w[v] = nload<NL>(b + v * NL);
#pragma GCC unroll 16
  for (int q = 0; q < MR; ++q) {
    const VN<NL> s = VN<NL>{} + a[q * lda];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[q][v] += s * w[v];
  }
}

template <int NL, int MR, int NV>
static inline void zero(VN<NL> (&acc)[MR][NV]) {
#pragma GCC unroll 16
  for (int q = 0; q < MR; ++q)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[q][v] = VN<NL>{};
}

// Rows q of the accumulators to p + q * ld (fp32, or bf16 rounded to nearest even).
template <int NL, int MR, int NV, typename D>
static inline void put(const VN<NL> (&acc)[MR][NV], D* p, int64_t ld) {
#pragma GCC unroll 16
  for (int q = 0; q < MR; ++q)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      if constexpr (std::is_same<D, float>::value) {
        std::memcpy(p + q * ld + v * NL, &acc[q][v], sizeof(acc[q][v]));
      } else if constexpr (NL == LANES) {
        V u;
        std::memcpy(&u, &acc[q][v], sizeof(u));
        store_f32<uint16_t>(p + q * ld + v * NL, u);
      } else {
        for (int l = 0; l < NL; ++l) p[q * ld + v * NL + l] = f32_to_bf16(acc[q][v][l]);
      }
    }
}

// Forward of MR tokens (rows of x from xa, stride ldx) for outputs o0 .. o0 + NV NL of block-row r.
template <int NL, int MR, int NV, typename D>
static inline void fwd_micro(const float* xa, int64_t ldx, const float* wt_r, const int32_t* idx_r, int64_t k,
                             int64_t b, int64_t o0, D* y, int64_t ldy) {
  VN<NL> acc[MR][NV];
  zero<NL, MR, NV>(acc);
  for (int64_t j = 0; j < k; ++j) {
    const float* a = xa + static_cast<int64_t>(idx_r[j]) * b;
    const float* w = wt_r + j * b * b + o0;
    for (int64_t i = 0; i < b; ++i) step<NL, MR, NV>(acc, a + i, ldx, w + i * b);
  }
  put<NL, MR, NV, D>(acc, y, ldy);
}

// dX of MR tokens (rows of g from ga, stride ldg) for inputs i0 .. i0 + NV NL of block-column c, whose blocks are
// blocks[e0 .. e1) (block ids r k + j).
template <int NL, int MR, int NV, typename D>
static inline void dx_micro(const float* ga, int64_t ldg, const float* vals, const int32_t* blocks, int64_t e0,
                            int64_t e1, int64_t k, int64_t b, int64_t i0, D* dx, int64_t ldx) {
  VN<NL> acc[MR][NV];
  zero<NL, MR, NV>(acc);
  for (int64_t e = e0; e < e1; ++e) {
    const int64_t rj = blocks[e];
    const float* a = ga + (rj / k) * b;
    const float* w = vals + rj * b * b + i0;
    for (int64_t o = 0; o < b; ++o) step<NL, MR, NV>(acc, a + o, ldg, w + o * b);
  }
  put<NL, MR, NV, D>(acc, dx, ldx);
}

// dW rows o0 .. o0 + MR, columns i0 .. i0 + NV NL of one block, over nt tokens: g column strip (stride ldg) times x
// column strip (stride ldx), added to the fp32 partial dwb (b x b, row-major).
template <int NL, int MR, int NV>
static inline void dw_micro(const float* gs, int64_t ldg, const float* xs, int64_t ldx, int64_t nt, int64_t b,
                            int64_t o0, int64_t i0, float* dwb) {
  VN<NL> acc[MR][NV];
  zero<NL, MR, NV>(acc);
  for (int64_t t = 0; t < nt; ++t) step<NL, MR, NV>(acc, gs + t * ldg + o0, 1, xs + t * ldx + i0);
#pragma GCC unroll 16
  for (int q = 0; q < MR; ++q)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      float* p = dwb + (o0 + q) * b + i0 + v * NL;
      const VN<NL> sum = nload<NL>(p) + acc[q][v];
      std::memcpy(p, &sum, sizeof(sum));
    }
}

constexpr int kMR = 8;                       // tokens (forward, dX) or dW rows per microkernel call
constexpr int kNV = LANES >= 16 ? 2 : 1;     // vectors per call: 16 (or 8) accumulators, within the register file

// Columns [0, b) in steps of NV NL: pairs of vectors where they fit the registers, then single ones.
template <int NL, typename F2, typename F1>
static inline void over_vectors(int64_t b, F2&& two, F1&& one) {
  int64_t c = 0;
  if constexpr (kNV == 2) {
    for (; c + 2 * NL <= b; c += 2 * NL) two(c);
  }
  for (; c < b; c += NL) one(c);
}

// The nt tokens of a chunk (rows of x from xa, stride ldx) through every block-row.
template <int NL, typename D>
static void fwd_chunk(const float* xa, int64_t ldx, int64_t nt, const float* wt, const int32_t* idx, int64_t rows,
                      int64_t k, int64_t b, D* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* wt_r = wt + r * k * b * b;
    const int32_t* idx_r = idx + r * k;
    auto run = [&](auto nv, int64_t o0) {
      constexpr int NV = decltype(nv)::value;
      int64_t t = 0;
      for (; t + kMR <= nt; t += kMR)
        fwd_micro<NL, kMR, NV, D>(xa + t * ldx, ldx, wt_r, idx_r, k, b, o0, y + t * ldy + r * b + o0, ldy);
      for (; t < nt; ++t)
        fwd_micro<NL, 1, NV, D>(xa + t * ldx, ldx, wt_r, idx_r, k, b, o0, y + t * ldy + r * b + o0, ldy);
    };
    over_vectors<NL>(b, [&](int64_t o0) { run(std::integral_constant<int, kNV>{}, o0); },
                     [&](int64_t o0) { run(std::integral_constant<int, 1>{}, o0); });
  }
}

// dX of a chunk: every block-column through its list of blocks (columns without blocks get zeros).
template <int NL, typename D>
static void dx_chunk(const float* ga, int64_t ldg, int64_t nt, const float* vals, const int32_t* colptr,
                     const int32_t* blocks, int64_t cols, int64_t k, int64_t b, D* dx, int64_t ldx) {
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t e0 = colptr[c], e1 = colptr[c + 1];
    auto run = [&](auto nv, int64_t i0) {
      constexpr int NV = decltype(nv)::value;
      int64_t t = 0;
      for (; t + kMR <= nt; t += kMR)
        dx_micro<NL, kMR, NV, D>(ga + t * ldg, ldg, vals, blocks, e0, e1, k, b, i0, dx + t * ldx + c * b + i0, ldx);
      for (; t < nt; ++t)
        dx_micro<NL, 1, NV, D>(ga + t * ldg, ldg, vals, blocks, e0, e1, k, b, i0, dx + t * ldx + c * b + i0, ldx);
    };
    over_vectors<NL>(b, [&](int64_t i0) { run(std::integral_constant<int, kNV>{}, i0); },
                     [&](int64_t i0) { run(std::integral_constant<int, 1>{}, i0); });
  }
}

// dW of a chunk, added to the fp32 partial dwp (R, k, b, b).
template <int NL>
static void dw_chunk(const float* ga, int64_t ldg, const float* xa, int64_t ldx, int64_t nt, const int32_t* idx,
                     int64_t rows, int64_t k, int64_t b, float* dwp) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < k; ++j) {
      const float* gs = ga + r * b;
      const float* xs = xa + static_cast<int64_t>(idx[r * k + j]) * b;
      float* dwb = dwp + (r * k + j) * b * b;
      int64_t o0 = 0;
      for (; o0 + kMR <= b; o0 += kMR)
        over_vectors<NL>(b, [&](int64_t i0) { dw_micro<NL, kMR, kNV>(gs, ldg, xs, ldx, nt, b, o0, i0, dwb); },
                         [&](int64_t i0) { dw_micro<NL, kMR, 1>(gs, ldg, xs, ldx, nt, b, o0, i0, dwb); });
      for (; o0 < b; ++o0)
        over_vectors<NL>(b, [&](int64_t i0) { dw_micro<NL, 1, kNV>(gs, ldg, xs, ldx, nt, b, o0, i0, dwb); },
                         [&](int64_t i0) { dw_micro<NL, 1, 1>(gs, ldg, xs, ldx, nt, b, o0, i0, dwb); });
    }
}

// Rows [0, nt) x cols of src (stride ld) into buf as fp32 rows of length cols: one sequential pass that the
// hardware prefetches, after which the microkernels' strided reads of the chunk hit L2.
template <typename S>
static inline void stage_chunk(const S* src, int64_t ld, int64_t nt, int64_t cols, float* buf) {
  for (int64_t t = 0; t < nt; ++t) {
    if constexpr (std::is_same<S, float>::value) {
      std::memcpy(buf + t * cols, src + t * ld, sizeof(float) * cols);
    } else {
      int64_t c = 0;
      for (; c + LANES <= cols; c += LANES) vstoreu(buf + t * cols + c, load_f32<uint16_t>(src + t * ld + c));
      for (; c < cols; ++c) buf[t * cols + c] = bf16_to_f32(src[t * ld + c]);
    }
  }
}

// The widest vector (at most LANES floats) that tiles a block row of b floats.
inline int vector_lanes(int64_t b) {
  for (int nl = LANES; nl > 1; nl /= 2)
    if (b % nl == 0) return nl;
  return 1;
}

// Entry points of this variant: chunks [cb, ce) of TC tokens.
template <typename S>
void blocks_forward_range(int64_t tc, const S* x, const float* wt, const int32_t* idx, S* y, int64_t T, int64_t in,
                          int64_t rows, int64_t k, int64_t b, int64_t cb, int64_t ce) {
  const int64_t out = rows * b;
  float* xbuf = static_cast<float*>(std::malloc(sizeof(float) * tc * in));
  TORCH_CHECK(xbuf != nullptr, "sparsemup blocks: out of memory");
  const int nl = vector_lanes(b);
  for (int64_t chunk = cb; chunk < ce; ++chunk) {
    const int64_t t0 = chunk * tc, nt = std::min(tc, T - t0);
    stage_chunk<S>(x + t0 * in, in, nt, in, xbuf);
    S* yc = y + t0 * out;
    switch (nl) {
      case 16: if constexpr (LANES >= 16) fwd_chunk<16, S>(xbuf, in, nt, wt, idx, rows, k, b, yc, out); break;
      case 8: if constexpr (LANES >= 8) fwd_chunk<8, S>(xbuf, in, nt, wt, idx, rows, k, b, yc, out); break;
      case 4: fwd_chunk<4, S>(xbuf, in, nt, wt, idx, rows, k, b, yc, out); break;
      case 2: fwd_chunk<2, S>(xbuf, in, nt, wt, idx, rows, k, b, yc, out); break;
      default: fwd_chunk<1, S>(xbuf, in, nt, wt, idx, rows, k, b, yc, out); break;
    }
  }
  std::free(xbuf);
}

template <typename S>
void blocks_backward_range(int64_t tc, const S* gy, const S* x, const float* vals, const int32_t* idx,
                           const int32_t* colptr, const int32_t* blocks, S* dx, float* dwp, int64_t T, int64_t in,
                           int64_t rows, int64_t k, int64_t b, int64_t cb, int64_t ce) {
  const int64_t out = rows * b, cols = in / b;
  float* gbuf = static_cast<float*>(std::malloc(sizeof(float) * tc * out));
  float* xbuf = dwp != nullptr ? static_cast<float*>(std::malloc(sizeof(float) * tc * in)) : nullptr;
  TORCH_CHECK(gbuf != nullptr && (dwp == nullptr || xbuf != nullptr), "sparsemup blocks: out of memory");
  const int nl = vector_lanes(b);
  for (int64_t chunk = cb; chunk < ce; ++chunk) {
    const int64_t t0 = chunk * tc, nt = std::min(tc, T - t0);
    stage_chunk<S>(gy + t0 * out, out, nt, out, gbuf);
    if (dx != nullptr) {
      S* dxc = dx + t0 * in;
      switch (nl) {
        case 16:
          if constexpr (LANES >= 16) dx_chunk<16, S>(gbuf, out, nt, vals, colptr, blocks, cols, k, b, dxc, in);
          break;
        case 8:
          if constexpr (LANES >= 8) dx_chunk<8, S>(gbuf, out, nt, vals, colptr, blocks, cols, k, b, dxc, in);
          break;
        case 4: dx_chunk<4, S>(gbuf, out, nt, vals, colptr, blocks, cols, k, b, dxc, in); break;
        case 2: dx_chunk<2, S>(gbuf, out, nt, vals, colptr, blocks, cols, k, b, dxc, in); break;
        default: dx_chunk<1, S>(gbuf, out, nt, vals, colptr, blocks, cols, k, b, dxc, in); break;
      }
    }
    if (dwp != nullptr) {
      stage_chunk<S>(x + t0 * in, in, nt, in, xbuf);
      switch (nl) {
        case 16: if constexpr (LANES >= 16) dw_chunk<16>(gbuf, out, xbuf, in, nt, idx, rows, k, b, dwp); break;
        case 8: if constexpr (LANES >= 8) dw_chunk<8>(gbuf, out, xbuf, in, nt, idx, rows, k, b, dwp); break;
        case 4: dw_chunk<4>(gbuf, out, xbuf, in, nt, idx, rows, k, b, dwp); break;
        case 2: dw_chunk<2>(gbuf, out, xbuf, in, nt, idx, rows, k, b, dwp); break;
        default: dw_chunk<1>(gbuf, out, xbuf, in, nt, idx, rows, k, b, dwp); break;
      }
    }
  }
  std::free(gbuf);
  std::free(xbuf);
}

template void blocks_forward_range<float>(int64_t, const float*, const float*, const int32_t*, float*, int64_t,
                                          int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
template void blocks_forward_range<uint16_t>(int64_t, const uint16_t*, const float*, const int32_t*, uint16_t*,
                                             int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
template void blocks_backward_range<float>(int64_t, const float*, const float*, const float*, const int32_t*,
                                           const int32_t*, const int32_t*, float*, float*, int64_t, int64_t, int64_t,
                                           int64_t, int64_t, int64_t, int64_t);
template void blocks_backward_range<uint16_t>(int64_t, const uint16_t*, const uint16_t*, const float*,
                                              const int32_t*, const int32_t*, const int32_t*, uint16_t*, float*,
                                              int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
