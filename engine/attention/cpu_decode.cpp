// Decode attention straight from the paged KV cache, on CPU: no gather into a contiguous buffer, no padding.
//
// One task per sequence: every query head is scored against every cached key of the sequence, read in place from
// its pages, with an online softmax in float32 and float32 accumulation of the values. Each K and V row is read
// once for all the query heads that share it (grouped-query attention).
//
//   q            [B, num_heads, D]                         float32 or bfloat16, contiguous
//   kv_layer     [2, num_blocks, block_size, num_kv_heads, D]  same dtype, last dim contiguous
//   block_tables int32 [B, max_blocks];  context_lens int32 [B]
//   returns      [B, num_heads, D] in q's dtype
//
// bfloat16 runs on AMX tiles where the CPU has them (cpu_decode_amx.cpp; `tiles=False` forces the AVX-512 path).
//
// rope_store_decode does a decode step's whole attention block between the two projections in one call: the
// rotary embedding and KV store of cpu_rope.cpp on the fused [B, (H + 2 Hkv) * D] qkv projection, then the decode
// attention above; it returns [B, H * D], the o projection's input.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <limits>
#include <type_traits>

#include "cpu_vec.h"

namespace splitserve_amx {   // cpu_decode_amx.cpp
bool usable();
void paged_decode_bf16(const uint16_t* q, uint16_t* out, const uint16_t* kv, int64_t kv_stride,
                       const int32_t* tables, int64_t table_stride, const int32_t* lens, int64_t begin, int64_t end,
                       int64_t block_size, int64_t block_stride, int64_t token_stride, int64_t head_stride, int H,
                       int Hkv, int D, float scale);
}  // namespace splitserve_amx

namespace splitserve_rope {   // cpu_rope.cpp: rotary embedding of q and k, k and v stored; returns q [T, H, D]
at::Tensor rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor kv,
                      const at::Tensor& slots, int64_t num_heads);
}  // namespace splitserve_rope

namespace {

constexpr int kLanes = 16;   // one AVX-512 register of float32; D is a multiple of it

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline void from_float(float x, float* out) { *out = x; }
inline void from_float(float x, c10::BFloat16* out) { *out = c10::BFloat16(x); }   // round to nearest even

constexpr int kMaxHeads = 32;     // query heads per sequence (per tensor-parallel rank)
constexpr int kMaxBlock = 64;     // tokens per KV block

inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 0);
}

