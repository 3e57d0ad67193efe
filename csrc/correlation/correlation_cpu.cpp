// CPU kernels of the correlation family: epilogues of the streaming engine, plus the window pass.
// The math of every op is in correlation.h; the loop they share is common/stream_engine.h.
#include "common/vec.h"  // first: selects the SIMD width of ATen's Vectorized

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <utility>

#include "common/kernel_util.h"
#include "common/stream_engine.h"
#include "correlation/correlation.h"
#include "correlation/correlation_core.h"

namespace semcorr {
namespace {

using at::Tensor;

// ------------------------------------------------------------------ soft_argmax: online softmax
template <typename acc_t>
struct SoftArgmaxFwd {
  acc_t inv_tau;
  const acc_t *gx, *gy;
  int64_t Ns;
  acc_t *out, *lse;

  struct Block {
    const SoftArgmaxFwd& e;
    int64_t b, r0, m;
    std::vector<acc_t> mx, l, sx, sy;
    Block(const SoftArgmaxFwd& e_, int64_t b_, int64_t r0_, int64_t m_)
        : e(e_), b(b_), r0(r0_), m(m_), mx(m_, -kInf<acc_t>), l(m_, 0), sx(m_, 0), sy(m_, 0) {}

    void tile(const acc_t* S, int64_t ld, int64_t c0, int64_t n) {
      using V = Vectorized<acc_t>;
      constexpr int64_t L = V::size();
      const acc_t it = e.inv_tau;
      const acc_t* gx = e.gx + c0;
      const acc_t* gy = e.gy + c0;
      for (int64_t i = 0; i < m; ++i) {
        const acc_t* row = S + i * ld;
        const acc_t alpha = online_max<acc_t>(row, n, it, mx[i]);
        const acc_t mnew = mx[i];
        const V vit(it), vm(mnew);
        V vl(acc_t(0)), vx(acc_t(0)), vy(acc_t(0));
        int64_t j = 0;
        for (; j + L <= n; j += L) {
          const V p = vexp(at::vec::fmsub(V::loadu(row + j), vit, vm));
          vl = vl + p;
          vx = at::vec::fmadd(p, V::loadu(gx + j), vx);
          vy = at::vec::fmadd(p, V::loadu(gy + j), vy);
        }
        acc_t tl = hsum<acc_t>(vl), tx = hsum<acc_t>(vx), ty = hsum<acc_t>(vy);
        for (; j < n; ++j) {
          const acc_t p = std::exp(row[j] * it - mnew);
          tl += p;
          tx += p * gx[j];
          ty += p * gy[j];
        }
        l[i] = l[i] * alpha + tl;
        sx[i] = sx[i] * alpha + tx;
        sy[i] = sy[i] * alpha + ty;
      }
    }
    void finish() {
      for (int64_t i = 0; i < m; ++i) {
        const int64_t u = b * e.Ns + r0 + i;
        e.out[2 * u] = sx[i] / l[i];
        e.out[2 * u + 1] = sy[i] / l[i];
        e.lse[u] = mx[i] + std::log(l[i]);
      }
    }
  };
};

template <typename acc_t>
struct SoftArgmaxBwd {
  acc_t inv_tau;
  const acc_t *gx, *gy;
  int64_t Ns;
  const acc_t *gout, *out, *lse;
  // dL/ds_uv = p_uv (⟨G_u, g_v⟩ − ⟨G_u, y_u⟩) / τ  (math.md, soft_argmax)
  void grad(int64_t b, int64_t r0, int64_t m, int64_t c0, int64_t n, acc_t* S, int64_t ld, bool) const {
    using V = Vectorized<acc_t>;
    constexpr int64_t L = V::size();
    for (int64_t i = 0; i < m; ++i) {
      const int64_t u = b * Ns + r0 + i;
      const acc_t Gx = gout[2 * u], Gy = gout[2 * u + 1];
      const acc_t D = Gx * out[2 * u] + Gy * out[2 * u + 1];
      acc_t* row = S + i * ld;
      const V vit(inv_tau), vL(lse[u]), vGx(Gx), vGy(Gy), vD(D);
      int64_t j = 0;
      for (; j + L <= n; j += L) {
        const V p = vexp(at::vec::fmsub(V::loadu(row + j), vit, vL));
        const V w = at::vec::fmadd(vGx, V::loadu(gx + c0 + j), at::vec::fmsub(vGy, V::loadu(gy + c0 + j), vD));
        (p * w * vit).store(row + j);
      }
      for (; j < n; ++j) {
        const acc_t p = std::exp(row[j] * inv_tau - lse[u]);
        row[j] = p * (Gx * gx[c0 + j] + Gy * gy[c0 + j] - D) * inv_tau;
      }
    }
  }
};

// ------------------------------------------------------------------ running top-k
// Per row: k (value, index) pairs sorted by value descending then index ascending. Targets arrive in
// increasing index order, so a strict comparison keeps the lowest index among ties.
// Small k (≤ kInsertMaxK): a sorted list with insertion. Large k (curation asks for 500): insertion
// would shift O(k) entries per accepted score, so each row instead appends the scores above its
// threshold to a buffer of k + max(k, 256) and, when the buffer is full, keeps its k best
// (std::nth_element; threshold = the k-th); finish() sorts. Amortised O(1) per accepted score; same
// order and tie rule (an equal score arriving later has a higher index, so it loses to the kept one).
constexpr int64_t kInsertMaxK = 32;

template <typename acc_t>
struct TopK {
  int64_t k, Ns, Nt;
  const bool* mask;  // (B, Nt) or null
  acc_t* vals;       // (B, Ns, k)
  int64_t* idx;      // (B, Ns, k)

