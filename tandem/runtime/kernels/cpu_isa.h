// Which instruction set a Tandem CPU kernel runs on: shared by int4_gemv.cpp and
// int8_gemv.cpp (one extension). Included inside each file's anonymous namespace.
// Note: torch's JIT build rebuilds when a .cpp changes; touch one after editing this file.
#pragma once

enum Isa : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

inline bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

inline bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

// `isa` as asked (kAuto: the best this CPU has); an error, naming `op`, for one it lacks.
inline Isa resolve_isa(int64_t isa, const char* op) {
  if (isa == kAuto) return has_avx512() ? kAvx512 : (has_avx2() ? kAvx2 : kScalar);
  TORCH_CHECK(isa >= kScalar && isa <= kAvx512, op, ": unknown isa ", isa);
  TORCH_CHECK(isa != kAvx2 || has_avx2(), op, ": this CPU has no AVX2/FMA/F16C");
  TORCH_CHECK(isa != kAvx512 || has_avx512(), op, ": this CPU has no AVX-512 VNNI");
  return static_cast<Isa>(isa);
}