// One sequence, all heads, one pass over its blocks (flash-decoding's online softmax, block by block): each
// block's K rows and then V rows are read as contiguous [block_size, Hkv, D] runs, and the next block is
// prefetched while this one is computed: the step is bound by memory latency, not arithmetic.
template <typename T, int D>
void decode_sequence(const T* q, T* out, const T* k_cache, int64_t kv_stride, const int32_t* table,
                     int64_t context, int64_t block_size, int64_t block_stride, int64_t token_stride,
                     int64_t head_stride, int H, int Hkv, float scale) {
  const int G = H / Hkv;
  float qf[kMaxHeads][D], acc[kMaxHeads][D];
  float m[kMaxHeads], l[kMaxHeads];
  float p[kMaxHeads][kMaxBlock];
  float row[D];
  for (int h = 0; h < H; ++h) {
    for (int d = 0; d < D; ++d) {
      qf[h][d] = to_float(q[h * D + d]) * scale;
      acc[h][d] = 0.f;
    }
    m[h] = -std::numeric_limits<float>::infinity();
    l[h] = 0.f;
  }
  const int64_t row_bytes = ((Hkv - 1) * head_stride + D) * static_cast<int64_t>(sizeof(T));
  const int64_t nblocks = (context + block_size - 1) / block_size;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const T* kb = k_cache + table[blk] * block_stride;
    const T* vb = kb + kv_stride;
    const int64_t n = std::min(block_size, context - blk * block_size);
    const T* next = blk + 1 < nblocks ? k_cache + table[blk + 1] * block_stride : nullptr;
    for (int64_t t = 0; t < n; ++t) {
      if (next) {
        prefetch_row(next + t * token_stride, row_bytes);
        prefetch_row(next + kv_stride + t * token_stride, row_bytes);
      }
      for (int hk = 0; hk < Hkv; ++hk) {
        const T* k = kb + t * token_stride + hk * head_stride;
        for (int d = 0; d < D; ++d) row[d] = to_float(k[d]);
        for (int g = 0; g < G; ++g) {
          const int h = hk * G + g;
          // kLanes independent partial sums: a plain `dot +=` is a serial chain the compiler may not reorder
          float part[kLanes] = {};
          for (int d0 = 0; d0 < D; d0 += kLanes)
            for (int x = 0; x < kLanes; ++x) part[x] += qf[h][d0 + x] * row[d0 + x];
          float dot = 0.f;
          for (int x = 0; x < kLanes; ++x) dot += part[x];
          p[h][t] = dot;
        }
      }
    }
    for (int h = 0; h < H; ++h) {
      float mx = m[h];
      for (int64_t t = 0; t < n; ++t) mx = std::max(mx, p[h][t]);
      const float corr = std::exp(m[h] - mx);      // 0 on the first block (m = -inf)
      float sum = 0.f;
      for (int64_t t = 0; t < n; ++t) {
        p[h][t] = std::exp(p[h][t] - mx);
        sum += p[h][t];
      }
      l[h] = l[h] * corr + sum;
      m[h] = mx;
      if (corr != 1.f)
        for (int d = 0; d < D; ++d) acc[h][d] *= corr;
    }
    for (int64_t t = 0; t < n; ++t) {
      for (int hk = 0; hk < Hkv; ++hk) {
        const T* v = vb + t * token_stride + hk * head_stride;
        for (int d = 0; d < D; ++d) row[d] = to_float(v[d]);
        for (int g = 0; g < G; ++g) {
          const int h = hk * G + g;
          const float w = p[h][t];
          for (int d = 0; d < D; ++d) acc[h][d] += w * row[d];
        }
      }
    }
  }
  for (int h = 0; h < H; ++h) {
    const float inv = 1.f / l[h];
    for (int d = 0; d < D; ++d) from_float(acc[h][d] * inv, out + h * D + d);
  }
}

#if defined(__AVX512F__)
// The same computation with AVX-512 intrinsics, 16 tokens (a "chunk", at most one block) at a time, KV head by KV
// head, for the (up to kGroup) query heads that share it:
//  - a K row is converted to float32 once into D/16 registers; a score is D/16 FMAs into one register of 16 partial
//    sums (or D/32 vdpbf16ps on the raw bfloat16 row, see QueryRows), and the 16 registers of a chunk's tokens are
//    summed together by a 4-level tree (15 steps of one blend, one shuffle and one add) into one register holding
//    the chunk's 16 scores, instead of 16 horizontal sums;
//  - with the tokens in the lanes, the softmax of a chunk is a few vector operations per head (exp: a polynomial
//    accurate to ~1 ulp instead of 16 calls of std::exp);
//  - a V row is converted once and accumulated into the float32 accumulators of the heads, held in registers.
// bfloat16 rows are widened with a shift and a mask, which puts even and odd elements in separate registers
// ("even/odd order"); q and the accumulators are kept in that order too, and the output is written back in order.
constexpr int kChunk = 16;
using splitserve_vec::exp_ps;
using splitserve_vec::round_to_bfloat16_high;
alignas(64) const unsigned char kZeroRow[128 * sizeof(float)] = {};   // stands in for the missing tokens of a chunk

