#include "common/tile_gemm.h"

#include <dlfcn.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define SEMCORR_AVX512BF16 1
#endif

#include "common/dispatch.h"

namespace semcorr {
namespace gemm {
namespace {

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                          const float*, const int*, const float*, const int*, const float*, float*,
                          const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*, double*,
                          const int*);

// torch's CPU library exports the Fortran BLAS symbols of the MKL it links; look them up once.
sgemm_fn find_sgemm() {
  static sgemm_fn f = reinterpret_cast<sgemm_fn>(dlsym(RTLD_DEFAULT, "sgemm_"));
  return f;
}
dgemm_fn find_dgemm() {
  static dgemm_fn f = reinterpret_cast<dgemm_fn>(dlsym(RTLD_DEFAULT, "dgemm_"));
  return f;
}

template <typename acc_t>
void loops(char ta, char tb, int64_t m, int64_t n, int64_t k, acc_t alpha, const acc_t* A,
           int64_t lda, const acc_t* B, int64_t ldb, acc_t beta, acc_t* C, int64_t ldc) {
  // Reference column-major GEMM, used only when no BLAS was found.
  auto a = [&](int64_t i, int64_t p) { return ta == 'N' ? A[i + p * lda] : A[p + i * lda]; };
  auto b = [&](int64_t p, int64_t j) { return tb == 'N' ? B[p + j * ldb] : B[j + p * ldb]; };
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < m; ++i) {
      acc_t s = 0;
      for (int64_t p = 0; p < k; ++p) s += a(i, p) * b(p, j);
      acc_t& c = C[i + j * ldc];
      c = alpha * s + (beta == acc_t(0) ? acc_t(0) : beta * c);
    }
}

}  // namespace

bool have_blas() { return find_sgemm() != nullptr && find_dgemm() != nullptr; }

