// Int4 weight x int8 activation GEMV/GEMM for CPU decode (M = 1..16 rows).
//
// Weight format (built by tandem/runtime/kernels/int4.py, `pack_int4`):
//   w[n, k] ~= scale[n, b] * q[n, k] + min[n, b],  q in [0, 15],  b = k / 32, with
//   scale[n, b] = scode[n, b] * d[n, s] and min[n, b] = mcode[n, b] * dmin[n, s]: 8-bit codes
//   per block and fp16 units per super-block s = b / 8 of 256 input channels (Q4_K's layout,
//   with 8-bit instead of 6-bit codes). Both products are exact in fp32.
//   Output rows are padded to a multiple of 16 and stored in groups of 16 rows (g = n / 16).
//   qweight: uint8 [G, KB, 256]. For block b of group g, 4 chunks of 64 bytes; chunk i byte
//            (4 * r + t) (r = row in group 0..15, t = 0..3) holds
//            q[16g + r, 32b + 4i + t] in its low nibble and q[16g + r, 32b + 16 + 4i + t]
//            in its high nibble. So one int32 lane = 4 consecutive k of one row, and a
//            256-bit half of a chunk = 8 rows (AVX2), the whole chunk = 16 rows (AVX-512).
//   scodes: uint8 [G, KB, 16]; mcodes: int8 [G, KB, 16]; supers: fp16 [G, SB, 2, 16]
//            (d, then dmin, for the 16 rows; SB = ceil(KB / 8), the last one may be short).
//   Total 4 + 0.5 + 0.125 bits per weight.
//
// Activations are quantized per block of 32 to int8 (Q8_0 style: d = max|x| / 127) with the
// per-block sum s = d * sum(xq) precomputed, so that
//   y[m, n] = sum_b scale[n,b] * dx[m,b] * dot_int(q[n,b], xq[m,b]) + min[n,b] * s[m,b].
// Integer dot products: AVX2 maddubs (u8 x s8 -> s16, summed in s16: 8 * 2 * 15 * 127 fits)
// + madd; AVX-512 VNNI dpbusd. The path is picked at run time (`isa` = 0) with
// __builtin_cpu_supports; the file itself is built for baseline AVX2 + FMA + F16C.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace tandem_kernels {
namespace {

constexpr int kRows = 16;    // output rows per group
constexpr int kBlock = 32;   // k per quantization block
constexpr int kBlockBytes = 256;
constexpr int kSuper = 8;    // blocks per super-block (one fp16 d and dmin per row)
constexpr int kMaxMcAvx2 = 4;  // activation rows per pass over a group's weights (AVX-512: 8)

#include "cpu_isa.h"

struct QuantX {
  std::vector<int8_t> q;  // [M, KB * 32]
  std::vector<float> d;   // [M, KB]
  std::vector<float> s;   // [M, KB]  d * sum(q)
};

struct Problem {
  const uint8_t* qw;
  const uint8_t* scodes;
  const int8_t* mcodes;
  const uint16_t* supers;
  const QuantX* x;
  int64_t m, n, kb, sb;
  const float* bias;  // [N] or nullptr
  float* y32;         // [M, N] when the output is fp32
  at::BFloat16* y16;  // [M, N] when the output is bf16
};

// 32 activations -> fp32 (8-lane vectors). The whole file is built for AVX2 (load() refuses
// CPUs without it), so activation quantization always uses AVX2.
inline void load_block(const at::BFloat16* src, __m256 v[4]) {
  for (int j = 0; j < 4; ++j) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 8 * j));
    v[j] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
}

inline void load_block(const float* src, __m256 v[4]) {
  for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(src + 8 * j);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline int hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Q8_0: d = max|x| / 127, q = round_half_even(x * 127 / max|x|), s = d * sum(q).
template <typename T>
void quantize_rows(const T* x, int64_t m, int64_t k, QuantX& out) {
  const int64_t kb = k / kBlock;
  out.q.resize(m * k);
  out.d.resize(m * kb);
  out.s.resize(m * kb);
  at::parallel_for(0, m * kb, 256, [&](int64_t begin, int64_t end) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t i = begin; i < end; ++i) {
      __m256 v[4];
      load_block(x + i * kBlock, v);  // rows are contiguous and k % 32 == 0
      __m256 amax = _mm256_andnot_ps(sign, v[0]);
      for (int j = 1; j < 4; ++j) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
      const float mx = hmax(amax);
      const __m256 inv = _mm256_set1_ps(mx > 0.f ? 127.f / mx : 0.f);
      __m256i q[4];
      for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
      const int sum = hsum(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]),
                                            _mm256_add_epi32(q[2], q[3])));
      const __m256i p16 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                             _mm256_packs_epi32(q[2], q[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + i * kBlock),
                          _mm256_permutevar8x32_epi32(p16, order));
      out.d[i] = mx / 127.f;
      out.s[i] = out.d[i] * static_cast<float>(sum);
    }
  });
}

