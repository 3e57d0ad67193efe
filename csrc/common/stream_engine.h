// The CPU streaming tile engine: one loop for the whole correlation/loss family.
//
//   for each (batch b, block of BM source rows)            <- at::parallel_for
//     for each tile of BN target rows
//       S = A_blk · B_tileᵀ          (tile GEMM, fp32 accumulate; bf16/fp16 on packed tiles)
//       S *= r_u · r_v               (fused L2 normalisation, never a normalised copy)
//       epilogue.tile(S)             (online softmax, running top-k, row-min, ...)
//
// Only BM×BN scores exist at a time per thread: no Ns×Nt matrix, forward or backward.
// The backward (`stream_backward`) recomputes S tile by tile; the op's gradient epilogue turns it
// into dL/ds from saved per-row statistics, and the engine does the tile GEMMs
//   dÂ_blk  += (dS ∘ r_v) · B_tile        dB̂_tile += (dS ∘ r_u)ᵀ · A_blk
// in one of two schedules:
//   * single pass (default when it fits): batch items one at a time, threads over row blocks, each
//     thread accumulating dB̂ in its own Nt×C buffer, summed at the end. S is recomputed once:
//     3 GEMMs per tile. Used when every thread gets a row block and the T·Nt·C buffers fit in
//     SEMCORR_CPU_BWD_BUFFER_MB (default 512).
//   * two passes otherwise, and for epilogues that accumulate per-target tensors (kTargetAccum):
//     pass Q over row blocks (dÂ), pass K over target tiles (dB̂), S recomputed in each: 4 GEMMs
//     per tile, no thread-count-sized buffers. The same split as the Triton backward.
//
// Epilogue concepts (see csrc/correlation/correlation_cpu.cpp for the ops):
//   Forward:  struct Block { Block(Epi&, int64_t b, int64_t r0, int64_t m);
//                            void tile(acc_t* S, int64_t ld, int64_t c0, int64_t n);  // may overwrite S
//                            void finish(); };
//             (stream_forward2 streams two feature sets at once — teacher and student — and calls
//              tile(SA, SB, ld, c0, n).)
//   Backward: void grad(int64_t b, int64_t r0, int64_t m, int64_t c0, int64_t n, acc_t* S, int64_t ld,
//                       bool pass_k)
//             turns the cosine tile S into dL/ds in place (columns ≥ n are ignored). pass_k tells the
//             epilogue that this call owns target tile [c0, c0+n) exclusively (pass K), which is where
//             an op accumulates gradients of per-target tensors (softmax_aggregate's values).
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "common/dispatch.h"
#include "common/tile_gemm.h"
#include "common/vec.h"

namespace semcorr {

inline int64_t env_int(const char* name, int64_t dflt) {
  const char* v = std::getenv(name);
  if (!v || !*v) return dflt;
  return std::max<int64_t>(1, std::atoll(v));
}
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Block sizes. BN is a multiple of 32 (brgemm/AMX friendly); BM shrinks when there are too few
// row blocks to keep every thread busy (keypoint mode: 30 query rows). bf16/fp16: 128×128 tiles
// (measured: the 128×768 A block and 768×128 packed B tile keep AMX brgemm ~25 % faster than 128×512;
// our AVX512-BF16 kernel on Zen 4 is within 3 % across BM 96–256 at BN 128, ~12 % slower at BN 256).
struct Blocking {
  int64_t BM, BN;
  static Blocking choose(int64_t B, int64_t Ns, int64_t Nt, bool lowp) {
    int64_t BM = env_int("SEMCORR_CPU_BM", lowp ? 128 : 192);
    int64_t BN = round_up(env_int("SEMCORR_CPU_BN", lowp ? 128 : 768), 32);
    const int64_t T = at::get_num_threads();
    B = std::max<int64_t>(B, 1);
    // Enough row blocks for every thread, and a block count that splits evenly over the threads
    // (3600 rows on 2 threads: 20 blocks of 184, not 19 of 192 with one thread idle at the end).
    const int64_t per_thread = std::max<int64_t>(1, ceil_div(B * ceil_div(Ns, BM), T));
    const int64_t blocks = ceil_div(per_thread * T, B);
    BM = std::max<int64_t>(8, std::min(BM, round_up(ceil_div(Ns, blocks), 8)));
    BN = std::max<int64_t>(32, std::min(BN, round_up(Nt, 32)));
    return {BM, BN};
  }
};

// x (n values of T) → acc_t. bf16 → fp32 is a 16-bit shift, which the compiler vectorises.
template <typename T, typename acc_t = acc_type_t<T>>
inline void to_acc(const T* x, acc_t* out, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint16_t* r = reinterpret_cast<const uint16_t*>(x);
    uint32_t* o = reinterpret_cast<uint32_t*>(out);
    for (int64_t i = 0; i < n; ++i) o[i] = uint32_t(r[i]) << 16;
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(x[i]);
  }
}