  struct Entry {
    acc_t v;
    int64_t i;
    bool operator<(const Entry& o) const { return v > o.v || (v == o.v && i < o.i); }  // "better than"
  };

  struct Block {
    const TopK& e;
    int64_t b, r0, m;
    bool big;
    int64_t cap;                // large k: buffer entries per row (k + max(k, 256))
    std::vector<acc_t> v;       // small k: (m, k) sorted lists
    std::vector<int64_t> id;
    std::vector<Entry> buf;     // large k: (m, cap) buffers
    std::vector<int64_t> cnt;   // large k: entries in each row's buffer
    std::vector<acc_t> thr;     // large k: each row's acceptance threshold (its k-th best once known)
    Block(const TopK& e_, int64_t b_, int64_t r0_, int64_t m_)
        : e(e_), b(b_), r0(r0_), m(m_), big(e_.k > kInsertMaxK), cap(e_.k + std::max<int64_t>(e_.k, 256)) {
      if (big) {
        buf.resize(size_t(m_ * cap));
        cnt.assign(m_, 0);
        thr.assign(m_, -kInf<acc_t>);
      } else {
        v.assign(m_ * e_.k, -kInf<acc_t>);
        id.assign(m_ * e_.k, -1);
      }
    }

    inline void insert(acc_t* vi, int64_t* ii, acc_t s, int64_t index) const {
      core::topk_insert<acc_t>(vi, ii, e.k, s, index);
    }
    // large k: partition row i's buffer so that its k best come first, drop the rest, raise the threshold
    void keep_best(int64_t i) {
      Entry* r = buf.data() + i * cap;
      if (cnt[i] > e.k) {
        std::nth_element(r, r + (e.k - 1), r + cnt[i]);
        cnt[i] = e.k;
      }
      if (cnt[i] == e.k) thr[i] = std::max_element(r, r + e.k)->v;  // the worst kept = the k-th best
    }
    void tile(const acc_t* S, int64_t ld, int64_t c0, int64_t n) {
      using V = Vectorized<acc_t>;
      constexpr int64_t L = V::size();
      const bool* mk = e.mask ? e.mask + b * e.Nt + c0 : nullptr;
      const int full = (1 << L) - 1;
      for (int64_t i = 0; i < m; ++i) {
        const acc_t* row = S + i * ld;
        if (big) {
          acc_t th = thr[i];
          Entry* r = buf.data() + i * cap;
          auto accept = [&](int64_t q) {
            if (!(row[q] > th) || (mk && !mk[q])) return;
            r[cnt[i]++] = Entry{row[q], c0 + q};
            if (cnt[i] == cap) {
              keep_best(i);
              th = thr[i];
            }
          };
          int64_t j = 0;
          for (; j + L <= n; j += L) {
            if ((V::loadu(row + j) > V(th)).zero_mask() == full) continue;
            for (int64_t q = j; q < j + L; ++q) accept(q);
          }
          for (; j < n; ++j) accept(j);
          continue;
        }
        acc_t* vi = v.data() + i * e.k;
        int64_t* ii = id.data() + i * e.k;
        int64_t j = 0;
        for (; j + L <= n; j += L) {
          // Most chunks hold nothing above the current k-th value: one compare skips them.
          if ((V::loadu(row + j) > V(vi[e.k - 1])).zero_mask() == full) continue;
          for (int64_t q = j; q < j + L; ++q)
            if (row[q] > vi[e.k - 1] && (!mk || mk[q])) insert(vi, ii, row[q], c0 + q);
        }
        for (; j < n; ++j)
          if (row[j] > vi[e.k - 1] && (!mk || mk[j])) insert(vi, ii, row[j], c0 + j);
      }
    }
    void finish() {
      const int64_t off = (b * e.Ns + r0) * e.k;
      if (!big) {
        std::copy(v.begin(), v.end(), e.vals + off);
        std::copy(id.begin(), id.end(), e.idx + off);
        return;
      }
      for (int64_t i = 0; i < m; ++i) {
        keep_best(i);
        Entry* r = buf.data() + i * cap;
        std::sort(r, r + cnt[i]);
        for (int64_t j = 0; j < e.k; ++j) {
          e.vals[off + i * e.k + j] = j < cnt[i] ? r[j].v : -kInf<acc_t>;
          e.idx[off + i * e.k + j] = j < cnt[i] ? r[j].i : -1;
        }
      }
    }
  };
};

// Row top-1 plus the column argmax (mutual_nn): each thread keeps its best source row per target
// column; the threads' columns are merged after the pass (ties → lowest row).
template <typename acc_t>
struct RowColArgmax {
  TopK<acc_t> rows;
  int64_t Nt;
  std::vector<std::vector<acc_t>>* colv;
  std::vector<std::vector<int64_t>>* coli;

