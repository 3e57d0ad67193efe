"""Demystifying's methods (semcorr_fast.methods.demystifying): training steps, fused losses against
materialising formulas, EQ/DVE pairing, temperature conventions, PCA/NMF projections, configs."""
from __future__ import annotations

import glob
import inspect
import math
import os
import tomllib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semcorr_fast import ops, warps
from semcorr_fast.backbones import Backbone, create_backbone
from semcorr_fast.backbones._base import freeze
from semcorr_fast.data.canvas import Canvas
from semcorr_fast.methods import build_method, get_method_class, list_methods
from semcorr_fast.methods import demystifying as D
from semcorr_fast.methods.projections import fit_nmf, fit_pca, make_nonnegative

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_METHODS = ("supervised", "eq", "dve", "cl", "lead", "asym")
FIXED_METHODS = ("none", "random", "pca", "nmf")


class StandIn(Backbone):
    """A fast random conv with the Backbone attributes (12-d, stride 4, 32×32 canvas)."""

    def __init__(self, dim: int = 12, seed: int = 0):
        super().__init__("standin", dim, 4, Canvas.resized(32))
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, dim, 4, stride=4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g))

    def grid(self, H, W):
        return H // 4, W // 4

    def _features(self, x):
        return self.conv(x)


def standin(dim=12):
    return freeze(StandIn(dim))


def make_batch(B=2, size=32, K=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {"src": torch.rand(B, 3, size, size, generator=g), "trg": torch.rand(B, 3, size, size, generator=g),
             "src_kps": torch.rand(B, K, 2, generator=g) * (size - 1),
             "trg_kps": torch.rand(B, K, 2, generator=g) * (size - 1),
             "valid": torch.rand(B, K, generator=g) > 0.3}
    batch["valid"][:, 0] = True
    return batch


def with_gen(batch, seed=7):
    return dict(batch, generator=torch.Generator().manual_seed(seed))


SMALL = dict(supervised=dict(grid=8, proj_dim=8), eq=dict(grid=8, proj_dim=8), dve=dict(grid=8, proj_dim=8),
             cl=dict(grid=8, proj_dim=8), lead=dict(grid=8, proj_dim=8), asym=dict(grid=8, proj_dim=8))


# ----------------------------------------------------------------------------------------------- registry
def test_every_method_is_registered():
    assert set(LOSS_METHODS + FIXED_METHODS) <= set(list_methods())
    with pytest.raises(TypeError, match="unknown method_args"):
        build_method("asym", standin(), not_an_option=1)


# ----------------------------------------------------------------------------------------------- training steps
@pytest.fixture(scope="module")
def tiny_backbones():
    return {name: create_backbone(name, pretrained=False, tiny=True) for name in ("resnet50_conv3", "dino_vits8")}


@pytest.mark.parametrize("bname", ["resnet50_conv3", "dino_vits8"])
@pytest.mark.parametrize("name", LOSS_METHODS)
def test_training_step_finite_with_gradients_only_into_rho(tiny_backbones, bname, name):
    bb = tiny_backbones[bname]
    S = bb.canvas.size[0]
    m = build_method(name, bb, **SMALL[name])
    m.train()
    out = m.training_step(with_gen(make_batch(B=2, size=S)), step=0)
    loss = out["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    trainable = {id(p) for p in m.trainable_parameters()}
    assert trainable == {id(m.rho.weight), id(m.rho.bias)}
    assert torch.isfinite(m.rho.weight.grad).all() and m.rho.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.backbone.parameters())
    assert not m.backbone.training                      # frozen backbone stays in eval mode
    d = m(make_batch(B=1, size=S)["src"])
    assert d.shape == (1, 8, *bb.grid(S, S)) and m.dim == 8


@pytest.mark.parametrize("name", FIXED_METHODS)
def test_fixed_projections_have_nothing_to_train(name):
    bb = standin()
    kw = {} if name == "none" else dict(proj_dim=4)
    if name in ("pca", "nmf"):
        kw.update(grid=8, fit_images=4, rows_per_image=16)
    m = build_method(name, bb, **kw)
    out = m.training_step(with_gen(make_batch(B=2)), step=0)
    assert out["loss"].dim() == 0 and float(out["loss"]) == 0.0
    assert m.trainable_parameters() == []
    d = m(make_batch(B=1)["src"])
    assert d.shape == (1, 12 if name == "none" else 4, 8, 8)
    if name == "none":
        torch.testing.assert_close(d, bb(make_batch(B=1)["src"]))


# ----------------------------------------------------------------------------------------------- fused = reference
@pytest.mark.parametrize("name", LOSS_METHODS)
def test_cpu_backend_equals_reference_backend(name):
    batch = make_batch(B=2)
    res = []
    for lb in ("cpu", "reference"):
        m = build_method(name, standin(), loss_backend=lb, **SMALL[name])
        loss = m.training_step(with_gen(batch), 0)["loss"]
        loss.backward()
        res.append((loss.detach(), m.rho.weight.grad.clone(), m.rho.bias.grad.clone()))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-5)


