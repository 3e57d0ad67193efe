// Small shared helpers: dtype dispatch and the accumulation type of each input dtype.
#pragma once
#include <string>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace semcorr {

// fp32 accumulation for fp32/bf16/fp16 inputs, fp64 for fp64 (the gradcheck path).
template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Which GEMM the CPU engine found at load time ("mkl" or "loops"), for `semcorr info`.
std::string gemm_backend_name();

}  // namespace semcorr

// SC_DISPATCH_FLOATING(dtype, NAME, ...) runs the lambda body with scalar_t bound to the C++ type.
#define SC_DISPATCH_FLOATING(TYPE, NAME, ...)                                                    \
  [&] {                                                                                          \
    switch (TYPE) {                                                                              \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                         \
      case at::kDouble: { using scalar_t = double; return __VA_ARGS__(); }                       \
      case at::kBFloat16: { using scalar_t = c10::BFloat16; return __VA_ARGS__(); }              \
      case at::kHalf: { using scalar_t = c10::Half; return __VA_ARGS__(); }                      \
      default: TORCH_CHECK(false, NAME, ": unsupported dtype ", TYPE,                            \
                           " (expected float32, float64, bfloat16 or float16)");                 \
    }                                                                                            \
  }()