inline float half_to_float(uint16_t h) {
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

inline void store_rows(const Problem& p, int64_t m, int64_t g, const float* acc16) {
  const int64_t n0 = g * kRows;
  const int64_t cnt = std::min<int64_t>(kRows, p.n - n0);
  for (int64_t r = 0; r < cnt; ++r) {
    const float v = acc16[r] + (p.bias ? p.bias[n0 + r] : 0.f);
    if (p.y16) {
      p.y16[m * p.n + n0 + r] = at::BFloat16(v);
    } else {
      p.y32[m * p.n + n0 + r] = v;
    }
  }
}

#ifndef TANDEM_PREFETCH_BLOCKS
#define TANDEM_PREFETCH_BLOCKS 16
#endif
// Software prefetch a few blocks ahead in all three streams (a group's blocks are contiguous,
// and so are consecutive groups, so this also warms the next group's start).
// (The super-block units are one 64-byte line per 8 blocks, left to the hardware prefetcher.)
inline void prefetch_ahead(const uint8_t* w, const uint8_t* sc, const int8_t* mn) {
  constexpr int ahead = TANDEM_PREFETCH_BLOCKS;
  if constexpr (ahead > 0) {
    const char* pw = reinterpret_cast<const char*>(w + ahead * kBlockBytes);
    for (int line = 0; line < kBlockBytes; line += 64) _mm_prefetch(pw + line, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(sc + ahead * kRows), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(mn + ahead * kRows), _MM_HINT_T0);
  }
}

// Row r's scale and min of block b in row group g, as the SIMD paths compute them.
inline float block_scale(const Problem& p, int64_t g, int64_t b, int r) {
  const uint16_t* sup = p.supers + (g * p.sb + b / kSuper) * 2 * kRows;
  return static_cast<float>(p.scodes[(g * p.kb + b) * kRows + r]) * half_to_float(sup[r]);
}

inline float block_min(const Problem& p, int64_t g, int64_t b, int r) {
  const uint16_t* sup = p.supers + (g * p.sb + b / kSuper) * 2 * kRows;
  return static_cast<float>(p.mcodes[(g * p.kb + b) * kRows + r]) *
         half_to_float(sup[kRows + r]);
}

// The quantized activations of rows m0 .. m0 + MC: int8 values, block scales, block sums.
template <int MC>
struct ActivationRows {
  const int8_t* q[MC];
  const float* d[MC];
  const float* s[MC];
  ActivationRows(const Problem& p, int64_t m0) {
    for (int m = 0; m < MC; ++m) {
      q[m] = p.x->q.data() + (m0 + m) * p.kb * kBlock;
      d[m] = p.x->d.data() + (m0 + m) * p.kb;
      s[m] = p.x->s.data() + (m0 + m) * p.kb;
    }
  }
};

// ---------------------------------------------------------------- scalar reference path
void group_scalar(const Problem& p, int64_t g) {
  const int64_t k = p.kb * kBlock;
  for (int64_t m = 0; m < p.m; ++m) {
    float acc[kRows] = {};
    for (int64_t b = 0; b < p.kb; ++b) {
      const uint8_t* w = p.qw + (g * p.kb + b) * kBlockBytes;
      const int8_t* xq = p.x->q.data() + m * k + b * kBlock;
      const float d = p.x->d[m * p.kb + b];
      const float s = p.x->s[m * p.kb + b];
      for (int r = 0; r < kRows; ++r) {
        int dot = 0;
        for (int i = 0; i < 4; ++i) {
          for (int t = 0; t < 4; ++t) {
            const uint8_t byte = w[i * 64 + 4 * r + t];
            dot += (byte & 0xF) * xq[4 * i + t] + (byte >> 4) * xq[16 + 4 * i + t];
          }
        }
        acc[r] += block_scale(p, g, b, r) * d * static_cast<float>(dot) +
                  block_min(p, g, b, r) * s;
      }
    }
    store_rows(p, m, g, acc);
  }
}

// ---------------------------------------------------------------- AVX2 path
template <int MC>
void group_avx2_mc(const Problem& p, int64_t g, int64_t m0) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MC][2], accm[MC][2];  // scale term, min term
  for (int m = 0; m < MC; ++m) {
    acc[m][0] = acc[m][1] = accm[m][0] = accm[m][1] = _mm256_setzero_ps();
  }
  const ActivationRows<MC> x(p, m0);
  const uint8_t* w = p.qw + g * p.kb * kBlockBytes;
  const uint8_t* sc = p.scodes + g * p.kb * kRows;
  const int8_t* mn = p.mcodes + g * p.kb * kRows;
  const uint16_t* sup = p.supers + g * p.sb * 2 * kRows;
  __m256 du[2], dmu[2];  // the current super-block's units, per half
  for (int64_t b = 0; b < p.kb; ++b, w += kBlockBytes, sc += kRows, mn += kRows) {
    prefetch_ahead(w, sc, mn);
    if (b % kSuper == 0) {
      for (int h = 0; h < 2; ++h) {
        du[h] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sup + 8 * h)));
        dmu[h] = _mm256_cvtph_ps(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(sup + kRows + 8 * h)));
      }
      sup += 2 * kRows;
    }
    for (int h = 0; h < 2; ++h) {
      __m256i s16[MC];
      for (int m = 0; m < MC; ++m) s16[m] = _mm256_setzero_si256();
      for (int i = 0; i < 4; ++i) {
        const __m256i raw =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * 64 + h * 32));
        const __m256i lo = _mm256_and_si256(raw, low);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
        for (int m = 0; m < MC; ++m) {
          int32_t xl, xh;
          std::memcpy(&xl, x.q[m] + b * kBlock + 4 * i, 4);
          std::memcpy(&xh, x.q[m] + b * kBlock + 16 + 4 * i, 4);
          s16[m] = _mm256_add_epi16(s16[m], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(xl)));
          s16[m] = _mm256_add_epi16(s16[m], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xh)));
        }
      }
      const __m256 wsc = _mm256_mul_ps(
          _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + 8 * h)))),
          du[h]);
      const __m256 wmn = _mm256_mul_ps(
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn + 8 * h)))),
          dmu[h]);
      for (int m = 0; m < MC; ++m) {
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[m], ones));
        const __m256 f = _mm256_mul_ps(wsc, _mm256_set1_ps(x.d[m][b]));
        acc[m][h] = _mm256_fmadd_ps(dot, f, acc[m][h]);
        accm[m][h] = _mm256_fmadd_ps(wmn, _mm256_set1_ps(x.s[m][b]), accm[m][h]);
      }
    }
  }
  for (int m = 0; m < MC; ++m) {
    alignas(32) float out[kRows];
    _mm256_store_ps(out, _mm256_add_ps(acc[m][0], accm[m][0]));
    _mm256_store_ps(out + 8, _mm256_add_ps(acc[m][1], accm[m][1]));
    store_rows(p, m0 + m, g, out);
  }
}

