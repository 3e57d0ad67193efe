// CUDA C++ kernels of match_topk and window_soft_argmax (forward and backward, outside="exclude" and
// "zero"). Op semantics: correlation.h; math: ../shared/docs/math.md; the per-row math (top-k
// insertion, the window, its softmax shift and closed-form outside mass, dL/ds) is shared with the CPU
// kernels through correlation_core.h. Same outputs and dtypes as correlation_cpu.cpp: fp32
// accumulation and outputs for fp32/bf16/fp16 inputs, fp64 for fp64, gradients in the input dtype.
//
// These kernels are the plain-CUDA fallback (backend="cuda"): correct on any shape, no tensor cores.
// The fast GPU path is the Triton backend (kernels/), which does the similarity tiles with tl.dot.
//
// match_topk (also pass 1 of window_soft_argmax, with k = 1):
//   inv_norms_kernel   one warp per row: r = 1 / max(‖x‖, 1e-12) (1 when !normalize).
//   topk_kernel        a block of 8 warps owns 32 query rows of one batch item (4 per warp) and walks
//                      its target range in tiles of 32 targets (one per lane); each tile's 32x32
//                      similarities are accumulated over channel chunks of 32 staged in shared memory
//                      (fp32, converted once on load). Then per row: a ballot of the lanes above the
//                      row's current k-th value, and those candidates inserted in increasing target
//                      order with core::topk_insert by lane 0 (so ties keep the lowest index, NaN and
//                      masked targets never pass the strict compare). Lists live in shared memory
//                      for k <= 16, else directly in the output buffer.
//   topk_merge_kernel  when there are too few row blocks to fill the GPU, the target range is split
//                      in S contiguous parts (one block per part), each writes its own sorted list,
//                      and one thread per row merges them in part order (which keeps the tie rule).
// window_soft_argmax_fwd: pass 1 as above; pass 2 one warp per row over the <= (2r+1)² window cells,
//   lanes over channels (4 cells per sweep, xor-butterfly sums so every lane holds the same logit):
//   the max (the first 256 logits cached in shared memory), then the softmax sums with
//   core::window_shift / core::window_add_outside.
// window_soft_argmax_bwd: one warp per row recomputes its window logits, ds with core::soft_argmax_ds;
//   dâ_u accumulates in shared memory (global scratch when C is too large), db̂_v with atomicAdd into
//   an fp32/fp64 buffer: a target cell receives contributions only from the rows whose window
//   contains it (at most (2r+1)² centre cells' worth of rows), so contention stays low and the
//   buffer is O(Nt·C); the price is a summation order that varies from run to run (not bitwise
//   deterministic in the last bits). Then the normalisation backward (fused for the rows, one warp
//   per target row for the targets) and the cast to the input dtype.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "common/dispatch.h"
#include "correlation/correlation.h"
#include "correlation/correlation_core.h"

