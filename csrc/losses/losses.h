// Training-loss family (contract: ../shared/docs/ops-contract.md; math: ../shared/docs/math.md).
// Same shapes and similarity as the correlation family (csrc/correlation/correlation.h); every loss
// streams BM×BN tiles through the engine (csrc/common/stream_engine.h), forward and backward.
//
//   expected_cost_fwd(src, tgt, target_xy (B,Ns,2), tau, H, W, p, normalize) -> (loss (B,Ns), lse (B,Ns))
//       L_u = Σ_v softmax(z_u)_v d_uv,  d_uv = ‖t_u − g_v‖₂^p  (p > 0; d = 0 at t_u = g_v for any p).
//   expected_cost_bwd(grad (B,Ns), src, tgt, target_xy, loss, lse, tau, H, W, p, normalize) -> (dsrc, dtgt)
//       ds_uv = G_u p_uv (d_uv − L_u) / τ. target_xy gets no gradient (d needs no derivative).
//   softmax_aggregate_fwd(src, tgt, values (B,Nt,Cv), tau, normalize) -> (out (B,Ns,Cv), lse (B,Ns))
//       O_u = Σ_v p_uv V_v (DVE's exchange step; attention with cosine logits).
//   softmax_aggregate_bwd(grad (B,Ns,Cv), src, tgt, values, out, lse, tau, normalize)
//       -> (dsrc, dtgt, dvalues); dV_v = Σ_u p_uv dO_u, ds_uv = p_uv (⟨dO_u, V_v⟩ − ⟨dO_u, O_u⟩)/τ.
//   rowsoftmax_distill_fwd(t_src, t_tgt, s_src, s_tgt, tau_t, tau_s, loss, normalize)
//       -> (loss (B,Ns), stats (B,Ns,3) = [LSE^T, LSE^S, c])
//       a = softmax(teacher/τ_t), b = softmax(student/τ_s): ce −Σ a log b, mse Σ (a−b)², l1 Σ |a−b|.
//       Pass 1: row LSEs of both; pass 2: the loss and c (mse: −2(Σab − Σb²); l1: Σ b·h, h = −sign(a−b)).
//   rowsoftmax_distill_bwd(grad, t_src, t_tgt, s_src, s_tgt, stats, tau_t, tau_s, loss, normalize)
//       -> (ds_src, ds_tgt): student only; ce: G (b − a)/τ_s; mse/l1: G b (h − c)/τ_s.
// loss codes: 0 = ce, 1 = mse, 2 = l1.
#pragma once
