// bfloat16 paged decode attention on Intel AMX tiles: the `paged_decode` of cpu_decode.cpp for bfloat16 on CPUs
// with AMX-BF16 (Sapphire Rapids and later), where the AVX-512 kernel spent most of its time on the per-row dot
// products and value updates. One sequence at a time, in two passes over its context:
//
//   1. scores S^T [16 tokens, 16 heads] = sum over KV heads of K_hk [16 tokens, D] x Q_hk^T [D, 16]: each K tile
//      is loaded straight from its page (rows token_stride apart); Q_hk^T is packed once per sequence in the
//      pair-interleaved ("VNNI") layout the tile product wants, with zeros outside hk's G query heads, so one
//      score tile holds up to 16 heads (16 / G KV heads per "column group"). Float32 sums of bfloat16 products.
//   2. the softmax of each head over its whole context (two passes: no running rescale of the accumulators), in
//      float32; each weight split into a bfloat16 high part and the bfloat16 of what that rounded off, so the
//      tile products below see it to ~16 bits (rounding the weights to bfloat16 alone, as ATen's CPU flash
//      attention does, changed the greedy tokens of the bench prompts more often);
//   3. per KV head, O [16, D] += (P_high + P_low) [16 heads, 32 tokens] x V [32 tokens, D], 16 output columns
//      per tile, the accumulators staying in tiles for the whole context; V rows are pair-interleaved on the way
//      (two rows in, one vpermt2w per 16 output columns).
//
// Rows of P past the G heads stay zero, as do the weights and V rows past the context: a page's tail is never
// read or multiplied into the result (a partial last tile of K is copied into a zero-padded buffer first).
// Requires block_size % 16 == 0 (a 16-token tile never straddles two pages) and G <= 16; the caller checks.
// In the engine (SmolLM2, batch 32) the attention of a decode step reads its KV from memory and is mostly bound
// by that: in one profile this kernel took it from ~10.5 to ~8.7 ms per step (weights rounded to bfloat16 only);
// in cache it is ~1.4x faster.

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_vec.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define SPLITSERVE_HAVE_AMX 1
#endif

namespace splitserve_amx {

#if defined(SPLITSERVE_HAVE_AMX)
using splitserve_vec::exp_ps;

bool usable() {
  // Linux hands out the tile-data register state only to processes that ask for it (oneDNN asks too); a CPU or
  // kernel without AMX refuses, and the caller keeps the AVX-512 kernel.
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

namespace {

constexpr int kTile = 16;   // rows of every tile; each row 64 bytes (16 float32 or 32 bfloat16)

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// One shape for all 8 tiles (16 rows of 64 bytes), so one configuration serves both products:
//  scores: tmm0 += tmm1 (K rows) x tmm2 (Q^T);   values: tmm3..6 += tmm1 (P) x tmm0 / tmm2 (V, alternating)
void configure_tiles() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = kTile;
  }
  _tile_loadconfig(&cfg);
}

// Per-thread buffers, grown on demand. `probs` rows past the heads written are kept zero (`dirty_rows`): rows
// 0-15 hold the weights' bfloat16 high parts, rows 16-31 the low parts (what the high part rounded off).
struct Scratch {
  std::vector<float> scores;                // [H, ctx_pad] scaled scores
  std::vector<uint16_t> probs;              // [2, 16, prob_stride] bfloat16 weights of one KV head's query heads
  int64_t prob_stride = 0;
  int dirty_rows = 0;
  int qt_shape = -1;                        // (H, G) of the last Q^T packed (its other columns are zero)
  std::vector<float> score_tiles;           // [groups, ctx16, 16] stored score tiles
  std::vector<uint16_t> k_tail;             // [16, token_stride] the last partial tile's K rows, zero-padded
  alignas(64) uint32_t qt[32][4][kTile][kTile];   // Q^T per (KV head, 32-column slice of D), pair-interleaved
  alignas(64) uint32_t vt[4][kTile][kTile];       // 32 tokens x 16 columns of V, pair-interleaved, 4 slices
  alignas(64) float tile[4][kTile][kTile];        // a stored score or output tile

