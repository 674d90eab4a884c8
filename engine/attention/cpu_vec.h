// Vector helpers shared by the native CPU attention kernels (cpu_decode.cpp, cpu_decode_amx.cpp). Header-only;
// cpu_kernels.py hashes it into the library's cache key with the sources.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

namespace splitserve_vec {

// exp(x), ~1 ulp (SLEEF's expf_u10 polynomial): x = n ln2 + r with |r| <= ln2/2, e^r by a polynomial, times 2^n
// by scalef, which also rounds results below FLT_MIN correctly and flushes them to 0 past -104 (-inf included).
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), x);   // NaN stays NaN (vmaxps returns its second operand)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.442695040888963f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);   // ln2 in two parts, the first exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 u = _mm512_set1_ps(0.000198527617612853646278381f);
  u = _mm512_fmadd_ps(u, r, _mm512_set1_ps(0.00139304355252534151077271f));
  u = _mm512_fmadd_ps(u, r, _mm512_set1_ps(0.00833336077630519866943359f));
  u = _mm512_fmadd_ps(u, r, _mm512_set1_ps(0.0416664853692054748535156f));
  u = _mm512_fmadd_ps(u, r, _mm512_set1_ps(0.166666671633720397949219f));
  u = _mm512_fmadd_ps(u, r, _mm512_set1_ps(0.5f));
  u = _mm512_add_ps(_mm512_set1_ps(1.f), _mm512_fmadd_ps(_mm512_mul_ps(r, r), u, r));
  return _mm512_scalef_ps(u, n);
}

// bfloat16 rounding as c10::BFloat16(float): to nearest even, NaN -> 0x7fc0; the bfloat16 ends up in the high half
inline __m512i round_to_bfloat16_high(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7fff));
  const __m512i r = _mm512_and_si512(_mm512_add_epi32(u, bias), _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000));
}

}  // namespace splitserve_vec
#endif
