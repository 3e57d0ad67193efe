"""Triton backend of the correlation-family ops (installed as ``semcorr_fast.kernels``).

Inputs arrive validated by ``semcorr_fast.ops``: ``src (B, Ns, C)`` and ``tgt (B, Nt, C)`` contiguous,
one dtype among fp32/fp16/bf16 (fp64 raises ``NotImplementedError``), one device (CUDA, or CPU under
``TRITON_INTERPRET=1``), ``H * W == Nt``, ``tau > 0``. Accumulation is fp32; coordinate, lse and
distance outputs are fp32. Cosine normalisation (``normalize=True``) is fused: similarities are
scaled by 1/max(||x||, 1e-12) per row and column on the fp32 GEMM tile.

Forward / backward pairs (the backward recomputes tiles from the saved lse, flash-style):

* ``soft_argmax_fwd(src, tgt, tau, H, W, normalize) -> (out (B,Ns,2), lse (B,Ns))``
* ``soft_argmax_bwd(grad_out, src, tgt, out, lse, tau, H, W, normalize) -> (dsrc, dtgt)``
* ``window_soft_argmax_fwd(src, tgt, tau, H, W, radius, zero_outside, normalize)
  -> (out (B,Ns,2), lse (B,Ns), center (B,Ns) int64)``
* ``window_soft_argmax_bwd(grad_out, src, tgt, out, lse, center, tau, H, W, radius, zero_outside,
  normalize) -> (dsrc, dtgt)``

Training losses (same forward / recompute-backward scheme; ``expected_cost``, ``softmax_aggregate``,
``rowsoftmax_distill`` modules):

* ``expected_cost_fwd(src, tgt, target_xy, tau, H, W, p, normalize) -> (loss (B,Ns), lse (B,Ns))``
* ``expected_cost_bwd(grad, src, tgt, target_xy, loss, lse, tau, H, W, p, normalize) -> (dsrc, dtgt)``
* ``softmax_aggregate_fwd(src, tgt, values, tau, normalize) -> (out (B,Ns,Cv), lse (B,Ns))``
* ``softmax_aggregate_bwd(grad, src, tgt, values, out, lse, tau, normalize) -> (dsrc, dtgt, dvalues)``
* ``rowsoftmax_distill_fwd(t_src, t_tgt, s_src, s_tgt, tau_t, tau_s, loss_code, normalize)
  -> (loss (B,Ns), stats (B,Ns,3) = [LSE_T, LSE_S, c])`` (loss_code 0 ce, 1 mse, 2 l1)
* ``rowsoftmax_distill_bwd(grad, t_src, t_tgt, s_src, s_tgt, stats, tau_t, tau_s, loss_code, normalize)
  -> (ds_src, ds_tgt)`` (student only)

Selection (no gradient):

* ``match_topk(src, tgt, k, tgt_mask, normalize) -> (values (B,Ns,k) fp32, indices (B,Ns,k) int64)``
* ``mutual_nn(src, tgt, normalize) -> (s2t (B,Ns), t2s (B,Nt), mutual (B,Ns) bool)``
* ``instance_matching_distance(src, tgt, src_mask, tgt_mask, normalize) -> (B,) fp32``

Materialising (forward only; their backward is plain torch in the ops layer):

* ``ncc(src, tgt, normalize) -> (B, Ns, Nt)`` in the input dtype
* ``softmax_t(sim, tau, dim=-1) -> same shape and dtype as sim``

Layout: ``_stream`` (the shared streaming tile loop, norms, normalisation backward), ``_config``
(the static block-size table), one module per op family, ``aot`` (ahead-of-time compile and checks,
``python -m semcorr_fast.kernels.aot --compile sm_80,sm_90``).
"""
from .expected_cost import expected_cost_bwd, expected_cost_fwd
from .ncc import ncc, softmax_t
from .rowsoftmax_distill import rowsoftmax_distill_bwd, rowsoftmax_distill_fwd
from .soft_argmax import soft_argmax_bwd, soft_argmax_fwd
from .softmax_aggregate import softmax_aggregate_bwd, softmax_aggregate_fwd
from .topk import instance_matching_distance, match_topk, mutual_nn
from .window_soft_argmax import window_soft_argmax_bwd, window_soft_argmax_fwd

__all__ = [
    "soft_argmax_fwd", "soft_argmax_bwd", "window_soft_argmax_fwd", "window_soft_argmax_bwd",
    "match_topk", "mutual_nn", "instance_matching_distance", "ncc", "softmax_t",
    "expected_cost_fwd", "expected_cost_bwd", "softmax_aggregate_fwd", "softmax_aggregate_bwd",
    "rowsoftmax_distill_fwd", "rowsoftmax_distill_bwd",
]