  struct Block {
    typename TopK<acc_t>::Block rb;
    const RowColArgmax& e;
    int64_t r0;
    Block(const RowColArgmax& e_, int64_t b, int64_t r0_, int64_t m) : rb(e_.rows, b, r0_, m), e(e_), r0(r0_) {}
    void tile(const acc_t* S, int64_t ld, int64_t c0, int64_t n) {
      rb.tile(S, ld, c0, n);
      const int t = at::get_thread_num();
      acc_t* cv = (*e.colv)[t].data() + c0;
      int64_t* ci = (*e.coli)[t].data() + c0;
      for (int64_t i = 0; i < rb.m; ++i) {
        const acc_t* row = S + i * ld;
        for (int64_t j = 0; j < n; ++j)
          if (row[j] > cv[j]) {
            cv[j] = row[j];
            ci[j] = r0 + i;
          }
      }
    }
    void finish() { rb.finish(); }
  };
};

// Row minimum of the squared L2 distance ‖â‖² + ‖b̂_v‖² − 2ŝ over valid targets, with its argmin
// (the exact distance to the argmin is recomputed afterwards, free of the cancellation).
template <typename acc_t>
struct RowMinL2 {
  int64_t Ns, Nt;
  const acc_t* sqn_t;  // (B, Nt) ‖b̂_v‖²
  const bool* mask;    // (B, Nt) or null
  int64_t* arg;        // (B, Ns): argmin, −1 none, −2 a NaN met
  struct Block {
    const RowMinL2& e;
    int64_t b, r0, m;
    std::vector<acc_t> best;
    std::vector<int64_t> a;
    Block(const RowMinL2& e_, int64_t b_, int64_t r0_, int64_t m_)
        : e(e_), b(b_), r0(r0_), m(m_), best(m_, kInf<acc_t>), a(m_, -1) {}
    void tile(const acc_t* S, int64_t ld, int64_t c0, int64_t n) {
      const acc_t* q = e.sqn_t + b * e.Nt + c0;
      const bool* mk = e.mask ? e.mask + b * e.Nt + c0 : nullptr;
      for (int64_t i = 0; i < m; ++i) {
        if (a[i] == -2) continue;
        const acc_t* row = S + i * ld;
        for (int64_t j = 0; j < n; ++j) {
          if (mk && !mk[j]) continue;
          const acc_t d = q[j] - 2 * row[j];
          if (d != d) {
            a[i] = -2;
            break;
          }
          if (d < best[i]) {
            best[i] = d;
            a[i] = c0 + j;
          }
        }
      }
    }
    void finish() { std::copy(a.begin(), a.end(), e.arg + b * e.Ns + r0); }
  };
};

std::tuple<Tensor, Tensor> soft_argmax_fwd(const Tensor& src, const Tensor& tgt, double tau, int64_t H,
                                           int64_t W, bool normalize) {
  check_pair(src, tgt, "soft_argmax_fwd");
  TORCH_CHECK(H * W == tgt.size(1), "soft_argmax_fwd: H*W != Nt");
  const int64_t B = src.size(0), Ns = src.size(1);
  Tensor out = out_like(src, {B, Ns, 2}), lse = out_like(src, {B, Ns});
  SC_DISPATCH_FLOATING(src.scalar_type(), "soft_argmax_fwd", [&] {
    using acc_t = acc_type_t<scalar_t>;
    auto in = make_input<scalar_t>(src, tgt, normalize);
    Grid<acc_t> g(H, W);
    SoftArgmaxFwd<acc_t> epi{acc_t(1.0 / tau), g.gx.data(), g.gy.data(), Ns, out.data_ptr<acc_t>(),
                             lse.data_ptr<acc_t>()};
    stream_forward(in, epi);
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor> soft_argmax_bwd(const Tensor& grad, const Tensor& src, const Tensor& tgt,
                                           const Tensor& out, const Tensor& lse, double tau, int64_t H,
                                           int64_t W, bool normalize) {
  check_pair(src, tgt, "soft_argmax_bwd");
  std::tuple<Tensor, Tensor> res;
  auto run = [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    const auto dt = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
    const Tensor g = grad.to(dt).contiguous(), o = out.to(dt).contiguous(), l = lse.to(dt).contiguous();
    Grid<acc_t> grid(H, W);
    SoftArgmaxBwd<acc_t> epi{acc_t(1.0 / tau), grid.gx.data(), grid.gy.data(), src.size(1),
                             g.data_ptr<acc_t>(), o.data_ptr<acc_t>(), l.data_ptr<acc_t>()};
    res = run_backward<acc_t>(src, tgt, normalize, epi);
  };
  if (src.scalar_type() == at::kDouble) run(double{}); else run(float{});
  return res;
}

// ------------------------------------------------------------------ fp32 top-k by bf16 screening
// An exact fp32 match_topk that runs its GEMM in bf16 (AMX / AVX512-BF16, several times the fp32 rate
// here), then re-ranks a few candidates per row in fp32:
//  1. x̂ = bf16(x · r_x), ŷ = bf16(y · r_y): the rows the fp32 path compares, rounded once (r = inverse
//     norm, or 1 for raw dots).
//  2. Screening: the running top-K2 (K2 = 4k + 12) of s̃ = x̂·ŷ (fp32 accumulation), masks
//     applied, through the same streaming engine and TopK epilogue as every other top-k.
//  3. Re-rank: the exact fp32 score of each candidate, (x·y) · r_x · r_y, sorted by value then index.
//  4. Certificate. Rounding to bf16 moves each factor by a relative 2⁻⁸ at most (u, round to nearest),
//     so |s̃ − s| ≤ ((1+u)² − 1) Σ|x_c r_x y_c r_y| + fp32 accumulation error
//                ≤ (2u + u² + (C+4)·2⁻²³) · ‖x r_x‖ · ‖y r_y‖ =: δ_u  (Cauchy–Schwarz; ‖y r_y‖ ≤ its max
//     over the batch's targets), and the same (C+4)·2⁻²³ term covers the fp32 re-rank's own error;
//     an absolute term covers what underflows (subnormals, flushed to zero by the tile GEMMs). A
//     target outside a full candidate list has s̃ ≤ t (the K2-th screened value), so its fp32 score is
//     below t + 2δ_u. When t + 2δ_u < the k-th re-ranked score, no outsider can enter the top k and the
//     answer is exactly the fp32 one; otherwise (many near-ties) that row goes through the plain fp32
//     path (the uncertain rows of a batch item as one block). Rows whose candidate list is not full
//     hold every valid target already.
// Non-finite inputs (NaN/Inf anywhere) take the plain fp32 path for the whole call, so their documented
// behaviour is unchanged. SEMCORR_CPU_SCREEN=0 turns the screening off.
// Candidates beyond k: 3k + 12. The list must reach δ-far below the k-th score or the row is redone in
// fp32; on random 768-d features (the narrowest gaps between ranks) 16 candidates suffice for k = 1,
// 32 for k = 5, ~76 for k = 16 (bench/bench_correlation.py -k screening).
constexpr int64_t kScreenExtra = 12;
// Beyond k = 32 the candidate lists cost more than the bf16 GEMM saves (k = 64: 156 vs 142 ms plain).
constexpr int64_t kScreenMaxK = 32;

bool screening_available(const Tensor& src, int64_t k) {
  const char* env = std::getenv("SEMCORR_CPU_SCREEN");
  const bool on = !(env && *env && std::atoi(env) == 0);
  return on && src.scalar_type() == at::kFloat && k <= kScreenMaxK && gemm::can_pack(at::kBFloat16);
}

// Returns false (and writes nothing) when an input is not finite: the caller then runs the fp32 path.
bool match_topk_screened(const Tensor& src, const Tensor& tgt, int64_t k, const bool* mask, bool normalize,
                         float* vals, int64_t* idx) {
  const int64_t B = src.size(0), Ns = src.size(1), Nt = tgt.size(1), C = src.size(2);
  const float* X = src.data_ptr<float>();
  const float* Y = tgt.data_ptr<float>();
  // inverse norms r (the fp32 path's, from inv_norms), the norms of the compared rows ‖x r‖ (1, or 0
  // for a zero row, when normalising), and the rows' bf16 copies
  std::vector<float> ns(B * Ns), nt(B * Nt);
  const std::vector<float> rs = inv_norms<float>(X, B * Ns, C, normalize, ns.data());
  const std::vector<float> rt = inv_norms<float>(Y, B * Nt, C, normalize, nt.data());
  Tensor xs = at::empty({B, Ns, C}, src.options().dtype(at::kBFloat16));
  Tensor ys = at::empty({B, Nt, C}, src.options().dtype(at::kBFloat16));
  auto round_rows = [C](const float* in, const float* r, float* norms, c10::BFloat16* out, int64_t rows) {
    at::parallel_for(0, rows, 64, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) {
        norms[i] *= r[i];
        for (int64_t c = 0; c < C; ++c) out[i * C + c] = c10::BFloat16(in[i * C + c] * r[i]);
      }
    });
  };
  round_rows(X, rs.data(), ns.data(), xs.data_ptr<c10::BFloat16>(), B * Ns);
  round_rows(Y, rt.data(), nt.data(), ys.data_ptr<c10::BFloat16>(), B * Nt);
  std::vector<float> ntmax(B, 0.f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t v = 0; v < Nt; ++v) {
      if (!std::isfinite(nt[b * Nt + v])) return false;
      ntmax[b] = std::max(ntmax[b], nt[b * Nt + v]);
    }
  for (int64_t u = 0; u < B * Ns; ++u)
    if (!std::isfinite(ns[u])) return false;

  const int64_t K2 = std::min(Nt, 4 * k + env_int("SEMCORR_CPU_SCREEN_EXTRA", kScreenExtra));
  std::vector<float> cv(size_t(B * Ns * K2));
  std::vector<int64_t> ci(size_t(B * Ns * K2));
  {
    const StreamInput<c10::BFloat16> in(xs.data_ptr<c10::BFloat16>(), ys.data_ptr<c10::BFloat16>(), B, Ns, Nt, C,
                                        /*normalize=*/false);
    TopK<float> screen{K2, Ns, Nt, mask, cv.data(), ci.data()};
    stream_forward(in, screen);
  }
  std::vector<uint8_t> redo(size_t(B * Ns), 0);
  const float factor = float((2.0 / 256 + 1.0 / 65536 + double(C + 4) * std::ldexp(1.0, -23)) * 1.001);
  // Below the normal range the relative bound fails: bf16 rounding of a subnormal, and the tile GEMMs
  // flush subnormal inputs and products to zero. Each costs at most 2⁻¹²⁶ per product or per factor:
  // ≤ 2⁻¹²⁶ (C + √C (‖x‖ + ‖y‖)) in all (‖·‖₁ ≤ √C ‖·‖₂), taken four times for margin.
  const float tiny = 4 * std::ldexp(1.f, -126), sqrtC = std::sqrt(float(C));
  at::parallel_for(0, B * Ns, 16, [&](int64_t a, int64_t e) {
    std::vector<std::pair<float, int64_t>> cand;
    for (int64_t u = a; u < e; ++u) {
      const int64_t b = u / Ns;
      const float* x = X + u * C;
      const float* yb = Y + b * Nt * C;
      const float* rtb = rt.data() + b * Nt;
      const float* cvu = cv.data() + u * K2;
      const int64_t* ciu = ci.data() + u * K2;
      const float delta = factor * ns[u] * ntmax[b] + tiny * (float(C) + sqrtC * (ns[u] + ntmax[b]));
      // Only candidates with s̃ ≥ s̃_(k) − 2δ can be in the exact top k (k of them score ≥ s̃_(k) − δ,
      // each other one below s̃ + δ): the rest are counted but not re-ranked.
      int64_t nscr = 0;
      while (nscr < K2 && ciu[nscr] >= 0) ++nscr;
      const float cut = nscr >= k ? cvu[k - 1] - 2 * delta : -kInf<float>;
      cand.clear();
      for (int64_t j = 0; j < nscr && cvu[j] >= cut; ++j) {
        const int64_t v = ciu[j];
        cand.emplace_back(dot<float>(x, yb + v * C, C) * rs[u] * rtb[v], v);
      }
      std::sort(cand.begin(), cand.end(), [](const auto& p, const auto& q) {
        return p.first > q.first || (p.first == q.first && p.second < q.second);
      });
      const bool full = nscr == K2 && K2 < Nt;
      const bool certain = !full || cvu[K2 - 1] + 2 * delta < cand[k - 1].first;  // full ⇒ cand holds ≥ k
      float* vo = vals + u * k;
      int64_t* io = idx + u * k;
      if (certain) {
        for (int64_t j = 0; j < k; ++j) {
          vo[j] = j < int64_t(cand.size()) ? cand[j].first : -kInf<float>;
          io[j] = j < int64_t(cand.size()) ? cand[j].second : -1;
        }
        continue;
      }
      redo[u] = 1;  // near-ties beyond the candidate list: this row again in fp32, below
    }
  });
  // The uncertain rows of each batch item through the plain fp32 streaming path, as one compact block.
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> rows;
    for (int64_t u = b * Ns; u < (b + 1) * Ns; ++u)
      if (redo[u]) rows.push_back(u);
    if (rows.empty()) continue;
    const int64_t nf = int64_t(rows.size());
    Tensor xf = at::empty({1, nf, C}, src.options());
    float* xp = xf.data_ptr<float>();
    for (int64_t i = 0; i < nf; ++i) std::copy(X + rows[i] * C, X + (rows[i] + 1) * C, xp + i * C);
    std::vector<float> vf(size_t(nf * k));
    std::vector<int64_t> idf(size_t(nf * k));
    const StreamInput<float> in(xp, Y + b * Nt * C, 1, nf, Nt, C, normalize);
    TopK<float> exact{k, nf, Nt, mask ? mask + b * Nt : nullptr, vf.data(), idf.data()};
    stream_forward(in, exact);
    for (int64_t i = 0; i < nf; ++i) {
      std::copy(vf.begin() + i * k, vf.begin() + (i + 1) * k, vals + rows[i] * k);
      std::copy(idf.begin() + i * k, idf.begin() + (i + 1) * k, idx + rows[i] * k);
    }
  }
  return true;
}

std::tuple<Tensor, Tensor> match_topk(const Tensor& src, const Tensor& tgt, int64_t k,
                                      const std::optional<Tensor>& tgt_mask, bool normalize) {
  check_pair(src, tgt, "match_topk");
  TORCH_CHECK(k >= 1, "match_topk: k must be >= 1");
  const int64_t B = src.size(0), Ns = src.size(1), Nt = tgt.size(1);
  Tensor vals = out_like(src, {B, Ns, k}), idx = at::empty({B, Ns, k}, src.options().dtype(at::kLong));
  Tensor mask;
  if (tgt_mask.has_value()) mask = tgt_mask->to(at::kBool).contiguous();
  if (Ns > 0 && Nt > 0 && screening_available(src, k) &&
      match_topk_screened(src, tgt, k, mask.defined() ? mask.data_ptr<bool>() : nullptr, normalize,
                          vals.data_ptr<float>(), idx.data_ptr<int64_t>()))
    return {vals, idx};
  SC_DISPATCH_FLOATING(src.scalar_type(), "match_topk", [&] {
    using acc_t = acc_type_t<scalar_t>;
    auto in = make_input<scalar_t>(src, tgt, normalize);
    TopK<acc_t> epi{k, Ns, Nt, mask.defined() ? mask.data_ptr<bool>() : nullptr, vals.data_ptr<acc_t>(),
                    idx.data_ptr<int64_t>()};
    stream_forward(in, epi);
  });
  return {vals, idx};
}

std::tuple<Tensor, Tensor, Tensor> mutual_nn(const Tensor& src, const Tensor& tgt, bool normalize) {
  check_pair(src, tgt, "mutual_nn");
  const int64_t B = src.size(0), Ns = src.size(1), Nt = tgt.size(1);
  Tensor s2t = at::empty({B, Ns}, src.options().dtype(at::kLong));
  Tensor t2s = at::empty({B, Nt}, src.options().dtype(at::kLong));
  Tensor mutual = at::empty({B, Ns}, src.options().dtype(at::kBool));
  SC_DISPATCH_FLOATING(src.scalar_type(), "mutual_nn", [&] {
    using acc_t = acc_type_t<scalar_t>;
    auto in = make_input<scalar_t>(src, tgt, normalize);
    std::vector<acc_t> v1(B * Ns);
    const int T = at::get_num_threads();
    std::vector<std::vector<acc_t>> colv(T);
    std::vector<std::vector<int64_t>> coli(T);
    int64_t* s2 = s2t.data_ptr<int64_t>();
    int64_t* t2 = t2s.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      for (int t = 0; t < T; ++t) {
        colv[t].assign(Nt, -kInf<acc_t>);
        coli[t].assign(Nt, -1);
      }
      RowColArgmax<acc_t> epi{TopK<acc_t>{1, Ns, Nt, nullptr, v1.data(), s2}, Nt, &colv, &coli};
      stream_forward(in, epi, b, b + 1);
      for (int64_t v = 0; v < Nt; ++v) {
        acc_t best = -kInf<acc_t>;
        int64_t arg = -1;
        for (int t = 0; t < T; ++t) {
          const int64_t r = coli[t][v];
          if (r < 0) continue;
          if (arg < 0 || colv[t][v] > best || (colv[t][v] == best && r < arg)) {
            best = colv[t][v];
            arg = r;
          }
        }
        t2[b * Nt + v] = arg;
      }
    }
    bool* mu = mutual.data_ptr<bool>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t u = 0; u < Ns; ++u) {
        const int64_t v = s2[b * Ns + u];
        mu[b * Ns + u] = v >= 0 && t2[b * Nt + v] == u;
      }
  });
  return {s2t, t2s, mutual};
}