// Σ x² of one row in acc_t, vectorised (chunks of low-precision input are converted first).
template <typename T, typename acc_t = acc_type_t<T>>
inline acc_t sum_squares(const T* p, int64_t C) {
  using V = Vectorized<acc_t>;
  constexpr int64_t L = V::size();
  constexpr int64_t CH = 256;
  alignas(64) acc_t buf[CH];
  V s0(acc_t(0)), s1(acc_t(0));
  acc_t tail = 0;
  for (int64_t c0 = 0; c0 < C; c0 += CH) {
    const int64_t n = std::min(CH, C - c0);
    const acc_t* q;
    if constexpr (std::is_same_v<T, acc_t>) {
      q = p + c0;
    } else {
      to_acc<T>(p + c0, buf, n);
      q = buf;
    }
    int64_t j = 0;
    for (; j + 2 * L <= n; j += 2 * L) {
      const V a = V::loadu(q + j), b = V::loadu(q + j + L);
      s0 = at::vec::fmadd(a, a, s0);
      s1 = at::vec::fmadd(b, b, s1);
    }
    for (; j < n; ++j) tail += q[j] * q[j];
  }
  alignas(64) acc_t lanes[L];
  (s0 + s1).store(lanes);
  for (int64_t k = 0; k < L; ++k) tail += lanes[k];
  return tail;
}

// Per-row inverse norms r = 1 / max(‖x‖₂, 1e-12) (as F.normalize), or 1 when normalize=false.
// `norms` (optional, rows entries) receives ‖x‖₂ itself, computed even when normalize=false.
template <typename T, typename acc_t = acc_type_t<T>>
std::vector<acc_t> inv_norms(const T* x, int64_t rows, int64_t C, bool normalize, acc_t* norms = nullptr) {
  std::vector<acc_t> r(rows, acc_t(1));
  if (!normalize && !norms) return r;
  at::parallel_for(0, rows, 64, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const acc_t n = std::sqrt(sum_squares<T>(x + i * C, C));
      if (norms) norms[i] = n;
      if (normalize) r[i] = acc_t(1) / std::max(n, acc_t(1e-12));
    }
  });
  return r;
}

// x[i*ld + j] *= rs[i] * rt[j] for i < m, j < n.
template <typename acc_t>
inline void scale_tile(acc_t* S, int64_t ld, int64_t m, int64_t n, const acc_t* rs, const acc_t* rt) {
  using V = Vectorized<acc_t>;
  for (int64_t i = 0; i < m; ++i) {
    acc_t* row = S + i * ld;
    const V ri(rs[i]);
    int64_t j = 0;
    for (; j + V::size() <= n; j += V::size())
      (V::loadu(row + j) * ri * V::loadu(rt + j)).store(row + j);
    for (; j < n; ++j) row[j] *= rs[i] * rt[j];
  }
}
template <typename acc_t>
inline void scale_cols(acc_t* S, int64_t ld, int64_t m, int64_t n, const acc_t* rt) {
  using V = Vectorized<acc_t>;
  for (int64_t i = 0; i < m; ++i) {
    acc_t* row = S + i * ld;
    int64_t j = 0;
    for (; j + V::size() <= n; j += V::size()) (V::loadu(row + j) * V::loadu(rt + j)).store(row + j);
    for (; j < n; ++j) row[j] *= rt[j];
  }
}
template <typename acc_t>
inline void scale_rows(acc_t* S, int64_t ld, int64_t m, int64_t n, const acc_t* rs) {
  for (int64_t i = 0; i < m; ++i) {
    acc_t* row = S + i * ld;
    const acc_t ri = rs[i];
    for (int64_t j = 0; j < n; ++j) row[j] *= ri;
  }
}

