"""The ``warps`` dataset: photos shipped with scikit-image and their random warps, with exact keypoints.

Needs no download: the default photos are colour images stored inside the scikit-image package
(``skimage/data/*.png|jpg``), loaded through ``skimage.data``. Each pair is (the photo on the canvas,
a random warp of it) from :func:`semcorr_fast.warps.random_warp`; its target keypoints are the exact
forward warp of the source keypoints (:meth:`semcorr_fast.warps.Warp.points`, ``tol`` 1e-4 px), so
the dataset measures a matcher against perfect ground truth. The default used by
``semcorr eval --dataset warps`` and ``semcorr demo``.

Protocol
--------
* Canvas: ``Canvas.resized(size, size)`` with ``size = 256`` (the photo squashed to a small square;
  a warp is defined in normalised coordinates, so the same seed gives the same geometric warp at any
  size). Source and target share the canvas size.
* Pair ``i`` uses photo ``images[i % len(images)]`` and a warp drawn from a ``torch.Generator`` seeded
  with a hash of ``(seed, i)`` only, so every process, shard and access order sees the same pairs. A
  warp that folds (:meth:`Warp.folds`) is redrawn from the same generator (the forward map of points
  is then one-to-one).
* Source keypoints: ``n_kps`` points inside the content box less a margin of 6 % of its short side.
  ``kp_mode="corners"`` (default): Harris corner peaks of the canvas photo (the strongest ``4·n_kps``
  per photo, from which each pair draws ``n_kps``; a photo with too few corners is topped up from the
  grid); ``kp_mode="grid"``: a jittered ``⌈√K⌉×⌈√K⌉`` grid (K cells drawn, jitter ±35 % of a cell).
* Target keypoints: the exact warp of the source keypoints. ``valid`` = the forward map exists
  (``ok``) and the target point lies inside the target image, ``0 ≤ x ≤ W−1``, ``0 ≤ y ≤ H−1``.
  Where no forward image exists (a DVE-style TPS does not reach every source point) the target is
  ``(-1, -1)``; out-of-image targets keep their exact coordinates and are invalid.
* ``thr`` = max side of the target image (``default_thr = "image"``), so PCK@0.1 at 256 px is 25.6 px.
* ``category`` = the photo name; ``src_name`` = ``warps/<photo>/<canvas>``; ``trg_name`` =
  ``<src_name>/<preset>-<kind>-x<scale>[-color]/seed<seed>/<i>``; both are stable strings that name
  everything an image depends on (usable as feature-cache keys); ``pair_id`` is the same without
  slashes.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from numbers import Integral

import numpy as np
import torch
from PIL import Image

from .. import warps as W
from .base import Pair, PairDataset, register_dataset
from .canvas import Canvas

# Photos stored inside the scikit-image package (no download), by ``skimage.data`` name.
_COLOR_PHOTOS = {
    "astronaut": lambda d: d.astronaut(),
    "chelsea": lambda d: d.chelsea(),
    "coffee": lambda d: d.coffee(),
    "rocket": lambda d: d.rocket(),
    "motorcycle_left": lambda d: d.stereo_motorcycle()[0],
    "motorcycle_right": lambda d: d.stereo_motorcycle()[1],
    "immunohistochemistry": lambda d: d.immunohistochemistry(),
    "hubble_deep_field": lambda d: d.hubble_deep_field(),
    "retina": lambda d: d.retina(),
}
# Grey photos, also shipped; replicated to three channels when asked for by name.
_GRAY_PHOTOS = ("camera", "coins", "moon", "grass", "gravel", "brick")

DEFAULT_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right",
                  "immunohistochemistry")
DEFAULT_SIZE = 256
_KP_MARGIN = 0.06
_MAX_REDRAWS = 50


def skimage_photo(name: str) -> Image.Image:
    """A photo shipped with scikit-image as an RGB PIL image (no download; grey photos → 3 channels)."""
    import skimage.data as skd
    if name in _COLOR_PHOTOS:
        get = _COLOR_PHOTOS[name]
    elif name in _GRAY_PHOTOS:
        get = getattr(skd, name)
    else:
        raise ValueError(f"WarpsDataset: unknown scikit-image photo {name!r}; available without download: "
                         f"{', '.join(list(_COLOR_PHOTOS) + list(_GRAY_PHOTOS))}")
    try:
        arr = np.asarray(get(skd))
    except Exception as exc:  # pooch missing / file not shipped: say so instead of trying to download
        raise FileNotFoundError(f"skimage.data.{name}: not available offline in this scikit-image installation "
                                f"(expected the photo inside the package data directory): {exc}") from exc
    return _to_pil(arr, name)


def _to_pil(img, name: str) -> Image.Image:
    """PIL image, (H, W[, 3|4]) uint8/float array, or (3, H, W) float tensor in [0, 1] → RGB PIL."""
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    if isinstance(img, torch.Tensor):
        if img.dim() != 3 or img.shape[0] not in (1, 3) or not img.dtype.is_floating_point:
            raise ValueError(f"WarpsDataset: images[{name!r}] as a tensor must be (3, H, W) float in [0, 1], "
                             f"got {tuple(img.shape)} {img.dtype}")
        img = img.detach().cpu().expand(3, -1, -1).permute(1, 2, 0).numpy()
    arr = np.asarray(img)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"WarpsDataset: images[{name!r}] must be (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        if a.max() <= 1.0:
            a = a * 255.0
        arr = np.clip(np.round(a), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def _pair_seed(seed: int, i: int) -> int:
    """A 63-bit seed from (seed, i) alone (stable across processes and Python versions)."""
    h = hashlib.blake2b(f"semcorr-warps:{seed}:{i}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@register_dataset("warps")
class WarpsDataset(PairDataset):
    """Pairs (photo, random warp of the photo) with exact dense ground truth; see the module docstring.

    Args:
        n_pairs: number of pairs (≥ 1).
        size: side of the default square canvas (``Canvas.resized(size, size)``; default 256). Give
            either ``size`` or ``canvas``, not both.
        kind: ``"tps"``, ``"affine"`` or ``"tps+affine"`` (:func:`semcorr_fast.warps.random_warp`).
        n_kps: keypoints per pair (≥ 1).
        seed: the dataset seed; pair i depends on (seed, i) only.
        images: None (the default scikit-image photos ``DEFAULT_PHOTOS``), a sequence of
            scikit-image photo names, or a mapping name → image (PIL image, (H, W[, 3]) array, or
            (3, H, W) float tensor in [0, 1]); the name becomes the category and part of the
            image names, so give distinct images distinct names.
        canvas: a :class:`Canvas`; default ``Canvas.resized(256, 256)``.
        preset: warp magnitudes, ``"demystifying"`` (default; DVE's published warp) or
            ``"universal"`` or a :class:`semcorr_fast.warps.WarpPreset`.
        scale: multiplies every random warp magnitude (≥ 0; 0 gives identity pairs).
        kp_mode: ``"corners"`` (default) or ``"grid"``.
        color: also colour-jitter the target (the preset's strengths, or Universal's if it has none).

    Items are :class:`~semcorr_fast.data.base.Pair`; ``flags`` holds ``preset``, ``kind``, ``scale``
    and ``warp_seed``. :meth:`get_warp` returns the :class:`~semcorr_fast.warps.Warp` of a pair (dense
    ground truth: ``grid``, ``valid_mask``, ``points``).
    """

    default_thr = "image"

    def __init__(self, n_pairs: int = 20, size: int | None = None, kind: str = "tps+affine", n_kps: int = 20,
                 seed: int = 0, images=None, canvas: Canvas | None = None, preset: str | W.WarpPreset = "demystifying",
                 scale: float = 1.0, kp_mode: str = "corners", color: bool = False):
        fn = "WarpsDataset"
        if isinstance(n_pairs, bool) or not isinstance(n_pairs, Integral) or n_pairs < 1:
            raise ValueError(f"{fn}: n_pairs must be an int >= 1, got {n_pairs!r}")
        if isinstance(n_kps, bool) or not isinstance(n_kps, Integral) or n_kps < 1:
            raise ValueError(f"{fn}: n_kps must be an int >= 1, got {n_kps!r}")
        if isinstance(seed, bool) or not isinstance(seed, Integral):
            raise ValueError(f"{fn}: seed must be an int, got {seed!r}")
        if kind not in ("tps", "affine", "tps+affine"):
            raise ValueError(f"{fn}: kind must be one of 'tps', 'affine', 'tps+affine', got {kind!r}")
        if kp_mode not in ("corners", "grid"):
            raise ValueError(f"{fn}: kp_mode must be 'corners' or 'grid', got {kp_mode!r}")
        if not isinstance(color, bool):
            raise ValueError(f"{fn}: color must be a bool, got {color!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
            raise ValueError(f"{fn}: scale must be a finite number >= 0, got {scale!r}")
        if canvas is not None and size is not None:
            raise ValueError(f"{fn}: give either size or canvas, not both (got size={size!r}, canvas={canvas!r})")
        if canvas is not None and not isinstance(canvas, Canvas):
            raise TypeError(f"{fn}: canvas must be a semcorr_fast.data.Canvas, got {type(canvas).__name__}")
        if canvas is None:
            size = DEFAULT_SIZE if size is None else size
            if isinstance(size, bool) or not isinstance(size, Integral) or size < 8:
                raise ValueError(f"{fn}: size must be an int >= 8 (the canvas side in pixels), got {size!r}")
            canvas = Canvas.resized(int(size), int(size))
        super().__init__(canvas)
        self.preset = W.get_preset(preset)
        self.n_pairs, self.n_kps, self.seed, self.kind = int(n_pairs), int(n_kps), int(seed), kind
        self.scale, self.kp_mode, self.color = float(scale), kp_mode, color
        self._sources = self._parse_images(images)
        self.categories = list(dict.fromkeys(n for n, _ in self._sources))
        self._cache: dict[str, tuple] = {}

    @classmethod
    def default_canvas(cls) -> Canvas:
        return Canvas.resized(DEFAULT_SIZE, DEFAULT_SIZE)

    @staticmethod
    def _parse_images(images) -> list[tuple[str, object]]:
        if images is None:
            return [(n, None) for n in DEFAULT_PHOTOS]
        if isinstance(images, Mapping):
            out = [(str(k), v) for k, v in images.items()]
        elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
            out = []
            for k, v in enumerate(images):
                if not isinstance(v, str):
                    raise TypeError(f"WarpsDataset: images[{k}] must be a scikit-image photo name (str); pass a "
                                    f"mapping name -> image for your own images, got {type(v).__name__}")
                if v not in _COLOR_PHOTOS and v not in _GRAY_PHOTOS:
                    skimage_photo(v)  # raises the error listing the available names
                out.append((v, None))
        else:
            raise TypeError(f"WarpsDataset: images must be None, a sequence of photo names or a mapping name -> image, "
                            f"got {type(images).__name__}")
        if not out:
            raise ValueError("WarpsDataset: images must not be empty")
        names = [n for n, _ in out]
        if len(set(names)) != len(names):
            raise ValueError(f"WarpsDataset: image names must be distinct, got {names}")
        return out

    def __len__(self) -> int:
        return self.n_pairs

    # -- per-photo data (cached per process) ---------------------------------------------------------
    def _photo(self, k: int):
        name, img = self._sources[k]
        if name not in self._cache:
            pil = skimage_photo(name) if img is None else _to_pil(img, name)
            tensor, tf = self.canvas.apply(pil)
            H, W_ = tensor.shape[1:]
            x0, y0, x1, y1 = tf.content_box
            m = _KP_MARGIN * min(x1 - x0, y1 - y0)
            box = (max(x0 + m, 0.0), max(y0 + m, 0.0), min(x1 - m, W_ - 1.0), min(y1 - m, H - 1.0))
            corners = self._corners(tensor, box) if self.kp_mode == "corners" else None
            tag = f"{self.canvas.kind}{H}x{W_}"
            self._cache[name] = (tensor, tf, box, corners, f"warps/{name}/{tag}")
        return name, self._cache[name]

    def _corners(self, image: torch.Tensor, box) -> torch.Tensor:
        """(M, 2) Harris corner peaks (x, y) inside box, strongest first, at most 4·n_kps."""
        from skimage.feature import corner_harris, corner_peaks
        gray = (image * image.new_tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0).numpy().astype(np.float64)
        H, W_ = gray.shape
        resp = corner_harris(gray, sigma=max(1.0, min(H, W_) / 256.0))
        pk = corner_peaks(resp, min_distance=max(2, min(H, W_) // 40), threshold_rel=0.01, exclude_border=False)
        if len(pk) == 0:
            return torch.zeros(0, 2)
        xy = torch.from_numpy(pk[:, ::-1].astype(np.float32).copy())
        inside = (xy[:, 0] >= box[0]) & (xy[:, 0] <= box[2]) & (xy[:, 1] >= box[1]) & (xy[:, 1] <= box[3])
        score = torch.from_numpy(resp[pk[:, 0], pk[:, 1]].astype(np.float64))
        xy, score = xy[inside], score[inside]
        order = torch.argsort(-score, stable=True)
        return xy[order][: 4 * self.n_kps]

    def _grid_kps(self, box, K: int, gen: torch.Generator) -> torch.Tensor:
        g = max(1, math.ceil(math.sqrt(K)))
        cells = torch.randperm(g * g, generator=gen)[:K].sort().values
        cx, cy = (cells % g).double(), (cells // g).double()
        jit = (torch.rand(K, 2, generator=gen, dtype=torch.float64) - 0.5) * 0.7
        w, h = (box[2] - box[0]) / g, (box[3] - box[1]) / g
        x = box[0] + (cx + 0.5 + jit[:, 0]) * w
        y = box[1] + (cy + 0.5 + jit[:, 1]) * h
        return torch.stack((x, y), -1).float()

    def _source_kps(self, corners, box, gen: torch.Generator) -> torch.Tensor:
        K = self.n_kps
        if corners is None:
            return self._grid_kps(box, K, gen)
        take = min(K, len(corners))
        idx = torch.randperm(len(corners), generator=gen)[:take].sort().values
        kps = corners[idx]
        if take < K:
            kps = torch.cat((kps, self._grid_kps(box, K - take, gen)), 0)
        return kps

    # -- pairs ------------------------------------------------------------------------------------
    def _index(self, i) -> int:
        if isinstance(i, bool) or not isinstance(i, Integral):
            raise TypeError(f"WarpsDataset: index must be an int, got {type(i).__name__}")
        if i < 0:
            i += self.n_pairs
        if not 0 <= i < self.n_pairs:
            raise IndexError(f"WarpsDataset: index {i} out of range for {self.n_pairs} pairs")
        return int(i)

    def _draw(self, i: int):
        k = i % len(self._sources)
        name, (image, tf, box, corners, src_name) = self._photo(k)
        H, W_ = image.shape[1:]
        wseed = _pair_seed(self.seed, i)
        gen = torch.Generator().manual_seed(wseed)
        for _ in range(_MAX_REDRAWS):
            warp = W.random_warp(1, H, W_, self.kind, preset=self.preset, scale=self.scale, generator=gen)
            if not bool(warp.folds()[0]):
                break
        else:  # pragma: no cover - probability ~ 0.2**50 with the published magnitudes
            raise RuntimeError(f"WarpsDataset: pair {i}: every one of {_MAX_REDRAWS} warps drawn folds; lower scale")
        src_kps = self._source_kps(corners, box, gen)
        return name, image, tf, src_name, warp, src_kps, gen, wseed

    def get_warp(self, i: int) -> W.Warp:
        """The :class:`~semcorr_fast.warps.Warp` (B = 1) of pair i: source canvas → target image."""
        return self._draw(self._index(i))[4]

    def __getitem__(self, i) -> Pair:
        i = self._index(i)
        name, image, tf, src_name, warp, src_kps, gen, wseed = self._draw(i)
        H, W_ = image.shape[1:]
        trg = warp.apply(image.unsqueeze(0))
        if self.color:
            strengths = self.preset.color or W.PRESETS["universal"].color
            b, c, s, h = strengths
            trg = W.color_jitter(trg, brightness=b, contrast=c, saturation=s, hue=h, generator=gen)
        trg_kps, ok = warp.points(src_kps.double().unsqueeze(0), return_ok=True)
        trg_kps, ok = trg_kps[0], ok[0]
        inside = (trg_kps[:, 0] >= 0) & (trg_kps[:, 0] <= W_ - 1) & (trg_kps[:, 1] >= 0) & (trg_kps[:, 1] <= H - 1)
        valid = ok & inside
        trg_kps = torch.where(ok.unsqueeze(-1), trg_kps, torch.full_like(trg_kps, -1.0)).float()
        variant = f"{self.preset.name}-{self.kind}-x{self.scale:g}" + ("-color" if self.color else "")
        trg_name = f"{src_name}/{variant}/seed{self.seed}/{i:06d}"
        return Pair(
            src_image=image.clone(), trg_image=trg[0].contiguous(), src_kps=src_kps.float(), trg_kps=trg_kps,
            valid=valid, thr=float(max(H, W_)), category=name, pair_id=trg_name.replace("/", "-"),
            src_name=src_name, trg_name=trg_name, src_tf=tf, trg_tf=None,
            kp_names=[f"kp{k}" for k in range(self.n_kps)],
            flags={"preset": self.preset.name, "kind": self.kind, "scale": self.scale, "warp_seed": wseed,
                   "color": self.color},
        )
