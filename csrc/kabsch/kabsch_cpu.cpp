// CPU implementation of kabsch (shape contract: kabsch.h; math: kabsch_core.h).
// One problem per iteration of at::parallel_for; each problem is two passes over its P points
// followed by the closed-form D x D solve.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kabsch/kabsch.h"
#include "kabsch/kabsch_core.h"

namespace semcorr {
namespace kabsch {
namespace {

// Problems per parallel chunk: enough work (~P * grain points) to amortise scheduling.
int64_t grain_for(int64_t P) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(P, 1)); }

template <typename T, int D>
void fwd_kernel(const T* src, const T* tgt, const T* w, int64_t B, int64_t P, bool estimate_scale, T min_s, T max_s,
                T* R, T* t, T* s, T* stats) {
  using L = StatsLayout<D>;
  at::parallel_for(0, B, grain_for(P), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* xs = src + b * P * D;
      const T* ys = tgt + b * P * D;
      const T* wb = w ? w + b * P : nullptr;
      Acc1<T, D> a1;
      acc1_init(a1);
      for (int64_t i = 0; i < P; ++i) {
        T x[D], y[D];
        const T wi = read_point<T, D>(xs, ys, wb, i, x, y);
        acc1_add(a1, wi, x, y);
      }
      Moments<T, D> m;
      if (moments_begin(a1, m)) {
        Acc2<T, D> a2;
        acc2_init(a2);
        for (int64_t i = 0; i < P; ++i) {
          T x[D], y[D];
          const T wi = read_point<T, D>(xs, ys, wb, i, x, y);
          acc2_add(a2, m, wi, x, y);
        }
        moments_end(a2, m);
      }
      Solution<T, D> sol;
      solve(m, estimate_scale, min_s, max_s, sol);
      for (int k = 0; k < D * D; ++k) R[b * D * D + k] = sol.R[k];
      for (int k = 0; k < D; ++k) t[b * D + k] = sol.t[k];
      s[b] = sol.s;
      write_stats(m, sol, stats + b * L::kSize);
    }
  });
}

template <typename T, int D>
void bwd_kernel(const T* gR, const T* gt, const T* gs, const T* src, const T* tgt, const T* w, const T* R, const T* s,
                const T* stats, int64_t B, int64_t P, bool estimate_scale, T min_s, T max_s, T* gsrc, T* gtgt, T* gw) {
  using L = StatsLayout<D>;
  at::parallel_for(0, B, grain_for(P), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      MomentGrads<T, D> g;
      backward_moments<T, D>(stats + b * L::kSize, R + b * D * D, s[b], gR + b * D * D, gt + b * D, gs[b],
                             estimate_scale, min_s, max_s, g);
      const T* xs = src + b * P * D;
      const T* ys = tgt + b * P * D;
      const T* wb = w ? w + b * P : nullptr;
      for (int64_t i = 0; i < P; ++i) {
        T x[D], y[D], gx[D], gy[D], gwi;
        const T wi = read_point<T, D>(xs, ys, wb, i, x, y);
        point_backward<T, D>(g, wi, x, y, gx, gy, gwi);
        for (int k = 0; k < D; ++k) {
          gsrc[(b * P + i) * D + k] = gx[k];
          gtgt[(b * P + i) * D + k] = gy[k];
        }
        if (gw) gw[b * P + i] = gwi;
      }
    }
  });
}

}  // namespace

FwdResult kabsch_fwd_cpu(const at::Tensor& src_, const at::Tensor& tgt_, const std::optional<at::Tensor>& weights,
                         bool estimate_scale, double min_scale, double max_scale) {
  const int64_t D = check_fwd_inputs(src_, tgt_, weights);
  TORCH_CHECK(src_.device().is_cpu(), "kabsch_fwd_cpu: tensors must be on the CPU");
  const at::Tensor src = src_.contiguous(), tgt = tgt_.contiguous();
  const at::Tensor w = weights.has_value() ? weights->contiguous() : at::Tensor();
  const int64_t B = src.size(0), P = src.size(1);
  auto opts = src.options();
  at::Tensor R = at::empty({B, D, D}, opts), t = at::empty({B, D}, opts), s = at::empty({B}, opts);
  at::Tensor stats = at::empty({B, 5 + 2 * D + D * D}, opts);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "kabsch_fwd_cpu", [&] {
    const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto dim) {
      constexpr int DD = decltype(dim)::value;
      fwd_kernel<scalar_t, DD>(src.const_data_ptr<scalar_t>(), tgt.const_data_ptr<scalar_t>(), wp, B, P,
                               estimate_scale, scalar_t(min_scale), scalar_t(max_scale), R.mutable_data_ptr<scalar_t>(),
                               t.mutable_data_ptr<scalar_t>(), s.mutable_data_ptr<scalar_t>(),
                               stats.mutable_data_ptr<scalar_t>());
    };
    if (D == 3) {
      run(std::integral_constant<int, 3>{});
    } else {
      run(std::integral_constant<int, 2>{});
    }
  });
  return {R, t, s, stats};
}