namespace semcorr {
namespace {

using at::Tensor;

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarps = 8;  // every kernel: blocks of 8 warps
constexpr int kThreads = kWarps * 32;
// topk_kernel tiling
constexpr int kRowsPerWarp = 4;
constexpr int kRowsBlk = kWarps * kRowsPerWarp;  // query rows per block
constexpr int kTileN = 32;                       // targets per tile: one per lane
constexpr int kKC = 32;                          // channels per shared-memory chunk
constexpr int kSmemK = 16;                       // k up to this keeps the lists in shared memory
constexpr int64_t kMinTilesPerSplit = 8;         // a target split covers at least 256 targets
constexpr int64_t kMaxSplitEntries = int64_t(1) << 22;  // cap on the split scratch (rows·S·k entries)
static_assert(kRowsBlk == kTileN && (kRowsBlk * kKC) % kThreads == 0, "tile loader assumes these");
// window kernels
constexpr int kCells = 4;      // window cells per sweep over the channels
constexpr int kZCache = 256;   // logits cached per row in the forward ((2r+1)² for r <= 7)
static_assert(kZCache % kCells == 0, "the recompute loop starts on a sweep boundary");
constexpr size_t kMaxDynSmem = 48 * 1024;  // dynamic shared memory without an opt-in

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// NaN-propagating max (as nan_max in correlation_cpu.cpp).
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (a != a || b != b) ? std::numeric_limits<T>::quiet_NaN() : (a > b ? a : b);
}

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t ld(const T* p) {
  return static_cast<acc_t>(*p);
}

// ------------------------------------------------------------------ shared pieces
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    inv_norms_kernel(const T* __restrict__ x, int64_t rows, int64_t C, bool normalize, acc_t* __restrict__ r) {
  const int lane = threadIdx.x & 31;
  const int64_t i = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (i >= rows) return;  // warp-uniform
  if (!normalize) {
    if (lane == 0) r[i] = acc_t(1);
    return;
  }
  const T* p = x + i * C;
  acc_t s = 0;
  for (int64_t c = lane; c < C; c += 32) {
    const acc_t v = ld<acc_t>(p + c);
    s += v * v;
  }
  s = warp_sum(s);
  if (lane == 0) {
    const acc_t n = sqrt(s);
    r[i] = acc_t(1) / (n < acc_t(1e-12) ? acc_t(1e-12) : n);  // std::max(n, ε): NaN stays NaN
  }
}

// Through x̂ = x·r (math.md): ‖x‖ > ε: dx = r(dx̂ − x̂⟨x̂, dx̂⟩); ‖x‖ ≤ ε: dx = r·dx̂; no
// normalisation: dx = dx̂. One warp, lanes over channels; written in the input dtype.
template <typename T, typename acc_t>
__device__ __forceinline__ void norm_bwd_row(const T* __restrict__ x, acc_t r, const acc_t* dxh, T* __restrict__ dx,
                                             int64_t C, bool normalize, int lane) {
  if (!normalize) {
    for (int64_t c = lane; c < C; c += 32) dx[c] = static_cast<T>(dxh[c]);
    return;
  }
  const bool clamped = !(r < acc_t(1e12));  // ‖x‖ ≤ ε (as norm_backward in stream_engine.h)
  acc_t dot = 0;
  if (!clamped) {
    for (int64_t c = lane; c < C; c += 32) dot += ld<acc_t>(x + c) * r * dxh[c];
    dot = warp_sum(dot);
  }
  for (int64_t c = lane; c < C; c += 32) {
    const acc_t proj = clamped ? acc_t(0) : ld<acc_t>(x + c) * r * dot;
    dx[c] = static_cast<T>(r * (dxh[c] - proj));
  }
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    norm_bwd_kernel(const T* __restrict__ x, const acc_t* __restrict__ r, const acc_t* __restrict__ dxh, int64_t rows,
                    int64_t C, bool normalize, T* __restrict__ dx) {
  const int lane = threadIdx.x & 31;
  const int64_t i = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (i >= rows) return;
  norm_bwd_row<T, acc_t>(x + i * C, r[i], dxh + i * C, dx + i * C, C, normalize, lane);
}

// ------------------------------------------------------------------ running top-k
// Grid: one block per (batch b, target split sp, block of 32 query rows rb), flattened as
// blockIdx.x = (b·S + sp)·nrb + rb. Split sp covers targets [sp·tps·32, min(Nt, (sp+1)·tps·32)) and
// writes row u's sorted list to out_v/out_i + ((b·Ns + u)·S + sp)·k (S = 1: the op's outputs).
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    topk_kernel(const T* __restrict__ src, const T* __restrict__ tgt, const acc_t* __restrict__ rs,
                const acc_t* __restrict__ rt, const bool* __restrict__ mask, int64_t Ns, int64_t Nt, int64_t C,
                int64_t k, int64_t nrb, int64_t S, int64_t tps, acc_t* __restrict__ out_v,
                int64_t* __restrict__ out_i) {
  __shared__ acc_t Qs[kRowsBlk][kKC];
  __shared__ acc_t Ts[kTileN][kKC + 1];  // +1: lane j reads row j, column c: conflict-free banks
  __shared__ acc_t Lv[kRowsBlk][kSmemK];
  __shared__ int64_t Li[kRowsBlk][kSmemK];
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t blk = blockIdx.x;
  const int64_t rb = blk % nrb, sp = (blk / nrb) % S, b = blk / nrb / S;
  const int64_t r0 = rb * kRowsBlk;
  const int64_t v_begin = sp * tps * kTileN, v_end = imin(Nt, (sp + 1) * tps * kTileN);
  const bool smem_list = k <= kSmemK;
  const T* sb = src + b * Ns * C;
  const T* tb = tgt + b * Nt * C;

  // The list of this warp's i-th row (u = r0 + warp·4 + i < Ns).
  auto list_v = [&](int i) -> acc_t* {
    const int lr = warp * kRowsPerWarp + i;
    return smem_list ? &Lv[lr][0] : out_v + ((b * Ns + r0 + lr) * S + sp) * k;
  };
  auto list_i = [&](int i) -> int64_t* {
    const int lr = warp * kRowsPerWarp + i;
    return smem_list ? &Li[lr][0] : out_i + ((b * Ns + r0 + lr) * S + sp) * k;
  };

  acc_t rq[kRowsPerWarp], thr[kRowsPerWarp];  // row inverse norm, row's current k-th value
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t u = r0 + warp * kRowsPerWarp + i;
    thr[i] = kNegInf;
    rq[i] = acc_t(0);
    if (u < Ns) {  // warp-uniform
      rq[i] = rs[b * Ns + u];
      acc_t* lv = list_v(i);
      int64_t* li = list_i(i);
      for (int64_t j = lane; j < k; j += 32) {
        lv[j] = kNegInf;
        li[j] = -1;
      }
    }
  }
  __syncwarp();  // lane 0 inserts into what the other lanes initialised

  for (int64_t v0 = v_begin; v0 < v_end; v0 += kTileN) {
    // acc[i] = ⟨src row u_i, tgt row v0 + lane⟩ over all channels, 32 at a time.
    acc_t acc[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) acc[i] = acc_t(0);
    for (int64_t c0 = 0; c0 < C; c0 += kKC) {
      __syncthreads();  // the previous chunk has been read by every warp
#pragma unroll
      for (int it = 0; it < (kRowsBlk * kKC) / kThreads; ++it) {
        const int e = threadIdx.x + it * kThreads;
        const int rr = e / kKC, cc = e % kKC;  // consecutive threads: consecutive channels of a row
        const int64_t c = c0 + cc, u = r0 + rr, v = v0 + rr;
        Qs[rr][cc] = (u < Ns && c < C) ? ld<acc_t>(sb + u * C + c) : acc_t(0);
        Ts[rr][cc] = (v < v_end && c < C) ? ld<acc_t>(tb + v * C + c) : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int cc = 0; cc < kKC; ++cc) {  // zero padding past C contributes exactly 0
        const acc_t t = Ts[lane][cc];
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) acc[i] += Qs[warp * kRowsPerWarp + i][cc] * t;
      }
    }

    const int64_t v = v0 + lane;
    const bool vok = v < v_end && (mask == nullptr || mask[b * Nt + v]);
    const acc_t rtv = vok ? rt[b * Nt + v] : acc_t(0);
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int64_t u = r0 + warp * kRowsPerWarp + i;
      if (u >= Ns) continue;  // warp-uniform
      const acc_t s = acc[i] * rq[i] * rtv;  // (dot·r_u)·r_v, as scale_tile on the CPU
      // NaN and masked targets never pass: the compare is strict and NaN compares false.
      unsigned cand = __ballot_sync(kFull, vok && s > thr[i]);
      if (cand == 0) continue;
      acc_t* lv = list_v(i);
      int64_t* li = list_i(i);
      while (cand) {  // lowest lane = lowest target index first: ties keep the lowest index
        const int j = __ffs(cand) - 1;
        cand &= cand - 1;
        const acc_t sj = __shfl_sync(kFull, s, j);
        if (sj > thr[i]) {  // the threshold rises as candidates go in
          acc_t t = thr[i];
          if (lane == 0) {
            core::topk_insert<acc_t>(lv, li, k, sj, v0 + j);
            t = lv[k - 1];
          }
          thr[i] = __shfl_sync(kFull, t, 0);
        }
      }
    }
  }

  if (smem_list) {
    __syncwarp();  // lane 0's insertions are visible to the copying lanes
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int lr = warp * kRowsPerWarp + i;
      const int64_t u = r0 + lr;
      if (u >= Ns) continue;
      const int64_t off = ((b * Ns + u) * S + sp) * k;
      for (int64_t j = lane; j < k; j += 32) {
        out_v[off + j] = Lv[lr][j];
        out_i[off + j] = Li[lr][j];
      }
    }
  }
}