// ---------------------------------------------------------------- AVX-512 VNNI path
// CH independent int32 accumulators per activation row hide the dpbusd latency at small MC.
template <int MC>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void group_avx512_mc(
    const Problem& p, int64_t g, int64_t m0) {
  constexpr int CH = MC == 1 ? 4 : (MC <= 4 ? 2 : 1);
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[MC], accm[MC];  // scale term, min term
  for (int m = 0; m < MC; ++m) acc[m] = accm[m] = _mm512_setzero_ps();
  const ActivationRows<MC> x(p, m0);
  const uint8_t* w = p.qw + g * p.kb * kBlockBytes;
  const uint8_t* sc = p.scodes + g * p.kb * kRows;
  const int8_t* mn = p.mcodes + g * p.kb * kRows;
  const uint16_t* sup = p.supers + g * p.sb * 2 * kRows;
  __m512 du = _mm512_setzero_ps(), dmu = _mm512_setzero_ps();  // the super-block's units
  for (int64_t b = 0; b < p.kb; ++b, w += kBlockBytes, sc += kRows, mn += kRows) {
    prefetch_ahead(w, sc, mn);
    if (b % kSuper == 0) {
      du = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sup)));
      dmu = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sup + kRows)));
      sup += 2 * kRows;
    }
    __m512i dot[MC][CH];
    for (int m = 0; m < MC; ++m) {
      for (int c = 0; c < CH; ++c) dot[m][c] = _mm512_setzero_si512();
    }
    for (int i = 0; i < 4; ++i) {
      const __m512i raw = _mm512_loadu_si512(w + i * 64);
      const __m512i lo = _mm512_and_si512(raw, low);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
      const int cl = (2 * i) % CH, chh = (2 * i + 1) % CH;
      for (int m = 0; m < MC; ++m) {
        int32_t xl, xh;
        std::memcpy(&xl, x.q[m] + b * kBlock + 4 * i, 4);
        std::memcpy(&xh, x.q[m] + b * kBlock + 16 + 4 * i, 4);
        dot[m][cl] = _mm512_dpbusd_epi32(dot[m][cl], lo, _mm512_set1_epi32(xl));
        dot[m][chh] = _mm512_dpbusd_epi32(dot[m][chh], hi, _mm512_set1_epi32(xh));
      }
    }
    const __m512 wsc = _mm512_mul_ps(
        _mm512_cvtepi32_ps(
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)))),
        du);
    const __m512 wmn = _mm512_mul_ps(
        _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn)))),
        dmu);
    for (int m = 0; m < MC; ++m) {
      __m512i d = dot[m][0];
      for (int c = 1; c < CH; ++c) d = _mm512_add_epi32(d, dot[m][c]);
      const __m512 f = _mm512_mul_ps(wsc, _mm512_set1_ps(x.d[m][b]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), f, acc[m]);
      accm[m] = _mm512_fmadd_ps(wmn, _mm512_set1_ps(x.s[m][b]), accm[m]);
    }
  }
  for (int m = 0; m < MC; ++m) {
    alignas(64) float out[kRows];
    _mm512_store_ps(out, _mm512_add_ps(acc[m], accm[m]));
    store_rows(p, m0 + m, g, out);
  }
}

