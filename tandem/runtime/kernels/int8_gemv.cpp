// Int8 weight x int8 activation GEMV/GEMM for CPU decode (and prefill).
//
// Weight format (built by tandem/runtime/kernels/int8.py, `pack_int8`):
//   w[n, k] ~= scale[n] * q[n, k],  q in [-127, 127] (symmetric, one fp32 scale per output
//   channel). Output rows are padded to a multiple of 16 and stored in groups of 16 rows:
//   qweight: uint8 [G, K / 4, 64]; chunk c of group g, byte (4 * r + t) (r = row in group
//            0..15, t = 0..3) holds q[16g + r, 4c + t] + 128 (offset binary). So one int32
//            lane = 4 consecutive k of one row; a 256-bit half of a chunk = 8 rows (AVX2),
//            the whole chunk = 16 rows (AVX-512).
//   scales: fp32 [G * 16] (0 for padding rows).
//
// Activations are quantized to int8 per block of `xblock` input channels of each row (a
// multiple of 32 dividing K; K itself = one scale per row): d = max|x| / 127,
// q = round_half_even(x / d), with the block sum S = sum(q) kept, so that with
// u = q_w + 128 stored:
//   y[m, n] = scale[n] * sum_b d[m, b] * (sum_{k in b} u[n, k] * xq[m, k] - 128 * S[m, b]).
// (Per row cost gemma3 +1.3% bits/char over aten's bf16-activation kernel; blocks of 128
// measured within noise of it.)
// AVX-512 VNNI: vpdpbusd takes the unsigned weights and the signed activations directly
// (u8 x s8, 4 products summed into int32, no saturation: 255 * 127 * 4 per lane per step,
// K up to ~66k before int32 overflows). AVX2 has no such instruction and maddubs saturates
// at s16 for u8 x s8 = 255 * 127 * 2, so that path flips the weights back to signed
// (xor 0x80) and uses the sign trick: maddubs(|w|, sign(x, w)) <= 2 * 127 * 127 fits s16;
// its dot needs no correction. The path is picked at run time (`isa` = 0) with
// __builtin_cpu_supports; the file is built for baseline AVX2 + FMA + F16C.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace tandem_kernels {
namespace {

constexpr int kRows = 16;        // output rows per group
constexpr int kChunkBytes = 64;  // 16 rows x 4 k
constexpr int kMaxMcAvx2 = 4;    // activation rows per pass over a group's weights
constexpr int kMaxMcAvx512 = 8;

#include "cpu_isa.h"

struct QuantRows {
  std::vector<int8_t> q;   // [M, K]
  std::vector<float> d;    // [M, NB]
  std::vector<int32_t> s;  // [M, NB], sum of q per block
  int64_t xblock = 0;      // activation block (k per scale)
  int64_t nb = 0;          // blocks per row
};

struct Problem {
  const uint8_t* qw;
  const float* scales;
  const QuantRows* x;
  int64_t m, n, k;
  const float* bias;  // [N] or nullptr
  float* y32;         // [M, N] when the output is fp32
  at::BFloat16* y16;  // [M, N] when the output is bf16
};

#include "vec8.h"

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline int hsum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// int8 quantization of one block of k values; k % 32 == 0 (checked by the caller).
template <typename T>
void quantize_block(const T* x, int64_t k, int8_t* q, float* d, int32_t* s) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 amax = _mm256_setzero_ps();
  for (int64_t j = 0; j < k; j += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, load8(x + j)));
  const float mx = hmax8(amax);
  const __m256 inv = _mm256_set1_ps(mx > 0.f ? 127.f / mx : 0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i sum = _mm256_setzero_si256();
  for (int64_t j = 0; j < k; j += 32) {
    __m256i v[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x + j + 8 * i), inv));
    sum = _mm256_add_epi32(sum, _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]),
                                                 _mm256_add_epi32(v[2], v[3])));
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]),
                                         _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j), _mm256_permutevar8x32_epi32(p, order));
  }
  *d = mx / 127.f;
  *s = hsum8(sum);
}