def _cos(a, b):
    """(B, C, h, w) maps → (B, N, N) dense cosine matrix (the materialising formula)."""
    a = F.normalize(a.flatten(2).transpose(1, 2), dim=-1)
    b = F.normalize(b.flatten(2).transpose(1, 2), dim=-1)
    return a @ b.transpose(1, 2)


def _cells(g):
    ys, xs = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32), indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)


def _warped_views(m, batch, seed):
    X = torch.cat([batch["src"], batch["trg"]])
    P, _, H, W = X.shape
    first, second = warps.random_warp_pair(P, H, W, "tps+affine", preset="demystifying",
                                           generator=torch.Generator().manual_seed(seed))
    x1 = first.apply(X).clamp(0, 1)
    x2 = second.apply(x1).clamp(0, 1)
    f1 = m.project(m.grid_features(x1))
    f2 = m.project(m.grid_features(x2))
    g = f1.shape[-1]
    centres = ((_cells(g) * 2 + 1) / g - 1).unsqueeze(0).expand(P, -1, -1)
    txy = (second.map_norm(centres) + 1) * g / 2 - 0.5      # normalised → target cell coordinates
    return f1, f2, txy, H


def _code_batching(view1, view2, B):
    """The released code: cat([src_img1, src_img2, trg_img1, trg_img2]) then [0::2] vs [1::2]."""
    imgs = torch.cat([view1[:B], view2[:B], view1[B:], view2[B:]])
    return imgs[0::2], imgs[1::2]