Tensor instance_matching_distance(const Tensor& src, const Tensor& tgt, const std::optional<Tensor>& src_mask,
                                  const std::optional<Tensor>& tgt_mask, bool normalize) {
  check_pair(src, tgt, "instance_matching_distance");
  const int64_t B = src.size(0), Ns = src.size(1), Nt = tgt.size(1), C = src.size(2);
  Tensor res = out_like(src, {B});
  Tensor tm, sm;
  if (tgt_mask.has_value()) tm = tgt_mask->to(at::kBool).contiguous();
  if (src_mask.has_value()) sm = src_mask->to(at::kBool).contiguous();
  SC_DISPATCH_FLOATING(src.scalar_type(), "instance_matching_distance", [&] {
    using acc_t = acc_type_t<scalar_t>;
    auto in = make_input<scalar_t>(src, tgt, normalize);
    std::vector<acc_t> sqn(B * Nt);
    const scalar_t* tp = tgt.data_ptr<scalar_t>();
    at::parallel_for(0, B * Nt, 256, [&](int64_t a, int64_t e) {
      for (int64_t v = a; v < e; ++v) {
        acc_t s = 0;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t x = static_cast<acc_t>(tp[v * C + c]) * in.rt[v];
          s += x * x;
        }
        sqn[v] = s;
      }
    });
    std::vector<int64_t> arg(B * Ns);
    RowMinL2<acc_t> epi{Ns, Nt, sqn.data(), tm.defined() ? tm.data_ptr<bool>() : nullptr, arg.data()};
    stream_forward(in, epi);
    const scalar_t* sp = src.data_ptr<scalar_t>();
    const bool* smp = sm.defined() ? sm.data_ptr<bool>() : nullptr;
    acc_t* r = res.data_ptr<acc_t>();
    for (int64_t b = 0; b < B; ++b) {
      acc_t total = 0;
      int64_t count = 0;
      for (int64_t u = 0; u < Ns; ++u) {
        const int64_t su = b * Ns + u;
        if (smp && !smp[su]) continue;
        ++count;
        const int64_t v = arg[su];
        if (v < 0) {
          total = kNaN<acc_t>;
          continue;
        }
        const int64_t tv = b * Nt + v;
        acc_t d2 = 0;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(sp[su * C + c]) * in.rs[su] - static_cast<acc_t>(tp[tv * C + c]) * in.rt[tv];
          d2 += d * d;
        }
        total += std::sqrt(d2);
      }
      r[b] = count == 0 ? kNaN<acc_t> : total / acc_t(count);
    }
  });
  return res;
}

