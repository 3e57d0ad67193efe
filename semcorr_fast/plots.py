"""Pictures of an evaluation (matplotlib, written to files): PCK-vs-α curves and match pictures.

``plot_matches`` draws the source image with its keypoints and the target image with the true (circle)
and predicted (cross) match of each, joined by a line coloured by the error in units of the PCK
threshold (green = correct at α, red = at or beyond 2α), so a person can check a result by eye.
"""
from __future__ import annotations

import os

import numpy as np
import torch


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def pck_curve(records, alphas=None, per: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """(alphas, PCK at each α) of evaluated pairs (:class:`semcorr_fast.evaluate.PairRecord`)."""
    from . import metrics
    from .evaluate import _stack

    alphas = np.linspace(0.0, 0.2, 41)[1:] if alphas is None else np.asarray(alphas, dtype=float)
    pred, gt, thr, valid = _stack(records)
    vals = metrics.pck(pred, gt, thr, [float(a) for a in alphas], valid=valid, per=per)
    return alphas, np.asarray(torch.as_tensor(vals).tolist(), dtype=float)


def plot_pck_curves(curves: dict, path: str, title: str = "PCK vs alpha") -> str:
    """curves: label → (alphas, pck). Writes a PNG and returns its path."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for label, (a, v) in curves.items():
        ax.plot(a, 100 * np.asarray(v), label=label)
    ax.set_xlabel("alpha (fraction of the threshold base)")
    ax.set_ylabel("PCK (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_matches(src_image: torch.Tensor, trg_image: torch.Tensor, src_kps: torch.Tensor, pred: torch.Tensor,
                 gt: torch.Tensor, valid: torch.Tensor, thr: float, path: str, *, alpha: float = 0.1,
                 title: str = "") -> str:
    """Side-by-side match picture; images (3, H, W) in [0, 1], points (K, 2) canvas pixels. Returns the path."""
    plt = _plt()
    import matplotlib
    from matplotlib import cm, colors

    fig, axes = plt.subplots(1, 2, figsize=(10, 5), dpi=110)
    axes[0].imshow(src_image.permute(1, 2, 0).clamp(0, 1).numpy())
    axes[1].imshow(trg_image.permute(1, 2, 0).clamp(0, 1).numpy())
    err = (pred - gt).norm(dim=-1) / max(thr, 1e-12)
    norm = colors.Normalize(vmin=0.0, vmax=2 * alpha)
    cmap = matplotlib.colormaps["RdYlGn_r"]
    ok = 0
    for k in valid.nonzero()[:, 0].tolist():
        e = float(err[k])
        col = cmap(norm(e if np.isfinite(e) else 2 * alpha))
        ok += int(np.isfinite(e) and e < alpha)
        axes[0].plot(*src_kps[k].tolist(), "o", ms=6, mec="k", mfc=col)
        axes[0].annotate(str(k), src_kps[k].tolist(), color="w", fontsize=6, ha="center", va="center")
        axes[1].plot(*gt[k].tolist(), "o", ms=7, mfc="none", mec="w", mew=1.5)
        if np.isfinite(e):
            axes[1].plot(*pred[k].tolist(), "x", ms=7, color=col, mew=2)
            axes[1].plot([gt[k, 0], pred[k, 0]], [gt[k, 1], pred[k, 1]], "-", color=col, lw=1)
    n = int(valid.sum())
    axes[0].set_title("source keypoints")
    axes[1].set_title(f"target: o true, x predicted  (PCK@{alpha:g}: {ok}/{n})")
    for ax in axes:
        ax.axis("off")
    sm = cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=axes, fraction=0.025, label="error / threshold")
    if title:
        fig.suptitle(title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