@pytest.mark.parametrize("pairing", ["correct", "code"])
def test_eq_and_dve_equal_materialising_formula(pairing):
    batch, seed, B = make_batch(B=2), 3, 2
    for name in ("eq", "dve"):
        m = build_method(name, standin(), grid=8, proj_dim=8, pairing=pairing, loss_backend="cpu")
        got = m.training_step(with_gen(batch, seed), 0)["loss"]
        f1, f2, txy, H = _warped_views(m, batch, seed)
        Q, T = (f2, f1) if pairing == "correct" else _code_batching(f2, f1, B)
        g = f1.shape[-1]
        tau = 0.05
        if name == "eq":
            prob = torch.softmax(_cos(Q, T) / tau, -1)
        else:
            P = Q.shape[0]
            A = Q[[(k + P // 2) % P for k in range(P)]]
            a_rows = F.normalize(A.flatten(2).transpose(1, 2), dim=-1)
            fhat = torch.softmax(_cos(Q, A) / tau, -1) @ a_rows               # not re-normalised
            t_rows = F.normalize(T.flatten(2).transpose(1, 2), dim=-1)
            prob = torch.softmax(fhat @ t_rows.transpose(1, 2) / tau, -1)
        d = (txy[:, :, None, :] - _cells(g)[None, None]).norm(dim=-1) ** 0.5
        want = ((prob * d).sum(-1) * (H / g) ** 0.5).mean()
        torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-5)


def test_cl_lead_asym_supervised_equal_materialising_formulas():
    batch = make_batch(B=2)
    bb = standin()
    # CL: self-matching, identity warp, p = 0.5, canvas pixels (32 / 8 = 4 per cell)
    m = build_method("cl", bb, grid=8, proj_dim=8)
    got = m.training_step(with_gen(batch), 0)["loss"]
    phi = m.project(m.grid_features(torch.cat([batch["src"], batch["trg"]])))
    c = _cells(8)
    d = (c[:, None] - c[None]).norm(dim=-1) ** 0.5
    want = ((torch.softmax(_cos(phi, phi) / 0.14, -1) * d).sum(-1) * 4 ** 0.5).mean()
    torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-5)
    # LEAD (CE, τ = 0.05) and ASYM (100 × squared difference, τ1 = 0.2, τ2 = 0.4)
    for name, check in (("lead", "ce"), ("asym", "mse")):
        m = build_method(name, bb, grid=8, proj_dim=8)
        got = m.training_step(with_gen(batch), 0)["loss"]
        psi_s, psi_t = m.grid_features(batch["src"]), m.grid_features(batch["trg"])
        phi_s, phi_t = m.project(psi_s), m.project(psi_t)
        if check == "ce":
            a = torch.softmax(_cos(psi_s, psi_t) / 0.05, -1)
            want = -(a * torch.log_softmax(_cos(phi_s, phi_t) / 0.05, -1)).sum(-1).mean()
        else:
            a = torch.softmax(_cos(psi_s, psi_t) / 0.2, -1)
            b = torch.softmax(_cos(phi_s, phi_t) / 0.4, -1)
            want = 100 * ((a - b) ** 2).sum(-1).mean()
        torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-6)
    # supervised: keypoint rows (cell containing the source keypoint), L1 / L2 in cells, τ = 1/25, / |Ω|
    for dist in ("l1", "l2"):
        m = build_method("supervised", bb, grid=8, proj_dim=8, distance=dist)
        got = m.training_step(batch, 0)["loss"]
        phi_s, phi_t = m.project(m.grid_features(batch["src"])), m.project(m.grid_features(batch["trg"]))
        S = _cos(phi_s, phi_t)                              # (B, 64, 64)
        want = 0.0
        for b in range(2):
            for k in range(5):
                if not batch["valid"][b, k]:
                    continue
                x, y = batch["src_kps"][b, k].tolist()
                row = int(math.floor((y + 0.5) / 4)) * 8 + int(math.floor((x + 0.5) / 4))
                t = (batch["trg_kps"][b, k] + 0.5) / 4 - 0.5
                diff = c - t
                dd = diff.abs().sum(-1) if dist == "l1" else diff.norm(dim=-1)
                want = want + (torch.softmax(S[b, row] * 25, -1) * dd).sum()
        torch.testing.assert_close(got, want / 64, rtol=2e-4, atol=1e-5)


def test_supervised_ignores_invalid_keypoints_and_needs_keypoints():
    batch = make_batch(B=2)
    m = build_method("supervised", standin(), grid=8, proj_dim=8)
    base = m.training_step(batch, 0)["loss"]
    moved = dict(batch, trg_kps=torch.where(batch["valid"][..., None], batch["trg_kps"], torch.full_like(batch["trg_kps"], -1.0)))
    torch.testing.assert_close(m.training_step(moved, 0)["loss"], base)
    with pytest.raises(KeyError, match="src_kps"):
        m.training_step({"src": batch["src"], "trg": batch["trg"]}, 0)
    with pytest.raises(ValueError, match="valid"):
        m.training_step(dict(batch, valid=batch["valid"].float()), 0)


# ----------------------------------------------------------------------------------------------- pairing
def test_code_pairing_index_map():
    # B = 1: the code's batching is correct
    for a, b in zip(D.pairing_indices(1, "code"), D.pairing_indices(1, "correct")):
        assert a.tolist() == b.tolist()
    # B = 2 (P = 4 images; stack = [query views 0..3, target views 4..7]): literal code batching
    q, t = D.pairing_indices(2, "code")
    assert q.tolist() == [0, 4, 2, 6] and t.tolist() == [1, 5, 3, 7]
    for B in (2, 3, 8):
        P = 2 * B
        q, t = D.pairing_indices(B, "code")
        img_q, img_t = q % P, t % P
        wrong = [k for k in range(P) if img_q[k] != k or img_t[k] != k or img_q[k] != img_t[k]]
        assert len(wrong) > 0                               # image i is compared under the warp of image k != i
        assert all(img_q[k] != img_t[k] for k in wrong if k < B)  # e.g. src item k vs src item k+1
        qc, tc = D.pairing_indices(B, "correct")
        assert (qc % P).tolist() == list(range(P)) and (tc % P).tolist() == list(range(P))
        assert (qc < P).all() and (tc >= P).all()
    assert D.dve_aux_indices(4).tolist() == [2, 3, 0, 1]


