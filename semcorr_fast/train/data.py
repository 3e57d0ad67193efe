"""Training image sources and the seeded, rank-sharded batch stream.

Sources (each yields float32 ``(3, H, W)`` images in [0, 1] of one fixed size, the backbone canvas):

* :class:`ShippedPhotos` — the colour and grey photographs that ship inside scikit-image (no download),
  expanded to ``n_images`` training images by seeded random crops, flips and colour changes.
* :class:`ImageFolder` — every image file under a directory (recursive, sorted), fitted to the size by
  squashing, padding or centre-cropping.
* :class:`DatasetPairs` — the pairs of a :mod:`semcorr_fast.data` dataset (e.g. SPair-71k ``trn``),
  with their keypoints, for the supervised methods.

:class:`BatchStream` turns a source into batches. Everything a batch holds is a pure function of
``(seed, step)``, so resuming needs no data-loader state, and the *global* batch of a step is the same
for every world size: rank ``r`` of ``W`` receives items ``[r·B/W, (r+1)·B/W)`` of it.

Batch layout (image sources): ``{"src": (b, 3, H, W), "trg": (b, 3, H, W), "index": (b, 2) int64}`` —
two independent random training images per item (``index`` = their source indices, src ≠ trg).
Pair sources add ``src_kps``/``trg_kps`` ``(b, K, 2)`` float32 (canvas pixels, padded with NaN),
``valid`` ``(b, K)`` bool, ``thr`` ``(b,)`` float32 (target) and ``src_thr`` (source, :func:`source_thr`),
``flip_perm`` ``(b, K)`` int64 (the dataset's left/right permutation; rows of -1 where it has none),
``category`` / ``pair_id`` / ``src_name`` / ``trg_name`` (lists of str) and ``index`` ``(b,)``. A pair
source with a ``make_batch(indices)`` method (e.g. GeoAware-SC's cached-feature pairs,
:class:`semcorr_fast.methods.feature_pairs.FeaturePairs`) assembles its own batches instead. The
trainer adds ``"generator"`` and ``"item_seeds"`` (see :meth:`semcorr_fast.methods.Method.training_step`).
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["SHIPPED_PHOTOS", "ShippedPhotos", "ImageFolder", "DatasetPairs", "BatchStream", "derive_seed",
           "training_size", "source_thr", "IMAGE_EXTENSIONS"]

#: scikit-image's bundled photographs used by :class:`ShippedPhotos` (``skimage.data`` loader names; the
#: files are inside the installed package, so nothing is downloaded). Grey ones are replicated to RGB.
SHIPPED_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right",
                  "hubble_deep_field", "immunohistochemistry", "retina", "camera", "coins", "moon", "grass",
                  "gravel", "brick", "clock")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS,
             "nearest": Image.NEAREST}


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints (numpy ``SeedSequence``; stable across runs,
    processes and platforms), e.g. ``derive_seed(seed, step, rank)``."""
    ss = np.random.SeedSequence([int(p) for p in parts])
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