template <typename T>
void quantize_rows(const T* x, int64_t m, int64_t k, int64_t xblock, QuantRows& out) {
  const int64_t nb = k / xblock;
  out.xblock = xblock;
  out.nb = nb;
  out.q.resize(m * k);
  out.d.resize(m * nb);
  out.s.resize(m * nb);
  auto body = [&](int64_t begin, int64_t end) {  // over blocks, rows are contiguous
    for (int64_t i = begin; i < end; ++i) {
      quantize_block(x + i * xblock, xblock, out.q.data() + i * xblock, out.d.data() + i,
                     out.s.data() + i);
    }
  };
  if (m * k < 65536) {
    body(0, m * nb);  // a decode step's rows: not worth waking the thread pool
  } else {
    at::parallel_for(0, m * nb, 64, body);
  }
}

// Writes y[m, the 16 rows of group g] (+ bias) from the finished fp32 sums.
inline void store_rows(const Problem& p, int64_t m, int64_t g, const float* out16) {
  const int64_t n0 = g * kRows;
  const int64_t cnt = std::min<int64_t>(kRows, p.n - n0);
  for (int64_t r = 0; r < cnt; ++r) {
    const float v = out16[r] + (p.bias ? p.bias[n0 + r] : 0.f);
    if (p.y16) {
      p.y16[m * p.n + n0 + r] = at::BFloat16(v);
    } else {
      p.y32[m * p.n + n0 + r] = v;
    }
  }
}

#ifndef TANDEM_INT8_PREFETCH_CHUNKS
#define TANDEM_INT8_PREFETCH_CHUNKS 16
#endif

inline void prefetch_ahead(const uint8_t* w) {
  constexpr int ahead = TANDEM_INT8_PREFETCH_CHUNKS;
  if constexpr (ahead > 0) {
    _mm_prefetch(reinterpret_cast<const char*>(w + ahead * kChunkBytes), _MM_HINT_T0);
  }
}

// ---------------------------------------------------------------- scalar reference path
void group_scalar(const Problem& p, int64_t g) {
  const int64_t chunks = p.k / 4;
  const uint8_t* w = p.qw + g * chunks * kChunkBytes;
  for (int64_t m = 0; m < p.m; ++m) {
    const int8_t* xq = p.x->q.data() + m * p.k;
    const int64_t cb = p.x->xblock / 4;  // chunks per activation block
    float out[kRows];
    for (int r = 0; r < kRows; ++r) {
      float acc = 0.f;
      for (int64_t b = 0; b < p.x->nb; ++b) {
        int32_t dot = 0;
        for (int64_t c = b * cb; c < (b + 1) * cb; ++c) {
          for (int t = 0; t < 4; ++t) {
            const int wq = static_cast<int>(w[c * kChunkBytes + 4 * r + t]) - 128;
            dot += wq * xq[4 * c + t];
          }
        }
        acc += p.x->d[m * p.x->nb + b] * static_cast<float>(dot);
      }
      out[r] = p.scales[g * kRows + r] * acc;
    }
    store_rows(p, m, g, out);
  }
}