template <int D>
inline void load_row(const float* src, __m512* r) {
  for (int j = 0; j < D / 16; ++j) r[j] = _mm512_loadu_ps(src + 16 * j);
}
template <int D>
inline void load_row(const c10::BFloat16* src, __m512* r) {   // even/odd order: bfloat16 -> float32 is a shift
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int j = 0; j < D / 32; ++j) {
    const __m512i raw = _mm512_loadu_si512(src + 32 * j);
    r[2 * j] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
    r[2 * j + 1] = _mm512_castsi512_ps(_mm512_and_si512(raw, hi));
  }
}
template <int D>
inline void store_row(const __m512* r, float scale, float* dst) {
  for (int j = 0; j < D / 16; ++j) _mm512_storeu_ps(dst + 16 * j, _mm512_mul_ps(r[j], _mm512_set1_ps(scale)));
}
template <int D>
inline void store_row(const __m512* r, float scale, c10::BFloat16* dst) {   // from even/odd order
  const __m512 s = _mm512_set1_ps(scale);
  for (int j = 0; j < D / 32; ++j) {
    const __m512i even = _mm512_srli_epi32(round_to_bfloat16_high(_mm512_mul_ps(r[2 * j], s)), 16);
    const __m512i odd = round_to_bfloat16_high(_mm512_mul_ps(r[2 * j + 1], s));
    _mm512_storeu_si512(dst + 32 * j, _mm512_or_si512(even, odd));
  }
}

// One step of the tree: lanes whose bit S is clear get a[i] + a[i + S], the others b[i - S] + b[i].
template <int S>
struct FoldIndex {
  int32_t v[16];
  constexpr FoldIndex() : v() {
    for (int i = 0; i < 16; ++i) v[i] = (i & S) ? 16 + i - S : i + S;
  }
};
template <int S>
inline __m512 fold(__m512 a, __m512 b) {
  static constexpr FoldIndex<S> kIndex{};
  constexpr __mmask16 from_b = S == 1 ? 0xaaaa : S == 2 ? 0xcccc : S == 4 ? 0xf0f0 : 0xff00;
  const __m512 other = _mm512_permutex2var_ps(a, _mm512_loadu_si512(kIndex.v), b);
  return _mm512_add_ps(_mm512_mask_blend_ps(from_b, a, b), other);
}

// The query heads, in the form the dot products take: float32 registers, scaled (in even/odd order for bfloat16),
// or with AVX512_BF16 the raw bfloat16 rows, for vdpbf16ps straight on the K rows (exact products, float32 sums;
// the scale is applied to the scores). dots<NG>: q[h0 + g] . k as 16 partial sums, for g < NG.
template <typename T, int D>
struct QueryRows {
  static constexpr bool kScaled = true;
  __m512 r[kMaxHeads][D / 16];
  void load(const T* q, int H, float scale) {
    for (int h = 0; h < H; ++h) {
      load_row<D>(q + h * D, r[h]);
      for (int j = 0; j < D / 16; ++j) r[h][j] = _mm512_mul_ps(r[h][j], _mm512_set1_ps(scale));
    }
  }
  template <int NG>
  __attribute__((always_inline)) inline void dots(int h0, const T* k, __m512* out) const {
    __m512 kr[D / 16];
    load_row<D>(k, kr);   // converted once for the NG heads
    for (int g = 0; g < NG; ++g) {
      __m512 a = _mm512_mul_ps(r[h0 + g][0], kr[0]);
      for (int j = 1; j < D / 16; ++j) a = _mm512_fmadd_ps(r[h0 + g][j], kr[j], a);
      out[g] = a;
    }
  }
};
#if defined(__AVX512BF16__)
template <int D>
struct QueryRows<c10::BFloat16, D> {
  static constexpr bool kScaled = false;
  __m512i r[kMaxHeads][D / 32];
  void load(const c10::BFloat16* q, int H, float) {
    for (int h = 0; h < H; ++h)
      for (int j = 0; j < D / 32; ++j) r[h][j] = _mm512_loadu_si512(q + h * D + 32 * j);
  }
  template <int NG>
  __attribute__((always_inline)) inline void dots(int h0, const c10::BFloat16* k, __m512* out) const {
    __m512i kr[D / 32];
    for (int j = 0; j < D / 32; ++j) kr[j] = _mm512_loadu_si512(k + 32 * j);
    for (int g = 0; g < NG; ++g) {
      __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)r[h0 + g][0], (__m512bh)kr[0]);
      for (int j = 1; j < D / 32; ++j) a = _mm512_dpbf16_ps(a, (__m512bh)r[h0 + g][j], (__m512bh)kr[j]);
      out[g] = a;
    }
  }
};
#endif

