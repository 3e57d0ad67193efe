// CUDA implementation of kabsch (shape contract: kabsch.h; math: kabsch_core.h).
//
// One warp per problem: lane l reads points l, l + 32, ... (consecutive lanes read consecutive
// points, so a warp's loads of one pass cover one contiguous span of memory), the moment sums are
// reduced with an xor butterfly (every lane ends with the same bits), then every lane runs the
// same closed-form D x D solve (warp-uniform control flow) and lane 0 writes the outputs. The
// backward recomputes nothing but the per-point step: the moments come from `stats`.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kabsch/kabsch.h"
#include "kabsch/kabsch_core.h"

namespace semcorr {
namespace kabsch {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    kabsch_fwd_kernel(const T* __restrict__ src, const T* __restrict__ tgt, const T* __restrict__ w, int64_t B,
                      int64_t P, bool estimate_scale, T min_s, T max_s, T* __restrict__ R, T* __restrict__ t,
                      T* __restrict__ s, T* __restrict__ stats) {
  using L = StatsLayout<D>;
  const int lane = threadIdx.x & 31;
  const int64_t b = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (b >= B) return;  // b is warp-uniform: whole warps leave
  const T* xs = src + b * P * D;
  const T* ys = tgt + b * P * D;
  const T* wb = w ? w + b * P : nullptr;

  Acc1<T, D> a1;
  acc1_init(a1);
  for (int64_t i = lane; i < P; i += 32) {
    T x[D], y[D];
    const T wi = read_point<T, D>(xs, ys, wb, i, x, y);
    acc1_add(a1, wi, x, y);
  }
#pragma unroll
  for (int k = 0; k < Acc1<T, D>::K; ++k) a1.v[k] = warp_sum(a1.v[k]);

  Moments<T, D> m;
  if (moments_begin(a1, m)) {
    Acc2<T, D> a2;
    acc2_init(a2);
    for (int64_t i = lane; i < P; i += 32) {
      T x[D], y[D];
      const T wi = read_point<T, D>(xs, ys, wb, i, x, y);
      acc2_add(a2, m, wi, x, y);
    }
#pragma unroll
    for (int k = 0; k < Acc2<T, D>::K; ++k) a2.v[k] = warp_sum(a2.v[k]);
    moments_end(a2, m);
  }
  Solution<T, D> sol;
  solve(m, estimate_scale, min_s, max_s, sol);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < D * D; ++k) R[b * D * D + k] = sol.R[k];
#pragma unroll
    for (int k = 0; k < D; ++k) t[b * D + k] = sol.t[k];
    s[b] = sol.s;
    write_stats(m, sol, stats + b * L::kSize);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    kabsch_bwd_kernel(const T* __restrict__ gR, const T* __restrict__ gt, const T* __restrict__ gs,
                      const T* __restrict__ src, const T* __restrict__ tgt, const T* __restrict__ w,
                      const T* __restrict__ R, const T* __restrict__ s, const T* __restrict__ stats, int64_t B,
                      int64_t P, bool estimate_scale, T min_s, T max_s, T* __restrict__ gsrc, T* __restrict__ gtgt,
                      T* __restrict__ gw) {
  using L = StatsLayout<D>;
  const int lane = threadIdx.x & 31;
  const int64_t b = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (b >= B) return;
  MomentGrads<T, D> g;
  backward_moments<T, D>(stats + b * L::kSize, R + b * D * D, s[b], gR + b * D * D, gt + b * D, gs[b],
                         estimate_scale, min_s, max_s, g);
  const T* xs = src + b * P * D;
  const T* ys = tgt + b * P * D;
  const T* wb = w ? w + b * P : nullptr;
  for (int64_t i = lane; i < P; i += 32) {
    T x[D], y[D], gx[D], gy[D], gwi;
    const T wi = read_point<T, D>(xs, ys, wb, i, x, y);
    point_backward<T, D>(g, wi, x, y, gx, gy, gwi);
#pragma unroll
    for (int k = 0; k < D; ++k) {
      gsrc[(b * P + i) * D + k] = gx[k];
      gtgt[(b * P + i) * D + k] = gy[k];
    }
    if (gw) gw[b * P + i] = gwi;
  }
}

unsigned blocks_for(int64_t B) { return static_cast<unsigned>((B + kWarpsPerBlock - 1) / kWarpsPerBlock); }

}  // namespace

FwdResult kabsch_fwd_cuda(const at::Tensor& src_, const at::Tensor& tgt_, const std::optional<at::Tensor>& weights,
                          bool estimate_scale, double min_scale, double max_scale) {
  const int64_t D = check_fwd_inputs(src_, tgt_, weights);
  TORCH_CHECK(src_.is_cuda(), "kabsch_fwd_cuda: tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(src_.device());
  const at::Tensor src = src_.contiguous(), tgt = tgt_.contiguous();
  const at::Tensor w = weights.has_value() ? weights->contiguous() : at::Tensor();
  const int64_t B = src.size(0), P = src.size(1);
  auto opts = src.options();
  at::Tensor R = at::empty({B, D, D}, opts), t = at::empty({B, D}, opts), s = at::empty({B}, opts);
  at::Tensor stats = at::empty({B, 5 + 2 * D + D * D}, opts);
  if (B == 0) return {R, t, s, stats};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "kabsch_fwd_cuda", [&] {
    const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto dim) {
      constexpr int DD = decltype(dim)::value;
      kabsch_fwd_kernel<scalar_t, DD><<<blocks_for(B), kThreads, 0, stream>>>(
          src.const_data_ptr<scalar_t>(), tgt.const_data_ptr<scalar_t>(), wp, B, P, estimate_scale,
          scalar_t(min_scale), scalar_t(max_scale), R.mutable_data_ptr<scalar_t>(), t.mutable_data_ptr<scalar_t>(),
          s.mutable_data_ptr<scalar_t>(), stats.mutable_data_ptr<scalar_t>());
    };
    if (D == 3) {
      run(std::integral_constant<int, 3>{});
    } else {
      run(std::integral_constant<int, 2>{});
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {R, t, s, stats};
}

BwdResult kabsch_bwd_cuda(const at::Tensor& grad_R_, const at::Tensor& grad_t_, const at::Tensor& grad_s_,
                          const at::Tensor& src_, const at::Tensor& tgt_, const std::optional<at::Tensor>& weights,
                          const at::Tensor& R_, const at::Tensor& s_, const at::Tensor& stats_, bool estimate_scale,
                          double min_scale, double max_scale) {
  const int64_t D = check_fwd_inputs(src_, tgt_, weights);
  check_bwd_inputs(grad_R_, grad_t_, grad_s_, src_, R_, s_, stats_);
  TORCH_CHECK(src_.is_cuda(), "kabsch_bwd_cuda: tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(src_.device());
  const at::Tensor src = src_.contiguous(), tgt = tgt_.contiguous();
  const at::Tensor w = weights.has_value() ? weights->contiguous() : at::Tensor();
  const at::Tensor gR = grad_R_.contiguous(), gt = grad_t_.contiguous(), gs = grad_s_.contiguous();
  const at::Tensor R = R_.contiguous(), s = s_.contiguous(), stats = stats_.contiguous();
  const int64_t B = src.size(0), P = src.size(1);
  at::Tensor gsrc = at::empty_like(src), gtgt = at::empty_like(tgt);
  at::Tensor gw = w.defined() ? at::empty_like(w) : at::empty({0}, src.options());
  if (B == 0) return {gsrc, gtgt, gw};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "kabsch_bwd_cuda", [&] {
    const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gwp = w.defined() ? gw.mutable_data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto dim) {
      constexpr int DD = decltype(dim)::value;
      kabsch_bwd_kernel<scalar_t, DD><<<blocks_for(B), kThreads, 0, stream>>>(
          gR.const_data_ptr<scalar_t>(), gt.const_data_ptr<scalar_t>(), gs.const_data_ptr<scalar_t>(),
          src.const_data_ptr<scalar_t>(), tgt.const_data_ptr<scalar_t>(), wp, R.const_data_ptr<scalar_t>(),
          s.const_data_ptr<scalar_t>(), stats.const_data_ptr<scalar_t>(), B, P, estimate_scale, scalar_t(min_scale),
          scalar_t(max_scale), gsrc.mutable_data_ptr<scalar_t>(), gtgt.mutable_data_ptr<scalar_t>(), gwp);
    };
    if (D == 3) {
      run(std::integral_constant<int, 3>{});
    } else {
      run(std::integral_constant<int, 2>{});
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gsrc, gtgt, gw};
}

}  // namespace kabsch
}  // namespace semcorr

TORCH_LIBRARY_IMPL(semcorr_ext, CUDA, m) {
  m.impl("kabsch_fwd", &semcorr::kabsch::kabsch_fwd_cuda);
  m.impl("kabsch_bwd", &semcorr::kabsch::kabsch_bwd_cuda);
}
