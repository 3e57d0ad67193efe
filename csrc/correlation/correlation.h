// Correlation family on feature maps (contract: ../shared/docs/ops-contract.md, math: docs/math.md).
//
// Shapes: src (B, Ns, C) query rows, tgt (B, Nt, C) target rows, Nt = H·W, cell v ↦ (x, y) =
// (v mod W, v div W). s_uv = ⟨â_u, b̂_v⟩ with x̂ = x / max(‖x‖₂, 1e-12) when normalize, else the raw
// dot product. z = s/τ. All kernels stream BM×BN tiles of s (csrc/common/stream_engine.h); none
// holds an Ns×Nt matrix. Accumulation in fp32 (fp64 for fp64 inputs); outputs fp32 (fp64).
//
//   soft_argmax_fwd(src, tgt, tau, H, W, normalize) -> (out (B,Ns,2), lse (B,Ns))
//       out_u = Σ_v softmax(z_u)_v g_v; lse_u = log Σ_v e^{z_uv}. Rows containing NaN give NaN.
//   soft_argmax_bwd(grad (B,Ns,2), src, tgt, out, lse, tau, H, W, normalize) -> (dsrc, dtgt)
//       ds_uv = p_uv (⟨G_u, g_v⟩ − ⟨G_u, out_u⟩)/τ, recomputed tile by tile from lse.
//   window_soft_argmax_fwd(src, tgt, tau, H, W, radius, zero_outside, normalize)
//       -> (out (B,Ns,2), lse (B,Ns), center (B,Ns) int64)
//       center = argmax_v s_uv (ties → lowest v; NaN never chosen; −1 if the row has no number).
//       Window = cells with |x−x_c| ≤ r and |y−y_c| ≤ r. zero_outside=false: softmax over the window;
//       true: GeoAware-SC, outside logits are 0 and join a full softmax (closed form).
//   window_soft_argmax_bwd(grad, src, tgt, out, lse, center, tau, H, W, radius, zero_outside, normalize)
//   match_topk(src, tgt, k, tgt_mask (B,Nt) bool?, normalize) -> (values (B,Ns,k), indices int64)
//       sorted descending, ties → lowest index, masked/NaN targets never chosen, empty slots −1/−inf.
//   mutual_nn(src, tgt, normalize) -> (s2t (B,Ns), t2s (B,Nt), mutual (B,Ns) bool)
//   instance_matching_rowmin(src, tgt, src_mask?, tgt_mask?, normalize) -> (B,)
//       mean over valid src rows of min over valid tgt rows of ‖â_u − b̂_v‖₂ (NaN if none valid).
#pragma once