BwdResult kabsch_bwd_cpu(const at::Tensor& grad_R_, const at::Tensor& grad_t_, const at::Tensor& grad_s_,
                         const at::Tensor& src_, const at::Tensor& tgt_, const std::optional<at::Tensor>& weights,
                         const at::Tensor& R_, const at::Tensor& s_, const at::Tensor& stats_, bool estimate_scale,
                         double min_scale, double max_scale) {
  const int64_t D = check_fwd_inputs(src_, tgt_, weights);
  check_bwd_inputs(grad_R_, grad_t_, grad_s_, src_, R_, s_, stats_);
  TORCH_CHECK(src_.device().is_cpu(), "kabsch_bwd_cpu: tensors must be on the CPU");
  const at::Tensor src = src_.contiguous(), tgt = tgt_.contiguous();
  const at::Tensor w = weights.has_value() ? weights->contiguous() : at::Tensor();
  const at::Tensor gR = grad_R_.contiguous(), gt = grad_t_.contiguous(), gs = grad_s_.contiguous();
  const at::Tensor R = R_.contiguous(), s = s_.contiguous(), stats = stats_.contiguous();
  const int64_t B = src.size(0), P = src.size(1);
  at::Tensor gsrc = at::empty_like(src), gtgt = at::empty_like(tgt);
  at::Tensor gw = w.defined() ? at::empty_like(w) : at::empty({0}, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "kabsch_bwd_cpu", [&] {
    const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gwp = w.defined() ? gw.mutable_data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto dim) {
      constexpr int DD = decltype(dim)::value;
      bwd_kernel<scalar_t, DD>(gR.const_data_ptr<scalar_t>(), gt.const_data_ptr<scalar_t>(),
                               gs.const_data_ptr<scalar_t>(), src.const_data_ptr<scalar_t>(),
                               tgt.const_data_ptr<scalar_t>(), wp, R.const_data_ptr<scalar_t>(),
                               s.const_data_ptr<scalar_t>(), stats.const_data_ptr<scalar_t>(), B, P, estimate_scale,
                               scalar_t(min_scale), scalar_t(max_scale), gsrc.mutable_data_ptr<scalar_t>(),
                               gtgt.mutable_data_ptr<scalar_t>(), gwp);
    };
    if (D == 3) {
      run(std::integral_constant<int, 3>{});
    } else {
      run(std::integral_constant<int, 2>{});
    }
  });
  return {gsrc, gtgt, gw};
}

// The 3x3 rotation solve alone (issue 4's "3x3 solve vs torch.linalg.svd" comparison and a
// building block for callers that already have M): R = argmax_R tr(R^T M) over SO(3) for each of
// the B matrices, computed by the same rotation3 (Horn quaternion + Jacobi) the kabsch op runs.
// Non-unique maximisers give the rotation closest to the identity (as in the op); non-finite
// entries give an unspecified (possibly NaN) R. Forward only, no autograd.
at::Tensor kabsch_rotation3_cpu(const at::Tensor& M_) {
  TORCH_CHECK(M_.dim() == 3 && M_.size(1) == 3 && M_.size(2) == 3,
              "kabsch_rotation3: M must have shape (B, 3, 3), got ", M_.sizes());
  TORCH_CHECK(M_.device().is_cpu(), "kabsch_rotation3: M must be on the CPU");
  TORCH_CHECK(M_.scalar_type() == at::kFloat || M_.scalar_type() == at::kDouble,
              "kabsch_rotation3: M must be float32 or float64, got ", M_.scalar_type());
  const at::Tensor M = M_.contiguous();
  const int64_t B = M.size(0);
  at::Tensor R = at::empty({B, 3, 3}, M.options());
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "kabsch_rotation3_cpu", [&] {
    const scalar_t* mp = M.const_data_ptr<scalar_t>();
    scalar_t* rp = R.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 256, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        scalar_t Mb[9], Rb[9];
        for (int k = 0; k < 9; ++k) Mb[k] = mp[b * 9 + k];
        int flags = 0;
        rotation3<scalar_t>(Mb, Rb, flags);
        for (int k = 0; k < 9; ++k) rp[b * 9 + k] = Rb[k];
      }
    });
  });
  return R;
}

}  // namespace kabsch
}  // namespace semcorr

TORCH_LIBRARY_FRAGMENT(semcorr_ext, m) {
  m.def(
      "kabsch_fwd(Tensor src, Tensor tgt, Tensor? weights, bool estimate_scale, float min_scale, float max_scale)"
      " -> (Tensor R, Tensor t, Tensor s, Tensor stats)");
  m.def(
      "kabsch_bwd(Tensor grad_R, Tensor grad_t, Tensor grad_s, Tensor src, Tensor tgt, Tensor? weights, Tensor R,"
      " Tensor s, Tensor stats, bool estimate_scale, float min_scale, float max_scale)"
      " -> (Tensor grad_src, Tensor grad_tgt, Tensor grad_weights)");
  m.def("kabsch_rotation3(Tensor M) -> Tensor R");
}

TORCH_LIBRARY_IMPL(semcorr_ext, CPU, m) {
  m.impl("kabsch_fwd", &semcorr::kabsch::kabsch_fwd_cpu);
  m.impl("kabsch_bwd", &semcorr::kabsch::kabsch_bwd_cpu);
  m.impl("kabsch_rotation3", &semcorr::kabsch::kabsch_rotation3_cpu);
}
