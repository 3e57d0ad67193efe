// The Python module semcorr_fast._C. The kernels themselves register with the torch dispatcher
// (TORCH_LIBRARY_FRAGMENT(semcorr_ext, ...) in each csrc/<op>/ folder); this file only says how
// the extension was built, for `semcorr info` and backend resolution.
#include <torch/extension.h>

#include "common/dispatch.h"
#include "common/tile_gemm.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "semcorr_fast native kernels (registered as torch.ops.semcorr_ext.*)";
  m.def("build_info", []() {
    pybind11::dict d;
#ifdef WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
#if defined(__AVX512F__)
    d["simd"] = "avx512";
#elif defined(__AVX2__)
    d["simd"] = "avx2";
#else
    d["simd"] = "baseline";
#endif
    d["gemm"] = semcorr::gemm_backend_name();
    return d;
  });
  m.def("cpu_bf16_gemm", []() { return semcorr::gemm::bf16_kernel_name(); },
        "The CPU bf16 tile GEMM in use: brgemm (oneDNN, AMX), avx512bf16 (ours) or off (fp32 sgemm).");
  m.def("set_cpu_bf16_gemm", [](const std::string& want) { return semcorr::gemm::set_bf16_kernel(want); },
        "Choose the CPU bf16 tile GEMM (auto | brgemm | avx512bf16 | off); returns the one in use, "
        "'off' when the one asked for is not available on this CPU.");
}

// The op library. Every op folder adds its schemas with TORCH_LIBRARY_FRAGMENT(semcorr_ext, m).
TORCH_LIBRARY(semcorr_ext, m) {}
