// Decode attention for CPU: a few new query rows per sequence over that sequence's KV cache.
//
// One kernel for both decode paths (the compiled step and the eager reference), so the two
// compute the same arithmetic and give the same bits: inductor's own loops and aten's
// matmul/SDPA each sum in their own order.
//
//   out[t, h] = sum_j softmax_j(scale * q[t, h] . k[slot[t], h / G, j]) v[slot[t], h / G, j]
//   over j in [max(0, pos[t] - window + 1), pos[t]]   (window < 0: no window)
//
// q [T, H, hd] (bf16 or fp32), k and v [S, KVH, L, hd] of q's dtype with any strides but a
// unit last one (a slot pool, or one sequence's cache as S = 1). Everything is fp32 inside:
// the dot products in 8-lane FMA chunks summed in a fixed order, a max-subtracted softmax
// with a polynomial exp (max relative error ~2e-7), one rounding to q's dtype at the end.
// Only positions a row sees are read, so whatever other positions hold is never touched.
// Work is split over (row, kv head) pairs; each pair's arithmetic does not depend on the
// split or on the other rows, so a row's result is the same alone or batched.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace tandem_kernels {
namespace {

#include "vec8.h"

inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(float x) { return x; }

// exp(x) for x <= 0 (softmax after subtracting the max): 2^n * p(r), x = n ln2 + r,
// |r| <= ln2 / 2, p a degree-6 Taylor polynomial; below -87 the result is 0.
inline __m256 exp_neg(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// Scores of one (row, kv head) pair: s[g * n + j] = q[g] . k[first + j] for its G query
// heads. G > 0: that many heads held in registers; G = 0: any number, one at a time.
template <typename T, int G>
void scores_of(const float* qf, int64_t group, const T* kbase, int64_t ks2, int64_t first,
               int64_t n, int64_t hd, float* s) {
  const int64_t hd8 = hd / 8 * 8;
  constexpr int R = G > 0 ? G : 1;
  for (int64_t g0 = 0; g0 < group; g0 += R) {
    for (int64_t j = 0; j < n; ++j) {
      const T* kr = kbase + (first + j) * ks2;
      __m256 a[R];
      for (int r = 0; r < R; ++r) a[r] = _mm256_setzero_ps();
      for (int64_t d = 0; d < hd8; d += 8) {
        const __m256 kv = load8(kr + d);
        for (int r = 0; r < R; ++r) {
          a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + (g0 + r) * hd + d), kv, a[r]);
        }
      }
      for (int r = 0; r < R; ++r) {
        float sum = hsum8(a[r]);
        for (int64_t d = hd8; d < hd; ++d) sum += qf[(g0 + r) * hd + d] * to_float(kr[d]);
        s[(g0 + r) * n + j] = sum;
      }
    }
  }
}

// acc[g] = sum_j p[g * n + j] v[first + j] for the pair's heads: positions in order, each
// value row read once (contiguous) into all heads' accumulators (in L1).
template <typename T>
void values_of(const float* p, int64_t group, const T* vbase, int64_t vs2, int64_t first,
               int64_t n, int64_t hd, float* acc) {
  const int64_t hd8 = hd / 8 * 8;
  std::fill(acc, acc + group * hd, 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    const T* vr = vbase + (first + j) * vs2;
    for (int64_t d = 0; d < hd8; d += 8) {
      const __m256 vv = load8(vr + d);
      for (int64_t g = 0; g < group; ++g) {
        float* a = acc + g * hd + d;
        _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_broadcast_ss(p + g * n + j), vv, _mm256_loadu_ps(a)));
      }
    }
    for (int64_t d = hd8; d < hd; ++d) {
      for (int64_t g = 0; g < group; ++g) acc[g * hd + d] += p[g * n + j] * to_float(vr[d]);
    }
  }
}

// Softmax of each head's n scores in place (unnormalised exp); returns 1 / sum per head.
inline void softmax_rows(float* scores, int64_t group, int64_t n, float* inv) {
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * n;
    float mx = s[0];
    for (int64_t j = 1; j < n; ++j) mx = std::max(mx, s[j]);
    const __m256 m8 = _mm256_set1_ps(mx);
    __m256 sum8 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(s + j), m8));
      _mm256_storeu_ps(s + j, e);
      sum8 = _mm256_add_ps(sum8, e);
    }
    float sum = hsum8(sum8);
    if (j < n) {  // the tail through the same vector exp
      alignas(32) float tail[8] = {0};
      for (int64_t i = j; i < n; ++i) tail[i - j] = s[i] - mx;
      alignas(32) float e[8];
      _mm256_store_ps(e, exp_neg(_mm256_load_ps(tail)));
      for (int64_t i = j; i < n; ++i) {
        s[i] = e[i - j];
        sum += e[i - j];
      }
    }
    inv[g] = 1.0f / sum;
  }
}