// Everything one call of the engine needs about its two feature sets.
template <typename T>
struct StreamInput {
  using acc_t = acc_type_t<T>;
  const T* src;  // (B, Ns, C)
  const T* tgt;  // (B, Nt, C)
  int64_t B, Ns, Nt, C;
  bool normalize;
  std::vector<acc_t> rs, rt;  // (B·Ns), (B·Nt) inverse norms (1 when !normalize)

  StreamInput(const T* s, const T* t, int64_t B_, int64_t Ns_, int64_t Nt_, int64_t C_, bool norm)
      : src(s), tgt(t), B(B_), Ns(Ns_), Nt(Nt_), C(C_), normalize(norm) {
    rs = inv_norms<T>(src, B * Ns, C, normalize);
    rt = inv_norms<T>(tgt, B * Nt, C, normalize);
  }
  // With inverse norms already computed (from the same rows in another precision).
  StreamInput(const T* s, const T* t, int64_t B_, int64_t Ns_, int64_t Nt_, int64_t C_, bool norm,
              std::vector<acc_t> rs_, std::vector<acc_t> rt_)
      : src(s), tgt(t), B(B_), Ns(Ns_), Nt(Nt_), C(C_), normalize(norm), rs(std::move(rs_)), rt(std::move(rt_)) {}
};

namespace detail {

// Produces raw score tiles S(m×BN) = A_blk · B_tileᵀ in acc_t, whatever the input dtype.
template <typename T>
struct ScoreTiles {
  using acc_t = acc_type_t<T>;
  static constexpr bool kLowp = !std::is_same_v<T, acc_t>;
  const StreamInput<T>& in;
  int64_t BN, ntile;
  // bf16/fp16 with brgemm: targets packed per tile, sources padded to an even channel count.
  bool packed = false;
  int64_t Cp = 0;
  std::vector<T> tpack, spad;
  // bf16/fp16 without brgemm: fp32 copies, then the fp32 BLAS path.
  std::vector<acc_t> sconv, tconv;

  ScoreTiles(const StreamInput<T>& in_, int64_t BN_) : in(in_), BN(BN_) {
    ntile = ceil_div(in.Nt, BN);
    if constexpr (kLowp) {
      packed = gemm::can_pack(c10::CppTypeToScalarType<T>::value);
      if (packed) {
        Cp = round_up(in.C, 2);
        tpack.resize(size_t(in.B) * ntile * Cp * BN);
        at::parallel_for(0, in.B * ntile, 1, [&](int64_t a, int64_t b) {
          for (int64_t it = a; it < b; ++it) {
            const int64_t bb = it / ntile, t = it % ntile, c0 = t * BN;
            gemm::pack_vnni_tile<T>(in.tgt + (bb * in.Nt + c0) * in.C, std::min(BN, in.Nt - c0), in.C,
                                    Cp, BN, tpack.data() + it * Cp * BN);
          }
        });
        if (Cp != in.C) {
          spad.assign(size_t(in.B) * in.Ns * Cp, T(0.f));
          for (int64_t r = 0; r < in.B * in.Ns; ++r)
            std::copy(in.src + r * in.C, in.src + (r + 1) * in.C, spad.data() + r * Cp);
        }
      } else {
        sconv.resize(size_t(in.B) * in.Ns * in.C);
        tconv.resize(size_t(in.B) * in.Nt * in.C);
        to_acc<T>(in.src, sconv.data(), int64_t(sconv.size()));
        to_acc<T>(in.tgt, tconv.data(), int64_t(tconv.size()));
      }
    }
  }