// ------------------------------------------------------------------ window soft-argmax
// Pass 1 is the engine's top-1 (fp32: by bf16 screening, as match_topk); pass 2 visits only the
// ≤(2r+1)² window cells of each row, on acc_t features (bf16/fp16 inputs are converted once, O(N·C)).
using core::Window;
using core::window_of;

template <typename acc_t>
std::vector<int64_t> argmax_rows(const Tensor& src, const Tensor& tgt, bool normalize) {
  const int64_t B = src.size(0), Ns = src.size(1), Nt = tgt.size(1);
  std::vector<int64_t> center(B * Ns);
  if (Ns > 0 && Nt > 0 && screening_available(src, 1)) {  // fp32: the certified bf16 screening of match_topk
    std::vector<float> v1(B * Ns);
    if (match_topk_screened(src, tgt, 1, nullptr, normalize, v1.data(), center.data())) return center;
  }
  SC_DISPATCH_FLOATING(src.scalar_type(), "window_soft_argmax", [&] {
    using a_t = acc_type_t<scalar_t>;
    auto in = make_input<scalar_t>(src, tgt, normalize);
    std::vector<a_t> v1(B * Ns);
    TopK<a_t> epi{1, Ns, Nt, nullptr, v1.data(), center.data()};
    stream_forward(in, epi);
  });
  return center;
}

