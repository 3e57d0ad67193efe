// kabsch: batched weighted Kabsch-Umeyama (rotation, translation, optional scale).
//
// For each of B problems, find R in SO(D), t in R^D and s > 0 minimising
//     sum_i w_i | s R src_i + t - tgt_i |^2            (column vectors: x -> s R x + t)
// Closed form per problem (math in kabsch_core.h): weighted centroids, the D x D cross-covariance
// M = sum w (tgt_i - mu_t)(src_i - mu_s)^T / sum w, R = argmax tr(R^T M) (Horn's quaternion
// method for D = 3, atan2 for D = 2), s = clamp(tr(R^T M) / var_s, min_scale, max_scale) when
// estimate_scale (else 1), t = mu_t - s R mu_s.
//
// Shapes (B problems, P points, D in {2, 3}; all tensors of one dtype, float32 or float64, one
// device, contiguous or made so):
//   src      (B, P, D)   source points
//   tgt      (B, P, D)   target points
//   weights  (B, P)      optional, >= 0 (not checked here: the Python op raises); absent = all 1
//
// kabsch_fwd(src, tgt, weights, estimate_scale, min_scale, max_scale) -> (R, t, s, stats)
//   R      (B, D, D)     rotation, row-major (R[b, r, c])
//   t      (B, D)        translation
//   s      (B,)          scale (1 when estimate_scale is false)
//   stats  (B, K)        K = 5 + 2D + D^2: per-problem values the backward needs, laid out as
//                        StatsLayout<D> in kabsch_core.h: [sum w, var_s, unclamped scale,
//                        status, flags, mu_s (D), mu_t (D), M (D*D)]. status is 0 ok,
//                        1 degenerate (rotation not unique or a cloud is a single point),
//                        2 empty (all weights 0), 3 non-finite input.
//
// kabsch_bwd(grad_R, grad_t, grad_s, src, tgt, weights, R, s, stats, estimate_scale, min_scale,
//            max_scale) -> (grad_src (B, P, D), grad_tgt (B, P, D), grad_weights (B, P))
//   grad_R (B, D, D), grad_t (B, D), grad_s (B,): gradients of the loss w.r.t. the outputs.
//   grad_weights is an empty tensor when weights is absent.
//
// Both are registered as torch.ops.semcorr_ext.kabsch_fwd / kabsch_bwd with CPU
// (kabsch_cpu.cpp, at::parallel_for over problems) and CUDA (kabsch.cu, one warp per problem)
// implementations; the dispatcher picks one from the tensors' device.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace semcorr {
namespace kabsch {

using FwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

FwdResult kabsch_fwd_cpu(const at::Tensor& src, const at::Tensor& tgt, const std::optional<at::Tensor>& weights,
                         bool estimate_scale, double min_scale, double max_scale);

BwdResult kabsch_bwd_cpu(const at::Tensor& grad_R, const at::Tensor& grad_t, const at::Tensor& grad_s,
                         const at::Tensor& src, const at::Tensor& tgt, const std::optional<at::Tensor>& weights,
                         const at::Tensor& R, const at::Tensor& s, const at::Tensor& stats, bool estimate_scale,
                         double min_scale, double max_scale);

#ifdef WITH_CUDA
FwdResult kabsch_fwd_cuda(const at::Tensor& src, const at::Tensor& tgt, const std::optional<at::Tensor>& weights,
                          bool estimate_scale, double min_scale, double max_scale);

BwdResult kabsch_bwd_cuda(const at::Tensor& grad_R, const at::Tensor& grad_t, const at::Tensor& grad_s,
                          const at::Tensor& src, const at::Tensor& tgt, const std::optional<at::Tensor>& weights,
                          const at::Tensor& R, const at::Tensor& s, const at::Tensor& stats, bool estimate_scale,
                          double min_scale, double max_scale);
#endif

// Shape/dtype checks shared by both implementations (TORCH_CHECK with the argument's name).
// Returns D.
inline int64_t check_fwd_inputs(const at::Tensor& src, const at::Tensor& tgt, const std::optional<at::Tensor>& weights) {
  TORCH_CHECK(src.dim() == 3, "kabsch: src must be (B, P, D), got ", src.dim(), " dims");
  TORCH_CHECK(tgt.sizes() == src.sizes(), "kabsch: tgt must have the shape of src ", src.sizes(), ", got ", tgt.sizes());
  const int64_t D = src.size(2);
  TORCH_CHECK(D == 2 || D == 3, "kabsch: the point dimension D must be 2 or 3, got ", D);
  TORCH_CHECK(src.scalar_type() == at::kFloat || src.scalar_type() == at::kDouble,
              "kabsch: src must be float32 or float64, got ", src.scalar_type());
  TORCH_CHECK(tgt.scalar_type() == src.scalar_type(), "kabsch: tgt dtype ", tgt.scalar_type(),
              " differs from src dtype ", src.scalar_type());
  TORCH_CHECK(tgt.device() == src.device(), "kabsch: src and tgt must be on one device");
  if (weights.has_value()) {
    const at::Tensor& w = *weights;
    TORCH_CHECK(w.dim() == 2 && w.size(0) == src.size(0) && w.size(1) == src.size(1),
                "kabsch: weights must be (B, P) = (", src.size(0), ", ", src.size(1), "), got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == src.scalar_type(), "kabsch: weights dtype ", w.scalar_type(),
                " differs from src dtype ", src.scalar_type());
    TORCH_CHECK(w.device() == src.device(), "kabsch: weights must be on the device of src");
  }
  return D;
}

inline void check_bwd_inputs(const at::Tensor& grad_R, const at::Tensor& grad_t, const at::Tensor& grad_s,
                             const at::Tensor& src, const at::Tensor& R, const at::Tensor& s, const at::Tensor& stats) {
  const int64_t B = src.size(0), D = src.size(2);
  TORCH_CHECK(grad_R.dim() == 3 && grad_R.size(0) == B && grad_R.size(1) == D && grad_R.size(2) == D,
              "kabsch_bwd: grad_R must be (B, D, D), got ", grad_R.sizes());
  TORCH_CHECK(grad_t.dim() == 2 && grad_t.size(0) == B && grad_t.size(1) == D,
              "kabsch_bwd: grad_t must be (B, D), got ", grad_t.sizes());
  TORCH_CHECK(grad_s.dim() == 1 && grad_s.size(0) == B, "kabsch_bwd: grad_s must be (B,), got ", grad_s.sizes());
  TORCH_CHECK(R.sizes() == grad_R.sizes(), "kabsch_bwd: R must be (B, D, D), got ", R.sizes());
  TORCH_CHECK(s.sizes() == grad_s.sizes(), "kabsch_bwd: s must be (B,), got ", s.sizes());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == B && stats.size(1) == 5 + 2 * D + D * D,
              "kabsch_bwd: stats must be (B, ", 5 + 2 * D + D * D, "), got ", stats.sizes());
  for (const at::Tensor* x : {&grad_R, &grad_t, &grad_s, &R, &s, &stats}) {
    TORCH_CHECK(x->scalar_type() == src.scalar_type(), "kabsch_bwd: all tensors must be ", src.scalar_type(),
                ", got ", x->scalar_type());
    TORCH_CHECK(x->device() == src.device(), "kabsch_bwd: all tensors must be on the device of src");
  }
}

}  // namespace kabsch
}  // namespace semcorr