// One thread per row: merge the S per-split lists (each sorted by value desc, index asc) in split
// order. Splits hold increasing target ranges and a list holds equal values in index order, so
// inserting with the strict compare of core::topk_insert keeps ties → lowest index. A list is
// descending: its first value that does not beat the row's k-th value ends it.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    topk_merge_kernel(const acc_t* __restrict__ pv, const int64_t* __restrict__ pi, int64_t rows, int64_t S,
                      int64_t k, acc_t* __restrict__ ov, int64_t* __restrict__ oi) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  acc_t* v = ov + r * k;
  int64_t* id = oi + r * k;
  const acc_t* p0 = pv + r * S * k;
  const int64_t* i0 = pi + r * S * k;
  for (int64_t j = 0; j < k; ++j) {
    v[j] = p0[j];
    id[j] = i0[j];
  }
  acc_t thr = v[k - 1];
  for (int64_t s = 1; s < S; ++s) {
    const acc_t* ps = p0 + s * k;
    const int64_t* is = i0 + s * k;
    for (int64_t j = 0; j < k; ++j) {
      const acc_t x = ps[j];
      if (!(x > thr)) break;
      core::topk_insert<acc_t>(v, id, k, x, is[j]);
      thr = v[k - 1];
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned grid_size(int64_t blocks) {
  TORCH_CHECK(blocks <= int64_t(std::numeric_limits<int>::max()), "semcorr CUDA kernels: problem too large (",
              blocks, " blocks)");
  return static_cast<unsigned>(blocks);
}
unsigned warp_blocks(int64_t rows) { return grid_size(ceil_div(rows, kWarps)); }

Tensor out_like(const Tensor& x, at::IntArrayRef shape) {
  return at::empty(shape, x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
}

template <typename acc_t>
at::ScalarType acc_dtype() {
  return std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
}

// r per row of x (B, N, C), in acc_t.
template <typename T, typename acc_t>
Tensor inv_norms(const Tensor& x, bool normalize, cudaStream_t stream) {
  const int64_t rows = x.size(0) * x.size(1), C = x.size(2);
  Tensor r = at::empty({rows}, x.options().dtype(acc_dtype<acc_t>()));
  if (rows > 0) {
    inv_norms_kernel<T, acc_t><<<warp_blocks(rows), kThreads, 0, stream>>>(x.const_data_ptr<T>(), rows, C, normalize,
                                                                           r.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return r;
}

// Top-k of every row of src (B, Ns > 0, C) over tgt (B, Nt, C) into vals/idx (B, Ns, k).
template <typename T, typename acc_t>
void run_topk(const Tensor& src, const Tensor& tgt, const Tensor& rs, const Tensor& rt, const bool* mask, int64_t k,
              acc_t* vals, int64_t* idx, cudaStream_t stream) {
  const int64_t B = src.size(0), Ns = src.size(1), Nt = tgt.size(1), C = src.size(2);
  const int64_t nrb = ceil_div(Ns, kRowsBlk), ntiles = ceil_div(Nt, kTileN), rows = B * Ns;
  // Split the targets when the row blocks alone cannot fill the GPU (keypoint mode: tens of rows).
  int64_t S = 1, tps = ntiles;
  if (ntiles > 0) {
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    S = std::min(ceil_div(4 * sms, B * nrb), ceil_div(ntiles, kMinTilesPerSplit));
    S = std::min(S, kMaxSplitEntries / std::max<int64_t>(rows * k, 1));
    S = std::max<int64_t>(S, 1);
    tps = ceil_div(ntiles, S);
    S = ceil_div(ntiles, tps);
  }
  const unsigned grid = grid_size(B * S * nrb);
  const T* sp = src.const_data_ptr<T>();
  const T* tp = tgt.const_data_ptr<T>();
  const acc_t* rsp = rs.const_data_ptr<acc_t>();
  const acc_t* rtp = rt.const_data_ptr<acc_t>();
  if (S == 1) {
    topk_kernel<T, acc_t><<<grid, kThreads, 0, stream>>>(sp, tp, rsp, rtp, mask, Ns, Nt, C, k, nrb, 1, tps, vals, idx);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  Tensor pv = at::empty({rows * S * k}, src.options().dtype(acc_dtype<acc_t>()));
  Tensor pi = at::empty({rows * S * k}, src.options().dtype(at::kLong));
  topk_kernel<T, acc_t><<<grid, kThreads, 0, stream>>>(sp, tp, rsp, rtp, mask, Ns, Nt, C, k, nrb, S, tps,
                                                       pv.mutable_data_ptr<acc_t>(), pi.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  topk_merge_kernel<acc_t><<<grid_size(ceil_div(rows, kThreads)), kThreads, 0, stream>>>(
      pv.const_data_ptr<acc_t>(), pi.const_data_ptr<int64_t>(), rows, S, k, vals, idx);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------ window soft-argmax
// Walks a window's cells in row-major order, kCells at a time, without integer divisions (64-bit
// division is a called subroutine on the GPU). Slots past the window's end repeat the last cell; the
// callers ignore them.
struct WindowCursor {
  int64_t x, y;  // the next cell
  __device__ __forceinline__ explicit WindowCursor(const core::Window& w) : x(w.x0), y(w.y0) {}
  __device__ __forceinline__ WindowCursor(const core::Window& w, int dy, int dx) : x(w.x0 + dx), y(w.y0 + dy) {}
  __device__ __forceinline__ void next(const core::Window& w, int64_t W, int nvalid, int64_t (&v)[kCells],
                                       int64_t (&gx)[kCells], int64_t (&gy)[kCells]) {
#pragma unroll
    for (int j = 0; j < kCells; ++j) {
      if (j == 0 || j < nvalid) {
        gx[j] = x;
        gy[j] = y;
        if (++x > w.x1) {
          x = w.x0;
          ++y;
        }
      } else {
        gx[j] = gx[j - 1];
        gy[j] = gy[j - 1];
      }
      v[j] = gy[j] * W + gx[j];
    }
  }
};

// d[j] = ⟨q, tb[v[j]]⟩, lanes over channels; the xor butterfly leaves the same bits in every lane.
template <typename T, typename acc_t>
__device__ __forceinline__ void warp_dots(const T* __restrict__ q, const T* __restrict__ tb, const int64_t (&v)[kCells],
                                          int64_t C, int lane, acc_t (&d)[kCells]) {
#pragma unroll
  for (int j = 0; j < kCells; ++j) d[j] = acc_t(0);
  for (int64_t c = lane; c < C; c += 32) {
    const acc_t a = ld<acc_t>(q + c);
#pragma unroll
    for (int j = 0; j < kCells; ++j) d[j] += a * ld<acc_t>(tb + v[j] * C + c);
  }
#pragma unroll
  for (int j = 0; j < kCells; ++j) d[j] = warp_sum(d[j]);
}

// One warp per row ru of (B·Ns): out (x, y) and lse of the window softmax around center[ru].
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    window_fwd_kernel(const T* __restrict__ src, const T* __restrict__ tgt, const acc_t* __restrict__ rs,
                      const acc_t* __restrict__ rt, const int64_t* __restrict__ center, int64_t rows, int64_t Ns,
                      int64_t Nt, int64_t C, int64_t H, int64_t W, int64_t radius, bool zero_outside, acc_t inv_tau,
                      acc_t* __restrict__ out, acc_t* __restrict__ lse) {
  __shared__ acc_t zc[kWarps][kZCache];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t ru = int64_t(blockIdx.x) * kWarps + warp;
  if (ru >= rows) return;  // warp-uniform; no block-wide barrier below
  const int64_t b = ru / Ns, cen = center[ru];
  if (cen < 0) {  // the row has no number: NaN
    if (lane == 0) out[2 * ru] = out[2 * ru + 1] = lse[ru] = std::numeric_limits<acc_t>::quiet_NaN();
    return;
  }
  const core::Window w = core::window_of(cen, H, W, radius);
  const int64_t cnt = w.count(), ncol = w.x1 - w.x0 + 1;
  const T* q = src + ru * C;
  const T* tb = tgt + b * Nt * C;
  const acc_t* rtb = rt + b * Nt;
  const acc_t rsu = rs[ru];
  acc_t* z = zc[warp];

  // Max of the in-window logits z = s/τ (the first kZCache kept for the sums).
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  WindowCursor cur(w);
  for (int64_t q0 = 0; q0 < cnt; q0 += kCells) {
    int64_t v[kCells], gx[kCells], gy[kCells];
    acc_t d[kCells];
    cur.next(w, W, int(imin(kCells, cnt - q0)), v, gx, gy);
    warp_dots<T, acc_t>(q, tb, v, C, lane, d);
#pragma unroll
    for (int j = 0; j < kCells; ++j) {
      if (q0 + j >= cnt) break;
      const acc_t zj = d[j] * rsu * rtb[v[j]] * inv_tau;
      mx = nan_max(mx, zj);
      if (lane == 0 && q0 + j < kZCache) z[q0 + j] = zj;
    }
  }
  mx = core::window_shift<acc_t>(mx, cnt, Nt, zero_outside);
  __syncwarp();  // lane 0's cached logits are visible to every lane

  // Z = Σ e^{z−m}, (sx, sy) = Σ e^{z−m} g: cached cells lane-parallel, the rest recomputed.
  acc_t Z = 0, sx = 0, sy = 0;
  const int ncached = int(imin(cnt, kZCache)), ncol32 = int(ncol);  // small: 32-bit division is inline
  for (int qq = lane; qq < ncached; qq += 32) {
    const acc_t p = exp(z[qq] - mx);
    Z += p;
    sx += p * acc_t(w.x0 + qq % ncol32);
    sy += p * acc_t(w.y0 + qq / ncol32);
  }
  // Cells past the cache (windows of more than kZCache cells): recomputed.
  if (cnt > kZCache) cur = WindowCursor(w, kZCache / ncol32, kZCache % ncol32);
  for (int64_t q0 = kZCache; q0 < cnt; q0 += kCells) {
    int64_t v[kCells], gx[kCells], gy[kCells];
    acc_t d[kCells];
    cur.next(w, W, int(imin(kCells, cnt - q0)), v, gx, gy);
    warp_dots<T, acc_t>(q, tb, v, C, lane, d);
#pragma unroll
    for (int j = 0; j < kCells; ++j) {
      if (q0 + j < cnt && lane == j) {
        const acc_t p = exp(d[j] * rsu * rtb[v[j]] * inv_tau - mx);
        Z += p;
        sx += p * acc_t(gx[j]);
        sy += p * acc_t(gy[j]);
      }
    }
  }
  Z = warp_sum(Z);
  sx = warp_sum(sx);
  sy = warp_sum(sy);
  if (zero_outside && cnt < Nt) core::window_add_outside<acc_t>(w, H, W, mx, Z, sx, sy);
  if (lane == 0) {
    out[2 * ru] = sx / Z;
    out[2 * ru + 1] = sy / Z;
    lse[ru] = mx + log(Z);
  }
}

// One warp per row ru: dâ_u = Σ_{v∈W_u} ds_uv r_v b_v (in dq: shared memory, or dq_buf), db̂_v +=
// ds_uv r_u a_u by atomicAdd into dk (B·Nt, C), then dsrc_u through the normalisation.
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    window_bwd_kernel(const acc_t* __restrict__ grad, const T* __restrict__ src, const T* __restrict__ tgt,
                      const acc_t* __restrict__ out, const acc_t* __restrict__ lse, const int64_t* __restrict__ center,
                      const acc_t* __restrict__ rs, const acc_t* __restrict__ rt, int64_t rows, int64_t Ns,
                      int64_t Nt, int64_t C, int64_t H, int64_t W, int64_t radius, acc_t inv_tau, bool normalize,
                      bool dq_in_smem, acc_t* __restrict__ dq_buf, acc_t* __restrict__ dk, T* __restrict__ dsrc) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t ru = int64_t(blockIdx.x) * kWarps + warp;
  if (ru >= rows) return;  // warp-uniform; no block-wide barrier below
  // Each lane only ever touches channels c ≡ lane (mod 32) of dq: no synchronisation needed on it.
  acc_t* dq = dq_in_smem ? reinterpret_cast<acc_t*>(smem_raw) + warp * C : dq_buf + ru * C;
  for (int64_t c = lane; c < C; c += 32) dq[c] = acc_t(0);
  const int64_t b = ru / Ns, cen = center[ru];
  const T* q = src + ru * C;
  const acc_t rsu = rs[ru];
  if (cen >= 0) {
    const core::Window w = core::window_of(cen, H, W, radius);
    const int64_t cnt = w.count();
    const acc_t Gx = grad[2 * ru], Gy = grad[2 * ru + 1];
    const acc_t D = Gx * out[2 * ru] + Gy * out[2 * ru + 1];
    const acc_t L = lse[ru];
    const T* tb = tgt + b * Nt * C;
    const acc_t* rtb = rt + b * Nt;
    acc_t* dkb = dk + b * Nt * C;
    WindowCursor cur(w);
    for (int64_t q0 = 0; q0 < cnt; q0 += kCells) {
      int64_t v[kCells], gx[kCells], gy[kCells];
      acc_t d[kCells], cq[kCells], ck[kCells];
      const int nv = int(imin(kCells, cnt - q0));
      cur.next(w, W, nv, v, gx, gy);
      warp_dots<T, acc_t>(q, tb, v, C, lane, d);
#pragma unroll
      for (int j = 0; j < kCells; ++j) {
        const acc_t rtv = rtb[v[j]];
        const acc_t sim = d[j] * rsu * rtv;
        const acc_t ds = core::soft_argmax_ds<acc_t>(sim, inv_tau, L, Gx, Gy, acc_t(gx[j]), acc_t(gy[j]), D);
        cq[j] = ds * rtv;
        ck[j] = ds * rsu;
      }
      for (int64_t c = lane; c < C; c += 32) {
        const acc_t a = ld<acc_t>(q + c);
        acc_t g = dq[c];
#pragma unroll
        for (int j = 0; j < kCells; ++j) {
          if (j < nv) {
            g += cq[j] * ld<acc_t>(tb + v[j] * C + c);
            // Other rows whose window holds v add to the same row of dk: atomics, coalesced over c.
            atomicAdd(dkb + v[j] * C + c, ck[j] * a);
          }
        }
        dq[c] = g;
      }
    }
  }
  __syncwarp();
  norm_bwd_row<T, acc_t>(q, rsu, dq, dsrc + ru * C, C, normalize, lane);
}

// ------------------------------------------------------------------ op entry points
void check_pair(const Tensor& src, const Tensor& tgt, const char* op) {
  TORCH_CHECK(src.dim() == 3 && tgt.dim() == 3, op, ": src and tgt must be (B, N, C)");
  TORCH_CHECK(src.size(0) == tgt.size(0) && src.size(2) == tgt.size(2), op, ": B and C of src and tgt differ");
  TORCH_CHECK(src.scalar_type() == tgt.scalar_type(), op, ": src and tgt dtypes differ");
  TORCH_CHECK(src.is_contiguous() && tgt.is_contiguous(), op, ": src and tgt must be contiguous");
  TORCH_CHECK(src.is_cuda() && tgt.device() == src.device(), op, ": src and tgt must be on one CUDA device, got ",
              src.device(), " and ", tgt.device());
}

void check_rows(const Tensor& t, const Tensor& src, at::IntArrayRef shape, const char* op, const char* name) {
  TORCH_CHECK(t.device() == src.device(), op, ": ", name, " must be on ", src.device(), ", got ", t.device());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

std::tuple<Tensor, Tensor> match_topk_cuda(const Tensor& src, const Tensor& tgt, int64_t k,
                                           const std::optional<Tensor>& tgt_mask, bool normalize) {
  check_pair(src, tgt, "match_topk");
  TORCH_CHECK(k >= 1, "match_topk: k must be >= 1");
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t B = src.size(0), Ns = src.size(1), Nt = tgt.size(1);
  Tensor vals = out_like(src, {B, Ns, k}), idx = at::empty({B, Ns, k}, src.options().dtype(at::kLong));
  Tensor mask;
  if (tgt_mask.has_value() && tgt_mask->defined()) {
    check_rows(*tgt_mask, src, {B, Nt}, "match_topk", "tgt_mask");
    mask = tgt_mask->to(at::kBool).contiguous();
  }
  if (B * Ns == 0) return {vals, idx};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SC_DISPATCH_FLOATING(src.scalar_type(), "match_topk", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const Tensor rs = inv_norms<scalar_t, acc_t>(src, normalize, stream);
    const Tensor rt = inv_norms<scalar_t, acc_t>(tgt, normalize, stream);
    run_topk<scalar_t, acc_t>(src, tgt, rs, rt, mask.defined() ? mask.const_data_ptr<bool>() : nullptr, k,
                              vals.mutable_data_ptr<acc_t>(), idx.mutable_data_ptr<int64_t>(), stream);
  });
  return {vals, idx};
}

std::tuple<Tensor, Tensor, Tensor> window_soft_argmax_fwd_cuda(const Tensor& src, const Tensor& tgt, double tau,
                                                               int64_t H, int64_t W, int64_t radius,
                                                               bool zero_outside, bool normalize) {
  check_pair(src, tgt, "window_soft_argmax_fwd");
  TORCH_CHECK(H * W == tgt.size(1), "window_soft_argmax_fwd: H*W != Nt");
  TORCH_CHECK(tgt.size(1) <= std::numeric_limits<int>::max(), "window_soft_argmax_fwd: Nt must fit in 32 bits");
  TORCH_CHECK(radius >= 0, "window_soft_argmax_fwd: radius must be >= 0");
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t B = src.size(0), Ns = src.size(1), Nt = tgt.size(1), C = src.size(2);
  Tensor out = out_like(src, {B, Ns, 2}), lse = out_like(src, {B, Ns});
  Tensor center = at::empty({B, Ns}, src.options().dtype(at::kLong));
  if (B * Ns == 0) return {out, lse, center};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SC_DISPATCH_FLOATING(src.scalar_type(), "window_soft_argmax_fwd", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const Tensor rs = inv_norms<scalar_t, acc_t>(src, normalize, stream);
    const Tensor rt = inv_norms<scalar_t, acc_t>(tgt, normalize, stream);
    // Pass 1: the argmax (top-1; −1 where the row has no number).
    Tensor best = at::empty({B * Ns}, src.options().dtype(acc_dtype<acc_t>()));
    run_topk<scalar_t, acc_t>(src, tgt, rs, rt, nullptr, 1, best.mutable_data_ptr<acc_t>(),
                              center.mutable_data_ptr<int64_t>(), stream);
    // Pass 2: the window softmax of every row.
    window_fwd_kernel<scalar_t, acc_t><<<warp_blocks(B * Ns), kThreads, 0, stream>>>(
        src.const_data_ptr<scalar_t>(), tgt.const_data_ptr<scalar_t>(), rs.const_data_ptr<acc_t>(),
        rt.const_data_ptr<acc_t>(), center.const_data_ptr<int64_t>(), B * Ns, Ns, Nt, C, H, W, radius, zero_outside,
        acc_t(1.0 / tau), out.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse, center};
}

std::tuple<Tensor, Tensor> window_soft_argmax_bwd_cuda(const Tensor& grad, const Tensor& src, const Tensor& tgt,
                                                       const Tensor& out, const Tensor& lse, const Tensor& center,
                                                       double tau, int64_t H, int64_t W, int64_t radius,
                                                       bool zero_outside, bool normalize) {
  // zero_outside needs nothing here: the outside logits are constants, and lse already holds their mass.
  (void)zero_outside;
  const char* op = "window_soft_argmax_bwd";
  check_pair(src, tgt, op);
  TORCH_CHECK(H * W == tgt.size(1), op, ": H*W != Nt");
  TORCH_CHECK(tgt.size(1) <= std::numeric_limits<int>::max(), op, ": Nt must fit in 32 bits");
  TORCH_CHECK(radius >= 0, op, ": radius must be >= 0");
  const int64_t B = src.size(0), Ns = src.size(1), Nt = tgt.size(1), C = src.size(2);
  check_rows(grad, src, {B, Ns, 2}, op, "grad");
  check_rows(out, src, {B, Ns, 2}, op, "out");
  check_rows(lse, src, {B, Ns}, op, "lse");
  check_rows(center, src, {B, Ns}, op, "center");
  const c10::cuda::CUDAGuard guard(src.device());
  Tensor dsrc = at::empty(src.sizes(), src.options());  // contiguous, like the kernels index it
  Tensor dtgt = at::empty(tgt.sizes(), tgt.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SC_DISPATCH_FLOATING(src.scalar_type(), op, [&] {
    using acc_t = acc_type_t<scalar_t>;
    const auto dt = acc_dtype<acc_t>();
    const Tensor g = grad.to(dt).contiguous(), o = out.to(dt).contiguous(), l = lse.to(dt).contiguous();
    const Tensor cen = center.to(at::kLong).contiguous();
    const Tensor rs = inv_norms<scalar_t, acc_t>(src, normalize, stream);
    const Tensor rt = inv_norms<scalar_t, acc_t>(tgt, normalize, stream);
    Tensor dk = at::zeros({B * Nt * C}, src.options().dtype(dt));
    if (B * Ns > 0) {
      const size_t smem = size_t(kWarps) * size_t(C) * sizeof(acc_t);
      const bool in_smem = smem <= kMaxDynSmem;
      Tensor dq = in_smem ? Tensor() : at::empty({B * Ns * C}, src.options().dtype(dt));
      window_bwd_kernel<scalar_t, acc_t><<<warp_blocks(B * Ns), kThreads, in_smem ? smem : 0, stream>>>(
          g.const_data_ptr<acc_t>(), src.const_data_ptr<scalar_t>(), tgt.const_data_ptr<scalar_t>(),
          o.const_data_ptr<acc_t>(), l.const_data_ptr<acc_t>(), cen.const_data_ptr<int64_t>(),
          rs.const_data_ptr<acc_t>(), rt.const_data_ptr<acc_t>(), B * Ns, Ns, Nt, C, H, W, radius,
          acc_t(1.0 / tau), normalize, in_smem, in_smem ? nullptr : dq.mutable_data_ptr<acc_t>(),
          dk.mutable_data_ptr<acc_t>(), dsrc.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (B * Nt > 0) {
      norm_bwd_kernel<scalar_t, acc_t><<<warp_blocks(B * Nt), kThreads, 0, stream>>>(
          tgt.const_data_ptr<scalar_t>(), rt.const_data_ptr<acc_t>(), dk.const_data_ptr<acc_t>(), B * Nt, C, normalize,
          dtgt.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dsrc, dtgt};
}

}  // namespace
}  // namespace semcorr

TORCH_LIBRARY_IMPL(semcorr_ext, CUDA, m) {
  m.impl("match_topk", &semcorr::match_topk_cuda);
  m.impl("window_soft_argmax_fwd", &semcorr::window_soft_argmax_fwd_cuda);
  m.impl("window_soft_argmax_bwd", &semcorr::window_soft_argmax_bwd_cuda);
}