std::tuple<Tensor, Tensor, Tensor> window_soft_argmax_fwd(const Tensor& src, const Tensor& tgt, double tau,
                                                          int64_t H, int64_t W, int64_t radius,
                                                          bool zero_outside, bool normalize) {
  check_pair(src, tgt, "window_soft_argmax_fwd");
  TORCH_CHECK(H * W == tgt.size(1), "window_soft_argmax_fwd: H*W != Nt");
  TORCH_CHECK(radius >= 0, "window_soft_argmax_fwd: radius must be >= 0");
  const int64_t B = src.size(0), Ns = src.size(1), Nt = tgt.size(1), C = src.size(2);
  Tensor out = out_like(src, {B, Ns, 2}), lse = out_like(src, {B, Ns});
  Tensor center = at::empty({B, Ns}, src.options().dtype(at::kLong));
  auto run = [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    const auto dt = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
    std::vector<int64_t> cen = argmax_rows<acc_t>(src, tgt, normalize);
    std::copy(cen.begin(), cen.end(), center.data_ptr<int64_t>());
    const Tensor s = src.to(dt).contiguous(), t = tgt.to(dt).contiguous();
    const acc_t* sp = s.data_ptr<acc_t>();
    const acc_t* tp = t.data_ptr<acc_t>();
    const std::vector<acc_t> rs = inv_norms<acc_t>(sp, B * Ns, C, normalize);
    const std::vector<acc_t> rt = inv_norms<acc_t>(tp, B * Nt, C, normalize);
    acc_t* o = out.data_ptr<acc_t>();
    acc_t* l = lse.data_ptr<acc_t>();
    const acc_t it = acc_t(1.0 / tau);
    at::parallel_for(0, B * Ns, 16, [&](int64_t a, int64_t e) {
      std::vector<acc_t> z;
      for (int64_t u = a; u < e; ++u) {
        const int64_t b = u / Ns, c = cen[u];
        if (c < 0) {
          o[2 * u] = o[2 * u + 1] = l[u] = kNaN<acc_t>;
          continue;
        }
        const Window w = window_of(c, H, W, radius);
        const int64_t cnt = w.count();
        z.resize(cnt);
        acc_t mx = -kInf<acc_t>;
        int64_t q = 0;
        for (int64_t y = w.y0; y <= w.y1; ++y)
          for (int64_t x = w.x0; x <= w.x1; ++x, ++q) {
            const int64_t v = b * Nt + y * W + x;
            z[q] = dot<acc_t>(sp + u * C, tp + v * C, C) * rs[u] * rt[v] * it;
            mx = nan_max(mx, z[q]);
          }
        mx = core::window_shift<acc_t>(mx, cnt, Nt, zero_outside);
        acc_t Z = 0, sx = 0, sy = 0;
        q = 0;
        for (int64_t y = w.y0; y <= w.y1; ++y)
          for (int64_t x = w.x0; x <= w.x1; ++x, ++q) {
            const acc_t p = std::exp(z[q] - mx);
            Z += p;
            sx += p * acc_t(x);
            sy += p * acc_t(y);
          }
        if (zero_outside && cnt < Nt) core::window_add_outside<acc_t>(w, H, W, mx, Z, sx, sy);
        o[2 * u] = sx / Z;
        o[2 * u + 1] = sy / Z;
        l[u] = mx + std::log(Z);
      }
    });
  };
  if (src.scalar_type() == at::kDouble) run(double{}); else run(float{});
  return {out, lse, center};
}