void colmajor(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* A,
              int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (auto f = find_sgemm()) {
    const int M = int(m), N = int(n), K = int(k), LA = int(lda), LB = int(ldb), LC = int(ldc);
    const char TA[2] = {ta, 0}, TB[2] = {tb, 0};
    f(TA, TB, &M, &N, &K, &alpha, A, &LA, B, &LB, &beta, C, &LC);
  } else {
    loops<float>(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

void colmajor(char ta, char tb, int64_t m, int64_t n, int64_t k, double alpha, const double* A,
              int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (auto f = find_dgemm()) {
    const int M = int(m), N = int(n), K = int(k), LA = int(lda), LB = int(ldb), LC = int(ldc);
    const char TA[2] = {ta, 0}, TB[2] = {tb, 0};
    f(TA, TB, &M, &N, &K, &alpha, A, &LA, B, &LB, &beta, C, &LC);
  } else {
    loops<double>(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

// ---- bf16 score tiles -------------------------------------------------------------------------
// Two kernels read the same packed layout (targets [Cp/2][BN][2], VNNI-2):
//  * oneDNN's brgemm through ATen (`cpublas::brgemm`), where ATen can pack: AMX CPUs;
//  * our own AVX512-BF16 micro-kernel (`vdpbf16ps`: two bf16 products summed into an fp32 lane),
//    for AVX-512 CPUs without AMX (AMD Zen 4 and later, Cooper Lake), where ATen has no brgemm.
// SEMCORR_CPU_BF16_GEMM = auto (default: brgemm, else our kernel) | brgemm | avx512bf16 | off
// (off: bf16 inputs are converted to fp32 and go through sgemm, the portable path).
namespace {

enum class Bf16Kernel { kNone, kBrgemm, kAvx512 };

bool cpu_has_avx512bf16() {
#if defined(SEMCORR_AVX512BF16)
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

Bf16Kernel choose_bf16_kernel(const std::string& want) {
  const bool brg = at::native::cpublas::could_pack(c10::kBFloat16);
  const bool own = cpu_has_avx512bf16();
  if (want == "off") return Bf16Kernel::kNone;
  if (want == "brgemm") return brg ? Bf16Kernel::kBrgemm : Bf16Kernel::kNone;
  if (want == "avx512bf16") return own ? Bf16Kernel::kAvx512 : Bf16Kernel::kNone;
  TORCH_CHECK(want == "auto", "SEMCORR_CPU_BF16_GEMM / set_cpu_bf16_gemm: expected one of auto, brgemm, "
              "avx512bf16, off; got '", want, "'");
  return brg ? Bf16Kernel::kBrgemm : own ? Bf16Kernel::kAvx512 : Bf16Kernel::kNone;
}

std::atomic<int> g_bf16_kernel{-1};  // -1: not chosen yet (read SEMCORR_CPU_BF16_GEMM on first use)

Bf16Kernel bf16_kernel() {
  int k = g_bf16_kernel.load(std::memory_order_relaxed);
  if (k < 0) {
    const char* v = std::getenv("SEMCORR_CPU_BF16_GEMM");
    k = int(choose_bf16_kernel((v && *v) ? v : "auto"));
    g_bf16_kernel.store(k, std::memory_order_relaxed);
  }
  return Bf16Kernel(k);
}

const char* bf16_kernel_name(Bf16Kernel k) {
  return k == Bf16Kernel::kBrgemm ? "brgemm" : k == Bf16Kernel::kAvx512 ? "avx512bf16" : "off";
}

#if defined(SEMCORR_AVX512BF16)
// One MR×(16·NV) block of C over the whole reduction: MR·NV fp32 accumulators stay in registers;
// per reduction pair, NV vectors of B are loaded once and each of the MR rows of A is broadcast once
// (one 32-bit load of its pair). MR = 6, NV = 4 uses 24 + 4 + 1 of the 32 zmm registers. With ACC the
// accumulators start from C (C += A·B), else from zero (C = A·B).
template <int MR, int NV, bool ACC>
inline void bf16_micro(int64_t K2, const uint16_t* A, int64_t lda, const uint32_t* B, int64_t ldb,
                       float* S, int64_t lds) {
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = ACC ? _mm512_loadu_ps(S + i * lds + 16 * j) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K2; ++k) {
    __m512bh b[NV];
    for (int j = 0; j < NV; ++j) b[j] = (__m512bh)_mm512_loadu_si512(B + k * ldb + 16 * j);
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, A + i * lda + 2 * k, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, b[j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(S + i * lds + 16 * j, acc[i][j]);
}

template <int NV, bool ACC>
void bf16_panel(int64_t m, int64_t K2, const uint16_t* A, int64_t lda, const uint32_t* B, int64_t ldb,
                float* S, int64_t lds) {
  constexpr int MR = 6;
  int64_t i = 0;
  for (; i + MR <= m; i += MR) bf16_micro<MR, NV, ACC>(K2, A + i * lda, lda, B, ldb, S + i * lds, lds);
  const uint16_t* a = A + i * lda;
  float* s = S + i * lds;
  switch (m - i) {
    case 5: bf16_micro<5, NV, ACC>(K2, a, lda, B, ldb, s, lds); break;
    case 4: bf16_micro<4, NV, ACC>(K2, a, lda, B, ldb, s, lds); break;
    case 3: bf16_micro<3, NV, ACC>(K2, a, lda, B, ldb, s, lds); break;
    case 2: bf16_micro<2, NV, ACC>(K2, a, lda, B, ldb, s, lds); break;
    case 1: bf16_micro<1, NV, ACC>(K2, a, lda, B, ldb, s, lds); break;
    default: break;
  }
}

// C(m×N) (+)= A(m×Kp) · Bpacked([Kp/2][N][2]); N a multiple of 32 (panels of 64 columns, then 32).
template <bool ACC>
void avx512bf16_gemm(int64_t m, int64_t N, int64_t Kp, const c10::BFloat16* A, int64_t lda,
                     const c10::BFloat16* Bp, float* C, int64_t ldc) {
  const auto* a = reinterpret_cast<const uint16_t*>(A);
  const auto* b = reinterpret_cast<const uint32_t*>(Bp);
  const int64_t K2 = Kp / 2;
  int64_t j = 0;
  for (; j + 64 <= N; j += 64) bf16_panel<4, ACC>(m, K2, a, lda, b + j, N, C + j, ldc);
  for (; j + 32 <= N; j += 32) bf16_panel<2, ACC>(m, K2, a, lda, b + j, N, C + j, ldc);
  TORCH_CHECK(j == N, "avx512bf16_gemm: N must be a multiple of 32, got ", N);
}
#endif

}  // namespace

std::string bf16_kernel_name() { return bf16_kernel_name(bf16_kernel()); }
std::string set_bf16_kernel(const std::string& want) {
  g_bf16_kernel.store(int(choose_bf16_kernel(want)), std::memory_order_relaxed);
  return bf16_kernel_name();
}

bool can_pack(c10::ScalarType dt) {
  if (dt == c10::kBFloat16) return bf16_kernel() != Bf16Kernel::kNone;
  if (dt != c10::kHalf) return false;
  static const bool hf = at::native::cpublas::could_pack(c10::kHalf);
  return hf;
}

void brgemm_scores(int64_t m, int64_t BN, int64_t Cp, const c10::BFloat16* A, int64_t lda,
                   const c10::BFloat16* Bp, float* S) {
#if defined(SEMCORR_AVX512BF16)
  if (bf16_kernel() == Bf16Kernel::kAvx512) return avx512bf16_gemm<false>(m, BN, Cp, A, lda, Bp, S, BN);
#endif
  at::native::cpublas::brgemm(m, BN, Cp, lda, BN, BN, false, A, Bp, S, true);
}
bool bf16_gemm_acc(int64_t m, int64_t N, int64_t Kp, const c10::BFloat16* A, int64_t lda,
                   const c10::BFloat16* Bp, float* C, int64_t ldc) {
#if defined(SEMCORR_AVX512BF16)
  if (bf16_kernel() != Bf16Kernel::kAvx512 || N % 32 != 0 || Kp % 2 != 0) return false;
  avx512bf16_gemm<true>(m, N, Kp, A, lda, Bp, C, ldc);
  return true;
#else
  return false;
#endif
}
bool have_bf16_gemm_acc() { return bf16_kernel() == Bf16Kernel::kAvx512; }

void brgemm_scores(int64_t m, int64_t BN, int64_t Cp, const c10::Half* A, int64_t lda,
                   const c10::Half* Bp, float* S) {
  at::native::cpublas::brgemm(m, BN, Cp, lda, BN, BN, false, A, Bp, S, true);
}
void brgemm_release() {
  if (bf16_kernel() == Bf16Kernel::kBrgemm || at::native::cpublas::could_pack(c10::kHalf))
    at::native::cpublas::brgemm_release(true);
}

}  // namespace gemm

std::string gemm_backend_name() {
  std::string s = gemm::have_blas() ? "blas(sgemm_/dgemm_)" : "loops";
  if (gemm::can_pack(c10::kBFloat16)) s += "+bf16:" + gemm::bf16_kernel_name();
  if (gemm::can_pack(c10::kHalf)) s += "+fp16:brgemm";
  if (gemm::can_pack(c10::kHalf)) s += "+brgemm-fp16";
  return s;
}

}  // namespace semcorr