  uint16_t* prob_rows(int64_t width, int rows) {
    if (width > prob_stride) {
      prob_stride = std::max<int64_t>(width, 2 * prob_stride);
      probs.assign(2 * kTile * prob_stride, 0);
      dirty_rows = 0;
    }
    if (dirty_rows > rows) {   // rows past this call's heads must read as zero
      for (int part = 0; part < 2; ++part)
        std::memset(probs.data() + (part * kTile + rows) * prob_stride, 0,
                    (dirty_rows - rows) * prob_stride * sizeof(uint16_t));
    }
    dirty_rows = rows;
    return probs.data();
  }
};

alignas(64) constexpr int16_t kInterleave[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
alignas(64) constexpr uint16_t kZeroRow[64] = {};   // stands in for V rows past the context

inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }   // to nearest even
inline __m512 from_bf16(__m256i x) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16)); }

// V rows a and b (tokens t and t + 1; NJ 16-column slices) into row r of the pair-interleaved tiles `vt`:
// element (r, n) of slice j = (a[16 j + n], b[16 j + n]).
template <int NJ>
inline void interleave_pair(const uint16_t* a, const uint16_t* b, int r, uint32_t (*vt)[kTile][kTile]) {
  const __m512i lo = _mm512_loadu_si512(kInterleave), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int j = 0; j < NJ / 2; ++j) {
    const __m512i x = _mm512_loadu_si512(a + 32 * j), y = _mm512_loadu_si512(b + 32 * j);
    _mm512_store_si512(vt[2 * j][r], _mm512_permutex2var_epi16(x, lo, y));
    _mm512_store_si512(vt[2 * j + 1][r], _mm512_permutex2var_epi16(x, hi, y));
  }
}

// tmm C = sum over KV heads hk0..hk1-1 of their 16 K rows x their Q^T (zero outside their columns), stored to
// dst. (gcc's tile intrinsics take the register number as a literal: one function per register triple.)
#define SPLITSERVE_SCORE_TILE(NAME, C, A, B)                                                                   \
  template <int KT>                                                                                            \
  inline void NAME(const uint16_t* k, int64_t head_stride, int64_t token_stride, int hk0, int hk1,            \
                   const uint32_t (*qt)[4][kTile][kTile], float* dst) {                                        \
    _tile_zero(C);                                                                                             \
    for (int hk = hk0; hk < hk1; ++hk)                                                                         \
      for (int kt = 0; kt < KT; ++kt) {                                                                        \
        _tile_loadd(A, k + hk * head_stride + 32 * kt, token_stride * sizeof(uint16_t));                       \
        _tile_loadd(B, qt[hk][kt], 64);                                                                        \
        _tile_dpbf16ps(C, A, B);                                                                               \
      }                                                                                                        \
    _tile_stored(C, dst, 64);                                                                                  \
  }
SPLITSERVE_SCORE_TILE(score_tile_even, 0, 1, 2)
SPLITSERVE_SCORE_TILE(score_tile_odd, 3, 4, 5)
#undef SPLITSERVE_SCORE_TILE

