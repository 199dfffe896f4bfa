// RMSNorm for CPU, one kernel for both decode paths (the compiled step and the eager
// reference): inductor's decomposition and aten's fused rms_norm sum the squares in
// different orders, and the last-bit difference now and then rounds an output element to
// another bf16 value, which int8 activations turn into other tokens.
//
//   y = x / sqrt(mean(x^2) + eps) * (unit_offset ? 1 + w : w)
//
// over the last dimension of x (bf16 or fp32, any leading shape), fp32 inside: the squares
// summed in four 8-lane accumulators in a fixed order, one rounding to x's dtype at the end.
// Each row's arithmetic is the same whatever rows come with it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace tandem_kernels {
namespace {

#include "vec8.h"

// Row r of x starts at x + r * stride (unit stride inside a row); y is contiguous. The weight
// (W: bf16 or fp32) is read as it is stored, so a call allocates nothing but y.
template <typename T, typename W>
void norm_rows(const T* x, int64_t stride, const W* w, bool unit_offset, T* y, int64_t rows,
               int64_t dim, float eps) {
  const int64_t d32 = dim / 32 * 32, d8 = dim / 8 * 8;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * stride;
      __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
      int64_t d = 0;
      for (; d < d32; d += 32) {
        for (int i = 0; i < 4; ++i) {
          const __m256 v = load8(xr + d + 8 * i);
          a[i] = _mm256_fmadd_ps(v, v, a[i]);
        }
      }
      for (; d < d8; d += 8) {
        const __m256 v = load8(xr + d);
        a[0] = _mm256_fmadd_ps(v, v, a[0]);
      }
      float sum = hsum8(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
      for (; d < dim; ++d) {
        const float v = static_cast<float>(xr[d]);
        sum += v * v;
      }
      const float inv = 1.0f / std::sqrt(sum / static_cast<float>(dim) + eps);
      T* yr = y + r * dim;
      const float offset = unit_offset ? 1.0f : 0.0f;
      for (int64_t i = 0; i < dim; ++i) {
        yr[i] = static_cast<T>(static_cast<float>(xr[i]) * inv * (offset + static_cast<float>(w[i])));
      }
    }
  });
}

template <typename T>
void norm_any_weight(const at::Tensor& x, int64_t stride, const at::Tensor& w, bool unit_offset,
                     at::Tensor& y, int64_t rows, int64_t dim, float eps) {
  if (w.scalar_type() == at::kBFloat16) {
    norm_rows(x.data_ptr<T>(), stride, w.data_ptr<at::BFloat16>(), unit_offset, y.data_ptr<T>(),
              rows, dim, eps);
  } else {
    norm_rows(x.data_ptr<T>(), stride, w.data_ptr<float>(), unit_offset, y.data_ptr<T>(), rows,
              dim, eps);
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool unit_offset) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "rms_norm: x must be bf16 or fp32");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "rms_norm: weight must be [x.size(-1)]");
  const int64_t dim = x.size(-1), rows = dim == 0 ? 0 : x.numel() / dim;
  // Rows evenly strided (e.g. q heads sliced out of a fused qkv [T, H + 2 KVH, hd]) are read
  // in place; anything else is made contiguous first.
  const bool in_place = x.dim() == 2 && x.stride(1) == 1;
  const at::Tensor xc = in_place ? x : x.contiguous();
  const int64_t stride = in_place ? x.stride(0) : dim;
  at::Tensor w = weight;
  if (w.scalar_type() != at::kBFloat16 && w.scalar_type() != at::kFloat) w = w.to(at::kFloat);
  w = w.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (rows == 0) return y;
  const float e = static_cast<float>(eps);
  if (x.scalar_type() == at::kBFloat16) {
    norm_any_weight<at::BFloat16>(xc, stride, w, unit_offset, y, rows, dim, e);
  } else {
    norm_any_weight<float>(xc, stride, w, unit_offset, y, rows, dim, e);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_kernels, lib) {
  lib.def("rms_norm(Tensor x, Tensor weight, float eps, bool unit_offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_kernels, CPU, lib) { lib.impl("rms_norm", &rms_norm); }

TORCH_LIBRARY_IMPL(tandem_kernels, Autograd, lib) {
  lib.impl("rms_norm", torch::CppFunction::makeFallthrough());
}

}  // namespace tandem_kernels