def test_code_pairing_changes_loss_only_at_batch_above_one():
    for B, same in ((1, True), (2, False)):
        batch = make_batch(B=B)
        losses = [build_method("eq", standin(), grid=8, proj_dim=8, pairing=p).training_step(with_gen(batch), 0)["loss"]
                  for p in ("correct", "code")]
        assert torch.allclose(losses[0], losses[1]) == same


# ----------------------------------------------------------------------------------------------- temperatures
def test_temperature_table():
    t = D.demystifying_tau
    assert t("eq", "paper") == (0.05,)
    assert t("eq", "code") == (ops.tau_from_logit_scale(20.0),) == (1 / 400,)
    assert t("dve", "code") == pytest.approx((0.05 ** 2,))
    assert t("dve", "code_cli") == pytest.approx((1 / 100,))
    for name in ("cl", "lead"):                             # scale applied once: code == paper
        assert t(name, "code") == pytest.approx(t(name, "paper"))
    assert t("cl", "code_cli") == pytest.approx((0.1,))
    assert t("asym", "paper") == (0.2, 0.4)
    assert t("asym", "code") == pytest.approx((0.04, 0.16))
    assert t("asym", "code_cli") == pytest.approx((1 / 100, 1 / 25))
    assert t("supervised", "paper") == t("supervised", "code") == pytest.approx((1 / 25,))
    assert t("asym", logit_scale=(5.0, 2.5)) == pytest.approx(t("asym", "code"))
    assert t("lead", logit_scale=20.0) == pytest.approx((0.05,))
    with pytest.raises(ValueError, match="not both"):
        t("eq", tau=0.1, logit_scale=10.0)
    with pytest.raises(ValueError, match="temperature"):
        t("eq", "papers")
    with pytest.raises(ValueError, match="tau"):
        t("asym", tau=0.2)


def test_code_convention_is_scaled_unit_vectors():
    """'code' = the code's arithmetic: each unit vector × t (t²·cos) for EQ/ASYM, cos × t once for CL."""
    batch = make_batch(B=2)
    bb = standin()
    # EQ: ×20 per vector
    m = build_method("eq", bb, grid=8, proj_dim=8, temperature="code")
    got = m.training_step(with_gen(batch), 0)["loss"]
    Q, T, txy, inside, hw, (H, W) = m.warped_pairs(with_gen(batch), 0)
    Qs, Ts = 20 * F.normalize(Q, dim=-1), 20 * F.normalize(T, dim=-1)
    want = ops.expected_cost(Qs, Ts, 1.0, txy, hw, p=0.5, normalize=False, backend="reference").mean() * (H / 8) ** 0.5
    torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-5)
    # ASYM: t1 = 5, t2 = 2.5 per vector, logits = t²·cos
    m = build_method("asym", bb, grid=8, proj_dim=8, temperature="code")
    got = m.training_step(with_gen(batch), 0)["loss"]
    psi_s, psi_t = m.grid_features(batch["src"]), m.grid_features(batch["trg"])
    a = torch.softmax(_cos(5 * psi_s, 5 * psi_t) * 25, -1)
    b = torch.softmax(_cos(m.project(psi_s), m.project(psi_t)) * 2.5 ** 2, -1)
    torch.testing.assert_close(got, 100 * ((a - b) ** 2).sum(-1).mean(), rtol=2e-4, atol=1e-6)
    # CL: cos × t once, so "code" gives the paper's number
    losses = [build_method("cl", bb, grid=8, proj_dim=8, temperature=c).training_step(with_gen(batch), 0)["loss"]
              for c in ("paper", "code")]
    torch.testing.assert_close(losses[0], losses[1])
    assert build_method("asym", bb, temperature="code_cli").taus == pytest.approx((0.01, 0.04))


