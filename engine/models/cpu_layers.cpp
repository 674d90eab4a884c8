// Fused bfloat16 elementwise layers for CPU decode: each replaces 2-8 ATen ops (and their temporaries) with one
// pass, with the same roundings as the HF / torch formulas they replace:
//
//   rms_norm(x, weight, eps)  = bf16(weight * bf16(x * rsqrt(mean(x^2) + eps)))      statistics in float32
//   silu_mul(gate_up)         = bf16(bf16(silu(gate)) * up), gate_up = [gate | up] along the last dim
//   add_rms_norm(x, delta, weight, eps): x = bf16(x + delta) in place (the residual add), then rms_norm(x)
//
// Only the summation order of mean(x^2) and the exp of silu (a few float32 ulps) may differ from ATen's.
//
// argmax_rows(logits) = logits.argmax(-1) for float32 or bfloat16 rows (first maximum on ties, a NaN counts as
// the maximum, as in ATen), exact: greedy sampling's one pass over the [B, vocab] lm_head output.

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
#include <limits>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using bf16 = c10::BFloat16;

inline float f32(bf16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float round_bf16(float x) { return f32(bf16(x)); }   // round to nearest even, as ATen's casts do

#if defined(__AVX512F__)
inline __m512 load16(const bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m256i to_bf16_16(__m512 x) {   // round to nearest even; NaN handling is not needed for finite layers
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}
inline void store16(bf16* p, __m512 x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_16(x)); }

// exp(x) for float32 lanes (Cephes-style: 2^n * poly(r), |error| ~ 2 ulp); inputs clamped to [-87.3, 88.7]
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#endif

void check_bf16_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, name, " must be bfloat16");
  TORCH_CHECK(x.dim() >= 1 && x.stride(-1) == 1, name, " must be contiguous along its last dim");
}

// One row of rms_norm; with `delta`, the row is first replaced by bf16(x + delta) (the residual add).
void norm_row(bf16* xr, const bf16* delta, const bf16* wp, bf16* orow, int64_t n, float eps) {
  int64_t i = 0;
  float ss = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    __m512 v = load16(xr + i);
    if (delta) {
      const __m256i sum = to_bf16_16(_mm512_add_ps(v, load16(delta + i)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xr + i), sum);
      v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(sum), 16));
    }
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  ss = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) {
    if (delta) xr[i] = bf16(f32(xr[i]) + f32(delta[i]));
    ss += f32(xr[i]) * f32(xr[i]);
  }
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  i = 0;
#if defined(__AVX512F__)
  const __m512 vinv = _mm512_set1_ps(inv);
  for (; i + 16 <= n; i += 16) {
    const __m512 normed = load16(xr + i);
    const __m512 y = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(to_bf16_16(_mm512_mul_ps(normed, vinv))), 16));
    store16(orow + i, _mm512_mul_ps(load16(wp + i), y));
  }
#endif
  for (; i < n; ++i) orow[i] = bf16(f32(wp[i]) * round_bf16(f32(xr[i]) * inv));
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  check_bf16_rows(x_in, "x");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(), "weight must be contiguous bf16");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(-1), rows = x.numel() / std::max<int64_t>(n, 1);
  TORCH_CHECK(weight.numel() == n, "weight must have ", n, " elements");
  at::Tensor out = at::empty_like(x);
  bf16* xp = const_cast<bf16*>(x.data_ptr<bf16>());   // only read: no delta
  const bf16* wp = weight.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) norm_row(xp + r * n, nullptr, wp, op + r * n, n, eps);
  });
  return out;
}