// ---------------------------------------------------------------- dispatch
void group_avx2(const Problem& p, int64_t g) {
  int64_t m0 = 0;
  for (; m0 + kMaxMcAvx2 <= p.m; m0 += kMaxMcAvx2) group_avx2_mc<kMaxMcAvx2>(p, g, m0);
  switch (p.m - m0) {
    case 3: group_avx2_mc<3>(p, g, m0); break;
    case 2: group_avx2_mc<2>(p, g, m0); break;
    case 1: group_avx2_mc<1>(p, g, m0); break;
    default: break;
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void group_avx512(
    const Problem& p, int64_t g) {
  int64_t m0 = 0;
  for (; m0 + 8 <= p.m; m0 += 8) group_avx512_mc<8>(p, g, m0);
  switch (p.m - m0) {
    case 7: group_avx512_mc<7>(p, g, m0); break;
    case 6: group_avx512_mc<6>(p, g, m0); break;
    case 5: group_avx512_mc<5>(p, g, m0); break;
    case 4: group_avx512_mc<4>(p, g, m0); break;
    case 3: group_avx512_mc<3>(p, g, m0); break;
    case 2: group_avx512_mc<2>(p, g, m0); break;
    case 1: group_avx512_mc<1>(p, g, m0); break;
    default: break;
  }
}

// The packed weight's tensors, checked against each other (contiguous copies where needed).
struct Weight {
  at::Tensor q, scodes, mcodes, supers;
  int64_t groups, kb, sb;
};

Weight check_weight(const at::Tensor& qweight, const at::Tensor& scodes, const at::Tensor& mcodes,
                    const at::Tensor& supers, int64_t n, const char* op) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 3 &&
                  qweight.size(2) == kBlockBytes,
              op, ": qweight must be uint8 [G, KB, 256]");
  const int64_t groups = qweight.size(0), kb = qweight.size(1);
  const int64_t sb = (kb + kSuper - 1) / kSuper;
  TORCH_CHECK(scodes.scalar_type() == at::kByte && mcodes.scalar_type() == at::kChar,
              op, ": scodes must be uint8 and mcodes int8");
  TORCH_CHECK(scodes.sizes() == at::IntArrayRef({groups, kb, kRows}) &&
                  mcodes.sizes() == scodes.sizes(),
              op, ": scodes/mcodes must be [G, KB, 16]");
  TORCH_CHECK(supers.scalar_type() == at::kHalf &&
                  supers.sizes() == at::IntArrayRef({groups, sb, 2, kRows}),
              op, ": supers must be fp16 [G, ceil(KB / 8), 2, 16]");
  TORCH_CHECK(n > (groups - 1) * kRows && n <= groups * kRows, op, ": n=", n,
              " does not match ", groups, " row groups");
  return {qweight.contiguous(), scodes.contiguous(), mcodes.contiguous(), supers.contiguous(),
          groups, kb, sb};
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scodes,
                   const at::Tensor& mcodes, const at::Tensor& supers, int64_t n,
                   const c10::optional<at::Tensor>& bias, int64_t isa) {
  TORCH_CHECK(x.dim() == 2, "int4_mm: x must be [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "int4_mm: x must be bf16 or fp32");
  const Weight wt = check_weight(qweight, scodes, mcodes, supers, n, "int4_mm");
  TORCH_CHECK(x.size(1) == wt.kb * kBlock, "int4_mm: x has K=", x.size(1), ", weight has ",
              wt.kb * kBlock);
  const Isa path = resolve_isa(isa, "int4_mm");
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1);

  QuantX xqt;
  if (xc.scalar_type() == at::kBFloat16) {
    quantize_rows(xc.data_ptr<at::BFloat16>(), m, k, xqt);
  } else {
    quantize_rows(xc.data_ptr<float>(), m, k, xqt);
  }
  at::Tensor bias32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "int4_mm: bias must be [N]");
    bias32 = bias->to(at::kFloat).contiguous();
  }
  const bool out16 = xc.scalar_type() == at::kBFloat16;
  at::Tensor y = at::empty({m, n}, xc.options());
  Problem p{wt.q.data_ptr<uint8_t>(),
            wt.scodes.data_ptr<uint8_t>(),
            wt.mcodes.data_ptr<int8_t>(),
            reinterpret_cast<const uint16_t*>(wt.supers.data_ptr<at::Half>()),
            &xqt,
            m,
            n,
            wt.kb,
            wt.sb,
            bias32.defined() ? bias32.data_ptr<float>() : nullptr,
            out16 ? nullptr : y.data_ptr<float>(),
            out16 ? y.data_ptr<at::BFloat16>() : nullptr};
  if (m > 0) {
    at::parallel_for(0, wt.groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        if (path == kAvx512) {
          group_avx512(p, g);
        } else if (path == kAvx2) {
          group_avx2(p, g);
        } else {
          group_scalar(p, g);
        }
      }
    });
  }
  return y;
}