// ---------------------------------------------------------------- AVX2 path
template <int MC>
void group_avx2_mc(const Problem& p, int64_t g, int64_t m0) {
  const int64_t chunks = p.k / 4;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t cb = p.x->xblock / 4, nb = p.x->nb;
  __m256 facc[MC][2];
  for (int m = 0; m < MC; ++m) facc[m][0] = facc[m][1] = _mm256_setzero_ps();
  const int8_t* xq[MC];
  const float* xd[MC];
  for (int m = 0; m < MC; ++m) {
    xq[m] = p.x->q.data() + (m0 + m) * p.k;
    xd[m] = p.x->d.data() + (m0 + m) * nb;
  }
  const uint8_t* w = p.qw + g * chunks * kChunkBytes;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i acc[MC][2];
    for (int m = 0; m < MC; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    for (int64_t c = b * cb; c < (b + 1) * cb; ++c, w += kChunkBytes) {
      prefetch_ahead(w);
      for (int h = 0; h < 2; ++h) {
        const __m256i ws = _mm256_xor_si256(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * h)), flip);
        const __m256i aw = _mm256_sign_epi8(ws, ws);  // |w|, w in [-127, 127]
        for (int m = 0; m < MC; ++m) {
          int32_t x4;
          std::memcpy(&x4, xq[m] + 4 * c, 4);
          const __m256i sx = _mm256_sign_epi8(_mm256_set1_epi32(x4), ws);
          acc[m][h] = _mm256_add_epi32(acc[m][h],
                                       _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones));
        }
      }
    }
    for (int m = 0; m < MC; ++m) {
      const __m256 dm = _mm256_set1_ps(xd[m][b]);
      for (int h = 0; h < 2; ++h) {
        facc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][h]), dm, facc[m][h]);
      }
    }
  }
  const __m256 s0 = _mm256_loadu_ps(p.scales + g * kRows);
  const __m256 s1 = _mm256_loadu_ps(p.scales + g * kRows + 8);
  for (int m = 0; m < MC; ++m) {
    alignas(32) float out[kRows];
    _mm256_store_ps(out, _mm256_mul_ps(facc[m][0], s0));
    _mm256_store_ps(out + 8, _mm256_mul_ps(facc[m][1], s1));
    store_rows(p, m0 + m, g, out);
  }
}

