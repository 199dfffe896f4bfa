// 8-lane fp32 helpers (AVX2) shared by int8_gemv.cpp, attention.cpp and norm.cpp. Included
// inside each file's anonymous namespace, after <immintrin.h> and <c10/util/BFloat16.h>.
// Note: torch's JIT build rebuilds when a .cpp changes; touch one after editing this file.
#pragma once

// 8 bf16 (or fp32) values from memory as fp32 lanes.
inline __m256 load8(const at::BFloat16* src) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline __m256 load8(const float* src) { return _mm256_loadu_ps(src); }

// The sum of the 8 lanes, in a fixed order.
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