// The chunk's scores of query heads h0..h0+NG-1 (one KV head): lane t of s[g] = q[h0 + g] . k[t], 0 for t >= n
// (whose rows are not read).
template <typename T, int D, int NG>
inline void chunk_scores(const QueryRows<T, D>& q, int h0, const T* k, int64_t token_stride, int n, __m512* s) {
  const T* zero = reinterpret_cast<const T*>(kZeroRow);
  auto dots = [&](int t, __m512* out) __attribute__((always_inline)) {
    q.template dots<NG>(h0, t < n ? k + t * token_stride : zero, out);
  };
  auto quad = [&](int t, __m512* out) __attribute__((always_inline)) {   // tokens t..t+3, two levels down
    __m512 a[NG], b[NG];
    dots(t, a);
    dots(t + 1, b);
    for (int g = 0; g < NG; ++g) out[g] = fold<1>(a[g], b[g]);
    dots(t + 2, a);
    dots(t + 3, b);
    for (int g = 0; g < NG; ++g) out[g] = fold<2>(out[g], fold<1>(a[g], b[g]));
  };
  __m512 x[NG], y[NG];
  quad(0, x);
  quad(4, y);
  for (int g = 0; g < NG; ++g) s[g] = fold<4>(x[g], y[g]);
  quad(8, x);
  quad(12, y);
  for (int g = 0; g < NG; ++g) s[g] = fold<8>(s[g], fold<4>(x[g], y[g]));
}