  // Raw dot products of rows [r0, r0+m) of batch b with target tile t, into S (ld = BN).
  void scores(int64_t b, int64_t r0, int64_t m, int64_t t, acc_t* S) const {
    const int64_t c0 = t * BN, n = std::min(BN, in.Nt - c0), C = in.C;
    if constexpr (kLowp) {
      if (packed) {
        const T* A = Cp == C ? in.src + (b * in.Ns + r0) * C : spad.data() + (b * in.Ns + r0) * Cp;
        gemm::brgemm_scores(m, BN, Cp, A, Cp, tpack.data() + (b * ntile + t) * Cp * BN, S);
      } else {
        gemm::scores<acc_t>(m, n, C, sconv.data() + (b * in.Ns + r0) * C, C,
                            tconv.data() + (b * in.Nt + c0) * C, C, S, BN);
      }
    } else {
      gemm::scores<acc_t>(m, n, C, in.src + (b * in.Ns + r0) * C, C, in.tgt + (b * in.Nt + c0) * C, C,
                          S, BN);
    }
  }
  void release() const {
    if (packed) gemm::brgemm_release();
  }
};

}  // namespace detail

// Forward streaming pass. `batches` restricts the call to batch items [b_lo, b_hi) (mutual_nn runs
// one batch item at a time to keep its per-thread column buffers small).
template <typename T, typename Epi>
void stream_forward(const StreamInput<T>& in, Epi& epi, int64_t b_lo = 0, int64_t b_hi = -1) {
  using acc_t = acc_type_t<T>;
  if (b_hi < 0) b_hi = in.B;
  const int64_t nb = b_hi - b_lo;
  if (nb <= 0 || in.Ns == 0 || in.Nt == 0) return;
  const Blocking blk = Blocking::choose(nb, in.Ns, in.Nt, !std::is_same_v<T, acc_t>);
  const detail::ScoreTiles<T> tiles(in, blk.BN);
  const int64_t nblk = ceil_div(in.Ns, blk.BM);
  at::parallel_for(0, nb * nblk, 1, [&](int64_t w0, int64_t w1) {
    std::vector<acc_t> S(size_t(blk.BM) * blk.BN);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = b_lo + w / nblk, r0 = (w % nblk) * blk.BM, m = std::min(blk.BM, in.Ns - r0);
      typename Epi::Block block(epi, b, r0, m);
      for (int64_t t = 0; t < tiles.ntile; ++t) {
        const int64_t c0 = t * blk.BN, n = std::min(blk.BN, in.Nt - c0);
        tiles.scores(b, r0, m, t, S.data());
        if (in.normalize)
          scale_tile<acc_t>(S.data(), blk.BN, m, n, in.rs.data() + b * in.Ns + r0,
                            in.rt.data() + b * in.Nt + c0);
        block.tile(S.data(), blk.BN, c0, n);
      }
      block.finish();
    }
    tiles.release();
  });
}

// Forward pass over two feature sets with the same B, Ns, Nt (teacher and student of a distillation
// loss; their channel counts may differ): the epilogue sees both score tiles of each position.
template <typename T, typename Epi>
void stream_forward2(const StreamInput<T>& A, const StreamInput<T>& Bin, Epi& epi) {
  using acc_t = acc_type_t<T>;
  TORCH_CHECK(A.B == Bin.B && A.Ns == Bin.Ns && A.Nt == Bin.Nt, "stream_forward2: shapes differ");
  if (A.B == 0 || A.Ns == 0 || A.Nt == 0) return;
  const Blocking blk = Blocking::choose(A.B, A.Ns, A.Nt, !std::is_same_v<T, acc_t>);
  const detail::ScoreTiles<T> ta(A, blk.BN), tb(Bin, blk.BN);
  const int64_t nblk = ceil_div(A.Ns, blk.BM);
  at::parallel_for(0, A.B * nblk, 1, [&](int64_t w0, int64_t w1) {
    std::vector<acc_t> SA(size_t(blk.BM) * blk.BN), SB(size_t(blk.BM) * blk.BN);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / nblk, r0 = (w % nblk) * blk.BM, m = std::min(blk.BM, A.Ns - r0);
      typename Epi::Block block(epi, b, r0, m);
      for (int64_t t = 0; t < ta.ntile; ++t) {
        const int64_t c0 = t * blk.BN, n = std::min(blk.BN, A.Nt - c0);
        ta.scores(b, r0, m, t, SA.data());
        tb.scores(b, r0, m, t, SB.data());
        if (A.normalize)
          scale_tile<acc_t>(SA.data(), blk.BN, m, n, A.rs.data() + b * A.Ns + r0, A.rt.data() + b * A.Nt + c0);
        if (Bin.normalize)
          scale_tile<acc_t>(SB.data(), blk.BN, m, n, Bin.rs.data() + b * Bin.Ns + r0, Bin.rt.data() + b * Bin.Nt + c0);
        block.tile(SA.data(), SB.data(), blk.BN, c0, n);
      }
      block.finish();
    }
    ta.release();
    tb.release();
  });
}