template <int D>
void decode_sequence(const uint16_t* q, uint16_t* out, const uint16_t* kv, int64_t kv_stride, const int32_t* table,
                     int64_t context, int64_t block_size, int64_t block_stride, int64_t token_stride,
                     int64_t head_stride, int H, int Hkv, float scale, Scratch& s) {
  constexpr int KT = D / 32;                       // 32-column slices of D (one tile row each)
  const int G = H / Hkv;
  const int64_t ctx16 = (context + 15) / 16 * 16, ctx32 = (context + 31) / 32 * 32;
  if (static_cast<int64_t>(s.scores.size()) < H * ctx32) s.scores.resize(H * ctx32);
  float* scores = s.scores.data();
  auto row = [&](int64_t t) {                      // token t's KV row start (K; V is kv_stride further)
    return kv + table[t / block_size] * block_stride + (t % block_size) * token_stride;
  };

  // Q^T, pair-interleaved: element (r, n) of slice kt of KV head hk = q[head][32 kt + 2r .. +1] where column n is
  // one of hk's query heads in its column group (16 / G KV heads share one 16-column score tile), else zero
  const int kv_per_tile = kTile / G, groups = (Hkv + kv_per_tile - 1) / kv_per_tile;
  if (s.qt_shape != H * 64 + G) {
    std::memset(s.qt, 0, sizeof(s.qt));
    s.qt_shape = H * 64 + G;
  }
  for (int h = 0; h < H; ++h) {
    const int hk = h / G, n = (hk % kv_per_tile) * G + h % G;
    const uint32_t* pairs = reinterpret_cast<const uint32_t*>(q + h * D);
    for (int kt = 0; kt < KT; ++kt)
      for (int r = 0; r < kTile; ++r) s.qt[hk][kt][r][n] = pairs[16 * kt + r];
  }

  // scores S^T [16 tokens, 16 heads] per column group and 16 tokens, into [groups][ctx16][16]; the two
  // accumulators alternate so that consecutive tile products do not wait on each other
  if (static_cast<int64_t>(s.score_tiles.size()) < groups * ctx16 * kTile) s.score_tiles.resize(groups * ctx16 * kTile);
  float* st = s.score_tiles.data();
  const int64_t run_lines = 16 * token_stride * static_cast<int64_t>(sizeof(uint16_t)) / 64;
  int unit = 0;
  const int64_t row_bytes = token_stride * static_cast<int64_t>(sizeof(uint16_t));
  for (int64_t t0 = 0; t0 < ctx16; t0 += 16) {
    const int64_t n = std::min<int64_t>(16, context - t0);
    const uint16_t* k = row(t0);
    // into L2: the next 16 tokens' K rows, and these tokens' V rows, which the value pass reads (in the engine
    // the KV comes from memory; prefetching the next sequence's first rows as well, or issuing these after the
    // tile products, was slower). Rows past the context are not fetched.
    const char* next_k = t0 + 16 < ctx16 ? reinterpret_cast<const char*>(row(t0 + 16)) : nullptr;
    const int64_t next_lines = (std::min<int64_t>(16, context - t0 - 16) * row_bytes + 63) / 64;
    const char* v_run = reinterpret_cast<const char*>(k + kv_stride);
    const int64_t v_lines = n == 16 ? run_lines : (n * row_bytes + 63) / 64;
    for (int64_t i = 0; i < v_lines; ++i) __builtin_prefetch(v_run + 64 * i, 0, 2);
    if (next_k)
      for (int64_t i = 0; i < next_lines; ++i) __builtin_prefetch(next_k + 64 * i, 0, 2);
    if (n < 16) {   // the last, partial tile: its rows copied, zeros after, so the tile loads read no page tail
      if (static_cast<int64_t>(s.k_tail.size()) < 16 * token_stride) s.k_tail.resize(16 * token_stride);
      std::memcpy(s.k_tail.data(), k, n * row_bytes);
      std::memset(s.k_tail.data() + n * token_stride, 0, (16 - n) * row_bytes);
      k = s.k_tail.data();
    }
    for (int cg = 0; cg < groups; ++cg, ++unit) {
      const int hk0 = cg * kv_per_tile, hk1 = std::min(Hkv, hk0 + kv_per_tile);
      float* dst = st + (cg * ctx16 + t0) * kTile;
      if (unit % 2 == 0) score_tile_even<KT>(k, head_stride, token_stride, hk0, hk1, s.qt, dst);
      else score_tile_odd<KT>(k, head_stride, token_stride, hk0, hk1, s.qt, dst);
    }
  }
  // head-major scaled scores [H, ctx32]: column c of group cg's tiles is head cg * kv_per_tile * G + c
  const __m512i column = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int h = 0; h < H; ++h) {
    const int cg = h / G / kv_per_tile, c = h - cg * kv_per_tile * G;
    const float* src = st + cg * ctx16 * kTile + c;
    for (int64_t t0 = 0; t0 < ctx16; t0 += 16)
      _mm512_storeu_ps(scores + h * ctx32 + t0,
                       _mm512_mul_ps(_mm512_i32gather_ps(column, src + t0 * kTile, 4), vscale));
  }

  const uint16_t* zero_row = kZeroRow;
  const float minus_inf = -std::numeric_limits<float>::infinity();
  for (int hk = 0; hk < Hkv; ++hk) {
    // softmax of the G heads over the context as high + low bfloat16 parts, zero up to ctx32
    uint16_t* probs = s.prob_rows(ctx32, G);
    float inv_sum[kTile];
    for (int g = 0; g < G; ++g) {
      const float* sc = scores + (hk * G + g) * ctx32;
      uint16_t* p = probs + g * s.prob_stride;
      __m512 mx = _mm512_set1_ps(minus_inf);
      for (int64_t t = 0; t < ctx32; t += 16) {
        const __mmask16 valid = t + 16 <= context ? 0xffff : t < context ? (1u << (context - t)) - 1 : 0;
        mx = _mm512_mask_max_ps(mx, valid, mx, _mm512_maskz_loadu_ps(valid, sc + t));
      }
      const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t t = 0; t < ctx32; t += 16) {
        const __mmask16 valid = t + 16 <= context ? 0xffff : t < context ? (1u << (context - t)) - 1 : 0;
        const __m512 e = _mm512_maskz_mov_ps(valid, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, sc + t), m)));
        const __m256i hi = to_bf16(e), lo = to_bf16(_mm512_sub_ps(e, from_bf16(hi)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + t), hi);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + kTile * s.prob_stride + t), lo);
        sum = _mm512_add_ps(sum, e);
      }
      inv_sum[g] = 1.f / _mm512_reduce_add_ps(sum);
    }
    // O = P V, 4 slices of 16 output columns at a time (one pass over the context each)
    for (int j0 = 0; j0 < D / 16; j0 += 4) {
      _tile_zero(3);
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
      for (int64_t t0 = 0; t0 < ctx32; t0 += 32) {
        for (int half = 0; half < 2; ++half) {   // 16 tokens each, never straddling a page
          const int64_t t1 = t0 + 16 * half;
          const uint16_t* v = t1 < context ? row(t1) + kv_stride + hk * head_stride + 16 * j0 : zero_row;
          for (int i = 0; i < 16; i += 2) {
            const uint16_t* a = t1 + i < context ? v + i * token_stride : zero_row;
            const uint16_t* b = t1 + i + 1 < context ? v + (i + 1) * token_stride : zero_row;
            interleave_pair<4>(a, b, 8 * half + i / 2, s.vt);
          }
        }
        _tile_loadd(1, probs + t0, s.prob_stride * sizeof(uint16_t));                        // high parts
        _tile_loadd(7, probs + kTile * s.prob_stride + t0, s.prob_stride * sizeof(uint16_t));   // low parts
        _tile_loadd(0, s.vt[0], 64);
        _tile_loadd(2, s.vt[1], 64);
        _tile_dpbf16ps(3, 1, 0);
        _tile_dpbf16ps(4, 1, 2);
        _tile_dpbf16ps(3, 7, 0);
        _tile_dpbf16ps(4, 7, 2);
        _tile_loadd(0, s.vt[2], 64);
        _tile_loadd(2, s.vt[3], 64);
        _tile_dpbf16ps(5, 1, 0);
        _tile_dpbf16ps(6, 1, 2);
        _tile_dpbf16ps(5, 7, 0);
        _tile_dpbf16ps(6, 7, 2);
      }
      _tile_stored(3, s.tile[0], 64);
      _tile_stored(4, s.tile[1], 64);
      _tile_stored(5, s.tile[2], 64);
      _tile_stored(6, s.tile[3], 64);
      for (int g = 0; g < G; ++g) {
        uint16_t* o = out + (hk * G + g) * D + 16 * j0;
        const __m512 inv = _mm512_set1_ps(inv_sum[g]);
        for (int j = 0; j < 4; ++j)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * j),
                              to_bf16(_mm512_mul_ps(_mm512_loadu_ps(s.tile[j][g]), inv)));
      }
    }
  }
}

}  // namespace

