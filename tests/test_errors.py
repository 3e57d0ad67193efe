"""Bad input: every case of the contract gets a ValueError/TypeError naming the argument."""
import pytest
import torch

from semcorr_fast import ops

S, T = torch.randn(2, 5, 4), torch.randn(2, 6, 4)
HW = (2, 3)

# (callable, exception, message regex)
CASES = {
    # wrong ranks
    "src rank": (lambda: ops.soft_argmax(S[0], T, 0.1, HW), ValueError, r"src must have shape \(B, Ns, C\)"),
    "tgt rank": (lambda: ops.match_topk(S, T[0]), ValueError, r"tgt must have shape \(B, Nt, C\)"),
    # mismatched B / C
    "batch": (lambda: ops.soft_argmax(S[:1], T, 0.1, HW), ValueError, r"same batch size B"),
    "channels": (lambda: ops.window_soft_argmax(S[..., :3], T, 0.1, HW), ValueError, r"same channel count C"),
    # hw
    "hw product": (lambda: ops.soft_argmax(S, T, 0.1, (2, 2)), ValueError, r"hw = \(2, 2\).*Nt = 6"),
    "hw type": (lambda: ops.soft_argmax(S, T, 0.1, 6), ValueError, r"hw must be a pair"),
    "hw float": (lambda: ops.soft_argmax(S, T, 0.1, (2.0, 3)), TypeError, r"hw\[0\]"),
    # dtypes
    "int features": (lambda: ops.soft_argmax(S.long(), T.long(), 0.1, HW), TypeError, r"src must be a float16"),
    "dtype mismatch": (lambda: ops.match_topk(S, T.double()), TypeError, r"same dtype"),
    "not a tensor": (lambda: ops.match_topk(S.numpy(), T), TypeError, r"src must be a torch.Tensor"),
    # temperature
    "tau zero": (lambda: ops.soft_argmax(S, T, 0.0, HW), ValueError, r"tau must be a finite float > 0"),
    "tau negative": (lambda: ops.window_soft_argmax(S, T, -1.0, HW), ValueError, r"tau"),
    "tau nan": (lambda: ops.soft_argmax(S, T, float("nan"), HW), ValueError, r"tau"),
    "tau vector": (lambda: ops.soft_argmax(S, T, torch.ones(2), HW), ValueError, r"0-dim tensor"),
    "tau str": (lambda: ops.soft_argmax(S, T, "0.1", HW), TypeError, r"tau"),
    "softmax tau": (lambda: ops.softmax_t(torch.randn(2, 3), 0), ValueError, r"tau"),
    "softmax dim": (lambda: ops.softmax_t(torch.randn(2, 3), 1.0, dim=2), ValueError, r"dim"),
    # radius / k / outside
    "radius negative": (lambda: ops.window_soft_argmax(S, T, 0.1, HW, -1), ValueError, r"radius must be >= 0"),
    "radius float": (lambda: ops.window_soft_argmax(S, T, 0.1, HW, 1.5), TypeError, r"radius must be an int"),
    "outside": (lambda: ops.window_soft_argmax(S, T, 0.1, HW, outside="inf"), ValueError, r"outside must be one of"),
    "k zero": (lambda: ops.match_topk(S, T, 0), ValueError, r"k must be >= 1"),
    "k bool": (lambda: ops.match_topk(S, T, True), TypeError, r"k must be an int"),
    "retrieval k": (lambda: ops.topk_retrieval(S[0], T[0], 0), ValueError, r"k must be >= 1"),
    # masks
    "mask shape": (lambda: ops.match_topk(S, T, tgt_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError,
                   r"tgt_mask must have shape \(2, 6\)"),
    "mask broadcast": (lambda: ops.match_topk(S, T, tgt_mask=torch.ones(6, dtype=torch.bool)), ValueError,
                       r"tgt_mask must have shape"),
    "mask dtype": (lambda: ops.match_topk(S, T, tgt_mask=torch.ones(2, 6)), TypeError, r"tgt_mask must be a bool"),
    "src mask shape": (lambda: ops.instance_matching_distance(S, T, src_mask=torch.ones(2, 6, dtype=torch.bool)),
                       ValueError, r"src_mask must have shape \(2, 5\)"),
    # retrieval shapes
    "retrieval rank": (lambda: ops.topk_retrieval(S, T[0], 1), ValueError, r"queries must have shape \(Q, C\)"),
    "retrieval C": (lambda: ops.topk_retrieval(S[0], T[0, :, :3], 1), ValueError, r"same C"),
    # flags / empty targets / zero channels
    "normalize flag": (lambda: ops.soft_argmax(S, T, 0.1, HW, normalize=1), TypeError, r"normalize must be a bool"),
    "empty target": (lambda: ops.match_topk(S, T[:, :0]), ValueError, r"tgt must have at least 1 row"),
    "zero channels": (lambda: ops.match_topk(S[..., :0], T[..., :0]), ValueError, r"at least one channel"),
    "flatten rank": (lambda: ops.flatten_map(S), ValueError, r"x must have shape \(B, C, H, W\)"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name):
    fn, exc, msg = CASES[name]
    with pytest.raises(exc, match=msg):
        fn()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_errors_come_before_dispatch(backend):
    """The same checks guard every backend, the reference included."""
    with pytest.raises(ValueError, match="radius"):
        ops.window_soft_argmax(S, T, 0.1, HW, -2, backend=backend)


LOSS_CASES = {
    "ec target shape": (lambda: ops.expected_cost(S, T, 0.1, torch.zeros(2, 4, 2), HW), ValueError,
                        r"target_xy must have shape \(2, 5, 2\)"),
    "ec target int": (lambda: ops.expected_cost(S, T, 0.1, torch.zeros(2, 5, 2, dtype=torch.long), HW), TypeError,
                      r"target_xy must be a floating"),
    "ec p": (lambda: ops.expected_cost(S, T, 0.1, torch.zeros(2, 5, 2), HW, p=0.0), ValueError, r"p must be"),
    "ec hw": (lambda: ops.expected_cost(S, T, 0.1, torch.zeros(2, 5, 2), (3, 3)), ValueError, r"hw"),
    "agg values shape": (lambda: ops.softmax_aggregate(S, T, torch.zeros(2, 5, 3), 0.1), ValueError,
                         r"values must have shape \(B, Nt, Cv\)"),
    "agg tau": (lambda: ops.softmax_aggregate(S, T, torch.zeros(2, 6, 3), -0.1), ValueError, r"tau"),
    "distill loss": (lambda: ops.rowsoftmax_distill(S, T, S, T, 0.2, 0.4, loss="kl"), ValueError, r"loss must be"),
    "distill shapes": (lambda: ops.rowsoftmax_distill(S[:, :3], T, S, T, 0.2, 0.4), ValueError,
                       r"same B, Ns and Nt"),
    "distill dtype": (lambda: ops.rowsoftmax_distill(S.double(), T.double(), S, T, 0.2, 0.4), TypeError,
                      r"same dtype"),
    "distill tau": (lambda: ops.rowsoftmax_distill(S, T, S, T, 0.0, 0.4), ValueError, r"tau_teacher"),
    "distill student C": (lambda: ops.rowsoftmax_distill(S, T, S, T[..., :2], 0.2, 0.4), ValueError,
                          r"s_src and s_tgt must have the same channel count"),
}


@pytest.mark.parametrize("name", list(LOSS_CASES))
def test_bad_loss_input(name):
    fn, exc, msg = LOSS_CASES[name]
    with pytest.raises(exc, match=msg):
        fn()