// Backward streaming passes on acc_t features (bf16/fp16 callers convert first: the backward
// accumulates in fp32 anyway). dsrc_hat (B·Ns×C) and dtgt_hat (B·Nt×C) receive dL/dâ and dL/db̂
// (the gradients w.r.t. the normalised features; see norm_backward). Either may be null.
// Whether an epilogue needs exclusive ownership of target tiles (pass K) for accumulations of its own.
template <typename Epi, typename = void>
struct needs_target_accum : std::false_type {};
template <typename Epi>
struct needs_target_accum<Epi, std::void_t<decltype(Epi::kTargetAccum)>> : std::bool_constant<Epi::kTargetAccum> {};

// The single-pass backward's per-thread Nt×C buffers for dB̂ (each thread owns row blocks, so every
// thread touches every target): zeroed on a thread's first block of a batch item, then summed.
template <typename acc_t>
struct ThreadTargetGrads {
  int64_t size;
  std::vector<std::vector<acc_t>> buf;
  std::vector<char> used;
  ThreadTargetGrads(int64_t threads, int64_t n) : size(n), buf(threads), used(threads, 0) {}
  void begin() { std::fill(used.begin(), used.end(), 0); }
  acc_t* mine() {  // inside at::parallel_for
    const int t = at::get_thread_num();
    if (!used[t]) {
      buf[t].assign(size_t(size), acc_t(0));
      used[t] = 1;
    }
    return buf[t].data();
  }
  void add_to(acc_t* out) const {
    at::parallel_for(0, size, 4096, [&](int64_t a, int64_t e) {
      for (size_t t = 0; t < buf.size(); ++t)
        if (used[t])
          for (int64_t i = a; i < e; ++i) out[i] += buf[t][i];
    });
  }
};

