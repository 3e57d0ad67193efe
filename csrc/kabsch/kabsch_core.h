// Per-problem math of the weighted Kabsch-Umeyama op, written once for the CPU and CUDA kernels.
//
// One "problem" is P corresponding point pairs (src_i, tgt_i) in R^D (D = 2 or 3) with weights
// w_i >= 0. The solution (R, t, s) minimises  sum_i w_i |s R src_i + t - tgt_i|^2,  R in SO(D).
// Column-vector convention: a point x maps to s R x + t.
//
// Steps (all functions below are __host__ __device__ and templated on the scalar type T):
//   1. First moments (pass 1 over the points):   W = sum w,  mu_s = sum w x / W,  mu_t = sum w y / W.
//   2. Central moments (pass 2, a_i = x_i - mu_s, b_i = y_i - mu_t):
//        M = sum w b a^T / W  (D x D),  var_s = sum w |a|^2 / W,  var_t = sum w |b|^2 / W.
//      Two short passes instead of one pass over raw moments: the points of one problem sit in L1
//      (or registers), and raw moments lose every digit to cancellation when a cloud lies far from
//      the origin relative to its extent.
//   3. Rotation = argmax_R tr(R^T M):
//        D = 3: Horn's unit-quaternion method (B. K. P. Horn, "Closed-form solution of absolute
//               orientation using unit quaternions", J. Opt. Soc. Am. A 4(4):629-642, 1987): the
//               quaternion is the eigenvector of the largest eigenvalue of a symmetric 4x4 matrix N
//               built from M. The eigenproblem is solved with cyclic Jacobi rotations (Golub & Van
//               Loan, "Matrix Computations", section 8.5), which stays accurate when eigenvalues
//               repeat. The determinant sign fix of the SVD route is built in (N's eigenvalues are
//               +-s1 +- s2 +- s3 with the reflection-corrected signs).
//        D = 2: closed form, R = rotation by atan2(M10 - M01, M00 + M11) (computed as cos/sin
//               directly, without trigonometric calls).
//      When the maximiser is not unique (the top eigenvalue of N repeats: collinear clouds, fewer
//      than D points, coincident points; D = 2: M00 + M11 = M10 - M01 = 0) the rotation closest to
//      the identity among the maximisers is returned (the projection of the identity quaternion
//      onto the top eigenspace), and the problem is flagged degenerate.
//      The eigen-solves run on M / max|M_ij| (R does not depend on the scale of M; O(1) entries keep
//      squares inside the float32 range for coordinates from ~1e-15 to ~1e15).
//   4. Scale (S. Umeyama, "Least-squares estimation of transformation parameters between two point
//      patterns", IEEE TPAMI 13(4):376-380, 1991): s_raw = tr(R^T M) / var_s, clamped to
//      [min_scale, max_scale]; translation t = mu_t - s R mu_s.
//
// Backward (analytic, no SVD): with S = R^T M (symmetric at the optimum),
//   * d tr(R^T M) / dM = R (envelope theorem: R maximises tr(R^T M)).
//   * D = 3: M = R S gives skew(R^T dM) = (Omega S + S Omega) / 2 for dR = R Omega, Omega = [w]_x,
//     and [w]_x S + S [w]_x = [(tr(S) I - S) w]_x, so (tr(S) I - S) w = vee(R^T dM - dM^T R).
//     Transposed: dL/dM = R [z]_x with (tr(S) I - S) z = vee(R^T G - G^T R), G = dL/dR
//     (rotation_backward3). The eigenvalues of tr(S) I - S are s_i + s_j (with the reflection
//     sign folded into s_3): these are the 1/(s_i + s_j) terms of the Procrustes derivative
//     (T. Papadopoulo & M. Lourakis, "Estimating the Jacobian of the Singular Value Decomposition",
//     ECCV 2000). Repeated singular values are harmless; when s_i + s_j -> 0 (rotation not unique)
//     the inverse is replaced by the pseudo-inverse (that gradient component is set to zero).
//   * D = 2: dtheta = (a db - b da) / (a^2 + b^2), a = M00 + M11, b = M10 - M01.
//   * Chain rule through t, the clamp (no gradient when active), s_raw = tr / var_s and the moments.
#pragma once

#include <cstdint>
#include <limits>

#ifdef __CUDACC__
#define SC_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define SC_HD inline
#endif

#if defined(__CUDACC__) || defined(__clang__)
#define SC_UNROLL _Pragma("unroll")
#else
#define SC_UNROLL _Pragma("GCC unroll 16")
#endif