// Dequantize to fp32 [N, K] (for tests, dequantized() and a prefill fallback).
at::Tensor int4_dequant(const at::Tensor& qweight, const at::Tensor& scodes,
                        const at::Tensor& mcodes, const at::Tensor& supers, int64_t n) {
  const Weight wt = check_weight(qweight, scodes, mcodes, supers, n, "int4_dequant");
  const int64_t kb = wt.kb, k = kb * kBlock;
  at::Tensor out = at::empty({n, k}, wt.q.options().dtype(at::kFloat));
  Problem p{wt.q.data_ptr<uint8_t>(),
            wt.scodes.data_ptr<uint8_t>(),
            wt.mcodes.data_ptr<int8_t>(),
            reinterpret_cast<const uint16_t*>(wt.supers.data_ptr<at::Half>()),
            nullptr,
            0,
            n,
            kb,
            wt.sb,
            nullptr,
            nullptr,
            nullptr};
  float* o = out.data_ptr<float>();
  at::parallel_for(0, wt.groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t b = 0; b < kb; ++b) {
        const uint8_t* blk = p.qw + (g * kb + b) * kBlockBytes;
        for (int r = 0; r < kRows; ++r) {
          const int64_t row = g * kRows + r;
          if (row >= n) break;
          const float d = block_scale(p, g, b, r);
          const float mm = block_min(p, g, b, r);
          float* dst = o + row * k + b * kBlock;
          for (int i = 0; i < 4; ++i) {
            for (int t = 0; t < 4; ++t) {
              const uint8_t byte = blk[i * 64 + 4 * r + t];
              dst[4 * i + t] = d * static_cast<float>(byte & 0xF) + mm;
              dst[16 + 4 * i + t] = d * static_cast<float>(byte >> 4) + mm;
            }
          }
        }
      }
    }
  });
  return out;
}

int64_t best_isa() { return static_cast<int64_t>(resolve_isa(kAuto, "best_isa")); }

}  // namespace

TORCH_LIBRARY(tandem_kernels, lib) {
  lib.def(
      "int4_mm(Tensor x, Tensor qweight, Tensor scodes, Tensor mcodes, Tensor supers, int n, "
      "Tensor? bias=None, int isa=0) -> Tensor");
  lib.def(
      "int4_dequant(Tensor qweight, Tensor scodes, Tensor mcodes, Tensor supers, int n) -> "
      "Tensor");
  lib.def("best_isa() -> int", &best_isa);
}

TORCH_LIBRARY_IMPL(tandem_kernels, CPU, lib) {
  lib.impl("int4_mm", &int4_mm);
  lib.impl("int4_dequant", &int4_dequant);
}

// Inference only: no autograd formula; outputs never require grad.
TORCH_LIBRARY_IMPL(tandem_kernels, Autograd, lib) {
  lib.impl("int4_mm", torch::CppFunction::makeFallthrough());
  lib.impl("int4_dequant", torch::CppFunction::makeFallthrough());
}

}  // namespace tandem_kernels
