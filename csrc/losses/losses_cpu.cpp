// CPU kernels of the training-loss family: epilogues of the streaming engine (see losses.h).
#include "common/vec.h"  // first: selects the SIMD width of ATen's Vectorized

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/kernel_util.h"
#include "common/stream_engine.h"
#include "losses/losses.h"

namespace semcorr {
namespace {

using at::Tensor;

at::ScalarType acc_dtype(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// ------------------------------------------------------------------ expected_cost
// d = ‖t − g‖^p, vectorised: r² then e^{(p/2)·log r²} (log 0 = −inf, so d = 0 there for every p > 0).
template <typename acc_t>
inline Vectorized<acc_t> vdist(const Vectorized<acc_t>& dx, const Vectorized<acc_t>& dy, acc_t p) {
  const Vectorized<acc_t> r2 = at::vec::fmadd(dx, dx, dy * dy);
  if (p == acc_t(2)) return r2;
  if (p == acc_t(1)) return r2.sqrt();
  return (r2.log() * Vectorized<acc_t>(p / 2)).exp();
}
template <typename acc_t>
inline acc_t sdist(acc_t dx, acc_t dy, acc_t p) {
  const acc_t r2 = dx * dx + dy * dy;
  if (p == acc_t(2)) return r2;
  if (p == acc_t(1)) return std::sqrt(r2);
  return r2 > 0 ? std::pow(r2, p / 2) : acc_t(0);
}

template <typename acc_t>
struct ExpectedCostFwd {
  acc_t inv_tau, p;
  const acc_t *gx, *gy, *target;
  int64_t Ns;
  acc_t *loss, *lse;
  struct Block {
    const ExpectedCostFwd& e;
    int64_t b, r0, m;
    std::vector<acc_t> mx, l, c;
    Block(const ExpectedCostFwd& e_, int64_t b_, int64_t r0_, int64_t m_)
        : e(e_), b(b_), r0(r0_), m(m_), mx(m_, -kInf<acc_t>), l(m_, 0), c(m_, 0) {}
    void tile(acc_t* S, int64_t ld, int64_t c0, int64_t n) {
      using V = Vectorized<acc_t>;
      constexpr int64_t L = V::size();
      for (int64_t i = 0; i < m; ++i) {
        const int64_t u = b * e.Ns + r0 + i;
        const acc_t tx = e.target[2 * u], ty = e.target[2 * u + 1];
        const acc_t* row = S + i * ld;
        const acc_t alpha = online_max<acc_t>(row, n, e.inv_tau, mx[i]);
        const V vit(e.inv_tau), vm(mx[i]), vtx(tx), vty(ty);
        V vl(acc_t(0)), vc(acc_t(0));
        int64_t j = 0;
        for (; j + L <= n; j += L) {
          const V pr = vexp(at::vec::fmsub(V::loadu(row + j), vit, vm));
          const V d = vdist<acc_t>(vtx - V::loadu(e.gx + c0 + j), vty - V::loadu(e.gy + c0 + j), e.p);
          vl = vl + pr;
          vc = at::vec::fmadd(pr, d, vc);
        }
        acc_t tl = hsum<acc_t>(vl), tc = hsum<acc_t>(vc);
        for (; j < n; ++j) {
          const acc_t pr = std::exp(row[j] * e.inv_tau - mx[i]);
          tl += pr;
          tc += pr * sdist<acc_t>(tx - e.gx[c0 + j], ty - e.gy[c0 + j], e.p);
        }
        l[i] = l[i] * alpha + tl;
        c[i] = c[i] * alpha + tc;
      }
    }
    void finish() {
      for (int64_t i = 0; i < m; ++i) {
        const int64_t u = b * e.Ns + r0 + i;
        e.loss[u] = c[i] / l[i];
        e.lse[u] = mx[i] + std::log(l[i]);
      }
    }
  };
};

template <typename acc_t>
struct ExpectedCostBwd {
  acc_t inv_tau, p;
  const acc_t *gx, *gy, *target, *gout, *loss, *lse;
  int64_t Ns;
  // ds_uv = G_u p_uv (d_uv − L_u) / τ
  void grad(int64_t b, int64_t r0, int64_t m, int64_t c0, int64_t n, acc_t* S, int64_t ld, bool) const {
    using V = Vectorized<acc_t>;
    constexpr int64_t L = V::size();
    for (int64_t i = 0; i < m; ++i) {
      const int64_t u = b * Ns + r0 + i;
      const acc_t tx = target[2 * u], ty = target[2 * u + 1], G = gout[u];
      acc_t* row = S + i * ld;
      const V vit(inv_tau), vL(lse[u]), vtx(tx), vty(ty), vloss(loss[u]), vG(G * inv_tau);
      int64_t j = 0;
      for (; j + L <= n; j += L) {
        const V pr = vexp(at::vec::fmsub(V::loadu(row + j), vit, vL));
        const V d = vdist<acc_t>(vtx - V::loadu(gx + c0 + j), vty - V::loadu(gy + c0 + j), p);
        (vG * pr * (d - vloss)).store(row + j);
      }
      for (; j < n; ++j) {
        const acc_t pr = std::exp(row[j] * inv_tau - lse[u]);
        row[j] = G * inv_tau * pr * (sdist<acc_t>(tx - gx[c0 + j], ty - gy[c0 + j], p) - loss[u]);
      }
    }
  }
};

std::tuple<Tensor, Tensor> expected_cost_fwd(const Tensor& src, const Tensor& tgt, const Tensor& target_xy,
                                             double tau, int64_t H, int64_t W, double p, bool normalize) {
  check_pair(src, tgt, "expected_cost_fwd");
  TORCH_CHECK(H * W == tgt.size(1), "expected_cost_fwd: H*W != Nt");
  const int64_t B = src.size(0), Ns = src.size(1);
  Tensor loss = out_like(src, {B, Ns}), lse = out_like(src, {B, Ns});
  const Tensor t = target_xy.to(acc_dtype(src)).contiguous();
  SC_DISPATCH_FLOATING(src.scalar_type(), "expected_cost_fwd", [&] {
    using acc_t = acc_type_t<scalar_t>;
    auto in = make_input<scalar_t>(src, tgt, normalize);
    Grid<acc_t> g(H, W);
    ExpectedCostFwd<acc_t> epi{acc_t(1.0 / tau), acc_t(p), g.gx.data(), g.gy.data(), t.data_ptr<acc_t>(), Ns,
                               loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>()};
    stream_forward(in, epi);
  });
  return {loss, lse};
}

std::tuple<Tensor, Tensor> expected_cost_bwd(const Tensor& grad, const Tensor& src, const Tensor& tgt,
                                             const Tensor& target_xy, const Tensor& loss, const Tensor& lse,
                                             double tau, int64_t H, int64_t W, double p, bool normalize) {
  check_pair(src, tgt, "expected_cost_bwd");
  std::tuple<Tensor, Tensor> res;
  auto run = [&](auto tag) {
    using acc_t = decltype(tag);
    const auto dt = acc_dtype(src);
    const Tensor g = grad.to(dt).contiguous(), t = target_xy.to(dt).contiguous();
    const Tensor lo = loss.to(dt).contiguous(), ls = lse.to(dt).contiguous();
    Grid<acc_t> grid(H, W);
    ExpectedCostBwd<acc_t> epi{acc_t(1.0 / tau), acc_t(p), grid.gx.data(), grid.gy.data(), t.data_ptr<acc_t>(),
                               g.data_ptr<acc_t>(), lo.data_ptr<acc_t>(), ls.data_ptr<acc_t>(), src.size(1)};
    res = run_backward<acc_t>(src, tgt, normalize, epi);
  };
  if (src.scalar_type() == at::kDouble) run(double{}); else run(float{});
  return res;
}

// ------------------------------------------------------------------ softmax_aggregate
// Online softmax with a value GEMM per tile: O = O·α + P·V_tile (the attention forward).
template <typename acc_t>
struct AggregateFwd {
  acc_t inv_tau;
  const acc_t* V;  // (B, Nt, Cv)
  int64_t Ns, Nt, Cv;
  acc_t *out, *lse;
  struct Block {
    const AggregateFwd& e;
    int64_t b, r0, m;
    std::vector<acc_t> mx, l, O;
    Block(const AggregateFwd& e_, int64_t b_, int64_t r0_, int64_t m_)
        : e(e_), b(b_), r0(r0_), m(m_), mx(m_, -kInf<acc_t>), l(m_, 0), O(m_ * e_.Cv, 0) {}
    void tile(acc_t* S, int64_t ld, int64_t c0, int64_t n) {
      using Vec = Vectorized<acc_t>;
      constexpr int64_t L = Vec::size();
      for (int64_t i = 0; i < m; ++i) {
        acc_t* row = S + i * ld;
        const acc_t alpha = online_max<acc_t>(row, n, e.inv_tau, mx[i]);
        if (alpha != acc_t(1))
          for (int64_t c = 0; c < e.Cv; ++c) O[i * e.Cv + c] *= alpha;
        const Vec vit(e.inv_tau), vm(mx[i]);
        Vec vl(acc_t(0));
        int64_t j = 0;
        for (; j + L <= n; j += L) {
          const Vec pr = vexp(at::vec::fmsub(Vec::loadu(row + j), vit, vm));
          pr.store(row + j);
          vl = vl + pr;
        }
        acc_t tl = hsum<acc_t>(vl);
        for (; j < n; ++j) {
          row[j] = std::exp(row[j] * e.inv_tau - mx[i]);
          tl += row[j];
        }
        l[i] = l[i] * alpha + tl;
      }
      gemm::acc_pb<acc_t>(m, n, e.Cv, S, ld, e.V + (b * e.Nt + c0) * e.Cv, e.Cv, O.data(), e.Cv);
    }
    void finish() {
      for (int64_t i = 0; i < m; ++i) {
        const int64_t u = b * e.Ns + r0 + i;
        for (int64_t c = 0; c < e.Cv; ++c) e.out[u * e.Cv + c] = O[i * e.Cv + c] / l[i];
        e.lse[u] = mx[i] + std::log(l[i]);
      }
    }
  };
};

template <typename acc_t>
struct AggregateBwd {
  static constexpr bool kTargetAccum = true;  // dV_v needs exclusive target tiles (pass K)
  acc_t inv_tau;
  const acc_t *V, *gout, *out, *lse;  // V (B,Nt,Cv), gout/out (B,Ns,Cv), lse (B,Ns)
  acc_t* dV;                          // (B, Nt, Cv), written in pass K only
  int64_t Ns, Nt, Cv;
  void grad(int64_t b, int64_t r0, int64_t m, int64_t c0, int64_t n, acc_t* S, int64_t ld, bool pass_k) const {
    using Vec = Vectorized<acc_t>;
    constexpr int64_t L = Vec::size();
    thread_local std::vector<acc_t> dP;
    dP.resize(size_t(m) * ld);
    const acc_t* Vt = V + (b * Nt + c0) * Cv;
    const acc_t* dO = gout + (b * Ns + r0) * Cv;
    // P = e^{z − lse}, recomputed in place
    for (int64_t i = 0; i < m; ++i) {
      acc_t* row = S + i * ld;
      const Vec vit(inv_tau), vL(lse[b * Ns + r0 + i]);
      int64_t j = 0;
      for (; j + L <= n; j += L) vexp(at::vec::fmsub(Vec::loadu(row + j), vit, vL)).store(row + j);
      for (; j < n; ++j) row[j] = std::exp(row[j] * inv_tau - lse[b * Ns + r0 + i]);
    }
    // dP = dO_blk · V_tileᵀ
    gemm::scores<acc_t>(m, n, Cv, dO, Cv, Vt, Cv, dP.data(), ld);
    // dV_tile += Pᵀ · dO_blk: this call owns the target tile in pass K
    if (pass_k) gemm::acc_pta<acc_t>(m, n, Cv, S, ld, dO, Cv, dV + (b * Nt + c0) * Cv, Cv);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t u = b * Ns + r0 + i;
      acc_t D = 0;
      for (int64_t c = 0; c < Cv; ++c) D += gout[u * Cv + c] * out[u * Cv + c];
      acc_t* row = S + i * ld;
      const acc_t* dp = dP.data() + i * ld;
      for (int64_t j = 0; j < n; ++j) row[j] = row[j] * (dp[j] - D) * inv_tau;
    }
  }
};

std::tuple<Tensor, Tensor> softmax_aggregate_fwd(const Tensor& src, const Tensor& tgt, const Tensor& values,
                                                 double tau, bool normalize) {
  check_pair(src, tgt, "softmax_aggregate_fwd");
  const int64_t B = src.size(0), Ns = src.size(1), Nt = tgt.size(1), Cv = values.size(2);
  Tensor out = out_like(src, {B, Ns, Cv}), lse = out_like(src, {B, Ns});
  const Tensor v = values.to(acc_dtype(src)).contiguous();
  SC_DISPATCH_FLOATING(src.scalar_type(), "softmax_aggregate_fwd", [&] {
    using acc_t = acc_type_t<scalar_t>;
    auto in = make_input<scalar_t>(src, tgt, normalize);
    AggregateFwd<acc_t> epi{acc_t(1.0 / tau), v.data_ptr<acc_t>(), Ns, Nt, Cv, out.data_ptr<acc_t>(),
                            lse.data_ptr<acc_t>()};
    stream_forward(in, epi);
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> softmax_aggregate_bwd(const Tensor& grad, const Tensor& src, const Tensor& tgt,
                                                         const Tensor& values, const Tensor& out, const Tensor& lse,
                                                         double tau, bool normalize) {
  check_pair(src, tgt, "softmax_aggregate_bwd");
  const int64_t Ns = src.size(1), Nt = tgt.size(1), Cv = values.size(2);
  std::tuple<Tensor, Tensor, Tensor> res;
  auto run = [&](auto tag) {
    using acc_t = decltype(tag);
    const auto dt = acc_dtype(src);
    const Tensor v = values.to(dt).contiguous(), g = grad.to(dt).contiguous();
    const Tensor o = out.to(dt).contiguous(), l = lse.to(dt).contiguous();
    Tensor dv = at::zeros_like(v);
    AggregateBwd<acc_t> epi{acc_t(1.0 / tau), v.data_ptr<acc_t>(), g.data_ptr<acc_t>(), o.data_ptr<acc_t>(),
                            l.data_ptr<acc_t>(), dv.data_ptr<acc_t>(), Ns, Nt, Cv};
    auto [ds, dtg] = run_backward<acc_t>(src, tgt, normalize, epi);
    res = {ds, dtg, dv.to(values.scalar_type())};
  };
  if (src.scalar_type() == at::kDouble) run(double{}); else run(float{});
  return res;
}

// ------------------------------------------------------------------ rowsoftmax_distill
enum DistillLoss : int64_t { kCE = 0, kMSE = 1, kL1 = 2 };

// ce and mse in ONE pass: both softmaxes' normalisers and the cross sums are kept online, each sum
// rescaled by the factor of its own running max(es) when a larger logit arrives:
//   sT = Σe^T, sS = Σe^S, sTT = Σ(e^T)², sTS = Σe^T e^S, sSS = Σ(e^S)², sTz = Σe^T z^S
//   → Σa² = sTT/sT², Σab = sTS/(sT sS), Σb² = sSS/sS², Σ a z^S = sTz/sT, LSE = m + log s.
// l1 is not decomposable this way: its pass 2 (DistillL1) runs after the row LSEs are known.
template <typename acc_t>
struct DistillOnline {
  acc_t it_t, it_s;
  int64_t Ns, loss_kind;
  acc_t *loss, *stats;  // stats (B, Ns, 3): LSE^T, LSE^S, c
  struct Block {
    const DistillOnline& e;
    int64_t b, r0, m;
    std::vector<acc_t> mt, ms, sT, sS, sTT, sTS, sSS, sTz;
    Block(const DistillOnline& e_, int64_t b_, int64_t r0_, int64_t m_)
        : e(e_), b(b_), r0(r0_), m(m_), mt(m_, -kInf<acc_t>), ms(m_, -kInf<acc_t>), sT(m_, 0), sS(m_, 0),
          sTT(m_, 0), sTS(m_, 0), sSS(m_, 0), sTz(m_, 0) {}
    void tile(acc_t* ST, acc_t* SS, int64_t ld, int64_t c0, int64_t n) {
      using V = Vectorized<acc_t>;
      constexpr int64_t L = V::size();
      const bool ce = e.loss_kind == kCE;
      for (int64_t i = 0; i < m; ++i) {
        const acc_t* rt = ST + i * ld;
        const acc_t* rs = SS + i * ld;
        const acc_t at_ = online_max<acc_t>(rt, n, e.it_t, mt[i]);
        const acc_t as_ = online_max<acc_t>(rs, n, e.it_s, ms[i]);
        const V vitt(e.it_t), vits(e.it_s), vmt(mt[i]), vms(ms[i]);
        V a1(acc_t(0)), a2(acc_t(0)), a3(acc_t(0)), a4(acc_t(0)), a5(acc_t(0)), a6(acc_t(0));
        int64_t j = 0;
        for (; j + L <= n; j += L) {
          const V et = vexp(at::vec::fmsub(V::loadu(rt + j), vitt, vmt));
          const V zs = V::loadu(rs + j) * vits;
          const V es = vexp(zs - vms);
          a1 = a1 + et;
          a2 = a2 + es;
          if (ce) {
            a6 = at::vec::fmadd(et, zs, a6);
          } else {
            a3 = at::vec::fmadd(et, et, a3);
            a4 = at::vec::fmadd(et, es, a4);
            a5 = at::vec::fmadd(es, es, a5);
          }
        }
        acc_t t1 = hsum<acc_t>(a1), t2 = hsum<acc_t>(a2), t3 = hsum<acc_t>(a3), t4 = hsum<acc_t>(a4),
              t5 = hsum<acc_t>(a5), t6 = hsum<acc_t>(a6);
        for (; j < n; ++j) {
          const acc_t et = std::exp(rt[j] * e.it_t - mt[i]);
          const acc_t zs = rs[j] * e.it_s;
          const acc_t es = std::exp(zs - ms[i]);
          t1 += et;
          t2 += es;
          t3 += et * et;
          t4 += et * es;
          t5 += es * es;
          t6 += et * zs;
        }
        sT[i] = sT[i] * at_ + t1;
        sS[i] = sS[i] * as_ + t2;
        sTT[i] = sTT[i] * at_ * at_ + t3;
        sTS[i] = sTS[i] * at_ * as_ + t4;
        sSS[i] = sSS[i] * as_ * as_ + t5;
        sTz[i] = sTz[i] * at_ + t6;
      }
    }
    void finish() {
      for (int64_t i = 0; i < m; ++i) {
        const int64_t u = b * e.Ns + r0 + i;
        const acc_t lt = mt[i] + std::log(sT[i]), ls = ms[i] + std::log(sS[i]);
        e.stats[3 * u] = lt;
        e.stats[3 * u + 1] = ls;
        if (e.loss_kind == kCE) {
          e.loss[u] = ls - sTz[i] / sT[i];
          e.stats[3 * u + 2] = 0;
        } else {  // mse (l1 overwrites loss and c in its second pass)
          const acc_t aa = sTT[i] / (sT[i] * sT[i]), ab = sTS[i] / (sT[i] * sS[i]), bb = sSS[i] / (sS[i] * sS[i]);
          e.loss[u] = aa - 2 * ab + bb;
          e.stats[3 * u + 2] = -2 * (ab - bb);
        }
      }
    }
  };
};

// l1's pass 2, with both LSEs known: Σ|a − b| and c = Σ b·h, h = −sign(a − b).
template <typename acc_t>
struct DistillL1 {
  acc_t it_t, it_s;
  int64_t Ns;
  acc_t *loss, *stats;
  struct Block {
    const DistillL1& e;
    int64_t b, r0, m;
    std::vector<acc_t> s1, s2;
    Block(const DistillL1& e_, int64_t b_, int64_t r0_, int64_t m_) : e(e_), b(b_), r0(r0_), m(m_), s1(m_, 0), s2(m_, 0) {}
    void tile(acc_t* ST, acc_t* SS, int64_t ld, int64_t c0, int64_t n) {
      using V = Vectorized<acc_t>;
      constexpr int64_t L = V::size();
      for (int64_t i = 0; i < m; ++i) {
        const int64_t u = b * e.Ns + r0 + i;
        const acc_t* rt = ST + i * ld;
        const acc_t* rs = SS + i * ld;
        const V vitt(e.it_t), vits(e.it_s), vlt(e.stats[3 * u]), vls(e.stats[3 * u + 1]);
        V x1(acc_t(0)), x2(acc_t(0));
        int64_t j = 0;
        for (; j + L <= n; j += L) {
          const V a = vexp(at::vec::fmsub(V::loadu(rt + j), vitt, vlt));
          const V bb = vexp(at::vec::fmsub(V::loadu(rs + j), vits, vls));
          const V d = a - bb;
          x1 = x1 + d.abs();
          // b·h with h = −sign(a − b): −b where a > b, +b where a < b, 0 on ties
          x2 = x2 + V::blendv(V(acc_t(0)), V(acc_t(0)) - bb, d > V(acc_t(0))) +
               V::blendv(V(acc_t(0)), bb, d < V(acc_t(0)));
        }
        acc_t t1 = hsum<acc_t>(x1), t2 = hsum<acc_t>(x2);
        for (; j < n; ++j) {
          const acc_t a = std::exp(rt[j] * e.it_t - e.stats[3 * u]);
          const acc_t bb = std::exp(rs[j] * e.it_s - e.stats[3 * u + 1]);
          const acc_t d = a - bb;
          t1 += std::abs(d);
          t2 += d > 0 ? -bb : (d < 0 ? bb : acc_t(0));
        }
        s1[i] += t1;
        s2[i] += t2;
      }
    }
    void finish() {
      for (int64_t i = 0; i < m; ++i) {
        const int64_t u = b * e.Ns + r0 + i;
        e.loss[u] = s1[i];
        e.stats[3 * u + 2] = s2[i];
      }
    }
  };
};

// Backward on the student only; the teacher tile is recomputed from fp32 (fp64) copies.
template <typename acc_t>
struct DistillBwd {
  acc_t it_t, it_s;
  int64_t Ns, Nt, Ct, loss_kind;
  const StreamInput<acc_t>* teacher;
  const acc_t *stats, *gout;
  void grad(int64_t b, int64_t r0, int64_t m, int64_t c0, int64_t n, acc_t* S, int64_t ld, bool) const {
    using V = Vectorized<acc_t>;
    constexpr int64_t L = V::size();
    thread_local std::vector<acc_t> T;
    T.resize(size_t(m) * ld);
    gemm::scores<acc_t>(m, n, Ct, teacher->src + (b * Ns + r0) * Ct, Ct, teacher->tgt + (b * Nt + c0) * Ct, Ct,
                        T.data(), ld);
    if (teacher->normalize)
      scale_tile<acc_t>(T.data(), ld, m, n, teacher->rs.data() + b * Ns + r0, teacher->rt.data() + b * Nt + c0);
    const V zero(acc_t(0)), one(acc_t(1)), two(acc_t(2));
    for (int64_t i = 0; i < m; ++i) {
      const int64_t u = b * Ns + r0 + i;
      const acc_t lt = stats[3 * u], ls = stats[3 * u + 1], c = stats[3 * u + 2], G = gout[u] * it_s;
      acc_t* row = S + i * ld;
      const acc_t* trow = T.data() + i * ld;
      const V vitt(it_t), vits(it_s), vlt(lt), vls(ls), vc(c), vG(G);
      int64_t j = 0;
      for (; j + L <= n; j += L) {
        const V a = vexp(at::vec::fmsub(V::loadu(trow + j), vitt, vlt));
        const V bb = vexp(at::vec::fmsub(V::loadu(row + j), vits, vls));
        V g;
        if (loss_kind == kCE) {
          g = vG * (bb - a);
        } else if (loss_kind == kMSE) {
          g = vG * bb * (V(acc_t(0)) - two * (a - bb) - vc);
        } else {
          const V d = a - bb;
          const V h = V::blendv(zero, zero - one, d > zero) + V::blendv(zero, one, d < zero);
          g = vG * bb * (h - vc);
        }
        g.store(row + j);
      }
      for (; j < n; ++j) {
        const acc_t a = std::exp(trow[j] * it_t - lt);
        const acc_t bb = std::exp(row[j] * it_s - ls);
        if (loss_kind == kCE) {
          row[j] = G * (bb - a);
        } else if (loss_kind == kMSE) {
          row[j] = G * bb * (-2 * (a - bb) - c);
        } else {
          const acc_t d = a - bb;
          const acc_t h = d > 0 ? acc_t(-1) : (d < 0 ? acc_t(1) : acc_t(0));
          row[j] = G * bb * (h - c);
        }
      }
    }
  }
};

void check_distill(const Tensor& ts, const Tensor& tt, const Tensor& ss, const Tensor& st) {
  check_pair(ts, tt, "rowsoftmax_distill");
  check_pair(ss, st, "rowsoftmax_distill");
  TORCH_CHECK(ts.size(0) == ss.size(0) && ts.size(1) == ss.size(1) && tt.size(1) == st.size(1),
              "rowsoftmax_distill: teacher and student must have the same B, Ns and Nt");
  TORCH_CHECK(ts.scalar_type() == ss.scalar_type(), "rowsoftmax_distill: teacher and student dtypes differ");
}

std::tuple<Tensor, Tensor> rowsoftmax_distill_fwd(const Tensor& t_src, const Tensor& t_tgt, const Tensor& s_src,
                                                  const Tensor& s_tgt, double tau_t, double tau_s, int64_t loss_kind,
                                                  bool normalize) {
  check_distill(t_src, t_tgt, s_src, s_tgt);
  TORCH_CHECK(loss_kind >= 0 && loss_kind <= 2, "rowsoftmax_distill: loss code must be 0 (ce), 1 (mse) or 2 (l1)");
  const int64_t B = s_src.size(0), Ns = s_src.size(1);
  Tensor loss = out_like(s_src, {B, Ns}), stats = out_like(s_src, {B, Ns, 3});
  SC_DISPATCH_FLOATING(s_src.scalar_type(), "rowsoftmax_distill_fwd", [&] {
    using acc_t = acc_type_t<scalar_t>;
    auto inT = make_input<scalar_t>(t_src, t_tgt, normalize);
    auto inS = make_input<scalar_t>(s_src, s_tgt, normalize);
    DistillOnline<acc_t> e1{acc_t(1.0 / tau_t), acc_t(1.0 / tau_s), Ns, loss_kind, loss.data_ptr<acc_t>(),
                            stats.data_ptr<acc_t>()};
    stream_forward2(inT, inS, e1);
    if (loss_kind == kL1) {
      DistillL1<acc_t> e2{acc_t(1.0 / tau_t), acc_t(1.0 / tau_s), Ns, loss.data_ptr<acc_t>(), stats.data_ptr<acc_t>()};
      stream_forward2(inT, inS, e2);
    }
  });
  return {loss, stats};
}

std::tuple<Tensor, Tensor> rowsoftmax_distill_bwd(const Tensor& grad, const Tensor& t_src, const Tensor& t_tgt,
                                                  const Tensor& s_src, const Tensor& s_tgt, const Tensor& stats,
                                                  double tau_t, double tau_s, int64_t loss_kind, bool normalize) {
  check_distill(t_src, t_tgt, s_src, s_tgt);
  std::tuple<Tensor, Tensor> res;
  auto run = [&](auto tag) {
    using acc_t = decltype(tag);
    const auto dt = acc_dtype(s_src);
    const Tensor ts = t_src.to(dt).contiguous(), tt = t_tgt.to(dt).contiguous();
    const Tensor g = grad.to(dt).contiguous(), st = stats.to(dt).contiguous();
    auto teacher = make_input<acc_t>(ts, tt, normalize);
    DistillBwd<acc_t> epi{acc_t(1.0 / tau_t), acc_t(1.0 / tau_s), s_src.size(1), s_tgt.size(1), t_src.size(2),
                          loss_kind, &teacher, st.data_ptr<acc_t>(), g.data_ptr<acc_t>()};
    res = run_backward<acc_t>(s_src, s_tgt, normalize, epi);
  };
  if (s_src.scalar_type() == at::kDouble) run(double{}); else run(float{});
  return res;
}

}  // namespace
}  // namespace semcorr

TORCH_LIBRARY_FRAGMENT(semcorr_ext, m) {
  m.def("expected_cost_fwd(Tensor src, Tensor tgt, Tensor target_xy, float tau, int H, int W, float p, "
        "bool normalize) -> (Tensor, Tensor)");
  m.def("expected_cost_bwd(Tensor grad, Tensor src, Tensor tgt, Tensor target_xy, Tensor loss, Tensor lse, "
        "float tau, int H, int W, float p, bool normalize) -> (Tensor, Tensor)");
  m.def("softmax_aggregate_fwd(Tensor src, Tensor tgt, Tensor values, float tau, bool normalize) -> (Tensor, Tensor)");
  m.def("softmax_aggregate_bwd(Tensor grad, Tensor src, Tensor tgt, Tensor values, Tensor out, Tensor lse, "
        "float tau, bool normalize) -> (Tensor, Tensor, Tensor)");
  m.def("rowsoftmax_distill_fwd(Tensor t_src, Tensor t_tgt, Tensor s_src, Tensor s_tgt, float tau_t, float tau_s, "
        "int loss, bool normalize) -> (Tensor, Tensor)");
  m.def("rowsoftmax_distill_bwd(Tensor grad, Tensor t_src, Tensor t_tgt, Tensor s_src, Tensor s_tgt, Tensor stats, "
        "float tau_t, float tau_s, int loss, bool normalize) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(semcorr_ext, CPU, m) {
  m.impl("expected_cost_fwd", &semcorr::expected_cost_fwd);
  m.impl("expected_cost_bwd", &semcorr::expected_cost_bwd);
  m.impl("softmax_aggregate_fwd", &semcorr::softmax_aggregate_fwd);
  m.impl("softmax_aggregate_bwd", &semcorr::softmax_aggregate_bwd);
  m.impl("rowsoftmax_distill_fwd", &semcorr::rowsoftmax_distill_fwd);
  m.impl("rowsoftmax_distill_bwd", &semcorr::rowsoftmax_distill_bwd);
}
