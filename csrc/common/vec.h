// Vectorized<T> from ATen, compiled for the instruction set this translation unit targets.
// ATen's headers pick their SIMD width from CPU_CAPABILITY_* macros; we derive them from the
// compiler's own target macros (setup.py builds with -march=$SEMCORR_CPU_ARCH, default native).
// Include this header before any other ATen header in a kernel file.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512 1
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2 1
#define CPU_CAPABILITY AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace semcorr {
using at::vec::Vectorized;

// exp used by every softmax epilogue: the fast polynomial for float (~1e-6 relative), the accurate
// one for double (fp64 is the gradcheck path).
inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }
}  // namespace semcorr
