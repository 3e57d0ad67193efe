"""A tiny synthetic Jamais Vu training set in the real on-disk formats, with known 3-D ground truth.

``make_jamaisvu(root, ...)`` renders ``n_images`` views of one object per category — an ellipsoid with
a known, left/right-symmetric 3-D keypoint template on its surface — under random rotations, scales and
translations through a pinhole camera, and writes (``root`` = the ``SPair-71k`` folder):

* ``JPEGImages/<cat>/<stem>.jpg`` — the renders: the object is coloured by its canonical surface
  coordinates (so any backbone sees consistent parts), over a textured background plane;
* ``ImageAnnotation/<cat>/<stem>.json``, ``PairAnnotation/trn/<pair>.json``, ``Layout/large/trn.txt`` —
  SPair-71k annotations: the projected keypoints that clearly face the camera and whose 3×3 pixel
  neighbourhood is object (no labels on the silhouette);
  pairs ``(i, i + 1 mod n)``;
* ``MoGeMaps/<cat>/<stem>/points.exr``, ``depth.exr``, ``mask.png``, ``fov.json`` — MoGe's ``--maps``
  output (see :mod:`semcorr_fast.geometry`): the exact camera-frame point map of the render (object and
  background plane) and its depth;
* ``owlv2_sam_masks/<cat>/<stem>.npy`` — an object mask (float): 1 on the object, plus a strip of
  background pixels wrongly marked 1 (far in depth: the MAD refinement must drop them) and a strip
  at 0.95 (below the 0.99 threshold).

The returned :class:`FakeJamaisVu` holds the template, the poses and the camera, so tests can check the
lifted keypoints and the learned prototype against the truth.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from semcorr_fast.data.spair import SPAIR_LR_PAIRS
from semcorr_fast.geometry import write_moge
from tests.fakedata.spair_pf_ap10k import spair_image_name, spair_pair_flags

#: semi-axes (x, y, z) of the canonical ellipsoid
AXES = np.array([1.0, 0.7, 0.5])
#: keypoints per category written by the generator (Jamais Vu's per-category slot counts)
FAKE_NUM_KPS = {"cat": 15, "dog": 16, "bird": 17}
BACKGROUND_DEPTH = 9.0


@dataclass
class FakeJamaisVu:
    """What :func:`make_jamaisvu` wrote and the ground truth behind it."""

    root: str
    categories: tuple
    size: tuple                     # (W, H) of every image
    K: np.ndarray                   # (3, 3) pixel intrinsics (corner convention)
    fov: tuple                      # (fov_x, fov_y) degrees
    templates: dict                 # category -> (K_c, 3) canonical keypoints
    poses: dict                     # category -> list of (s, R (3, 3), t (3,)): X_cam = s R X + t
    stems: dict                     # category -> list of image stems
    visible: dict = field(default_factory=dict)   # category -> (n, K_c) bool
    kps: dict = field(default_factory=dict)       # category -> (n, K_c, 2) projected pixels

    @property
    def maps_root(self) -> str:
        return os.path.join(self.root, "MoGeMaps")

    @property
    def masks_root(self) -> str:
        return os.path.join(self.root, "owlv2_sam_masks")


def keypoint_template(category: str, seed: int = 0) -> np.ndarray:
    """``(K, 3)`` points on the ellipsoid, mirror-symmetric in x according to SPair's left/right pairs of
    ``category`` (pair (a, b): p_b = p_a with x negated; unpaired ids lie on the plane x = 0)."""
    K = FAKE_NUM_KPS[category]
    rng = np.random.default_rng(1000 + seed)
    pairs = [(a, b) for a, b in SPAIR_LR_PAIRS[category] if a < K and b < K]
    paired = {i for p in pairs for i in p}
    out = np.zeros((K, 3))

    def on_surface(u):
        u = u / np.linalg.norm(u)
        return AXES * u

    for a, b in pairs:
        # front-ish hemisphere (z < 0 faces the camera at the identity pose), away from the mirror plane
        u = np.array([rng.uniform(0.35, 1.0), rng.uniform(-1, 1), -rng.uniform(0.1, 1.0)])
        out[a] = on_surface(u)
        out[b] = out[a] * np.array([-1.0, 1.0, 1.0])
    for i in range(K):
        if i not in paired:
            out[i] = on_surface(np.array([0.0, rng.uniform(-1, 1), -rng.uniform(0.2, 1.0)]))
    return out


def _rotation(rng) -> np.ndarray:
    yaw, pitch, roll = (math.radians(rng.uniform(-60, 60)), math.radians(rng.uniform(-25, 25)),
                        math.radians(rng.uniform(-15, 15)))
    cy, sy, cp, sp, cr, sr = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch), math.cos(roll), math.sin(roll)
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    Rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return Rz @ Rx @ Ry


def render(s: float, R: np.ndarray, t: np.ndarray, K: np.ndarray, size: tuple, texture_seed: int = 0):
    """Ray-cast the posed ellipsoid and the background plane.

    Returns ``(image (H, W, 3) uint8, points (H, W, 3), depth (H, W), hit (H, W) bool, canon (H, W, 3))``
    with pixel centres at ``i + 0.5``.
    """
    W, H = size
    u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    d = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)     # z = 1 rays
    o_c = (R.T @ (-t)) / s                                                                  # camera in canonical
    d_c = (d @ R) / s                                                                       # R^T d per pixel
    a = ((d_c / AXES) ** 2).sum(-1)
    b = 2 * ((o_c / AXES) * (d_c / AXES)).sum(-1)
    c = ((o_c / AXES) ** 2).sum() - 1
    disc = b * b - 4 * a * c
    hit = disc > 0
    lam = np.where(hit, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), np.inf)
    hit &= lam > 0
    depth = np.where(hit, lam, BACKGROUND_DEPTH)
    points = d * depth[..., None]
    canon = o_c + lam[..., None] * d_c
    canon = np.where(hit[..., None], canon, 0.0)
    rng = np.random.default_rng(texture_seed)
    bg = 0.25 + 0.1 * np.sin(0.7 * u + 1.3 * v + rng.uniform(0, 6)) + 0.05 * rng.standard_normal((H, W))
    col = np.clip(0.5 + 0.45 * canon / AXES, 0, 1)
    shade = np.clip(0.6 + 0.4 * (-(canon / AXES ** 2) @ np.array([0.3, 0.5, -0.8]) / 2), 0.3, 1.0)
    img = np.where(hit[..., None], col * shade[..., None], np.clip(bg, 0, 1)[..., None].repeat(3, -1))
    return (img * 255).round().astype(np.uint8), points, depth, hit, canon


def project(X: np.ndarray, K: np.ndarray) -> np.ndarray:
    """``(N, 3)`` camera-frame points → ``(N, 2)`` pixel positions (corner convention)."""
    p = X @ K.T
    return p[:, :2] / p[:, 2:3]


def _json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(data, fh)


def make_jamaisvu(root: str, n_images: int = 12, categories=("cat",), size=(96, 72), fov_x: float = 50.0,
                  seed: int = 0) -> FakeJamaisVu:
    """Write the synthetic set (module docstring) under ``root`` and return its ground truth."""
    W, H = size
    fx = W * 0.5 / math.tan(math.radians(fov_x) / 2)
    fov_y = math.degrees(2 * math.atan(H * 0.5 / fx))
    K = np.array([[fx, 0, W / 2], [0, fx, H / 2], [0, 0, 1.0]])
    out = FakeJamaisVu(root, tuple(categories), (W, H), K, (fov_x, fov_y), {}, {}, {})
    rng = np.random.default_rng(seed)
    names = []
    for cat in categories:
        tmpl = keypoint_template(cat, seed)
        out.templates[cat] = tmpl
        poses, stems, vis_all, kps_all = [], [], [], []
        normals = tmpl / AXES ** 2
        for j in range(n_images):
            stem = spair_image_name(cat, j)
            for _ in range(100):   # a pose with enough visible keypoints, object inside the frame
                R = _rotation(rng)
                s = float(rng.uniform(0.75, 1.0))
                t = np.array([rng.uniform(-0.2, 0.2), rng.uniform(-0.15, 0.15), rng.uniform(3.2, 3.8)])
                Xc = s * tmpl @ R.T + t
                uv = project(Xc, K)
                n_c = normals @ R.T
                cos = (n_c * Xc).sum(-1) / (np.linalg.norm(n_c, axis=1) * np.linalg.norm(Xc, axis=1))
                facing = cos < -0.35       # clearly facing the camera (no grazing keypoints on the silhouette)
                inside = (uv[:, 0] > 0.5) & (uv[:, 0] < W - 0.5) & (uv[:, 1] > 0.5) & (uv[:, 1] < H - 0.5)
                vis = facing & inside
                if vis.sum() < 6:
                    continue
                img, points, depth, hit, _ = render(s, R, t, K, size, texture_seed=seed * 1000 + j)
                # annotate only keypoints whose 3×3 pixel neighbourhood is object: a label on the
                # silhouette would lift onto the background and blur the prototype-recovery measurement
                pad = np.pad(hit, 1)
                xi = np.clip(np.floor(uv[:, 0]).astype(int), 0, W - 1)
                yi = np.clip(np.floor(uv[:, 1]).astype(int), 0, H - 1)
                inner = np.ones(len(tmpl), bool)
                for dy in (0, 1, 2):
                    for dx in (0, 1, 2):
                        inner &= pad[yi + dy, xi + dx]
                vis &= inner
                if vis.sum() >= 6:
                    break
            Image.fromarray(img).save(os.path.join(_mk(root, "JPEGImages", cat), stem + ".jpg"), quality=95)
            write_moge(os.path.join(root, "MoGeMaps", cat, stem), points, depth, mask=np.ones((H, W), bool),
                       fov=(fov_x, fov_y))
            obj = hit.astype(np.float32)
            ys, xs = np.nonzero(hit)
            x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            obj[max(0, y1 - 3):y1, x1:x2] = 1.0          # leak onto the far background (removed by the MAD filter)
            obj[y2:min(H, y2 + 2), x1:x2] = 0.95         # below the 0.99 threshold
            np.save(os.path.join(_mk(root, "owlv2_sam_masks", cat), stem + ".npy"), obj)
            kps = {str(k): ([round(float(uv[k, 0]), 2), round(float(uv[k, 1]), 2)] if vis[k] else None)
                   for k in range(len(tmpl))}
            _json(os.path.join(root, "ImageAnnotation", cat, stem + ".json"), {
                "filename": stem + ".jpg", "image_width": W, "image_height": H, "category": cat,
                "bndbox": [x1, y1, x2, y2], "azimuth_id": j % 8, "kps": kps})
            poses.append((s, R, t))
            stems.append(stem)
            vis_all.append(vis)
            kps_all.append(np.where(vis[:, None], np.round(uv, 2), np.nan))
        out.poses[cat], out.stems[cat] = poses, stems
        out.visible[cat], out.kps[cat] = np.stack(vis_all), np.stack(kps_all)
        for i in range(n_images):
            j = (i + 1) % n_images
            a, b = stems[i], stems[j]
            ids = [k for k in range(len(tmpl)) if vis_all[i][k] and vis_all[j][k]]
            name = f"{len(names):06d}-{a}-{b}:{cat}"
            boxes = []
            for stem in (a, b):
                with open(os.path.join(root, "ImageAnnotation", cat, stem + ".json")) as fh:
                    boxes.append(json.load(fh)["bndbox"])
            _json(os.path.join(root, "PairAnnotation", "trn", name + ".json"), {
                "pair_id": len(names), "filename": name, "src_imname": a + ".jpg", "trg_imname": b + ".jpg",
                "src_imsize": [W, H, 3], "trg_imsize": [W, H, 3], "src_bndbox": boxes[0], "trg_bndbox": boxes[1],
                "category": cat, "src_pose": "Unspecified", "trg_pose": "Unspecified",
                "src_kps": [list(kps_all[i][k]) for k in ids], "trg_kps": [list(kps_all[j][k]) for k in ids],
                "kps_ids": [str(k) for k in ids], **spair_pair_flags(i)})
            names.append(name)
    os.makedirs(os.path.join(root, "Layout", "large"), exist_ok=True)
    with open(os.path.join(root, "Layout", "large", "trn.txt"), "w") as fh:
        fh.write("".join(n + "\n" for n in names))
    return out


def _mk(*parts) -> str:
    p = os.path.join(*parts)
    os.makedirs(p, exist_ok=True)
    return p