// acc[g] = acc[g] * corr[g] + sum_t p[g][t] v[t] for NG query heads of one KV head over a chunk's n tokens.
template <typename T, int D, int NG>
inline void accumulate_values(const T* v, int64_t token_stride, int64_t n, const float (*p)[kChunk],
                              const float* corr, __m512 (*acc)[D / 16]) {
  constexpr int R = D / 16;
  __m512 a[NG][R];
  for (int g = 0; g < NG; ++g) {
    const __m512 c = _mm512_set1_ps(corr[g]);
    for (int j = 0; j < R; ++j) a[g][j] = _mm512_mul_ps(acc[g][j], c);
  }
  for (int64_t t = 0; t < n; ++t) {
    __m512 r[R];
    load_row<D>(v + t * token_stride, r);
    for (int g = 0; g < NG; ++g) {
      const __m512 w = _mm512_set1_ps(p[g][t]);
      for (int j = 0; j < R; ++j) a[g][j] = _mm512_fmadd_ps(w, r[j], a[g][j]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int j = 0; j < R; ++j) acc[g][j] = a[g][j];
}

template <typename T, int D>
void decode_sequence_avx512(const T* q, T* out, const T* k_cache, int64_t kv_stride, const int32_t* table,
                            int64_t context, int64_t block_size, int64_t block_stride, int64_t token_stride,
                            int64_t head_stride, int H, int Hkv, float scale) {
  constexpr int R = D / 16;
  constexpr int kGroup = 24 / R < 4 ? 24 / R : 4;   // query heads whose accumulators fit in registers
  const int G = H / Hkv;
  QueryRows<T, D> qr;
  __m512 acc[kMaxHeads][R], lsum[kMaxHeads];   // lsum: per-lane parts of the softmax denominator
  float m[kMaxHeads], corr[kMaxHeads];
  alignas(64) float p[kMaxHeads][kChunk];
  const __m512 vscale = _mm512_set1_ps(scale), minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  qr.load(q, H, scale);
  for (int h = 0; h < H; ++h) {
    for (int j = 0; j < R; ++j) acc[h][j] = _mm512_setzero_ps();
    lsum[h] = _mm512_setzero_ps();
    m[h] = -std::numeric_limits<float>::infinity();
  }
  const int64_t nblocks = (context + block_size - 1) / block_size;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const T* kb = k_cache + table[blk] * block_stride;
    const int64_t nb = std::min(block_size, context - blk * block_size);
    if (blk + 1 < nblocks) {
      // Prefetch the next block's K and V runs whole into L2 (prefetcht1). In the engine each layer's KV comes
      // from L3 or memory: a decode step's forward pass gets 4-5% faster at batch 32-128 in bfloat16 and 3% at
      // 128 in float32 (no change at batch 8 in bfloat16, nor at 32 in float32), though a one-layer
      // microbenchmark, whose KV sits in L2, gets 8-25% slower. Touching only the first 2 lines of each run (and
      // leaving the rest to the hardware prefetchers) was the previous choice; whole blocks with the
      // non-temporal hint (as decode_sequence does) made large batches 2-4x slower.
      const T* next = k_cache + table[blk + 1] * block_stride;
      const int64_t lines = block_size * token_stride * static_cast<int64_t>(sizeof(T)) / 64;
      for (int64_t i = 0; i < lines; ++i) {
        __builtin_prefetch(reinterpret_cast<const char*>(next) + 64 * i, 0, 2);
        __builtin_prefetch(reinterpret_cast<const char*>(next + kv_stride) + 64 * i, 0, 2);
      }
    }
    for (int64_t c0 = 0; c0 < nb; c0 += kChunk) {
      const T* kc = kb + c0 * token_stride;
      const T* vc = kc + kv_stride;
      const int n = static_cast<int>(std::min<int64_t>(kChunk, nb - c0));
      const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
      for (int hk = 0; hk < Hkv; ++hk)
        for (int g0 = 0; g0 < G; g0 += kGroup) {
          const int h0 = hk * G + g0, ng = std::min(kGroup, G - g0);
          const T* k = kc + hk * head_stride;
          __m512 s[kGroup];
          switch (ng) {
            case 1: chunk_scores<T, D, 1>(qr, h0, k, token_stride, n, s); break;
            case 2: chunk_scores<T, D, 2>(qr, h0, k, token_stride, n, s); break;
            case 3: chunk_scores<T, D, 3>(qr, h0, k, token_stride, n, s); break;
            default: chunk_scores<T, D, kGroup>(qr, h0, k, token_stride, n, s); break;
          }
          for (int g = 0; g < ng; ++g) {   // online softmax over the chunk, the tokens in the lanes
            const int h = h0 + g;
            if (!qr.kScaled) s[g] = _mm512_mul_ps(s[g], vscale);
            const __m512 x = _mm512_mask_blend_ps(valid, minus_inf, s[g]);
            const float mx = std::max(m[h], _mm512_reduce_max_ps(x));
            corr[h] = mx == m[h] ? 1.f : std::exp(m[h] - mx);      // 0 on the first chunk (m = -inf)
            m[h] = mx;
            const __m512 e = exp_ps(_mm512_sub_ps(x, _mm512_set1_ps(mx)));
            _mm512_store_ps(p[h], e);
            lsum[h] = _mm512_fmadd_ps(lsum[h], _mm512_set1_ps(corr[h]), e);
          }
          const T* v = vc + hk * head_stride;
          switch (ng) {
            case 1: accumulate_values<T, D, 1>(v, token_stride, n, p + h0, corr + h0, acc + h0); break;
            case 2: accumulate_values<T, D, 2>(v, token_stride, n, p + h0, corr + h0, acc + h0); break;
            case 3: accumulate_values<T, D, 3>(v, token_stride, n, p + h0, corr + h0, acc + h0); break;
            default: accumulate_values<T, D, kGroup>(v, token_stride, n, p + h0, corr + h0, acc + h0); break;
          }
        }
    }
  }
  for (int h = 0; h < H; ++h) store_row<D>(acc[h], 1.f / _mm512_reduce_add_ps(lsum[h]), out + h * D);
}
#define DECODE_SEQUENCE decode_sequence_avx512
#else
#define DECODE_SEQUENCE decode_sequence
#endif

template <typename T, int D>
void run(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables, const at::Tensor& lens,
         at::Tensor& out, double scale, bool tiles) {
  const int64_t B = q.size(0), H = q.size(1), Hkv = kv.size(3), block_size = kv.size(2);
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const T* kp = kv.data_ptr<T>();
  const int64_t kv_stride = kv.stride(0), block_stride = kv.stride(1), token_stride = kv.stride(2);
  const int64_t head_stride = kv.stride(3), table_stride = tables.stride(0);
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  // bfloat16 on AMX tiles (cpu_decode_amx.cpp) where the CPU has them: 16-token tiles must not straddle pages
  if (std::is_same_v<T, c10::BFloat16> && tiles && block_size % 16 == 0 && H / Hkv <= 16 &&
      splitserve_amx::usable()) {
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      splitserve_amx::paged_decode_bf16(
          reinterpret_cast<const uint16_t*>(qp), reinterpret_cast<uint16_t*>(op),
          reinterpret_cast<const uint16_t*>(kp), kv_stride, tp, table_stride, lp, begin, end, block_size,
          block_stride, token_stride, head_stride, static_cast<int>(H), static_cast<int>(Hkv), D,
          static_cast<float>(scale));
    });
    return;
  }
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      DECODE_SEQUENCE<T, D>(qp + b * H * D, op + b * H * D, kp, kv_stride, tp + b * table_stride, lp[b],
                            block_size, block_stride, token_stride, head_stride, static_cast<int>(H),
                            static_cast<int>(Hkv), static_cast<float>(scale));
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables,
                        const at::Tensor& lens, double scale, bool tiles) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous [B, H, D] tensor");
  TORCH_CHECK(kv.dim() == 5 && kv.size(0) == 2 && kv.stride(4) == 1, "kv_layer must be [2, N, bs, Hkv, D]");
  TORCH_CHECK(kv.scalar_type() == q.scalar_type(), "q and kv_layer must have the same dtype");
  TORCH_CHECK(tables.scalar_type() == at::kInt && lens.scalar_type() == at::kInt, "tables and lens: int32");
  TORCH_CHECK(tables.dim() == 2 && tables.stride(1) == 1 && lens.is_contiguous(), "bad tables / lens layout");
  TORCH_CHECK(q.size(1) % kv.size(3) == 0 && q.size(1) <= kMaxHeads, "num_heads must be a multiple of "
              "num_kv_heads and at most ", kMaxHeads);
  TORCH_CHECK(kv.size(2) <= kMaxBlock, "block_size must be at most ", kMaxBlock);
  TORCH_CHECK(q.size(2) == kv.size(4), "head_dim mismatch");
  at::Tensor out = at::empty_like(q);
  const int64_t D = q.size(2);
  if (q.scalar_type() == at::kFloat) {
    if (D == 64) run<float, 64>(q, kv, tables, lens, out, scale, tiles);
    else if (D == 128) run<float, 128>(q, kv, tables, lens, out, scale, tiles);
    else TORCH_CHECK(false, "head_dim must be 64 or 128");
  } else if (q.scalar_type() == at::kBFloat16) {
    if (D == 64) run<c10::BFloat16, 64>(q, kv, tables, lens, out, scale, tiles);
    else if (D == 128) run<c10::BFloat16, 128>(q, kv, tables, lens, out, scale, tiles);
    else TORCH_CHECK(false, "head_dim must be 64 or 128");
  } else {
    TORCH_CHECK(false, "dtype must be float32 or bfloat16");
  }
  return out;
}

// ---- rotary embedding + KV store (cpu_rope.cpp) + decode attention ------------------------------------------
at::Tensor rope_store_decode(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor kv,
                             const at::Tensor& slots, const at::Tensor& tables, const at::Tensor& lens,
                             int64_t num_heads, double scale) {
  TORCH_CHECK(tables.size(0) == qkv.size(0) && lens.numel() == qkv.size(0),
              "decode only: one new token per sequence");
  const at::Tensor q = splitserve_rope::rope_store(qkv, cos, sin, kv, slots, num_heads);
  return paged_decode(q, kv, tables, lens, scale, /*tiles=*/true).view({q.size(0), num_heads * q.size(2)});
}

}  // namespace

TORCH_LIBRARY(splitserve_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor kv_layer, Tensor block_tables, Tensor context_lens, float scale, "
        "bool tiles=True) -> Tensor");
  m.def("rope_store_decode(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) kv_layer, Tensor slot_mapping, "
        "Tensor block_tables, Tensor context_lens, int num_heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(splitserve_cpu, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("rope_store_decode", &rope_store_decode);
}
