// float32 layers for CPU decode, bit-identical to the ATen formulas they replace (float32 must match HF exactly):
//
//   rms_norm_f32(x, delta, weight, eps) = F.rms_norm(x, weight, eps), after `x += delta` (in place) if delta given
//   silu_mul_f32(gate_up)               = F.silu(gate) * up, gate_up = [gate | up] along the last dim
//
// ATen runs F.rms_norm on CPU as seven ops, five of them passes over x: pow, sum, div_, add_, rsqrt, mul, mul.
// Here the elementwise passes are fused (x + delta and its square in one, (x * r) * weight in another, each
// product rounded as ATen's separate multiplies: the library is built with -ffp-contract=off), while the row sums
// of the squares and the small [rows, 1] steps stay the ATen ops: their summation order is ATen's own, which a
// native reduction would not reproduce bit for bit.
//
// silu_mul_f32 is one pass instead of two. ATen's float32 silu is x / (1 + exp(-x)) with SLEEF's exp on 32-element
// steps of each row and std::exp on the rest (ATen's vectorized loop); the same exp (libtorch's Sleef_expf16_u10,
// which ATen's AVX-512 kernels call) and the same split give the same bits. Used only where ATen runs its AVX-512
// kernels (the Python side checks the capability).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/sum.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>

extern "C" __m512 Sleef_expf16_u10(__m512);   // in libtorch_cpu: Vectorized<float>::exp() under AVX-512
#endif

namespace {

at::Tensor rms_norm_f32(at::Tensor x, const std::optional<at::Tensor>& delta, const at::Tensor& weight,
                        double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1,
              "x must be a contiguous float32 tensor");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == x.size(-1),
              "weight must be contiguous float32 with x's last dim");
  const bool add = delta.has_value();
  TORCH_CHECK(!add || (delta->scalar_type() == at::kFloat && delta->is_contiguous() && delta->sizes() == x.sizes()),
              "delta must be contiguous float32 of x's shape");
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  float* xp = x.data_ptr<float>();
  const float* dp = add ? delta->data_ptr<float>() : nullptr;
  at::Tensor sq = at::empty_like(x);
  float* sp = sq.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {   // x += delta; sq = x * x
    for (int64_t i = begin * n, stop = end * n; i < stop;) {
#if defined(__AVX512F__)
      for (; i + 16 <= stop; i += 16) {
        __m512 v = _mm512_loadu_ps(xp + i);
        if (add) {
          v = _mm512_add_ps(v, _mm512_loadu_ps(dp + i));
          _mm512_storeu_ps(xp + i, v);
        }
        _mm512_storeu_ps(sp + i, _mm512_mul_ps(v, v));
      }
#endif
      for (; i < stop; ++i) {
        if (add) xp[i] += dp[i];
        sp[i] = xp[i] * xp[i];
      }
    }
  });
  // mean(x^2) as ATen's mean computes it (sum, then divide by n), + eps, rsqrt: [rows, 1]
  const at::Tensor r = at::rsqrt(sq.sum(-1, /*keepdim=*/true).div_(n).add_(eps)).contiguous();
  const float* rp = r.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  at::Tensor out = at::empty_like(x);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {   // out = (x * r) * weight
    for (int64_t row = begin; row < end; ++row) {
      const float* xr = xp + row * n;
      float* orow = op + row * n;
      const float rr = rp[row];
      int64_t j = 0;
#if defined(__AVX512F__)
      const __m512 vr = _mm512_set1_ps(rr);
      for (; j + 16 <= n; j += 16)
        _mm512_storeu_ps(orow + j, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(xr + j), vr), _mm512_loadu_ps(wp + j)));
#endif
      for (; j < n; ++j) orow[j] = (xr[j] * rr) * wp[j];
    }
  });
  return out;
}

at::Tensor silu_mul_f32(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat && gate_up.is_contiguous() && gate_up.dim() >= 1 &&
              gate_up.size(-1) % 2 == 0, "gate_up must be contiguous float32 with an even last dim");
  const int64_t width = gate_up.size(-1), n = width / 2, rows = width ? gate_up.numel() / width : 0;
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() = n;
  at::Tensor out = at::empty(shape, gate_up.options());
  const float* xp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* g = xp + r * width;
      const float* u = g + n;
      float* o = op + r * n;
      int64_t i = 0;
#if defined(__AVX512F__)
      const __m512 one = _mm512_set1_ps(1.f), sign = _mm512_set1_ps(-0.f);
      for (const int64_t whole = n / 32 * 32; i < whole; i += 16) {   // ATen: 32 per step, the rest scalar
        const __m512 x = _mm512_loadu_ps(g + i);
        const __m512 silu = _mm512_div_ps(x, _mm512_add_ps(one, Sleef_expf16_u10(_mm512_xor_ps(x, sign))));
        _mm512_storeu_ps(o + i, _mm512_mul_ps(silu, _mm512_loadu_ps(u + i)));
      }
#endif
      for (; i < n; ++i) {
        const float silu = g[i] / (1 + std::exp(-g[i]));
        o[i] = silu * u[i];
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(splitserve_cpu, m) {
  m.def("rms_norm_f32(Tensor(a!) x, Tensor? delta, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul_f32(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(splitserve_cpu, CPU, m) {
  m.impl("rms_norm_f32", &rms_norm_f32);
  m.impl("silu_mul_f32", &silu_mul_f32);
}