def _as_size(size, name: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)):
        raise ValueError(f"{name}: size must be a positive int or (H, W) of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def training_size(canvas, image_size=None) -> tuple[int, int]:
    """The ``(H, W)`` of training images for a backbone canvas.

    ``resize(H, W)`` → (H, W); ``pad_square(S)`` → (S, S); ``max_side(S)`` → ``image_size`` or (S, S)
    (its long side must be S); ``identity`` → ``image_size`` (required). An ``image_size`` that
    contradicts a fixed canvas is an error naming ``data.image_size``.
    """
    kind = getattr(canvas, "kind", None)
    want = None if image_size is None else _as_size(image_size, "data.image_size")
    if kind == "resize":
        size = tuple(canvas.size)
    elif kind == "pad_square":
        size = (canvas.size, canvas.size)
    elif kind == "max_side":
        size = want or (canvas.size, canvas.size)
        if max(size) != canvas.size:
            raise ValueError(f"data.image_size {list(size)} does not fit the backbone canvas max_side({canvas.size}): "
                             f"its long side must be {canvas.size}")
        return size
    elif kind == "identity":
        if want is None:
            raise ValueError("data.image_size is required: the backbone's canvas (identity) does not fix a size")
        return want
    else:
        raise ValueError(f"training_size: canvas must be a semcorr_fast.data.canvas.Canvas, got {canvas!r}")
    if want is not None and want != size:
        raise ValueError(f"data.image_size {list(want)} contradicts the backbone canvas {canvas} "
                         f"(training images must be {list(size)}); leave data.image_size unset")
    return size


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def fit_image(img: Image.Image, size: tuple[int, int], fit: str = "resize", resample: str = "bilinear") -> torch.Tensor:
    """PIL image → ``(3, H, W)`` float32 in [0, 1] of ``size``: ``resize`` squashes, ``pad`` keeps the
    aspect ratio and zero-pads centred (as the ``pad_square`` canvas), ``crop`` centre-crops to the
    aspect ratio then resizes."""
    H, W = size
    img = img.convert("RGB")
    w, h = img.size
    rs = _RESAMPLE[resample]
    if fit == "resize":
        return _to_tensor(img.resize((W, H), rs))
    if fit == "crop":
        r = min(w / W, h / H)
        cw, ch = max(1, round(W * r)), max(1, round(H * r))
        x0, y0 = (w - cw) // 2, (h - ch) // 2
        return _to_tensor(img.crop((x0, y0, x0 + cw, y0 + ch)).resize((W, H), rs))
    if fit == "pad":
        r = min(W / w, H / h)
        nw, nh = max(1, min(W, round(w * r))), max(1, min(H, round(h * r)))
        out = torch.zeros(3, H, W)
        ox, oy = (W - nw) // 2, (H - nh) // 2
        out[:, oy:oy + nh, ox:ox + nw] = _to_tensor(img.resize((nw, nh), rs))
        return out
    raise ValueError(f"fit_image: fit must be 'resize', 'pad' or 'crop', got {fit!r}")


# ----------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------

_PHOTO_CACHE: dict[str, np.ndarray] = {}


def _load_photo(name: str) -> np.ndarray:
    """A bundled scikit-image photo as (h, w, 3) uint8 (grey replicated), cached per process."""
    if name not in _PHOTO_CACHE:
        import skimage.data as skd
        if name in ("motorcycle_left", "motorcycle_right"):
            path = os.path.join(os.path.dirname(skd.__file__), f"{name}.png")
            if os.path.isfile(path):  # one file instead of the whole stereo pair + disparity
                with Image.open(path) as im:
                    arr = np.asarray(im.convert("RGB"))
            else:
                left, right, _ = skd.stereo_motorcycle()
                arr = left if name == "motorcycle_left" else right
        elif hasattr(skd, name):
            arr = getattr(skd, name)()
        else:
            raise ValueError(f"ShippedPhotos: {name!r} is not a scikit-image bundled photo; choose from {SHIPPED_PHOTOS}")
        arr = np.asarray(arr)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float64), 0, 1) * 255).round().astype(np.uint8) if arr.dtype.kind == "f" \
                else arr.astype(np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        _PHOTO_CACHE[name] = np.ascontiguousarray(arr[:, :, :3])
    return _PHOTO_CACHE[name]


class ShippedPhotos:
    """``n_images`` training images made from scikit-image's bundled photographs (no download).

    Image ``i`` is photo ``i mod P`` (P = ``len(photos)``), cropped, flipped and colour-changed with a
    generator seeded by ``(seed, i)``, so it is the same in every process and run:

    * a crop covering a fraction U[0.25, 1] of the largest crop of the output aspect ratio, with the
      aspect ratio also jittered by a log-uniform factor in [3/4, 4/3], placed uniformly;
    * a horizontal flip with probability 1/2;
    * brightness ×U[0.7, 1.3], contrast ×U[0.7, 1.3] around the mean grey, saturation ×U[0.6, 1.4]
      and a per-channel gain U[0.9, 1.1] (a colour cast), then clipped to [0, 1].

    Args:
        n_images: how many distinct training images (>= 1).
        size: output ``(H, W)`` (or an int for square images).
        seed: seeds every crop/flip/colour change.
        photos: the ``skimage.data`` photo names (default :data:`SHIPPED_PHOTOS`).
        resample: PIL resampling filter for the resize.
    ``image(i)`` returns ``(3, H, W)`` float32 in [0, 1].
    """

    def __init__(self, n_images: int, size, seed: int = 0, photos: Sequence[str] | None = None,
                 resample: str = "bilinear"):
        if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
            raise ValueError(f"ShippedPhotos: n_images must be a positive int, got {n_images!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"ShippedPhotos: seed must be a non-negative int, got {seed!r}")
        self.size = _as_size(size, "ShippedPhotos")
        self.n_images = n_images
        self.seed = seed
        self.photos = tuple(SHIPPED_PHOTOS if photos is None else photos)
        if not self.photos:
            raise ValueError("ShippedPhotos: photos must name at least one photo")
        bad = [p for p in self.photos if p not in SHIPPED_PHOTOS]
        if bad:
            raise ValueError(f"ShippedPhotos: unknown photo(s) {bad}; available: {SHIPPED_PHOTOS}")
        if resample not in _RESAMPLE:
            raise ValueError(f"ShippedPhotos: resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
        self.resample = resample

    def __len__(self) -> int:
        return self.n_images

    def __repr__(self) -> str:
        return f"ShippedPhotos(n_images={self.n_images}, size={self.size}, seed={self.seed}, photos={len(self.photos)})"

    def image(self, i: int) -> torch.Tensor:
        """Training image ``i`` → ``(3, H, W)`` float32 in [0, 1]."""
        if not 0 <= i < self.n_images:
            raise IndexError(f"ShippedPhotos: index {i} out of range [0, {self.n_images})")
        photo = _load_photo(self.photos[i % len(self.photos)])
        rng = np.random.default_rng(derive_seed(self.seed, i))
        h, w = photo.shape[:2]
        H, W = self.size
        aspect = (W / H) * float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        # the largest crop of this aspect ratio, then shrunk by sqrt(area fraction)
        cw, ch = (w, w / aspect) if w / aspect <= h else (h * aspect, h)
        s = float(np.sqrt(rng.uniform(0.25, 1.0)))
        cw, ch = max(1, int(round(cw * s))), max(1, int(round(ch * s)))
        x0 = int(rng.integers(0, w - cw + 1))
        y0 = int(rng.integers(0, h - ch + 1))
        flip = bool(rng.random() < 0.5)
        bright, contrast, sat = rng.uniform(0.7, 1.3), rng.uniform(0.7, 1.3), rng.uniform(0.6, 1.4)
        gains = rng.uniform(0.9, 1.1, size=3)
        img = Image.fromarray(photo[y0:y0 + ch, x0:x0 + cw]).resize((W, H), _RESAMPLE[self.resample])
        x = _to_tensor(img)
        if flip:
            x = x.flip(-1)
        x = x * float(bright)
        grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])
        x = (x - grey.mean()) * float(contrast) + grey.mean()
        grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
        x = (x - grey) * float(sat) + grey
        x = x * torch.from_numpy(gains.astype(np.float32))[:, None, None]
        return x.clamp_(0.0, 1.0).contiguous()


class ImageFolder:
    """Every image file under ``root`` (recursive; extensions :data:`IMAGE_EXTENSIONS`; sorted paths),
    fitted to ``size`` by ``fit`` (``resize`` | ``pad`` | ``crop``, see :func:`fit_image`).

    ``image(i)`` returns ``(3, H, W)`` float32 in [0, 1]. A missing or empty directory, or an
    unreadable file, is an error naming the path.
    """

    def __init__(self, root: str | os.PathLike, size, fit: str = "resize", resample: str = "bilinear"):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: directory not found (expected a folder of training images, "
                                    f"data.source = 'folder')")
        if fit not in ("resize", "pad", "crop"):
            raise ValueError(f"ImageFolder: fit must be 'resize', 'pad' or 'crop', got {fit!r}")
        if resample not in _RESAMPLE:
            raise ValueError(f"ImageFolder: resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
        self.root, self.fit, self.resample = root, fit, resample
        self.size = _as_size(size, "ImageFolder")
        files = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            files += [os.path.join(dirpath, f) for f in filenames
                      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        self.files = sorted(files)
        if not self.files:
            raise FileNotFoundError(f"{root}: no image files found (expected files ending in {IMAGE_EXTENSIONS})")

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"ImageFolder({self.root!r}, n={len(self.files)}, size={self.size}, fit={self.fit!r})"

    def image(self, i: int) -> torch.Tensor:
        path = self.files[i]
        try:
            with Image.open(path) as im:
                im.load()
                img = im.convert("RGB")
        except Exception as exc:
            raise OSError(f"{path}: not a readable image ({exc})") from exc
        return fit_image(img, self.size, self.fit, self.resample)


class DatasetPairs:
    """The pairs of a :class:`semcorr_fast.data.PairDataset` as training items (supervised methods).

    Items are visited in a fresh seeded permutation every epoch (epoch = ``len(dataset)`` items of the
    global stream). Every pair must have the same image size (use a fixed-size canvas such as the
    backbone's ``pad_square``/``resize``).
    """

    def __init__(self, dataset):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"DatasetPairs: dataset must be a semcorr_fast.data.PairDataset, got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError(f"DatasetPairs: dataset {getattr(dataset, 'name', '?')!r} has no pairs")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"DatasetPairs({getattr(self.dataset, 'name', type(self.dataset).__name__)}, n={len(self)})"


def source_thr(pair, thr_kind: str = "bbox") -> float:
    """The PCK threshold base of a pair's SOURCE image, in canvas pixels (``Pair.thr`` is the target's):
    the max side of the source bbox (``thr_kind="bbox"``), else of the source image content; NaN when
    the pair has neither (GeoAware-SC's self-flip augmentation scales its noise by it)."""
    if thr_kind == "bbox" and pair.src_bbox is not None:
        x0, y0, x1, y1 = [float(v) for v in pair.src_bbox]
    elif pair.src_tf is not None:
        x0, y0, x1, y1 = pair.src_tf.content_box
    else:
        return float("nan")
    return float(max(x1 - x0, y1 - y0))


# ----------------------------------------------------------------------------------------------
# the batch stream
# ----------------------------------------------------------------------------------------------

class BatchStream(torch.utils.data.Dataset):
    """Seeded, rank-sharded training batches: ``stream[step]`` is this rank's batch of ``step``.

    Args:
        source: :class:`ShippedPhotos`, :class:`ImageFolder` (anything with ``__len__`` and
            ``image(i)``) or :class:`DatasetPairs`.
        batch_size: the *global* batch size (items per step over all ranks); must be divisible by
            ``world``.
        seed: the run's seed; the items of step s depend only on ``(seed, s)``.
        rank, world: this process's shard (``torch.distributed`` rank and world size).
    """

    def __init__(self, source, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"BatchStream: batch_size must be a positive int, got {batch_size!r}")
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
            raise ValueError(f"BatchStream: need 0 <= rank < world, got rank={rank!r}, world={world!r}")
        if batch_size % world:
            raise ValueError(f"train.batch_size ({batch_size}) must be divisible by the world size ({world}): "
                             f"every rank gets batch_size / world items")
        self.pairs = isinstance(source, DatasetPairs)
        n = len(source)
        if not self.pairs and n < 2:
            raise ValueError(f"BatchStream: an image source needs at least 2 images (pairs of distinct images), "
                             f"got {n}")
        self.source, self.batch_size, self.seed, self.rank, self.world = source, batch_size, seed, rank, world
        self.local = batch_size // world

    def __len__(self) -> int:  # a DataLoader over explicit step indices never asks; kept for the protocol
        return 2 ** 62

    def global_indices(self, step: int) -> torch.Tensor:
        """Source indices of the whole global batch of ``step``: ``(B, 2)`` (image sources: src, trg)
        or ``(B,)`` (pair sources)."""
        B = self.batch_size
        if self.pairs:
            n = len(self.source)
            g = torch.arange(step * B, (step + 1) * B, dtype=torch.int64)
            epochs, pos = g // n, g % n
            out = torch.empty(B, dtype=torch.int64)
            for e in epochs.unique().tolist():
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.seed, 1, e)))
                m = epochs == e
                out[m] = perm[pos[m]]
            return out
        n = len(self.source)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, 0, step))
        i = torch.randint(0, n, (B,), generator=gen)
        j = torch.randint(0, n - 1, (B,), generator=gen)
        j = j + (j >= i).long()  # uniform over the other n - 1 images
        return torch.stack((i, j), 1)

    def indices(self, step: int) -> torch.Tensor:
        """This rank's slice of :meth:`global_indices`."""
        return self.global_indices(step)[self.rank * self.local:(self.rank + 1) * self.local]

    def __getitem__(self, step: int) -> dict:
        idx = self.indices(int(step))
        if not self.pairs:
            src = torch.stack([self.source.image(int(i)) for i in idx[:, 0]])
            trg = torch.stack([self.source.image(int(j)) for j in idx[:, 1]])
            return {"src": src, "trg": trg, "index": idx}
        make = getattr(self.source, "make_batch", None)  # a pair source that assembles its own batches
        return make(idx) if make is not None else self._pair_batch(idx)

    def _pair_batch(self, idx: torch.Tensor) -> dict:
        ds = self.source.dataset
        pairs = [ds[int(i)] for i in idx]
        shapes = {tuple(p.src_image.shape) for p in pairs} | {tuple(p.trg_image.shape) for p in pairs}
        if len(shapes) != 1:
            raise ValueError(f"DatasetPairs: images of one batch have different sizes {sorted(shapes)}; build the "
                             f"dataset on a fixed-size canvas (pad_square or resize)")
        K = max(p.src_kps.shape[0] for p in pairs)
        b = len(pairs)
        src_kps = torch.full((b, K, 2), float("nan"))
        trg_kps = torch.full((b, K, 2), float("nan"))
        valid = torch.zeros(b, K, dtype=torch.bool)
        flip_perm = torch.full((b, K), -1, dtype=torch.int64)
        for n, p in enumerate(pairs):
            k = p.src_kps.shape[0]
            src_kps[n, :k], trg_kps[n, :k], valid[n, :k] = p.src_kps, p.trg_kps, p.valid
            if p.flip_perm is not None:
                flip_perm[n] = torch.arange(K)
                flip_perm[n, :k] = p.flip_perm
        thr_kind = getattr(ds, "thr_kind", "bbox")
        return {"src": torch.stack([p.src_image for p in pairs]).float(),
                "trg": torch.stack([p.trg_image for p in pairs]).float(),
                "src_kps": src_kps, "trg_kps": trg_kps, "valid": valid,
                "thr": torch.tensor([float(p.thr) for p in pairs], dtype=torch.float32),
                "src_thr": torch.tensor([source_thr(p, thr_kind) for p in pairs], dtype=torch.float32),
                "flip_perm": flip_perm, "src_name": [p.src_name for p in pairs],
                "trg_name": [p.trg_name for p in pairs],
                "category": [p.category for p in pairs], "pair_id": [p.pair_id for p in pairs], "index": idx}

    def iterate(self, start: int, stop: int, num_workers: int = 0) -> Iterator[tuple[int, dict]]:
        """``(step, batch)`` for ``start <= step < stop``; ``num_workers > 0`` assembles batches in
        DataLoader worker processes (same content: batches depend only on the step)."""
        if num_workers == 0:
            for s in range(start, stop):
                yield s, self[s]
            return
        loader = torch.utils.data.DataLoader(self, batch_size=None, sampler=range(start, stop),
                                             num_workers=num_workers, persistent_workers=False,
                                             prefetch_factor=2)
        for s, batch in zip(range(start, stop), loader):
            yield s, batch