template <typename T, int G>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* slot,
            const int64_t* pos, double scale, int64_t window, at::Tensor& out) {
  const int64_t rows = q.size(0), heads = q.size(1), hd = q.size(2);
  const int64_t kv_heads = k.size(1), group = heads / kv_heads;
  const T* qp = q.data_ptr<T>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * hd), acc(group * hd), inv(group), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / kv_heads, kh = item % kv_heads;
      const int64_t last = pos[t];
      const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      const int64_t n = last - first + 1;
      for (int64_t g = 0; g < group; ++g) {
        const T* src = qp + t * qs0 + (kh * group + g) * qs1;
        for (int64_t d = 0; d < hd; ++d) qf[g * hd + d] = to_float(src[d]) * sc;
      }
      scores.resize(group * n);
      scores_of<T, G>(qf.data(), group, kp + slot[t] * k.stride(0) + kh * k.stride(1),
                      k.stride(2), first, n, hd, scores.data());
      softmax_rows(scores.data(), group, n, inv.data());
      values_of<T>(scores.data(), group, vp + slot[t] * v.stride(0) + kh * v.stride(1),
                      v.stride(2), first, n, hd, acc.data());
      for (int64_t g = 0; g < group; ++g) {
        T* dst = op + (t * heads + kh * group + g) * hd;
        for (int64_t d = 0; d < hd; ++d) dst[d] = static_cast<T>(acc[g * hd + d] * inv[g]);
      }
    }
  });
}

template <typename T>
void attend_any(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const int64_t* slot, const int64_t* pos, double scale, int64_t window,
                at::Tensor& out) {
  switch (q.size(1) / k.size(1)) {  // query heads per kv head, in registers
    case 1: return attend<T, 1>(q, k, v, slot, pos, scale, window, out);
    case 2: return attend<T, 2>(q, k, v, slot, pos, scale, window, out);
    case 3: return attend<T, 3>(q, k, v, slot, pos, scale, window, out);
    case 4: return attend<T, 4>(q, k, v, slot, pos, scale, window, out);
    case 6: return attend<T, 6>(q, k, v, slot, pos, scale, window, out);
    case 7: return attend<T, 7>(q, k, v, slot, pos, scale, window, out);
    case 8: return attend<T, 8>(q, k, v, slot, pos, scale, window, out);
    default: return attend<T, 0>(q, k, v, slot, pos, scale, window, out);
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& slot, const at::Tensor& pos, double scale,
                            int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4,
              "decode_attention: q [T, H, hd], k and v [S, KVH, L, hd]");
  TORCH_CHECK(k.sizes() == v.sizes(), "decode_attention: k and v differ in shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "decode_attention: q, k, v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat,
              "decode_attention: bf16 or fp32");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k, v need unit last stride");
  const int64_t rows = q.size(0), heads = q.size(1);
  TORCH_CHECK(k.size(3) == q.size(2), "decode_attention: head_dim differs");
  TORCH_CHECK(heads % k.size(1) == 0, "decode_attention: heads not a multiple of kv heads");
  const at::Tensor sl = slot.to(at::kLong).contiguous(), ps = pos.to(at::kLong).contiguous();
  TORCH_CHECK(sl.numel() == rows && ps.numel() == rows, "decode_attention: slot/pos per row");
  const int64_t* slp = sl.data_ptr<int64_t>();
  const int64_t* pp = ps.data_ptr<int64_t>();
  for (int64_t t = 0; t < rows; ++t) {
    TORCH_CHECK(slp[t] >= 0 && slp[t] < k.size(0), "decode_attention: slot out of range");
    TORCH_CHECK(pp[t] >= 0 && pp[t] < k.size(2), "decode_attention: position out of range");
  }
  const at::Tensor qc = q.stride(2) == 1 ? q : q.contiguous();  // rows/heads read strided
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (rows == 0) return out;
  if (q.scalar_type() == at::kBFloat16) {
    attend_any<at::BFloat16>(qc, k, v, slp, pp, scale, window, out);
  } else {
    attend_any<float>(qc, k, v, slp, pp, scale, window, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_kernels, lib) {
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor slot, Tensor pos, float scale, "
          "int window=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_kernels, CPU, lib) { lib.impl("decode_attention", &decode_attention); }

TORCH_LIBRARY_IMPL(tandem_kernels, Autograd, lib) {
  lib.impl("decode_attention", torch::CppFunction::makeFallthrough());
}

}  // namespace tandem_kernels