namespace semcorr {
namespace kabsch {

// Public status codes (the `info` tensor of the Python op).
enum Status : int { kOk = 0, kDegenerate = 1, kEmpty = 2, kNonFinite = 3 };

// Internal flags (bit mask) stored for the backward.
enum Flag : int {
  kFlagRotation = 1,    // the optimal rotation is not unique
  kFlagSrcPoint = 2,    // zero source spread: R := I, s_raw := 1
  kFlagTgtPoint = 4,    // zero target spread: R := I (M treated as 0)
  kFlagEmpty = 8,       // all weights are zero
  kFlagNonFinite = 16,  // NaN/Inf weight, or NaN/Inf coordinate of a positive-weight point
};

// Per-problem statistics saved by the forward for the backward: one row of `stats (B, K)`.
template <int D>
struct StatsLayout {
  static constexpr int kW = 0;          // sum of weights
  static constexpr int kVarS = 1;       // weighted source variance (sum w |a|^2 / W)
  static constexpr int kScaleRaw = 2;   // unclamped Umeyama scale (1 when not estimated)
  static constexpr int kStatus = 3;     // public status code (Status)
  static constexpr int kFlags = 4;      // Flag bit mask
  static constexpr int kMuS = 5;        // D entries
  static constexpr int kMuT = 5 + D;    // D entries
  static constexpr int kM = 5 + 2 * D;  // D*D entries, row-major
  static constexpr int kSize = 5 + 2 * D + D * D;
};

template <typename T>
struct Num;
template <>
struct Num<float> {
  static constexpr float eps = 1.1920928955078125e-07f;
  SC_HD static float sqrt_(float x) { return sqrtf(x); }
  SC_HD static float abs_(float x) { return fabsf(x); }
};
template <>
struct Num<double> {
  static constexpr double eps = 2.220446049250313e-16;
  SC_HD static double sqrt_(double x) { return sqrt(x); }
  SC_HD static double abs_(double x) { return fabs(x); }
};

// Relative tolerance below which a spread, an eigen-gap or a rotation norm counts as zero.
template <typename T>
SC_HD T tol_rel() { return T(256) * Num<T>::eps; }

template <typename T>
SC_HD T quiet_nan() { return std::numeric_limits<T>::quiet_NaN(); }

// NaN and +-Inf fail x - x == 0 (IEEE semantics; the project never builds with -ffast-math).
template <typename T>
SC_HD bool is_finite(T v) { return v - v == T(0); }

template <typename T>
SC_HD T max_(T a, T b) { return a > b ? a : b; }

// Largest |entry| of an n-vector (the eigen-solves run on matrices divided by it: rotations do not
// depend on the scale of M, and O(1) entries keep squares away from overflow and underflow).
template <typename T, int n>
SC_HD T max_abs(const T (&v)[n]) {
  T m = T(0);
SC_UNROLL
  for (int k = 0; k < n; ++k) m = max_(m, Num<T>::abs_(v[k]));
  return m;
}

// ---------------------------------------------------------------------------------------------
// Point access and moments
// ---------------------------------------------------------------------------------------------

// Reads point i of one problem. `w == nullptr` means unit weights. A zero-weight point takes no
// part in the result; its non-finite coordinates are read as 0 so that they cannot poison sums.
template <typename T, int D>
SC_HD T read_point(const T* src, const T* tgt, const T* w, int64_t i, T (&x)[D], T (&y)[D]) {
  const T wi = w ? w[i] : T(1);
SC_UNROLL
  for (int k = 0; k < D; ++k) {
    x[k] = src[i * D + k];
    y[k] = tgt[i * D + k];
  }
  if (wi == T(0)) {
SC_UNROLL
    for (int k = 0; k < D; ++k) {
      if (!is_finite(x[k])) x[k] = T(0);
      if (!is_finite(y[k])) y[k] = T(0);
    }
  }
  return wi;
}

// Pass 1 accumulator: v[0] = sum w, v[1..D] = sum w x, v[1+D..2D] = sum w y. A non-finite weight,
// or a non-finite coordinate of a positive-weight point, makes one of these sums non-finite
// (w * Inf = Inf, w * NaN = NaN; zero-weight points were sanitised by read_point), so finiteness is
// checked once on the sums instead of per point. Sums that overflow also count as non-finite.
template <typename T, int D>
struct Acc1 {
  static constexpr int K = 1 + 2 * D;
  T v[K];
};

template <typename T, int D>
SC_HD void acc1_init(Acc1<T, D>& a) {
SC_UNROLL
  for (int k = 0; k < Acc1<T, D>::K; ++k) a.v[k] = T(0);
}

template <typename T, int D>
SC_HD void acc1_add(Acc1<T, D>& a, T wi, const T (&x)[D], const T (&y)[D]) {
  a.v[0] += wi;
SC_UNROLL
  for (int k = 0; k < D; ++k) {
    a.v[1 + k] += wi * x[k];
    a.v[1 + D + k] += wi * y[k];
  }
}

// Pass 2 accumulator: v[D*r + c] = sum w b_r a_c, v[D*D] = sum w |a|^2, v[D*D+1] = sum w |b|^2.
template <typename T, int D>
struct Acc2 {
  static constexpr int K = D * D + 2;
  T v[K];
};

template <typename T, int D>
SC_HD void acc2_init(Acc2<T, D>& a) {
SC_UNROLL
  for (int k = 0; k < Acc2<T, D>::K; ++k) a.v[k] = T(0);
}

// Everything the solve and the backward need about one problem.
template <typename T, int D>
struct Moments {
  T W;
  T mu_s[D];
  T mu_t[D];
  T M[D * D];  // row-major, M[D*r + c] = sum w b_r a_c / W
  T var_s;
  T var_t;
  int flags;
};

// After pass 1: weights sum and centroids. Returns false when pass 2 is unnecessary (empty or
// non-finite problem; the flags say which).
template <typename T, int D>
SC_HD bool moments_begin(const Acc1<T, D>& a, Moments<T, D>& m) {
  m.flags = 0;
  m.W = a.v[0];
  m.var_s = T(0);
  m.var_t = T(0);
SC_UNROLL
  for (int k = 0; k < D * D; ++k) m.M[k] = T(0);
  bool finite = true;
SC_UNROLL
  for (int k = 0; k < Acc1<T, D>::K; ++k) finite = finite && is_finite(a.v[k]);
  if (!finite) {
    m.flags = kFlagNonFinite;
  } else if (!(a.v[0] > T(0))) {
    m.flags = kFlagEmpty;
  }
  if (m.flags) {
SC_UNROLL
    for (int k = 0; k < D; ++k) {
      m.mu_s[k] = T(0);
      m.mu_t[k] = T(0);
    }
    return false;
  }
  const T inv = T(1) / a.v[0];
SC_UNROLL
  for (int k = 0; k < D; ++k) {
    m.mu_s[k] = a.v[1 + k] * inv;
    m.mu_t[k] = a.v[1 + D + k] * inv;
  }
  return true;
}

template <typename T, int D>
SC_HD void acc2_add(Acc2<T, D>& acc, const Moments<T, D>& m, T wi, const T (&x)[D], const T (&y)[D]) {
  T a[D], b[D];
SC_UNROLL
  for (int k = 0; k < D; ++k) {
    a[k] = x[k] - m.mu_s[k];
    b[k] = y[k] - m.mu_t[k];
  }
  T aa = T(0), bb = T(0);
SC_UNROLL
  for (int r = 0; r < D; ++r) {
    const T wb = wi * b[r];
SC_UNROLL
    for (int c = 0; c < D; ++c) acc.v[D * r + c] += wb * a[c];
    aa += a[r] * a[r];
    bb += b[r] * b[r];
  }
  acc.v[D * D] += wi * aa;
  acc.v[D * D + 1] += wi * bb;
}

// After pass 2: central moments and the zero-spread flags.
template <typename T, int D>
SC_HD void moments_end(const Acc2<T, D>& acc, Moments<T, D>& m) {
  const T inv = T(1) / m.W;
SC_UNROLL
  for (int k = 0; k < D * D; ++k) m.M[k] = acc.v[k] * inv;
  m.var_s = acc.v[D * D] * inv;
  m.var_t = acc.v[D * D + 1] * inv;
  // A cloud is a single point when its spread is below tol * (its distance to the origin): the
  // centroid itself is only known to that relative precision.
  T ref_s = T(0), ref_t = T(0);
SC_UNROLL
  for (int k = 0; k < D; ++k) {
    ref_s = max_(ref_s, Num<T>::abs_(m.mu_s[k]));
    ref_t = max_(ref_t, Num<T>::abs_(m.mu_t[k]));
  }
  const T tol = tol_rel<T>();
  if (!(m.var_s > T(0)) || Num<T>::sqrt_(m.var_s) <= tol * ref_s) m.flags |= kFlagSrcPoint;
  if (!(m.var_t > T(0)) || Num<T>::sqrt_(m.var_t) <= tol * ref_t) m.flags |= kFlagTgtPoint;
}

// ---------------------------------------------------------------------------------------------
// Symmetric eigensolver: cyclic Jacobi (Golub & Van Loan, Matrix Computations, 4th ed., 8.5.2)
// ---------------------------------------------------------------------------------------------

// One Jacobi rotation zeroing A[p][q]; V accumulates the eigenvectors (columns).
template <typename T, int N, int p, int q>
SC_HD void jacobi_rotate(T (&A)[N][N], T (&V)[N][N]) {
  const T apq = A[p][q];
  // An off-diagonal entry at rounding level of the diagonal is set to zero without a rotation
  // (the perturbation is below the rounding error already in A; Numerical Recipes' threshold).
  if (Num<T>::abs_(apq) <= T(0.5) * Num<T>::eps * (Num<T>::abs_(A[p][p]) + Num<T>::abs_(A[q][q]))) {
    A[p][q] = T(0);
    A[q][p] = T(0);
    return;
  }
  // Golub & Van Loan's t = sign(theta) / (|theta| + sqrt(theta^2 + 1)), theta = d / h, written
  // without the division by h: t = sign(d) h / (|d| + r), r = sqrt(d^2 + h^2), and
  // c = 1 / sqrt(1 + t^2) = sqrt((|d| + r) / (2 r)). Callers keep the entries O(1) (see
  // normalised_max), so d^2 + h^2 neither overflows nor underflows; r > 0 here since h != 0.
  const T d = A[q][q] - A[p][p], h = T(2) * apq;
  const T ad = Num<T>::abs_(d);
  const T r = Num<T>::sqrt_(d * d + h * h);
  const T t = (d < T(0) ? -h : h) / (ad + r);
  const T c = Num<T>::sqrt_((ad + r) / (T(2) * r));
  const T s = t * c;
  A[p][p] -= t * apq;
  A[q][q] += t * apq;
  A[p][q] = T(0);
  A[q][p] = T(0);
SC_UNROLL
  for (int r = 0; r < N; ++r) {
    if (r != p && r != q) {
      const T arp = A[r][p], arq = A[r][q];
      A[r][p] = c * arp - s * arq;
      A[p][r] = A[r][p];
      A[r][q] = s * arp + c * arq;
      A[q][r] = A[r][q];
    }
    const T vrp = V[r][p], vrq = V[r][q];
    V[r][p] = c * vrp - s * vrq;
    V[r][q] = s * vrp + c * vrq;
  }
}

// One cyclic sweep over the upper triangle (indices fixed at compile time: registers on the GPU).
template <typename T, int N>
struct JacobiSweep;
template <typename T>
struct JacobiSweep<T, 3> {
  SC_HD static void run(T (&A)[3][3], T (&V)[3][3]) {
    jacobi_rotate<T, 3, 0, 1>(A, V);
    jacobi_rotate<T, 3, 0, 2>(A, V);
    jacobi_rotate<T, 3, 1, 2>(A, V);
  }
};
// N = 4 in the round-robin ("parallel") ordering: the two rotations of each pair touch disjoint
// index pairs, so their angle computations (a div/sqrt latency chain each) are independent and
// overlap on an out-of-order core.
template <typename T>
struct JacobiSweep<T, 4> {
  SC_HD static void run(T (&A)[4][4], T (&V)[4][4]) {
    jacobi_rotate<T, 4, 0, 1>(A, V);
    jacobi_rotate<T, 4, 2, 3>(A, V);
    jacobi_rotate<T, 4, 0, 2>(A, V);
    jacobi_rotate<T, 4, 1, 3>(A, V);
    jacobi_rotate<T, 4, 0, 3>(A, V);
    jacobi_rotate<T, 4, 1, 2>(A, V);
  }
};

// Eigen-decomposition of the symmetric N x N matrix A (overwritten: eigenvalues end on its
// diagonal); V receives the eigenvectors as columns. Stops when the off-diagonal mass is below
// eps^2 times the diagonal mass (quadratic convergence: 3-6 sweeps for N = 4).
template <typename T, int N>
SC_HD void jacobi_eigh(T (&A)[N][N], T (&V)[N][N]) {
SC_UNROLL
  for (int r = 0; r < N; ++r) {
SC_UNROLL
    for (int c = 0; c < N; ++c) V[r][c] = r == c ? T(1) : T(0);
  }
  const T e2 = Num<T>::eps * Num<T>::eps;
  for (int sweep = 0; sweep < 16; ++sweep) {
    T off = T(0), diag = T(0);
SC_UNROLL
    for (int r = 0; r < N; ++r) {
      diag += A[r][r] * A[r][r];
SC_UNROLL
      for (int c = r + 1; c < N; ++c) off += A[r][c] * A[r][c];
    }
    if (!(off > e2 * diag)) break;  // also exits on off == 0 and on NaN
    JacobiSweep<T, N>::run(A, V);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward solve
// ---------------------------------------------------------------------------------------------

template <typename T, int D>
struct Solution {
  T R[D * D];  // row-major
  T t[D];
  T s;
  T s_raw;
  int status;
  int flags;
};

// D = 3 rotation by Horn's quaternion method. Sets kFlagRotation when the maximiser is not unique.
template <typename T>
SC_HD void rotation3(const T (&M0)[9], T (&R)[9], int& flags) {
  const T mmax = max_abs(M0);
  const T inv_m = mmax > T(0) ? T(1) / mmax : T(0);
  T M[9];
SC_UNROLL
  for (int k = 0; k < 9; ++k) M[k] = M0[k] * inv_m;
  // Horn's S_ab = sum src_a tgt_b = M[b][a].
  const T Sxx = M[0], Sxy = M[3], Sxz = M[6];
  const T Syx = M[1], Syy = M[4], Syz = M[7];
  const T Szx = M[2], Szy = M[5], Szz = M[8];
  T A[4][4] = {
      {Sxx + Syy + Szz, Syz - Szy, Szx - Sxz, Sxy - Syx},
      {Syz - Szy, Sxx - Syy - Szz, Sxy + Syx, Szx + Sxz},
      {Szx - Sxz, Sxy + Syx, -Sxx + Syy - Szz, Syz + Szy},
      {Sxy - Syx, Szx + Sxz, Syz + Szy, -Sxx - Syy + Szz},
  };
  T V[4][4];
  jacobi_eigh<T, 4>(A, V);
  int top = 0;
  T lmax = A[0][0], scale = Num<T>::abs_(A[0][0]);
SC_UNROLL
  for (int k = 1; k < 4; ++k) {
    if (A[k][k] > lmax) {
      lmax = A[k][k];
      top = k;
    }
    scale = max_(scale, Num<T>::abs_(A[k][k]));
  }
  const T tol = tol_rel<T>() * scale;
  int mult = 0;
  T q[4] = {T(0), T(0), T(0), T(0)};
SC_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (A[k][k] >= lmax - tol) {
      ++mult;
      // Projection of the identity quaternion (1, 0, 0, 0) onto the top eigenspace.
      const T c = V[0][k];
SC_UNROLL
      for (int r = 0; r < 4; ++r) q[r] += c * V[r][k];
    }
  }
  T qn = q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3];
  if (mult > 1) flags |= kFlagRotation;
  if (mult == 1 || !(qn > T(1e-6))) {
    // Unique maximiser, or the identity is orthogonal to the eigenspace: take the eigenvector.
SC_UNROLL
    for (int r = 0; r < 4; ++r) {
      T v = V[r][0];
      if (top == 1) v = V[r][1];
      if (top == 2) v = V[r][2];
      if (top == 3) v = V[r][3];
      q[r] = v;
    }
    qn = q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3];
  }
  const T inv = T(1) / Num<T>::sqrt_(qn);
  const T w = q[0] * inv, x = q[1] * inv, y = q[2] * inv, z = q[3] * inv;
  R[0] = w * w + x * x - y * y - z * z;
  R[1] = T(2) * (x * y - w * z);
  R[2] = T(2) * (x * z + w * y);
  R[3] = T(2) * (x * y + w * z);
  R[4] = w * w - x * x + y * y - z * z;
  R[5] = T(2) * (y * z - w * x);
  R[6] = T(2) * (x * z - w * y);
  R[7] = T(2) * (y * z + w * x);
  R[8] = w * w - x * x - y * y + z * z;
}

// D = 2 rotation: maximise c a + s b with a = M00 + M11, b = M10 - M01.
template <typename T>
SC_HD void rotation2(const T (&M0)[4], T (&R)[4], int& flags) {
  const T mmax = max_abs(M0);
  const T inv_m = mmax > T(0) ? T(1) / mmax : T(0);
  T M[4];
SC_UNROLL
  for (int k = 0; k < 4; ++k) M[k] = M0[k] * inv_m;
  const T a = M[0] + M[3], b = M[2] - M[1];
  const T rho = Num<T>::sqrt_(a * a + b * b);
  const T fro = Num<T>::sqrt_(M[0] * M[0] + M[1] * M[1] + M[2] * M[2] + M[3] * M[3]);
  T c = T(1), s = T(0);
  if (rho > tol_rel<T>() * fro) {
    c = a / rho;
    s = b / rho;
  } else {
    flags |= kFlagRotation;
  }
  R[0] = c;
  R[1] = -s;
  R[2] = s;
  R[3] = c;
}

template <typename T, int D>
SC_HD void rotation(const T (&M)[D * D], T (&R)[D * D], int& flags) {
  if constexpr (D == 3) {
    rotation3<T>(M, R, flags);
  } else {
    rotation2<T>(M, R, flags);
  }
}

template <typename T>
SC_HD T clamp_(T v, T lo, T hi) { return v < lo ? lo : (v > hi ? hi : v); }

SC_HD int status_of(int flags) {
  if (flags & kFlagNonFinite) return kNonFinite;
  if (flags & kFlagEmpty) return kEmpty;
  if (flags & (kFlagRotation | kFlagSrcPoint | kFlagTgtPoint)) return kDegenerate;
  return kOk;
}

// Rotation, scale and translation from the moments. Degenerate cases (documented in the Python
// docstring): non-finite -> all NaN; empty -> R = I, t = 0, s = clamp(1); zero source spread ->
// R = I, s_raw = 1; zero target spread -> R = I, s_raw = 0.
template <typename T, int D>
SC_HD void solve(const Moments<T, D>& m, bool estimate_scale, T min_scale, T max_scale, Solution<T, D>& out) {
  out.flags = m.flags;
  if (m.flags & kFlagNonFinite) {
    const T nan = quiet_nan<T>();
SC_UNROLL
    for (int k = 0; k < D * D; ++k) out.R[k] = nan;
SC_UNROLL
    for (int k = 0; k < D; ++k) out.t[k] = nan;
    out.s = nan;
    out.s_raw = nan;
    out.status = kNonFinite;
    return;
  }
SC_UNROLL
  for (int r = 0; r < D; ++r) {
SC_UNROLL
    for (int c = 0; c < D; ++c) out.R[D * r + c] = r == c ? T(1) : T(0);
  }
  if (m.flags & kFlagEmpty) {
SC_UNROLL
    for (int k = 0; k < D; ++k) out.t[k] = T(0);
    out.s_raw = T(1);
    out.s = estimate_scale ? clamp_(T(1), min_scale, max_scale) : T(1);
    out.status = kEmpty;
    return;
  }
  const bool point = (m.flags & (kFlagSrcPoint | kFlagTgtPoint)) != 0;
  if (!point) rotation<T, D>(m.M, out.R, out.flags);
  T s_raw = T(1);
  if (estimate_scale) {
    if (m.flags & kFlagSrcPoint) {
      s_raw = T(1);
    } else if (m.flags & kFlagTgtPoint) {
      s_raw = T(0);
    } else {
      T tr = T(0);
SC_UNROLL
      for (int k = 0; k < D * D; ++k) tr += out.R[k] * m.M[k];
      s_raw = tr / m.var_s;
    }
  }
  out.s_raw = s_raw;
  out.s = estimate_scale ? clamp_(s_raw, min_scale, max_scale) : T(1);
SC_UNROLL
  for (int r = 0; r < D; ++r) {
    T rm = T(0);
SC_UNROLL
    for (int c = 0; c < D; ++c) rm += out.R[D * r + c] * m.mu_s[c];
    out.t[r] = m.mu_t[r] - out.s * rm;
  }
  out.status = status_of(out.flags);
}

template <typename T, int D>
SC_HD void write_stats(const Moments<T, D>& m, const Solution<T, D>& sol, T* st) {
  using L = StatsLayout<D>;
  st[L::kW] = m.W;
  st[L::kVarS] = m.var_s;
  st[L::kScaleRaw] = sol.s_raw;
  st[L::kStatus] = T(sol.status);
  st[L::kFlags] = T(sol.flags);
SC_UNROLL
  for (int k = 0; k < D; ++k) {
    st[L::kMuS + k] = m.mu_s[k];
    st[L::kMuT + k] = m.mu_t[k];
  }
SC_UNROLL
  for (int k = 0; k < D * D; ++k) st[L::kM + k] = m.M[k];
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Gradients of the loss w.r.t. the moments, and what the per-point step needs.
template <typename T, int D>
struct MomentGrads {
  T g_mu_s[D];
  T g_mu_t[D];
  T g_M[D * D];
  T g_var;
  T mu_s[D];
  T mu_t[D];
  T inv_W;
  T c0;      // <g_M, M> + g_var * var_s: the constant part of dL/dw_i * W
  int mode;  // 0: regular, 1: all gradients zero (empty problem), 2: all NaN (non-finite problem)
};

// dL/dM of the rotation part for D = 3: dL/dM = R [z]_x, (tr(S) I - S) z = vee(R^T G - G^T R),
// S = sym(R^T M). Eigenvalues of tr(S) I - S below tol are dropped (pseudo-inverse).
template <typename T>
SC_HD void rotation_backward3(const T (&R)[9], const T (&M)[9], const T (&G)[9], T (&gM)[9]) {
  // S = R^T M and X = R^T G.
  T S[3][3], X[3][3];
SC_UNROLL
  for (int i = 0; i < 3; ++i) {
SC_UNROLL
    for (int j = 0; j < 3; ++j) {
      T s = T(0), x = T(0);
SC_UNROLL
      for (int k = 0; k < 3; ++k) {
        s += R[3 * k + i] * M[3 * k + j];
        x += R[3 * k + i] * G[3 * k + j];
      }
      S[i][j] = s;
      X[i][j] = x;
    }
  }
  // vee(X - X^T) = (X21 - X12, X02 - X20, X10 - X01).
  const T v[3] = {X[2][1] - X[1][2], X[0][2] - X[2][0], X[1][0] - X[0][1]};
  // Eigen-decompose sym(S) / m, m = max |S_ij|: kappa = m * kappa_normalised.
  T smax = T(0);
SC_UNROLL
  for (int i = 0; i < 3; ++i) {
SC_UNROLL
    for (int j = 0; j < 3; ++j) smax = max_(smax, Num<T>::abs_(S[i][j]));
  }
  if (!(smax > T(0))) return;
  const T inv_m = T(1) / smax;
  T A[3][3];
SC_UNROLL
  for (int i = 0; i < 3; ++i) {
SC_UNROLL
    for (int j = 0; j < 3; ++j) A[i][j] = T(0.5) * (S[i][j] + S[j][i]) * inv_m;
  }
  T V[3][3];
  jacobi_eigh<T, 3>(A, V);
  const T trS = A[0][0] + A[1][1] + A[2][2];
  const T scale = max_(max_(Num<T>::abs_(A[0][0]), Num<T>::abs_(A[1][1])), Num<T>::abs_(A[2][2]));
  const T tol = tol_rel<T>() * scale;
  // z = V diag(1 / kappa) V^T v with kappa_k = trS - lambda_k = sum of the two other eigenvalues.
  T z[3] = {T(0), T(0), T(0)};
SC_UNROLL
  for (int k = 0; k < 3; ++k) {
    const T kappa = trS - A[k][k];
    if (kappa > tol) {
      const T proj = (V[0][k] * v[0] + V[1][k] * v[1] + V[2][k] * v[2]) * inv_m / kappa;
SC_UNROLL
      for (int r = 0; r < 3; ++r) z[r] += proj * V[r][k];
    }
  }
  // [z]_x = [[0, -z2, z1], [z2, 0, -z0], [-z1, z0, 0]];  gM += R [z]_x.
  const T Z[3][3] = {{T(0), -z[2], z[1]}, {z[2], T(0), -z[0]}, {-z[1], z[0], T(0)}};
SC_UNROLL
  for (int i = 0; i < 3; ++i) {
SC_UNROLL
    for (int j = 0; j < 3; ++j) {
      T acc = T(0);
SC_UNROLL
      for (int k = 0; k < 3; ++k) acc += R[3 * i + k] * Z[k][j];
      gM[3 * i + j] += acc;
    }
  }
}

// D = 2: R = rot(theta), theta = atan2(b, a); dL/dtheta = vee(R^T G) and dtheta/dM via (a, b).
template <typename T>
SC_HD void rotation_backward2(const T (&R)[4], const T (&M0)[4], const T (&G)[4], T (&gM)[4]) {
  // Work with M / m (m = max |M_ij|): theta is scale-free, dtheta/dM = (1/m) dtheta/d(M/m).
  const T mmax = max_abs(M0);
  if (!(mmax > T(0))) return;
  const T inv_m = T(1) / mmax;
  T M[4];
SC_UNROLL
  for (int k = 0; k < 4; ++k) M[k] = M0[k] * inv_m;
  const T a = M[0] + M[3], b = M[2] - M[1];
  const T rho2 = a * a + b * b;
  const T fro = Num<T>::sqrt_(M[0] * M[0] + M[1] * M[1] + M[2] * M[2] + M[3] * M[3]);
  const T rho = Num<T>::sqrt_(rho2);
  if (!(rho > tol_rel<T>() * fro)) return;
  // dR/dtheta = R J, J = [[0, -1], [1, 0]] -> dL/dtheta = <G, R J> = (R^T G)_10 - (R^T G)_01.
  const T x10 = R[1] * G[0] + R[3] * G[2];  // (R^T G)_10
  const T x01 = R[0] * G[1] + R[2] * G[3];  // (R^T G)_01
  const T g_theta = (x10 - x01) * inv_m;
  const T ga = -b / rho2 * g_theta, gb = a / rho2 * g_theta;
  gM[0] += ga;
  gM[3] += ga;
  gM[2] += gb;
  gM[1] -= gb;
}

template <typename T, int D>
SC_HD void rotation_backward(const T (&R)[D * D], const T (&M)[D * D], const T (&G)[D * D], T (&gM)[D * D]) {
  if constexpr (D == 3) {
    rotation_backward3<T>(R, M, G, gM);
  } else {
    rotation_backward2<T>(R, M, G, gM);
  }
}

// From the output gradients (gR (D*D), gt (D), gs) and the forward's saved values to the
// gradients of the moments. `st` is the problem's stats row, R and s its outputs.
template <typename T, int D>
SC_HD void backward_moments(const T* st, const T* Rp, T s, const T* gRp, const T* gt, T gs, bool estimate_scale,
                            T min_scale, T max_scale, MomentGrads<T, D>& g) {
  using L = StatsLayout<D>;
  const int flags = int(st[L::kFlags]);
  g.mode = 0;
  g.inv_W = T(0);
  g.c0 = T(0);
  g.g_var = T(0);
SC_UNROLL
  for (int k = 0; k < D; ++k) {
    g.g_mu_s[k] = T(0);
    g.g_mu_t[k] = T(0);
    g.mu_s[k] = st[L::kMuS + k];
    g.mu_t[k] = st[L::kMuT + k];
  }
SC_UNROLL
  for (int k = 0; k < D * D; ++k) g.g_M[k] = T(0);
  if (flags & kFlagNonFinite) {
    g.mode = 2;
    return;
  }
  if (flags & kFlagEmpty) {
    g.mode = 1;
    return;
  }
  T R[D * D], G[D * D], M[D * D];
SC_UNROLL
  for (int k = 0; k < D * D; ++k) {
    R[k] = Rp[k];
    G[k] = gRp[k];
    M[k] = st[L::kM + k];
  }
  const T var_s = st[L::kVarS];
  const T s_raw = st[L::kScaleRaw];
  // t = mu_t - s R mu_s.
  T Rmu[D];
SC_UNROLL
  for (int r = 0; r < D; ++r) {
    T acc = T(0);
SC_UNROLL
    for (int c = 0; c < D; ++c) acc += R[D * r + c] * g.mu_s[c];
    Rmu[r] = acc;
  }
  T g_s = gs;
SC_UNROLL
  for (int r = 0; r < D; ++r) {
    g.g_mu_t[r] = gt[r];
    g_s -= gt[r] * Rmu[r];
SC_UNROLL
    for (int c = 0; c < D; ++c) {
      G[D * r + c] -= s * gt[r] * g.mu_s[c];
      g.g_mu_s[c] -= s * R[D * r + c] * gt[r];
    }
  }
  // s = clamp(s_raw): gradient passes when min <= s_raw <= max (as torch.clamp); s_raw = tr / var_s.
  const bool point = (flags & (kFlagSrcPoint | kFlagTgtPoint)) != 0;
  // In the zero-spread cases s_raw is a constant (1 or 0) and R = I: no gradient through them.
  if (estimate_scale && !point && s_raw >= min_scale && s_raw <= max_scale) {
    const T g_tr = g_s / var_s;
    g.g_var = -g_s * s_raw / var_s;
SC_UNROLL
    for (int k = 0; k < D * D; ++k) g.g_M[k] += g_tr * R[k];  // d tr(R^T M) / dM = R
  }
  if (!point) rotation_backward<T, D>(R, M, G, g.g_M);
  g.inv_W = T(1) / st[L::kW];
  T c0 = g.g_var * var_s;
SC_UNROLL
  for (int k = 0; k < D * D; ++k) c0 += g.g_M[k] * M[k];
  g.c0 = c0;
}

// Per-point gradients (a_i = x_i - mu_s, b_i = y_i - mu_t, w^_i = w_i / W):
//   dL/dx_i = w^_i (g_mu_s + g_M^T b_i + 2 g_var a_i)
//   dL/dy_i = w^_i (g_mu_t + g_M a_i)
//   dL/dw_i = (g_mu_s.a_i + g_mu_t.b_i + b_i^T g_M a_i + g_var |a_i|^2 - c0) / W
// (the centroid terms of M and var_s vanish: sum w^ a = sum w^ b = 0).
template <typename T, int D>
SC_HD void point_backward(const MomentGrads<T, D>& g, T wi, const T (&x)[D], const T (&y)[D], T (&gx)[D], T (&gy)[D],
                          T& gw) {
  if (g.mode != 0) {
    const T v = g.mode == 2 ? quiet_nan<T>() : T(0);
SC_UNROLL
    for (int k = 0; k < D; ++k) {
      gx[k] = v;
      gy[k] = v;
    }
    gw = v;
    return;
  }
  T a[D], b[D];
SC_UNROLL
  for (int k = 0; k < D; ++k) {
    a[k] = x[k] - g.mu_s[k];
    b[k] = y[k] - g.mu_t[k];
  }
  const T wn = wi * g.inv_W;
  T acc = -g.c0;
SC_UNROLL
  for (int r = 0; r < D; ++r) {
    T gma = T(0), gmtb = T(0);
SC_UNROLL
    for (int c = 0; c < D; ++c) {
      gma += g.g_M[D * r + c] * a[c];   // (g_M a)_r
      gmtb += g.g_M[D * c + r] * b[c];  // (g_M^T b)_r
    }
    gx[r] = wn * (g.g_mu_s[r] + gmtb + T(2) * g.g_var * a[r]);
    gy[r] = wn * (g.g_mu_t[r] + gma);
    acc += g.g_mu_s[r] * a[r] + g.g_mu_t[r] * b[r] + b[r] * gma + g.g_var * a[r] * a[r];
  }
  gw = acc * g.inv_W;
}

}  // namespace kabsch
}  // namespace semcorr
