// Per-row math of the correlation family, written once for the CPU and CUDA kernels
// (__host__ __device__ under nvcc). The CPU epilogues in correlation_cpu.cpp and the CUDA kernels in
// correlation.cu both call these, so CI (CPU only) runs exactly this code.
#pragma once
#include <cstdint>

#ifndef SC_HD
#ifdef __CUDACC__
#define SC_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define SC_HD inline
#endif
#endif

namespace semcorr {
namespace core {

// Insert (s, index) into a row's top-k list, kept sorted by value descending, then index ascending.
// Precondition: s > v[k-1] (the caller's filter) and indices arrive in increasing order, so a strict
// comparison keeps the lowest index among ties.
template <typename T>
SC_HD void topk_insert(T* v, int64_t* id, int64_t k, T s, int64_t index) {
  int64_t pos = k - 1;
  while (pos > 0 && v[pos - 1] < s) {
    v[pos] = v[pos - 1];
    id[pos] = id[pos - 1];
    --pos;
  }
  v[pos] = s;
  id[pos] = index;
}

// The window of cells within `r` of centre cell c in x and in y, clipped at the border of an H×W grid.
struct Window {
  int64_t x0, x1, y0, y1;
  SC_HD int64_t count() const { return (x1 - x0 + 1) * (y1 - y0 + 1); }
};
SC_HD Window window_of(int64_t c, int64_t H, int64_t W, int64_t r) {
  const int64_t xc = c % W, yc = c / W;
  Window w;
  w.x0 = xc - r < 0 ? 0 : xc - r;
  w.x1 = xc + r > W - 1 ? W - 1 : xc + r;
  w.y0 = yc - r < 0 ? 0 : yc - r;
  w.y1 = yc + r > H - 1 ? H - 1 : yc + r;
  return w;
}

// The softmax shift of a window row: max of the in-window logits, and 0 too when the outside cells
// (logit 0, outside="zero") take part. NaN propagates.
template <typename T>
SC_HD T window_shift(T max_in, int64_t count, int64_t N, bool zero_outside) {
  if (zero_outside && count < N) return (max_in != max_in) ? max_in : (max_in > T(0) ? max_in : T(0));
  return max_in;
}

// GeoAware-SC's outside="zero": the N − w cells outside the window have logit 0. Their softmax mass
// and coordinate sums, added in closed form to the in-window sums (Z, sx, sy) shifted by m:
//   Z += (N − w) e^{−m},  (sx, sy) += e^{−m} (G_tot − Σ_window g),  G_tot = Σ_all g.
template <typename T>
SC_HD void window_add_outside(const Window& w, int64_t H, int64_t W, T m, T& Z, T& sx, T& sy) {
  const T e0 = exp(-m);
  const T nrow = T(w.y1 - w.y0 + 1), ncol = T(w.x1 - w.x0 + 1);
  const T win_sx = nrow * ncol * T(w.x0 + w.x1) / T(2), win_sy = ncol * nrow * T(w.y0 + w.y1) / T(2);
  const T tot_sx = T(H) * T(W) * T(W - 1) / T(2), tot_sy = T(W) * T(H) * T(H - 1) / T(2);
  Z += T(H * W - w.count()) * e0;
  sx += e0 * (tot_sx - win_sx);
  sy += e0 * (tot_sy - win_sy);
}

// dL/ds of one (row, cell) of a soft-argmax: p (⟨G, g⟩ − D)/τ, p = e^{z − lse}, D = ⟨G, y⟩ (math.md).
template <typename T>
SC_HD T soft_argmax_ds(T sim, T inv_tau, T lse, T Gx, T Gy, T gx, T gy, T D) {
  const T p = exp(sim * inv_tau - lse);
  return p * (Gx * gx + Gy * gy - D) * inv_tau;
}

}  // namespace core
}  // namespace semcorr
