// The rotary embedding and KV-cache store of a step's new tokens, on CPU, in one pass over the fused qkv rows.
//
//   qkv          [T, (H + 2 Hkv) * D]   the fused projection, contiguous, float32 or bfloat16
//   cos, sin     [T, D]                 the rotary tables at the tokens' positions (sin signed: [-sin | sin])
//   kv_layer     [2, num_blocks, block_size, Hkv, D]   same dtype, last dim contiguous (written)
//   slot_mapping int64 [T]              each token's flat cache slot
//   returns      q [T, H, D]            the rotated query heads
//
// The k heads are rotated straight into their cache slots and the v heads copied there. The rotation rounds as
// the ATen expression `x * cos + swap_halves(x) * signed_sin` does (each product and the sum rounded to the dtype,
// no fused multiply-add: the library is built with -ffp-contract=off), so float32 stays bit-identical to HF.
// `rope_store` is the op for steps with prompt tokens; `rope_store_decode` (cpu_decode.cpp) adds the decode
// attention in the same call.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_vec.h"

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline void from_float(float x, float* out) { *out = x; }
inline void from_float(float x, c10::BFloat16* out) { *out = c10::BFloat16(x); }   // round to nearest even
inline float round_to(float x, const float*) { return x; }
inline float round_to(float x, const c10::BFloat16*) { return to_float(c10::BFloat16(x)); }

#if defined(__AVX512F__)
using splitserve_vec::round_to_bfloat16_high;
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 round16(__m512 x, const float*) { return x; }
inline __m512 round16(__m512 x, const c10::BFloat16*) { return _mm512_castsi512_ps(round_to_bfloat16_high(x)); }
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(c10::BFloat16* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_to_bfloat16_high(x), 16)));
}
#endif

// out = x * cos + swap_halves(x) * signed_sin over one head's D elements, rounded like the three ATen ops.
template <typename T, int D>
inline void rotate_head(const T* x, const T* c, const T* s, T* out) {
  constexpr int half = D / 2;
#if defined(__AVX512F__)
  for (int d = 0; d < D; d += 16) {
    const int sw = d < half ? d + half : d - half;
    const __m512 a = round16(_mm512_mul_ps(load16(x + d), load16(c + d)), x);
    const __m512 b = round16(_mm512_mul_ps(load16(x + sw), load16(s + d)), x);
    store16(out + d, _mm512_add_ps(a, b));
  }
#else
  for (int d = 0; d < D; ++d) {
    const int sw = d < half ? d + half : d - half;
    const float a = round_to(to_float(x[d]) * to_float(c[d]), x);
    const float b = round_to(to_float(x[sw]) * to_float(s[d]), x);
    from_float(a + b, out + d);
  }
#endif
}

// Tokens [begin, end): q heads rotated into q_out [T, H, D]; k heads rotated and v heads copied into their slots.
template <typename T, int D>
void rope_store_rows(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& kv,
                     const at::Tensor& slots, at::Tensor& q_out, int64_t H, int64_t Hkv) {
  const int64_t T_ = qkv.size(0), width = qkv.size(1), block_size = kv.size(2);
  const T* xp = qkv.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  T* qp = q_out.data_ptr<T>();
  T* kp = kv.data_ptr<T>();
  const int64_t kv_stride = kv.stride(0), block_stride = kv.stride(1), token_stride = kv.stride(2);
  const int64_t head_stride = kv.stride(3);
  // tokens write distinct slots, so a long prompt's rows can be split across threads
  at::parallel_for(0, T_, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* x = xp + t * width;
      const T* c = cp + t * D;
      const T* s = sp + t * D;
      for (int64_t h = 0; h < H; ++h) rotate_head<T, D>(x + h * D, c, s, qp + (t * H + h) * D);
      T* k_slot = kp + (slot[t] / block_size) * block_stride + (slot[t] % block_size) * token_stride;
      T* v_slot = k_slot + kv_stride;
      for (int64_t h = 0; h < Hkv; ++h) {
        rotate_head<T, D>(x + (H + h) * D, c, s, k_slot + h * head_stride);
        std::memcpy(v_slot + h * head_stride, x + (H + Hkv + h) * D, D * sizeof(T));
      }
    }
  });
}

}  // namespace

namespace splitserve_rope {

at::Tensor rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor kv,
                      const at::Tensor& slots, int64_t num_heads) {
  TORCH_CHECK(kv.dim() == 5 && kv.size(0) == 2 && kv.stride(4) == 1, "kv_layer must be [2, N, bs, Hkv, D]");
  const int64_t T_ = qkv.size(0), H = num_heads, Hkv = kv.size(3), D = kv.size(4);
  TORCH_CHECK(H > 0 && H % Hkv == 0, "num_heads must be a positive multiple of num_kv_heads");
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == (H + 2 * Hkv) * D,
              "qkv must be a contiguous [T, (num_heads + 2 * num_kv_heads) * head_dim] tensor");
  TORCH_CHECK(qkv.scalar_type() == kv.scalar_type() && cos.scalar_type() == kv.scalar_type() &&
              sin.scalar_type() == kv.scalar_type(), "qkv, cos, sin and kv_layer must have the same dtype");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == T_ * D && sin.numel() == T_ * D,
              "cos and sin must be contiguous [T, head_dim] rows");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == T_,
              "slot_mapping must be int64 [T]");
  at::Tensor q = at::empty({T_, H, D}, qkv.options());
  if (qkv.scalar_type() == at::kFloat) {
    if (D == 64) rope_store_rows<float, 64>(qkv, cos, sin, kv, slots, q, H, Hkv);
    else if (D == 128) rope_store_rows<float, 128>(qkv, cos, sin, kv, slots, q, H, Hkv);
    else TORCH_CHECK(false, "head_dim must be 64 or 128");
  } else if (qkv.scalar_type() == at::kBFloat16) {
    if (D == 64) rope_store_rows<c10::BFloat16, 64>(qkv, cos, sin, kv, slots, q, H, Hkv);
    else if (D == 128) rope_store_rows<c10::BFloat16, 128>(qkv, cos, sin, kv, slots, q, H, Hkv);
    else TORCH_CHECK(false, "head_dim must be 64 or 128");
  } else {
    TORCH_CHECK(false, "dtype must be float32 or bfloat16");
  }
  return q;
}

}  // namespace splitserve_rope

TORCH_LIBRARY_FRAGMENT(splitserve_cpu, m) {
  m.def("rope_store(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) kv_layer, Tensor slot_mapping, int num_heads) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(splitserve_cpu, CPU, m) { m.impl("rope_store", &splitserve_rope::rope_store); }