at::Tensor add_rms_norm(at::Tensor x, const at::Tensor& delta_in, const at::Tensor& weight, double eps) {
  check_bf16_rows(x, "x");
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous (it is updated in place)");
  TORCH_CHECK(delta_in.scalar_type() == at::kBFloat16 && delta_in.sizes() == x.sizes(),
              "delta must be bfloat16 of x's shape");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(), "weight must be contiguous bf16");
  const at::Tensor delta = delta_in.contiguous();
  const int64_t n = x.size(-1), rows = x.numel() / std::max<int64_t>(n, 1);
  TORCH_CHECK(weight.numel() == n, "weight must have ", n, " elements");
  at::Tensor out = at::empty_like(x);
  bf16* xp = x.data_ptr<bf16>();
  const bf16* dp = delta.data_ptr<bf16>();
  const bf16* wp = weight.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) norm_row(xp + r * n, dp + r * n, wp, op + r * n, n, eps);
  });
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_bf16_rows(gate_up, "gate_up");
  const int64_t width = gate_up.size(-1);
  TORCH_CHECK(width % 2 == 0, "gate_up's last dim must be even");
  const int64_t n = width / 2, rows = gate_up.numel() / std::max<int64_t>(width, 1);
  const at::Tensor x = gate_up.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor out = at::empty(shape, x.options());
  const bf16* xp = x.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const bf16* g = xp + r * width;
      const bf16* u = g + n;
      bf16* o = op + r * n;
      int64_t i = 0;
#if defined(__AVX512F__)
      const __m512 one = _mm512_set1_ps(1.f);
      for (; i + 16 <= n; i += 16) {
        const __m512 gv = load16(g + i);
        const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        const __m512 sr = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_16(s)), 16));
        store16(o + i, _mm512_mul_ps(sr, load16(u + i)));
      }
#endif
      for (; i < n; ++i) {
        const float gv = f32(g[i]);
        o[i] = bf16(round_bf16(gv / (1.f + std::exp(-gv))) * f32(u[i]));
      }
    }
  });
  return out;
}

// First index of the row's maximum (of its first NaN if it has one).
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#if defined(__AVX512F__)
  // the maximum of a prefix 16 lanes at a time, up to the first chunk holding a NaN (left to the scalar loop)
  __m512 vmax = _mm512_set1_ps(best);
  for (; i + 16 <= n; i += 16) {
    __m512 v;
    if constexpr (std::is_same_v<T, float>) v = _mm512_loadu_ps(x + i);
    else v = load16(x + i);
    if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) break;
    vmax = _mm512_max_ps(vmax, v);
  }
  best = _mm512_reduce_max_ps(vmax);
#endif
  const int64_t prefix = i;
  int64_t at = -1;
  for (; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    if (std::isnan(v)) return i;
    if (v > best) best = v, at = i;
  }
  if (at >= 0) return at;
  int64_t j = 0;                         // the maximum lies in the prefix: its first occurrence
#if defined(__AVX512F__)
  const __m512 vbest = _mm512_set1_ps(best);
  for (; j + 16 <= prefix; j += 16) {
    __m512 v;
    if constexpr (std::is_same_v<T, float>) v = _mm512_loadu_ps(x + j);
    else v = load16(x + j);
    const __mmask16 hit = _mm512_cmp_ps_mask(v, vbest, _CMP_EQ_OQ);
    if (hit) return j + __builtin_ctz(hit);
  }
#endif
  for (; j < prefix; ++j)
    if (static_cast<float>(x[j]) == best) return j;
  return 0;                              // every element is -inf
}

at::Tensor argmax_rows(const at::Tensor& logits_in) {
  TORCH_CHECK(logits_in.dim() == 2, "logits must be [rows, vocab]");
  TORCH_CHECK(logits_in.scalar_type() == at::kFloat || logits_in.scalar_type() == at::kBFloat16,
              "logits must be float32 or bfloat16");
  TORCH_CHECK(logits_in.size(1) > 0, "logits must have a vocabulary");
  const at::Tensor logits = logits_in.contiguous();
  const int64_t rows = logits.size(0), n = logits.size(1);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (logits.scalar_type() == at::kFloat) op[r] = argmax_row(logits.data_ptr<float>() + r * n, n);
      else op[r] = argmax_row(logits.data_ptr<bf16>() + r * n, n);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(splitserve_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor(a!) x, Tensor delta, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("argmax_rows(Tensor logits) -> Tensor");
}

TORCH_LIBRARY_IMPL(splitserve_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("argmax_rows", &argmax_rows);
}
