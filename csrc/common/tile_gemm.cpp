#include "common/tile_gemm.h"

#include <dlfcn.h>

#include <string>

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

bool can_pack(c10::ScalarType dt) {
  if (dt != c10::kBFloat16 && dt != c10::kHalf) return false;
  static const bool bf = at::native::cpublas::could_pack(c10::kBFloat16);
  static const bool hf = at::native::cpublas::could_pack(c10::kHalf);
  return dt == c10::kBFloat16 ? bf : hf;
}

void brgemm_scores(int64_t m, int64_t BN, int64_t Cp, const c10::BFloat16* A, int64_t lda,
                   const c10::BFloat16* Bp, float* S) {
  at::native::cpublas::brgemm(m, BN, Cp, lda, BN, BN, false, A, Bp, S, true);
}
void brgemm_scores(int64_t m, int64_t BN, int64_t Cp, const c10::Half* A, int64_t lda,
                   const c10::Half* Bp, float* S) {
  at::native::cpublas::brgemm(m, BN, Cp, lda, BN, BN, false, A, Bp, S, true);
}
void brgemm_release() { at::native::cpublas::brgemm_release(true); }

}  // namespace gemm

std::string gemm_backend_name() {
  std::string s = gemm::have_blas() ? "blas(sgemm_/dgemm_)" : "loops";
  if (gemm::can_pack(c10::kBFloat16)) s += "+brgemm-bf16";
  if (gemm::can_pack(c10::kHalf)) s += "+brgemm-fp16";
  return s;
}

}  // namespace semcorr