template <typename acc_t, typename Epi>
void stream_backward(const StreamInput<acc_t>& in, const Epi& epi, acc_t* dsrc_hat, acc_t* dtgt_hat) {
  if (in.Ns == 0 || in.Nt == 0) return;
  const int64_t C = in.C;
  const Blocking blk = Blocking::choose(1, in.Ns, in.Nt, false);
  const int64_t T = at::get_num_threads();
  const double buf_mb = double(T) * in.Nt * C * sizeof(acc_t) / (1 << 20);
  const bool single = !needs_target_accum<Epi>::value && dsrc_hat && dtgt_hat &&
                      ceil_div(in.Ns, blk.BM) >= T && buf_mb <= double(env_int("SEMCORR_CPU_BWD_BUFFER_MB", 512));
  if (single) {
    const int64_t BM = blk.BM, BN = blk.BN, nblk = ceil_div(in.Ns, BM), ntile = ceil_div(in.Nt, BN);
    ThreadTargetGrads<acc_t> dk(T, in.Nt * C);
    for (int64_t b = 0; b < in.B; ++b) {
      dk.begin();
      at::parallel_for(0, nblk, 1, [&](int64_t w0, int64_t w1) {
        acc_t* dkt = dk.mine();
        std::vector<acc_t> S(size_t(BM) * BN), Ah(size_t(BM) * C);
        for (int64_t w = w0; w < w1; ++w) {
          const int64_t r0 = w * BM, m = std::min(BM, in.Ns - r0);
          const acc_t* A = in.src + (b * in.Ns + r0) * C;
          const acc_t* rsb = in.rs.data() + b * in.Ns + r0;
          for (int64_t i = 0; i < m; ++i)  // Â_blk = r_u·a_u: a block-sized scratch, reused by every tile
            for (int64_t c = 0; c < C; ++c) Ah[i * C + c] = A[i * C + c] * rsb[i];
          for (int64_t t2 = 0; t2 < ntile; ++t2) {
            const int64_t c0 = t2 * BN, n = std::min(BN, in.Nt - c0);
            const acc_t* Bt = in.tgt + (b * in.Nt + c0) * C;
            const acc_t* rtb = in.rt.data() + b * in.Nt + c0;
            gemm::scores<acc_t>(m, n, C, A, C, Bt, C, S.data(), BN);
            if (in.normalize) scale_tile<acc_t>(S.data(), BN, m, n, rsb, rtb);
            epi.grad(b, r0, m, c0, n, S.data(), BN, false);
            gemm::acc_pta<acc_t>(m, n, C, S.data(), BN, in.normalize ? Ah.data() : A, C, dkt + c0 * C, C);
            if (in.normalize) scale_cols<acc_t>(S.data(), BN, m, n, rtb);
            gemm::acc_pb<acc_t>(m, n, C, S.data(), BN, Bt, C, dsrc_hat + (b * in.Ns + r0) * C, C);
          }
        }
      });
      dk.add_to(dtgt_hat + b * in.Nt * C);
    }
    return;
  }
  const int64_t BM = blk.BM, BN = blk.BN;
  const int64_t nblk = ceil_div(in.Ns, BM), ntile = ceil_div(in.Nt, BN);
  const acc_t* rs = in.rs.data();
  const acc_t* rt = in.rt.data();
  if (dsrc_hat) {  // pass Q: each thread owns its row blocks
    at::parallel_for(0, in.B * nblk, 1, [&](int64_t w0, int64_t w1) {
      std::vector<acc_t> S(size_t(BM) * BN);
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t b = w / nblk, r0 = (w % nblk) * BM, m = std::min(BM, in.Ns - r0);
        const acc_t* A = in.src + (b * in.Ns + r0) * C;
        for (int64_t t = 0; t < ntile; ++t) {
          const int64_t c0 = t * BN, n = std::min(BN, in.Nt - c0);
          const acc_t* Bt = in.tgt + (b * in.Nt + c0) * C;
          gemm::scores<acc_t>(m, n, C, A, C, Bt, C, S.data(), BN);
          if (in.normalize) scale_tile<acc_t>(S.data(), BN, m, n, rs + b * in.Ns + r0, rt + b * in.Nt + c0);
          epi.grad(b, r0, m, c0, n, S.data(), BN, false);
          if (in.normalize) scale_cols<acc_t>(S.data(), BN, m, n, rt + b * in.Nt + c0);
          gemm::acc_pb<acc_t>(m, n, C, S.data(), BN, Bt, C, dsrc_hat + (b * in.Ns + r0) * C, C);
        }
      }
    });
  }
  if (dtgt_hat) {  // pass K: each thread owns its target tiles
    // Parallelism here is over target tiles; use a BN that gives every thread work.
    const int64_t T = at::get_num_threads();
    const int64_t BNk = std::max<int64_t>(32, std::min(BN, round_up(ceil_div(in.Nt, ceil_div(2 * T, in.B)), 32)));
    const int64_t ntk = ceil_div(in.Nt, BNk);
    const int64_t BMk = std::max<int64_t>(BM, 64);
    at::parallel_for(0, in.B * ntk, 1, [&](int64_t w0, int64_t w1) {
      std::vector<acc_t> S(size_t(BMk) * BNk);
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t b = w / ntk, c0 = (w % ntk) * BNk, n = std::min(BNk, in.Nt - c0);
        const acc_t* Bt = in.tgt + (b * in.Nt + c0) * C;
        for (int64_t r0 = 0; r0 < in.Ns; r0 += BMk) {
          const int64_t m = std::min(BMk, in.Ns - r0);
          const acc_t* A = in.src + (b * in.Ns + r0) * C;
          gemm::scores<acc_t>(m, n, C, A, C, Bt, C, S.data(), BNk);
          if (in.normalize) scale_tile<acc_t>(S.data(), BNk, m, n, rs + b * in.Ns + r0, rt + b * in.Nt + c0);
          epi.grad(b, r0, m, c0, n, S.data(), BNk, true);
          if (in.normalize) scale_rows<acc_t>(S.data(), BNk, m, n, rs + b * in.Ns + r0);
          gemm::acc_pta<acc_t>(m, n, C, S.data(), BNk, A, C, dtgt_hat + (b * in.Nt + c0) * C, C);
        }
      }
    });
  }
}