# ----------------------------------------------------------------------------------------------- PCA / NMF
def test_pca_orthonormal_and_max_variance():
    g = torch.Generator().manual_seed(0)
    n, Dm, r = 500, 20, 3
    basis, _ = torch.linalg.qr(torch.randn(Dm, r, generator=g, dtype=torch.float64))
    x = (torch.randn(n, r, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64)) @ basis.T
    x = x + 0.01 * torch.randn(n, Dm, generator=g, dtype=torch.float64) + 4.0
    res = fit_pca(x, r)
    V = res.components
    torch.testing.assert_close(V @ V.T, torch.eye(r, dtype=torch.float64), atol=1e-10, rtol=0)
    # spans the planted subspace
    assert torch.linalg.svdvals(V @ basis).min() > 0.999
    xc = x - x.mean(0)
    var = (xc @ V.T).var(0)
    torch.testing.assert_close(var, res.explained_variance, rtol=1e-8, atol=0)
    assert res.explained_variance_ratio.sum() > 0.999
    for s in range(5):                                      # no orthonormal r-basis captures more variance
        Rq, _ = torch.linalg.qr(torch.randn(Dm, r, generator=g, dtype=torch.float64))
        assert (xc @ Rq).var(0).sum() <= var.sum() + 1e-9
    with pytest.raises(ValueError, match="k = 21"):
        fit_pca(x, 21)


def test_nmf_nonnegative_and_error_decreases():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(200, 4, generator=g) @ torch.rand(4, 30, generator=g)
    res = fit_nmf(x, 4, iters=300, tol=0, generator=torch.Generator().manual_seed(0))
    assert (res.components >= 0).all() and (res.weights >= 0).all()
    errs = torch.tensor(res.errors)
    assert (errs[1:] <= errs[:-1] * (1 + 1e-5) + 1e-6).all()     # multiplicative updates never increase it
    direct = torch.linalg.norm(x - res.weights @ res.components)
    assert abs(float(direct) - res.errors[-1]) < 1e-3 * float(direct) + 1e-3
    assert res.errors[-1] < 0.05 * res.errors[0] and float(direct) / float(x.norm()) < 0.02
    with pytest.raises(ValueError, match="non-negative"):
        fit_nmf(x - 1, 2)
    shifted, s = make_nonnegative(x - 1, "shift")
    assert s > 0 and shifted.min() == 0


def test_pca_nmf_methods_fit_from_training_steps():
    bb = standin()
    for name in ("pca", "nmf"):
        m = build_method(name, bb, proj_dim=4, grid=8, fit_images=6, rows_per_image=32, bias="zero",
                         **({"nmf_iters": 50} if name == "nmf" else {}))
        with pytest.raises(RuntimeError, match="not fitted"):
            m(make_batch(B=1)["src"])
        out = m.training_step(with_gen(make_batch(B=2, seed=1)), 0)       # 4 images
        assert float(out["fitted"]) == 0.0
        out = m.training_step(with_gen(make_batch(B=2, seed=2)), 1)       # 6 images: fitted
        assert float(out["fitted"]) == 1.0 and float(out["fit_images_seen"]) == 6
        W = m.rho.weight.detach().reshape(4, -1)
        if name == "pca":
            torch.testing.assert_close(W @ W.T, torch.eye(4), atol=1e-5, rtol=0)
        else:
            assert (W >= 0).all()
        assert float(m.rho.bias.abs().sum()) == 0.0
        assert m(make_batch(B=1)["src"]).shape == (1, 4, 8, 8)
        state = m.checkpoint_state()
        assert "fitted" in state and "rho.weight" in state
    with pytest.raises(ValueError, match="proj_dim"):
        build_method("pca", bb, proj_dim=13)