std::tuple<Tensor, Tensor> window_soft_argmax_bwd(const Tensor& grad, const Tensor& src, const Tensor& tgt,
                                                  const Tensor& out, const Tensor& lse, const Tensor& center,
                                                  double tau, int64_t H, int64_t W, int64_t radius,
                                                  bool zero_outside, bool normalize) {
  check_pair(src, tgt, "window_soft_argmax_bwd");
  const int64_t B = src.size(0), Ns = src.size(1), Nt = tgt.size(1), C = src.size(2);
  std::tuple<Tensor, Tensor> res;
  auto run = [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    const auto dt = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
    const Tensor s = src.to(dt).contiguous(), t = tgt.to(dt).contiguous();
    const Tensor g = grad.to(dt).contiguous(), o = out.to(dt).contiguous(), l = lse.to(dt).contiguous();
    const Tensor cen_t = center.to(at::kLong).contiguous();
    const acc_t *sp = s.data_ptr<acc_t>(), *tp = t.data_ptr<acc_t>();
    const acc_t *gp = g.data_ptr<acc_t>(), *op = o.data_ptr<acc_t>(), *lp = l.data_ptr<acc_t>();
    const int64_t* cen = cen_t.data_ptr<int64_t>();
    const std::vector<acc_t> rs = inv_norms<acc_t>(sp, B * Ns, C, normalize);
    const std::vector<acc_t> rt = inv_norms<acc_t>(tp, B * Nt, C, normalize);
    const acc_t it = acc_t(1.0 / tau);
    // dL/ds for one (row, in-window cell): p (⟨G, g_v⟩ − ⟨G, y⟩)/τ with p = e^{z − lse}.
    auto ds_of = [&](int64_t u, int64_t vb, acc_t sim) {
      const acc_t Gx = gp[2 * u], Gy = gp[2 * u + 1];
      return core::soft_argmax_ds<acc_t>(sim, it, lp[u], Gx, Gy, acc_t(vb % W), acc_t(vb / W),
                                         Gx * op[2 * u] + Gy * op[2 * u + 1]);
    };
    Tensor dsh = at::zeros_like(s), dth = at::zeros_like(t);
    acc_t *dsp = dsh.data_ptr<acc_t>(), *dtp = dth.data_ptr<acc_t>();
    // Pass Q: one row at a time, dâ_u = Σ_{v∈W_u} ds_uv b̂_v.
    at::parallel_for(0, B * Ns, 16, [&](int64_t a, int64_t e) {
      for (int64_t u = a; u < e; ++u) {
        if (cen[u] < 0) continue;
        const int64_t b = u / Ns;
        const Window w = window_of(cen[u], H, W, radius);
        for (int64_t y = w.y0; y <= w.y1; ++y)
          for (int64_t x = w.x0; x <= w.x1; ++x) {
            const int64_t vb = y * W + x, v = b * Nt + vb;
            const acc_t sim = dot<acc_t>(sp + u * C, tp + v * C, C) * rs[u] * rt[v];
            axpy<acc_t>(ds_of(u, vb, sim) * rt[v], tp + v * C, dsp + u * C, C);
          }
      }
    });
    // Pass K: one target cell at a time, over the rows whose window holds it (rows bucketed by
    // their centre cell), db̂_v = Σ_u ds_uv â_u. Disjoint writes, no atomics.
    std::vector<int64_t> start(B * Nt + 1, 0), rows(B * Ns);
    for (int64_t u = 0; u < B * Ns; ++u)
      if (cen[u] >= 0) ++start[(u / Ns) * Nt + cen[u] + 1];
    for (int64_t i = 0; i < B * Nt; ++i) start[i + 1] += start[i];
    {
      std::vector<int64_t> fill(start.begin(), start.end() - 1);
      for (int64_t u = 0; u < B * Ns; ++u)
        if (cen[u] >= 0) rows[fill[(u / Ns) * Nt + cen[u]]++] = u;
    }
    at::parallel_for(0, B * Nt, 16, [&](int64_t a, int64_t e) {
      for (int64_t v = a; v < e; ++v) {
        const int64_t b = v / Nt, vb = v % Nt;
        const Window w = window_of(vb, H, W, radius);  // centres whose window contains v
        for (int64_t y = w.y0; y <= w.y1; ++y)
          for (int64_t x = w.x0; x <= w.x1; ++x) {
            const int64_t cb = b * Nt + y * W + x;
            for (int64_t q = start[cb]; q < start[cb + 1]; ++q) {
              const int64_t u = rows[q];
              const acc_t sim = dot<acc_t>(sp + u * C, tp + v * C, C) * rs[u] * rt[v];
              axpy<acc_t>(ds_of(u, vb, sim) * rs[u], sp + u * C, dtp + v * C, C);
            }
          }
      }
    });
    Tensor dsrc = at::empty_like(s), dtgt = at::empty_like(t);
    norm_backward<acc_t>(sp, rs.data(), dsp, dsrc.data_ptr<acc_t>(), B * Ns, C, normalize);
    norm_backward<acc_t>(tp, rt.data(), dtp, dtgt.data_ptr<acc_t>(), B * Nt, C, normalize);
    res = {dsrc.to(src.scalar_type()), dtgt.to(tgt.scalar_type())};
  };
  if (src.scalar_type() == at::kDouble) run(double{}); else run(float{});
  return res;
}

}  // namespace
}  // namespace semcorr

