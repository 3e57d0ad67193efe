// Small pieces shared by the CPU kernel files: horizontal vector reductions, NaN-propagating max,
// dot/axpy, the coordinate grid, output allocation, input checks, and the backward driver.
#pragma once
#include "common/vec.h"

#include <ATen/ATen.h>

#include <limits>
#include <tuple>
#include <vector>

#include "common/stream_engine.h"

namespace semcorr {

using at::Tensor;

template <typename acc_t>
constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
template <typename acc_t>
constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();

template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  alignas(64) acc_t buf[Vectorized<acc_t>::size()];
  v.store(buf);
  acc_t s = 0;
  for (int64_t k = 0; k < Vectorized<acc_t>::size(); ++k) s += buf[k];
  return s;
}
template <typename acc_t>
inline acc_t hmax(const Vectorized<acc_t>& v) {
  alignas(64) acc_t buf[Vectorized<acc_t>::size()];
  v.store(buf);
  acc_t s = buf[0];
  for (int64_t k = 1; k < Vectorized<acc_t>::size(); ++k) s = (s != s || buf[k] != buf[k]) ? kNaN<acc_t> : std::max(s, buf[k]);
  return s;
}
inline acc_type_t<float> nan_max(float a, float b) { return (a != a || b != b) ? kNaN<float> : std::max(a, b); }
inline double nan_max(double a, double b) { return (a != a || b != b) ? kNaN<double> : std::max(a, b); }

// One online-softmax step for a row of a tile (z = s·inv_tau): updates the running max m and returns
// alpha = e^{m_old − m_new}, the factor that rescales the row's running sums. NaN propagates.
template <typename acc_t>
inline acc_t online_max(const acc_t* row, int64_t n, acc_t inv_tau, acc_t& m) {
  using V = Vectorized<acc_t>;
  constexpr int64_t L = V::size();
  V vmax(-kInf<acc_t>);
  int64_t j = 0;
  for (; j + L <= n; j += L) vmax = at::vec::maximum(vmax, V::loadu(row + j));
  acc_t tmax = hmax<acc_t>(vmax);
  for (; j < n; ++j) tmax = nan_max(tmax, row[j]);
  const acc_t mnew = nan_max(m, tmax * inv_tau);
  const acc_t alpha = m == -kInf<acc_t> ? acc_t(0) : std::exp(m - mnew);
  m = mnew;
  return alpha;
}

template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t C) {
  using V = Vectorized<acc_t>;
  constexpr int64_t L = V::size();
  V s0(acc_t(0)), s1(acc_t(0));
  int64_t c = 0;
  for (; c + 2 * L <= C; c += 2 * L) {
    s0 = at::vec::fmadd(V::loadu(a + c), V::loadu(b + c), s0);
    s1 = at::vec::fmadd(V::loadu(a + c + L), V::loadu(b + c + L), s1);
  }
  for (; c + L <= C; c += L) s0 = at::vec::fmadd(V::loadu(a + c), V::loadu(b + c), s0);
  acc_t r = hsum<acc_t>(s0 + s1);
  for (; c < C; ++c) r += a[c] * b[c];
  return r;
}
template <typename acc_t>
inline void axpy(acc_t alpha, const acc_t* x, acc_t* y, int64_t C) {
  using V = Vectorized<acc_t>;
  const V va(alpha);
  int64_t c = 0;
  for (; c + V::size() <= C; c += V::size()) at::vec::fmadd(va, V::loadu(x + c), V::loadu(y + c)).store(y + c);
  for (; c < C; ++c) y[c] += alpha * x[c];
}

// Cell coordinates g_v = (v mod W, v div W), materialised once per call (O(Nt)).
template <typename acc_t>
struct Grid {
  std::vector<acc_t> gx, gy;
  Grid(int64_t H, int64_t W) : gx(H * W), gy(H * W) {
    for (int64_t v = 0; v < H * W; ++v) {
      gx[v] = acc_t(v % W);
      gy[v] = acc_t(v / W);
    }
  }
};

inline Tensor out_like(const Tensor& x, at::IntArrayRef shape) {
  return at::empty(shape, x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
}

template <typename T>
StreamInput<T> make_input(const Tensor& src, const Tensor& tgt, bool normalize) {
  return StreamInput<T>(src.data_ptr<T>(), tgt.data_ptr<T>(), src.size(0), src.size(1), tgt.size(1),
                        src.size(2), normalize);
}

inline void check_pair(const Tensor& src, const Tensor& tgt, const char* op) {
  TORCH_CHECK(src.dim() == 3 && tgt.dim() == 3, op, ": src and tgt must be (B, N, C)");
  TORCH_CHECK(src.size(0) == tgt.size(0) && src.size(2) == tgt.size(2), op, ": B and C of src and tgt differ");
  TORCH_CHECK(src.scalar_type() == tgt.scalar_type(), op, ": src and tgt dtypes differ");
  TORCH_CHECK(src.is_contiguous() && tgt.is_contiguous(), op, ": src and tgt must be contiguous");
}

// Runs a gradient epilogue through the two backward passes and the normalisation backward.
template <typename acc_t, typename Epi>
std::tuple<Tensor, Tensor> run_backward(const Tensor& src, const Tensor& tgt, bool normalize, const Epi& epi) {
  const auto acc_dt = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  const Tensor s = src.to(acc_dt).contiguous(), t = tgt.to(acc_dt).contiguous();
  auto in = make_input<acc_t>(s, t, normalize);
  Tensor dsh = at::zeros_like(s), dth = at::zeros_like(t);
  bool done = false;
  if constexpr (std::is_same_v<acc_t, float>) {  // bf16 inputs: the gradient GEMMs in bf16 where they can
    if (src.scalar_type() == at::kBFloat16 && tgt.scalar_type() == at::kBFloat16) {
      const Tensor sb = src.contiguous(), tb = tgt.contiguous();
      const StreamInput<c10::BFloat16> inb(sb.data_ptr<c10::BFloat16>(), tb.data_ptr<c10::BFloat16>(), in.B, in.Ns,
                                           in.Nt, in.C, normalize, in.rs, in.rt);  // the norms of the same rows
      done = stream_backward_bf16(inb, epi, dsh.data_ptr<float>(), dth.data_ptr<float>());
    }
  }
  if (!done) stream_backward<acc_t>(in, epi, dsh.data_ptr<acc_t>(), dth.data_ptr<acc_t>());
  Tensor ds = at::empty_like(s), dt = at::empty_like(t);
  norm_backward<acc_t>(s.data_ptr<acc_t>(), in.rs.data(), dsh.data_ptr<acc_t>(), ds.data_ptr<acc_t>(),
                       in.B * in.Ns, in.C, normalize);
  norm_backward<acc_t>(t.data_ptr<acc_t>(), in.rt.data(), dth.data_ptr<acc_t>(), dt.data_ptr<acc_t>(),
                       in.B * in.Nt, in.C, normalize);
  return {ds.to(src.scalar_type()), dt.to(tgt.scalar_type())};
}


}  // namespace semcorr