# ----------------------------------------------------------------------------------------------- from scratch
def test_smallcnn_trains_end_to_end():
    with pytest.raises(ValueError, match="no published weights"):
        create_backbone("smallcnn")
    bb = create_backbone("smallcnn", pretrained=False, tiny=True)
    assert (bb.dim, bb.stride, bb.grid(32, 32)) == (64, 4, (8, 8))
    for name in ("eq", "cl"):
        m = build_method(name, bb, grid=8, proj_dim=16, train_backbone=True)
        ids = {id(p) for p in m.trainable_parameters()}
        assert all(id(p) in ids for p in m.backbone.parameters())
        loss = m.training_step(with_gen(make_batch(B=2)), 0)["loss"]
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.backbone.parameters())
        assert any(k.startswith("backbone.") for k in m.checkpoint_state())
        for p in m.backbone.parameters():
            p.grad = None


# ----------------------------------------------------------------------------------------------- bad input, configs
def test_lead_report_kl_is_ce_minus_teacher_entropy():
    """report_kl logs H(a) and KL(a || b) = CE − H(a), checked against the materialised distributions."""
    batch = make_batch(B=2)
    bb = standin()
    m = build_method("lead", bb, grid=8, proj_dim=8, report_kl=True)
    out = m.training_step(with_gen(batch), 0)
    psi_s, psi_t = m.grid_features(batch["src"]), m.grid_features(batch["trg"])
    phi_s, phi_t = m.project(psi_s), m.project(psi_t)
    la = torch.log_softmax(_cos(psi_s, psi_t) / 0.05, -1)
    lb = torch.log_softmax(_cos(phi_s, phi_t) / 0.05, -1)
    a = la.exp()
    torch.testing.assert_close(out["teacher_entropy"], -(a * la).sum(-1).mean(), rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(out["kl"], (a * (la - lb)).sum(-1).mean(), rtol=2e-3, atol=2e-5)
    assert out["kl"] >= -1e-5 and not out["kl"].requires_grad and out["loss"].requires_grad
    # the same step without report_kl has the same loss and only the loss
    plain = build_method("lead", bb, grid=8, proj_dim=8).training_step(with_gen(batch), 0)
    assert set(plain) == {"loss"}
    torch.testing.assert_close(plain["loss"], out["loss"])
    with pytest.raises(ValueError, match="report_kl"):
        build_method("lead", bb, loss="mse", report_kl=True)
    with pytest.raises(TypeError, match="report_kl"):
        build_method("lead", bb, report_kl=1)


def test_bad_arguments_are_named():
    bb = standin()
    with pytest.raises(ValueError, match="pairing"):
        build_method("eq", bb, pairing="wrong")
    with pytest.raises(ValueError, match="loss_backend"):
        build_method("cl", bb, loss_backend="gpu")
    with pytest.raises(ValueError, match="grid"):
        build_method("lead", bb, grid=0)
    m = build_method("cl", bb, grid=8, proj_dim=8)
    with pytest.raises(KeyError, match="'trg'"):
        m.training_step({"src": torch.rand(1, 3, 32, 32)}, 0)
    with pytest.raises(ValueError, match=r"batch\['src'\]"):
        m.training_step({"src": torch.rand(1, 32, 32), "trg": torch.rand(1, 32, 32)}, 0)


def test_configs_parse_and_name_accepted_arguments():
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "demystifying", "*.toml")))
    names = {os.path.basename(f) for f in files}
    for method in LOSS_METHODS + FIXED_METHODS:
        for bname in ("resnet50_conv3", "dino_vits8"):
            assert f"{method}_{bname}.toml" in names
    assert {"eq_smallcnn.toml", "cl_smallcnn.toml"} <= names
    for f in files:
        with open(f, "rb") as fh:
            cfg = tomllib.load(fh)
        cls = get_method_class(cfg["method"])
        params = inspect.signature(cls.__init__).parameters
        assert set(cfg.get("method_args", {})) <= set(params) - {"self", "backbone"}, f
        assert os.path.basename(f).startswith(cfg["method"] + "_") and cfg["backbone"] in os.path.basename(f)
        for sec in ("data", "optim", "train", "eval"):
            assert sec in cfg, f"{f}: missing [{sec}]"