TORCH_LIBRARY_FRAGMENT(semcorr_ext, m) {
  m.def("soft_argmax_fwd(Tensor src, Tensor tgt, float tau, int H, int W, bool normalize) -> (Tensor, Tensor)");
  m.def("soft_argmax_bwd(Tensor grad, Tensor src, Tensor tgt, Tensor out, Tensor lse, float tau, int H, int W, "
        "bool normalize) -> (Tensor, Tensor)");
  m.def("window_soft_argmax_fwd(Tensor src, Tensor tgt, float tau, int H, int W, int radius, bool zero_outside, "
        "bool normalize) -> (Tensor, Tensor, Tensor)");
  m.def("window_soft_argmax_bwd(Tensor grad, Tensor src, Tensor tgt, Tensor out, Tensor lse, Tensor center, "
        "float tau, int H, int W, int radius, bool zero_outside, bool normalize) -> (Tensor, Tensor)");
  m.def("match_topk(Tensor src, Tensor tgt, int k, Tensor? tgt_mask, bool normalize) -> (Tensor, Tensor)");
  m.def("mutual_nn(Tensor src, Tensor tgt, bool normalize) -> (Tensor, Tensor, Tensor)");
  m.def("instance_matching_distance(Tensor src, Tensor tgt, Tensor? src_mask, Tensor? tgt_mask, bool normalize) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(semcorr_ext, CPU, m) {
  m.impl("soft_argmax_fwd", &semcorr::soft_argmax_fwd);
  m.impl("soft_argmax_bwd", &semcorr::soft_argmax_bwd);
  m.impl("window_soft_argmax_fwd", &semcorr::window_soft_argmax_fwd);
  m.impl("window_soft_argmax_bwd", &semcorr::window_soft_argmax_bwd);
  m.impl("match_topk", &semcorr::match_topk);
  m.impl("mutual_nn", &semcorr::mutual_nn);
  m.impl("instance_matching_distance", &semcorr::instance_matching_distance);
}
