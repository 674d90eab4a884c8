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
// The same computation with AVX-512 intrinsics: a K or V row is converted to float32 once into D/16 registers and
// used by all G query heads of its KV head; a score is D/16 FMAs and one horizontal sum.
template <int D>
inline void load_row(const float* src, __m512* r) {
  for (int j = 0; j < D / 16; ++j) r[j] = _mm512_loadu_ps(src + 16 * j);
}
template <int D>
inline void load_row(const c10::BFloat16* src, __m512* r) {   // bfloat16 -> float32 is a 16-bit left shift
  for (int j = 0; j < D / 16; ++j) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16 * j));
    r[j] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
}

template <typename T, int D>
void decode_sequence_avx512(const T* q, T* out, const T* k_cache, int64_t kv_stride, const int32_t* table,
                            int64_t context, int64_t block_size, int64_t block_stride, int64_t token_stride,
                            int64_t head_stride, int H, int Hkv, float scale) {
  constexpr int R = D / 16;
  const int G = H / Hkv;
  __m512 qv[kMaxHeads][R], acc[kMaxHeads][R];
  float m[kMaxHeads], l[kMaxHeads];
  alignas(64) float p[kMaxHeads][kMaxBlock];
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int h = 0; h < H; ++h) {
    load_row<D>(q + h * D, qv[h]);
    for (int j = 0; j < R; ++j) {
      qv[h][j] = _mm512_mul_ps(qv[h][j], vscale);
      acc[h][j] = _mm512_setzero_ps();
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
    if (blk + 1 < nblocks) {
      const T* next = k_cache + table[blk + 1] * block_stride;
      for (int64_t t = 0; t < n; ++t) {
        prefetch_row(next + t * token_stride, row_bytes);
        prefetch_row(next + kv_stride + t * token_stride, row_bytes);
      }
    }
    for (int64_t t = 0; t < n; ++t) {
      for (int hk = 0; hk < Hkv; ++hk) {
        __m512 r[R];
        load_row<D>(kb + t * token_stride + hk * head_stride, r);
        for (int g = 0; g < G; ++g) {
          const int h = hk * G + g;
          __m512 a = _mm512_mul_ps(qv[h][0], r[0]);
          for (int j = 1; j < R; ++j) a = _mm512_fmadd_ps(qv[h][j], r[j], a);
          p[h][t] = _mm512_reduce_add_ps(a);
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
      if (corr != 1.f) {
        const __m512 c = _mm512_set1_ps(corr);
        for (int j = 0; j < R; ++j) acc[h][j] = _mm512_mul_ps(acc[h][j], c);
      }
    }
    for (int64_t t = 0; t < n; ++t) {
      for (int hk = 0; hk < Hkv; ++hk) {
        __m512 r[R];
        load_row<D>(vb + t * token_stride + hk * head_stride, r);
        for (int g = 0; g < G; ++g) {
          const int h = hk * G + g;
          const __m512 w = _mm512_set1_ps(p[h][t]);
          for (int j = 0; j < R; ++j) acc[h][j] = _mm512_fmadd_ps(w, r[j], acc[h][j]);
        }
      }
    }
  }
  for (int h = 0; h < H; ++h) {
    alignas(64) float o[D];
    const __m512 inv = _mm512_set1_ps(1.f / l[h]);
    for (int j = 0; j < R; ++j) _mm512_store_ps(o + 16 * j, _mm512_mul_ps(acc[h][j], inv));
    for (int d = 0; d < D; ++d) from_float(o[d], out + h * D + d);
  }
}
#define DECODE_SEQUENCE decode_sequence_avx512
#else
#define DECODE_SEQUENCE decode_sequence
#endif

template <typename T, int D>
void run(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables, const at::Tensor& lens,
         at::Tensor& out, double scale) {
  const int64_t B = q.size(0), H = q.size(1), Hkv = kv.size(3), block_size = kv.size(2);
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const T* kp = kv.data_ptr<T>();
  const int64_t kv_stride = kv.stride(0), block_stride = kv.stride(1), token_stride = kv.stride(2);
  const int64_t head_stride = kv.stride(3), table_stride = tables.stride(0);
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      DECODE_SEQUENCE<T, D>(qp + b * H * D, op + b * H * D, kp, kv_stride, tp + b * table_stride, lp[b],
                            block_size, block_stride, token_stride, head_stride, static_cast<int>(H),
                            static_cast<int>(Hkv), static_cast<float>(scale));
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables,
                        const at::Tensor& lens, double scale) {
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
    if (D == 64) run<float, 64>(q, kv, tables, lens, out, scale);
    else if (D == 128) run<float, 128>(q, kv, tables, lens, out, scale);
    else TORCH_CHECK(false, "head_dim must be 64 or 128");
  } else if (q.scalar_type() == at::kBFloat16) {
    if (D == 64) run<c10::BFloat16, 64>(q, kv, tables, lens, out, scale);
    else if (D == 128) run<c10::BFloat16, 128>(q, kv, tables, lens, out, scale);
    else TORCH_CHECK(false, "head_dim must be 64 or 128");
  } else {
    TORCH_CHECK(false, "dtype must be float32 or bfloat16");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(splitserve_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor kv_layer, Tensor block_tables, Tensor context_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(splitserve_cpu, CPU, m) { m.impl("paged_decode", &paged_decode); }
