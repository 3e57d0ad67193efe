// The tile GEMMs of the CPU streaming engine.
//
// fp32/fp64 use the BLAS that torch itself links (MKL's sgemm_/dgemm_, found at load time with
// dlsym so the extension links against nothing extra); bf16/fp16 use ATen's oneDNN micro-kernel
// `at::native::cpublas::brgemm` (AMX / AVX512-BF16 on CPUs that have them) on target tiles packed
// once per call in the VNNI layout it expects. When neither exists, a plain loop GEMM keeps the
// results right (and slow); `semcorr info` says which one is in use.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <ATen/native/CPUBlas.h>
#include <c10/core/ScalarType.h>

namespace semcorr::gemm {

// Column-major GEMM C(m×n) = alpha·op(A)·op(B) + beta·C, op = 'N' or 'T' (Fortran BLAS semantics).
void colmajor(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* A,
              int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void colmajor(char ta, char tb, int64_t m, int64_t n, int64_t k, double alpha, const double* A,
              int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc);
bool have_blas();

// Row-major helpers, in the words of the engine (all matrices row-major, ld = row stride):
// S(m×n) = A(m×K) · B(n×K)ᵀ                              (score tile)
template <typename acc_t>
inline void scores(int64_t m, int64_t n, int64_t K, const acc_t* A, int64_t lda, const acc_t* B,
                   int64_t ldb, acc_t* S, int64_t lds) {
  colmajor('T', 'N', n, m, K, acc_t(1), B, ldb, A, lda, acc_t(0), S, lds);
}
// D(m×K) += P(m×n) · B(n×K)                              (dQ from a dS tile)
template <typename acc_t>
inline void acc_pb(int64_t m, int64_t n, int64_t K, const acc_t* P, int64_t ldp, const acc_t* B,
                   int64_t ldb, acc_t* D, int64_t ldd) {
  colmajor('N', 'N', K, m, n, acc_t(1), B, ldb, P, ldp, acc_t(1), D, ldd);
}
// E(n×K) += P(m×n)ᵀ · A(m×K)                             (dK from a dS tile)
template <typename acc_t>
inline void acc_pta(int64_t m, int64_t n, int64_t K, const acc_t* P, int64_t ldp, const acc_t* A,
                    int64_t lda, acc_t* E, int64_t lde) {
  colmajor('N', 'T', K, n, m, acc_t(1), A, lda, P, ldp, acc_t(1), E, lde);
}

// bf16/fp16 score tiles from targets packed per tile as [Cp/2][BN][2] (VNNI-2): oneDNN's brgemm
// (AMX), or for bf16 our AVX512-BF16 micro-kernel (tile_gemm.cpp). can_pack: one of them exists.
bool can_pack(c10::ScalarType dt);
// The bf16 kernel in use: "brgemm", "avx512bf16" or "off" (bf16 → fp32 copies → sgemm). Chosen by
// SEMCORR_CPU_BF16_GEMM (auto | brgemm | avx512bf16 | off) on first use; set_bf16_kernel overrides
// it (for tests and benchmarks; not while an op runs) and returns what it got.
std::string bf16_kernel_name();
std::string set_bf16_kernel(const std::string& want);
void brgemm_scores(int64_t m, int64_t BN, int64_t Cp, const c10::BFloat16* A, int64_t lda,
                   const c10::BFloat16* Bpacked, float* S);
void brgemm_scores(int64_t m, int64_t BN, int64_t Cp, const c10::Half* A, int64_t lda,
                   const c10::Half* Bpacked, float* S);
void brgemm_release();
// C(m×N) += A(m×Kp) · Bp, Bp packed [Kp/2][N][2] (pairs along the reduction), fp32 accumulation, on
// our AVX512-BF16 kernel; N a multiple of 32, Kp even. Returns false (and does nothing) where that
// kernel is not the one in use: the bf16 backward's gradient GEMMs (stream_engine.h) then take fp32.
bool bf16_gemm_acc(int64_t m, int64_t N, int64_t Kp, const c10::BFloat16* A, int64_t lda,
                   const c10::BFloat16* Bp, float* C, int64_t ldc);
bool have_bf16_gemm_acc();
// Pack rows [0, n) of X (n×C row-major) as the B operand of a product that reduces over those rows:
// [BNp/2][C][2] with out[(k2·C + c)·2 + e] = X[2·k2 + e][c], zero for rows ≥ n.
template <typename T>
inline void pack_rows_vnni(const T* X, int64_t n, int64_t C, int64_t BNp, T* out) {
  static_assert(sizeof(T) == 2, "VNNI-2 packing is for 16-bit types");
  const uint16_t* src = reinterpret_cast<const uint16_t*>(X);
  uint16_t* dst = reinterpret_cast<uint16_t*>(out);
  for (int64_t k2 = 0; k2 < BNp / 2; ++k2) {
    const int64_t r0 = 2 * k2, r1 = 2 * k2 + 1;
    uint16_t* o = dst + k2 * C * 2;
    for (int64_t c = 0; c < C; ++c) {
      o[2 * c] = r0 < n ? src[r0 * C + c] : uint16_t(0);
      o[2 * c + 1] = r1 < n ? src[r1 * C + c] : uint16_t(0);
    }
  }
}

// Pack rows [0, n) of B (n×C, row-major, ld C) into one VNNI tile [Cp/2][BN][2], zero padded.
// Blocks of 16 rows: each row's cache lines stay in L1 while its channel pairs are scattered, and
// every channel pair of the block is written as one contiguous run of 64 bytes.
template <typename T>
inline void pack_vnni_tile(const T* B, int64_t n, int64_t C, int64_t Cp, int64_t BN, T* out) {
  static_assert(sizeof(T) == 2, "VNNI-2 packing is for 16-bit types");
  const uint16_t* src = reinterpret_cast<const uint16_t*>(B);
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);  // one (even, odd) channel pair per 32-bit word
  const int64_t K2 = Cp / 2, Ceven = C / 2;
  for (int64_t j0 = 0; j0 < BN; j0 += 16) {
    const int64_t j1 = std::min<int64_t>(j0 + 16, BN);
    for (int64_t k2 = 0; k2 < K2; ++k2) {
      uint32_t* o = dst + k2 * BN;
      for (int64_t j = j0; j < j1; ++j) {
        if (j >= n) {
          o[j] = 0;
        } else if (k2 < Ceven) {
          uint32_t w;
          std::memcpy(&w, src + j * C + 2 * k2, 4);
          o[j] = w;
        } else {  // odd C: the last channel pairs with a zero
          o[j] = uint32_t(src[j * C + 2 * k2]);
        }
      }
    }
  }
}

}  // namespace semcorr::gemm