void paged_decode_bf16(const uint16_t* q, uint16_t* out, const uint16_t* kv, int64_t kv_stride,
                       const int32_t* tables, int64_t table_stride, const int32_t* lens, int64_t begin, int64_t end,
                       int64_t block_size, int64_t block_stride, int64_t token_stride, int64_t head_stride, int H,
                       int Hkv, int D, float scale) {
  thread_local Scratch scratch;
  configure_tiles();
  for (int64_t b = begin; b < end; ++b) {
    if (D == 64)
      decode_sequence<64>(q + b * H * D, out + b * H * D, kv, kv_stride, tables + b * table_stride, lens[b],
                          block_size, block_stride, token_stride, head_stride, H, Hkv, scale, scratch);
    else
      decode_sequence<128>(q + b * H * D, out + b * H * D, kv, kv_stride, tables + b * table_stride, lens[b],
                           block_size, block_stride, token_stride, head_stride, H, Hkv, scale, scratch);
  }
  _tile_release();
}

#else   // no AMX in this build: the AVX-512 kernel runs

bool usable() { return false; }
void paged_decode_bf16(const uint16_t*, uint16_t*, const uint16_t*, int64_t, const int32_t*, int64_t,
                       const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int, int, float) {}

#endif

}  // namespace splitserve_amx