// ---------------------------------------------------------------- AVX-512 VNNI path
// CH independent accumulators per activation row hide the dpbusd latency at small MC.
template <int MC>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void group_avx512_mc(
    const Problem& p, int64_t g, int64_t m0) {
  constexpr int CH = MC == 1 ? 4 : (MC <= 4 ? 2 : 1);
  const int64_t chunks = p.k / 4;
  const int64_t cb = p.x->xblock / 4, nb = p.x->nb;  // cb: a multiple of 8
  __m512 facc[MC];
  for (int m = 0; m < MC; ++m) facc[m] = _mm512_setzero_ps();
  const int32_t* xq[MC];
  const float* xd[MC];
  const int32_t* xs[MC];
  for (int m = 0; m < MC; ++m) {
    xq[m] = reinterpret_cast<const int32_t*>(p.x->q.data() + (m0 + m) * p.k);
    xd[m] = p.x->d.data() + (m0 + m) * nb;
    xs[m] = p.x->s.data() + (m0 + m) * nb;
  }
  const uint8_t* w = p.qw + g * chunks * kChunkBytes;
  for (int64_t b = 0; b < nb; ++b) {
    __m512i acc[MC][CH];
    for (int m = 0; m < MC; ++m) {
      for (int c = 0; c < CH; ++c) acc[m][c] = _mm512_setzero_si512();
    }
    for (int64_t c = b * cb; c < (b + 1) * cb; c += CH, w += CH * kChunkBytes) {
      for (int j = 0; j < CH; ++j) {
        prefetch_ahead(w + j * kChunkBytes);
        const __m512i raw = _mm512_loadu_si512(w + j * kChunkBytes);
        for (int m = 0; m < MC; ++m) {
          int32_t x4;
          std::memcpy(&x4, xq[m] + c + j, 4);
          acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], raw, _mm512_set1_epi32(x4));
        }
      }
    }
    for (int m = 0; m < MC; ++m) {
      __m512i dot = acc[m][0];
      for (int c = 1; c < CH; ++c) dot = _mm512_add_epi32(dot, acc[m][c]);
      dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(128 * xs[m][b]));
      facc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(xd[m][b]), facc[m]);
    }
  }
  const __m512 sc = _mm512_loadu_ps(p.scales + g * kRows);
  for (int m = 0; m < MC; ++m) {
    alignas(64) float out[kRows];
    _mm512_store_ps(out, _mm512_mul_ps(facc[m], sc));
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
  for (; m0 + kMaxMcAvx512 <= p.m; m0 += kMaxMcAvx512) group_avx512_mc<kMaxMcAvx512>(p, g, m0);
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

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                   int64_t n, const c10::optional<at::Tensor>& bias, int64_t isa,
                   int64_t xblock) {
  TORCH_CHECK(x.dim() == 2, "int8_mm: x must be [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "int8_mm: x must be bf16 or fp32");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 3 &&
                  qweight.size(2) == kChunkBytes,
              "int8_mm: qweight must be uint8 [G, K/4, 64]");
  const int64_t groups = qweight.size(0), k = qweight.size(1) * 4;
  TORCH_CHECK(k % 32 == 0, "int8_mm: K must be a multiple of 32, got ", k);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 &&
                  scales.size(0) == groups * kRows,
              "int8_mm: scales must be fp32 [G * 16]");
  TORCH_CHECK(x.size(1) == k, "int8_mm: x has K=", x.size(1), ", weight has ", k);
  TORCH_CHECK(n > (groups - 1) * kRows && n <= groups * kRows, "int8_mm: n=", n,
              " does not match ", groups, " row groups");
  if (xblock == 0) xblock = k;
  TORCH_CHECK(xblock > 0 && xblock % 32 == 0 && k % xblock == 0,
              "int8_mm: xblock must be a multiple of 32 dividing K=", k, ", got ", xblock);
  const Isa path = resolve_isa(isa, "int8_mm");
  const at::Tensor xc = x.contiguous();
  const at::Tensor qc = qweight.contiguous(), sc = scales.contiguous();
  const int64_t m = xc.size(0);

  QuantRows xq;
  if (xc.scalar_type() == at::kBFloat16) {
    quantize_rows(xc.data_ptr<at::BFloat16>(), m, k, xblock, xq);
  } else {
    quantize_rows(xc.data_ptr<float>(), m, k, xblock, xq);
  }
  at::Tensor bias32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "int8_mm: bias must be [N]");
    bias32 = bias->to(at::kFloat).contiguous();
  }
  const bool out16 = xc.scalar_type() == at::kBFloat16;
  at::Tensor y = at::empty({m, n}, xc.options());
  Problem p{qc.data_ptr<uint8_t>(),
            sc.data_ptr<float>(),
            &xq,
            m,
            n,
            k,
            bias32.defined() ? bias32.data_ptr<float>() : nullptr,
            out16 ? nullptr : y.data_ptr<float>(),
            out16 ? y.data_ptr<at::BFloat16>() : nullptr};
  if (m > 0) {
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
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

// Dequantize to fp32 [N, K] (for tests and dequantized()).
at::Tensor int8_dequant(const at::Tensor& qweight, const at::Tensor& scales, int64_t n) {
  const at::Tensor qc = qweight.contiguous(), sc = scales.contiguous();
  const int64_t groups = qc.size(0), chunks = qc.size(1), k = chunks * 4;
  TORCH_CHECK(n > (groups - 1) * kRows && n <= groups * kRows, "int8_dequant: bad n");
  at::Tensor out = at::empty({n, k}, qc.options().dtype(at::kFloat));
  const uint8_t* w = qc.data_ptr<uint8_t>();
  const float* s = sc.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t g = row / kRows, r = row % kRows;
      for (int64_t c = 0; c < chunks; ++c) {
        for (int t = 0; t < 4; ++t) {
          const int q = static_cast<int>(w[(g * chunks + c) * kChunkBytes + 4 * r + t]) - 128;
          o[row * k + 4 * c + t] = s[row] * static_cast<float>(q);
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_kernels, lib) {
  lib.def("int8_mm(Tensor x, Tensor qweight, Tensor scales, int n, Tensor? bias=None, "
          "int isa=0, int xblock=0) -> Tensor");
  lib.def("int8_dequant(Tensor qweight, Tensor scales, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_kernels, CPU, lib) {
  lib.impl("int8_mm", &int8_mm);
  lib.impl("int8_dequant", &int8_dequant);
}

TORCH_LIBRARY_IMPL(tandem_kernels, Autograd, lib) {
  lib.impl("int8_mm", torch::CppFunction::makeFallthrough());
  lib.impl("int8_dequant", torch::CppFunction::makeFallthrough());
}

}  // namespace tandem_kernels