// out[j] = row[j] · (col ? col[j] : 1) · k for j < n.
inline void scaled_row(const float* row, const float* col, float k, float* out, int64_t n) {
  using V = Vectorized<float>;
  const V vk(k);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size())
    (col ? V::loadu(row + j) * V::loadu(col + j) * vk : V::loadu(row + j) * vk).store(out + j);
  for (; j < n; ++j) out[j] = row[j] * (col ? col[j] : 1.f) * k;
}

// bf16 inputs on the bf16 kernel that can accumulate (gemm::bf16_gemm_acc): all three tile GEMMs of
// the single-pass backward in bf16 with fp32 accumulation. S is recomputed exactly as the forward
// computed it; dS is rounded to bf16 once, the normalisation scales folded in before rounding, for
//   dÂ_blk += bf16(dS ∘ r_v) · B_tile        dB̂_tile += bf16(dS ∘ r_u)ᵀ · A_blk
// on the raw rows, packed once per call with pairs along the reduction (gemm::pack_rows_vnni). The
// gradients are bf16 tensors in the end, so the one extra rounding is of their own order (the Triton
// backward also runs these GEMMs on bf16 operands). Returns false, having done nothing, where it does
// not apply: no such kernel, C not a multiple of 32, an epilogue with per-target accumulations, fewer
// row blocks than threads, per-thread buffers over SEMCORR_CPU_BWD_BUFFER_MB, SEMCORR_CPU_BF16_BWD=0.
template <typename Epi>
bool stream_backward_bf16(const StreamInput<c10::BFloat16>& in, const Epi& epi, float* dsrc_hat, float* dtgt_hat) {
  using T = c10::BFloat16;
  const char* env = std::getenv("SEMCORR_CPU_BF16_BWD");
  if (env && *env && std::atoi(env) == 0) return false;
  if (needs_target_accum<Epi>::value || !dsrc_hat || !dtgt_hat || !gemm::have_bf16_gemm_acc()) return false;
  const int64_t C = in.C;
  if (in.Ns == 0 || in.Nt == 0 || C % 32 != 0) return false;
  const Blocking blk = Blocking::choose(1, in.Ns, in.Nt, true);
  const int64_t BM = round_up(blk.BM, 2), BN = blk.BN, NT = at::get_num_threads();
  const int64_t nblk = ceil_div(in.Ns, BM), ntile = ceil_div(in.Nt, BN);
  const double buf_mb = double(NT) * in.Nt * C * sizeof(float) / (1 << 20);
  if (nblk < NT || buf_mb > double(env_int("SEMCORR_CPU_BWD_BUFFER_MB", 512))) return false;
  const detail::ScoreTiles<T> tiles(in, BN);
  if (!tiles.packed) return false;
  std::vector<T> tpk(size_t(in.B) * ntile * BN * C), spk(size_t(in.B) * nblk * BM * C);
  at::parallel_for(0, in.B * ntile, 1, [&](int64_t a, int64_t e) {
    for (int64_t it = a; it < e; ++it) {
      const int64_t b = it / ntile, c0 = (it % ntile) * BN;
      gemm::pack_rows_vnni<T>(in.tgt + (b * in.Nt + c0) * C, std::min(BN, in.Nt - c0), C, BN,
                              tpk.data() + it * BN * C);
    }
  });
  at::parallel_for(0, in.B * nblk, 1, [&](int64_t a, int64_t e) {
    for (int64_t it = a; it < e; ++it) {
      const int64_t b = it / nblk, r0 = (it % nblk) * BM;
      gemm::pack_rows_vnni<T>(in.src + (b * in.Ns + r0) * C, std::min(BM, in.Ns - r0), C, BM,
                              spk.data() + it * BM * C);
    }
  });
  ThreadTargetGrads<float> dk(NT, in.Nt * C);
  for (int64_t b = 0; b < in.B; ++b) {
    dk.begin();
    at::parallel_for(0, nblk, 1, [&](int64_t w0, int64_t w1) {
      float* dkt = dk.mine();
      std::vector<float> S(size_t(BM) * BN), tmp(BN);
      std::vector<T> d1(size_t(BM) * BN), d2t(size_t(BN) * BM), tmpb(BN);
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t r0 = w * BM, m = std::min(BM, in.Ns - r0);
        const float* rsb = in.rs.data() + b * in.Ns + r0;
        if (m < BM) std::fill(d2t.begin(), d2t.end(), T(0.f));  // reduction rows ≥ m stay zero
        for (int64_t t2 = 0; t2 < ntile; ++t2) {
          const int64_t c0 = t2 * BN, n = std::min(BN, in.Nt - c0);
          const float* rtb = in.rt.data() + b * in.Nt + c0;
          tiles.scores(b, r0, m, t2, S.data());
          if (in.normalize) scale_tile<float>(S.data(), BN, m, n, rsb, rtb);
          epi.grad(b, r0, m, c0, n, S.data(), BN, false);
          for (int64_t i = 0; i < m; ++i) {  // d1 = bf16(dS ∘ r_v), d2t = bf16(dS ∘ r_u)ᵀ (vector rounding)
            const float* row = S.data() + i * BN;
            T* o1 = d1.data() + i * BN;
            scaled_row(row, rtb, 1.f, tmp.data(), n);
            at::vec::convert(tmp.data(), o1, n);
            std::fill(o1 + n, o1 + BN, T(0.f));
            scaled_row(row, nullptr, rsb[i], tmp.data(), n);
            at::vec::convert(tmp.data(), tmpb.data(), n);
            for (int64_t j = 0; j < n; ++j) d2t[j * BM + i] = tmpb[j];
          }
          gemm::bf16_gemm_acc(m, C, BN, d1.data(), BN, tpk.data() + (b * ntile + t2) * BN * C,
                              dsrc_hat + (b * in.Ns + r0) * C, C);
          gemm::bf16_gemm_acc(n, C, BM, d2t.data(), BM, spk.data() + (b * nblk + w) * BM * C,
                              dkt + c0 * C, C);
        }
      }
    });
    dk.add_to(dtgt_hat + b * in.Nt * C);
  }
  tiles.release();
  return true;
}

// Through the normalisation x̂ = x·r, r = 1/max(‖x‖, ε) (math.md):
//   ‖x‖ > ε: dx = r·(dx̂ − x̂⟨x̂, dx̂⟩);   ‖x‖ ≤ ε: dx = r·dx̂.   Without normalisation dx = dx̂.
template <typename acc_t>
void norm_backward(const acc_t* x, const acc_t* r, const acc_t* dxh, acc_t* dx, int64_t rows, int64_t C,
                   bool normalize) {
  at::parallel_for(0, rows, 64, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const acc_t* xi = x + i * C;
      const acc_t* gi = dxh + i * C;
      acc_t* oi = dx + i * C;
      if (!normalize) {
        std::copy(gi, gi + C, oi);
        continue;
      }
      const acc_t ri = r[i];
      const bool clamped = !(ri < acc_t(1e12));  // ‖x‖ ≤ ε
      acc_t dot = 0;
      if (!clamped)
        for (int64_t c = 0; c < C; ++c) dot += xi[c] * ri * gi[c];
      for (int64_t c = 0; c < C; ++c) oi[c] = ri * (gi[c] - (clamped ? acc_t(0) : xi[c] * ri * dot));
    }
  });
}

}  // namespace semcorr
