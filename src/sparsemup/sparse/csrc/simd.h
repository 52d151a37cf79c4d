// SIMD helpers shared by the kernels: fp32 vectors of LANES floats (GCC vector extensions), bf16 <-> fp32
// conversion, an in-register LANES x LANES transpose and a butterfly reduction. Included once per ISA pass by
// kernels.cpp (inside that pass's namespace, with LANES defined), so it has no include guard.

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
