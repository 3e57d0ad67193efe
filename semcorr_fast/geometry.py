"""3-D geometry for Jamais Vu's prototype losses: point maps, lifting, object masks, FPS, neighbourhoods.

Everything here is plain torch (plus a small numpy OpenEXR reader/writer), vectorised over points:
no Python loop visits individual points. The only loops are the inherently sequential ones —
farthest-point sampling's ``n_samples − 1`` greedy steps and Algorithm 1's ``k − 1`` growth steps —
and each step is a handful of whole-tensor ops over every point (and every seed) at once.

Coordinates
-----------
* **Pixels** use the corner convention of the datasets' annotations and of :mod:`semcorr_fast.data.canvas`:
  pixel ``(i, j)`` (column, row) covers ``[i, i+1) × [j, j+1)``, its centre is ``(i + 0.5, j + 0.5)``.
  A keypoint ``(x, y)`` lies in pixel ``(floor(x), floor(y))``.
* **Feature-grid coordinates** (:func:`sample_at_points`): continuous cell coordinates with cell centres at
  integers, as :mod:`semcorr_fast.matching`; an ``(h, w)`` map covering an ``H × W`` image (the
  ``align_corners=False`` convention of ``F.interpolate``) sees image position ``x`` at
  ``x·w/W − 0.5`` (:func:`pixels_to_grid`).
* **Camera frame** (MoGe's, OpenCV's): x right, y down, z forward; pinhole intrinsics
  ``K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` in pixels, so that pixel position ``(u, v)`` at depth
  ``z`` back-projects to ``z · K⁻¹ [u, v, 1]ᵀ`` (Jamais Vu Eq. 2).

MoGe output format (what :func:`read_moge` reads)
--------------------------------------------------
``moge/scripts/infer.py --maps`` (MoGe v1 and v2) writes one folder per input image,
``<out>/<image stem>/``, and Jamais Vu's released maps use the same layout under
``SPair-71k/MoGeMaps/<category>/<image stem>/``:

===============  ================================================================================
file             content
===============  ================================================================================
``points.exr``   OpenEXR, 32-bit float, the point map: 3 channels of the input image's size (H, W).
                 MoGe writes it with OpenCV after an RGB→BGR swap, so the file's channel ``R`` is
                 x, ``G`` is y and ``B`` is z (camera frame above). Pixels MoGe considers invalid
                 (sky, undefined geometry) hold ``+inf``. OpenCV's default EXR compression is ZIP.
``depth.exr``    OpenEXR, 32-bit float, 1 channel (OpenCV names it ``Y``): the depth z, ``+inf`` where
                 invalid.
``mask.png``     8-bit grey, 255 where MoGe's geometry is valid (not an object mask).
``fov.json``     ``{"fov_x": deg, "fov_y": deg}``, the estimated horizontal/vertical field of view.
                 MoGe's normalised intrinsics are ``fx = 0.5/tan(fov_x/2)``, ``fy = 0.5/tan(fov_y/2)``,
                 ``cx = cy = 0.5`` (image = unit square); in pixels ``fx·W, fy·H, W/2, H/2``
                 (:func:`intrinsics_from_fov`). The point map equals the back-projection of the pixel
                 centres with these intrinsics.
``image.jpg``,   the input and visualisations (not read).
``depth_vis.png``
===============  ================================================================================

A ``.npz`` with the arrays of MoGe's Python API (``points`` (H, W, 3), ``depth`` (H, W), ``mask``
(H, W), optional ``intrinsics`` (3, 3) *normalised*) is read as well.

Note [C]: Jamais Vu's own ``read_exr`` stacks channels in sorted name order, ``(B, G, R)`` = (z, y, x) — a
fixed reflection of the camera frame for every image. The losses only compare clouds after Kabsch fits and
through distances, so the code's prototype is the mirror image of the one learned from (x, y, z) here; the
training dynamics are the same.

Object masks (:func:`read_object_mask`): Jamais Vu's OWLv2 + SAM masks, one ``.npy`` per image
(``SPair-71k/owlv2_sam_masks/<category>/<image stem>.npy``), a 2-D (H, W) float or bool array at the image's
resolution; pixels with value ≥ 0.99 are object (:func:`object_mask`), then refined by depth MAD
(:func:`refine_mask_mad`).
"""
from __future__ import annotations

import json
import math
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "read_exr", "write_exr", "ImageGeometry", "read_moge", "write_moge", "read_object_mask",
    "intrinsics_from_fov", "GeometryStore", "backproject", "lift_keypoints", "refine_mask_mad",
    "object_mask", "farthest_point_sampling", "pairwise_sq_dists", "knn_neighbourhoods",
    "geodesic_neighbourhoods", "neighbourhoods", "gather_neighbourhoods", "pixels_to_grid",
    "sample_at_points", "GEODESIC_VARIANTS", "NEIGHBOURHOOD_RULES", "POINT_CLIP",
]

#: Jamais Vu clips point-map coordinates to ±1e3 (MoGe writes +inf where invalid).
POINT_CLIP = 1e3
GEODESIC_VARIANTS = ("paper", "code")
NEIGHBOURHOOD_RULES = ("knn", "geodesic")


# ================================================================================================
# OpenEXR (scanline, single part; NO / RLE / ZIPS / ZIP compression; HALF / FLOAT / UINT channels)
# ================================================================================================

_EXR_MAGIC = 20000630
_EXR_COMPRESSIONS = {0: "none", 1: "rle", 2: "zips", 3: "zip", 4: "piz", 5: "pxr24", 6: "b44", 7: "b44a",
                     8: "dwaa", 9: "dwab"}
_EXR_LINES = {"none": 1, "rle": 1, "zips": 1, "zip": 16}
_EXR_TYPES = {0: np.dtype("<u4"), 1: np.dtype("<f2"), 2: np.dtype("<f4")}


def _exr_undo_predictor(buf: np.ndarray) -> np.ndarray:
    """OpenEXR's byte predictor (decoding): b[i] = b[i-1] + d[i] - 128 (mod 256), then de-interleave."""
    n = buf.size
    if n == 0:
        return buf
    acc = np.cumsum(buf.astype(np.int64) - 128)
    acc += 128  # the first byte is stored as is
    t = (acc & 0xFF).astype(np.uint8)
    out = np.empty(n, np.uint8)
    half = (n + 1) // 2
    out[0::2] = t[:half]
    out[1::2] = t[half:]
    return out


def _exr_apply_predictor(raw: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_exr_undo_predictor` (interleave even/odd bytes, then byte deltas + 128)."""
    t = np.concatenate([raw[0::2], raw[1::2]])
    d = t.astype(np.int16)
    d[1:] = (t[1:].astype(np.int16) - t[:-1].astype(np.int16) + 128) & 0xFF
    return d.astype(np.uint8)


def _exr_rle_decode(data: bytes, expected: int, path: str) -> np.ndarray:
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        c = struct.unpack_from("<b", data, i)[0]
        i += 1
        if c < 0:
            out += data[i:i - c]
            i -= c
        else:
            if i >= n:
                raise ValueError(f"{path}: truncated RLE chunk")
            out += bytes([data[i]]) * (c + 1)
            i += 1
    if len(out) != expected:
        raise ValueError(f"{path}: RLE chunk decodes to {len(out)} bytes, expected {expected}")
    return np.frombuffer(bytes(out), np.uint8)


def _read_cstr(buf: bytes, pos: int, path: str) -> tuple[str, int]:
    end = buf.find(b"\x00", pos)
    if end < 0:
        raise ValueError(f"{path}: malformed OpenEXR header (unterminated name)")
    return buf[pos:end].decode("latin-1"), end + 1


def read_exr(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a scanline OpenEXR file: ``{channel name: (H, W) array}``.

    Supports single-part scanline files with NO, RLE, ZIPS or ZIP compression (what OpenCV and
    OpenEXR write by default) and HALF (→ float16), FLOAT (→ float32) and UINT (→ uint32) channels
    without subsampling. Tiled, multi-part, deep and PIZ/PXR24/B44/DWA-compressed files raise
    ``NotImplementedError`` naming the feature (convert them, e.g. ``exrmaketiled``/``oiiotool``,
    or save the maps as ``.npz``).

    Raises:
        FileNotFoundError: ``path`` does not exist (the message says an OpenEXR file was expected).
        ValueError: not an OpenEXR file, or a corrupt one (the message names the file).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (expected an OpenEXR image, e.g. MoGe's points.exr/depth.exr)")
    with open(path, "rb") as fh:
        buf = fh.read()
    if len(buf) < 8 or struct.unpack_from("<i", buf, 0)[0] != _EXR_MAGIC:
        raise ValueError(f"{path}: not an OpenEXR file (bad magic number)")
    version = struct.unpack_from("<i", buf, 4)[0]
    if version & 0x200:
        raise NotImplementedError(f"{path}: tiled OpenEXR files are not supported (scanline only)")
    if version & 0x1800:
        raise NotImplementedError(f"{path}: multi-part / deep OpenEXR files are not supported")
    pos, header = 8, {}
    try:
        while buf[pos] != 0:
            name, pos = _read_cstr(buf, pos, path)
            typ, pos = _read_cstr(buf, pos, path)
            size = struct.unpack_from("<i", buf, pos)[0]
            pos += 4
            header[name] = (typ, buf[pos:pos + size])
            pos += size
        pos += 1
    except (IndexError, struct.error):
        raise ValueError(f"{path}: truncated OpenEXR header") from None
    for req in ("channels", "compression", "dataWindow"):
        if req not in header:
            raise ValueError(f"{path}: OpenEXR header lacks the required attribute {req!r}")
    chans, cpos, cbuf = [], 0, header["channels"][1]
    while cpos < len(cbuf) and cbuf[cpos] != 0:
        cname, cpos = _read_cstr(cbuf, cpos, path)
        ptype, _plin, xs, ys = struct.unpack_from("<iB3xii", cbuf, cpos)
        cpos += 16
        if ptype not in _EXR_TYPES:
            raise ValueError(f"{path}: channel {cname!r} has unknown pixel type {ptype}")
        if xs != 1 or ys != 1:
            raise NotImplementedError(f"{path}: channel {cname!r} is subsampled ({xs}, {ys}); not supported")
        chans.append((cname, _EXR_TYPES[ptype]))
    comp = _EXR_COMPRESSIONS.get(header["compression"][1][0], "?")
    if comp not in _EXR_LINES:
        raise NotImplementedError(f"{path}: OpenEXR compression {comp!r} is not supported (only none, rle, zips, "
                                  f"zip); re-save the file with ZIP compression or as .npz")
    x0, y0, x1, y1 = struct.unpack("<4i", header["dataWindow"][1])
    W, H = x1 - x0 + 1, y1 - y0 + 1
    if W <= 0 or H <= 0:
        raise ValueError(f"{path}: empty data window {(x0, y0, x1, y1)}")
    lines = _EXR_LINES[comp]
    n_chunks = (H + lines - 1) // lines
    try:
        offsets = struct.unpack_from(f"<{n_chunks}Q", buf, pos)
    except struct.error:
        raise ValueError(f"{path}: truncated OpenEXR offset table") from None
    line_bytes = sum(W * dt.itemsize for _, dt in chans)
    rows = np.empty((H, line_bytes), np.uint8)
    for off in offsets:
        try:
            y, size = struct.unpack_from("<ii", buf, off)
        except struct.error:
            raise ValueError(f"{path}: chunk offset {off} lies outside the file") from None
        r0 = y - y0
        if not 0 <= r0 < H:
            raise ValueError(f"{path}: chunk at line {y} lies outside the data window")
        n = min(lines, H - r0)
        expected = n * line_bytes
        data = buf[off + 8:off + 8 + size]
        if len(data) != size:
            raise ValueError(f"{path}: truncated chunk at line {y}")
        if comp == "none" or size == expected:  # OpenEXR stores a chunk raw when compression does not help
            raw = np.frombuffer(data, np.uint8)
        elif comp == "rle":
            raw = _exr_undo_predictor(_exr_rle_decode(data, expected, path))
        else:
            try:
                dec = zlib.decompress(data)
            except zlib.error as exc:
                raise ValueError(f"{path}: corrupt ZIP chunk at line {y} ({exc})") from None
            if len(dec) != expected:
                raise ValueError(f"{path}: chunk at line {y} decodes to {len(dec)} bytes, expected {expected}")
            raw = _exr_undo_predictor(np.frombuffer(dec, np.uint8))
        if raw.size != expected:
            raise ValueError(f"{path}: chunk at line {y} has {raw.size} bytes, expected {expected}")
        rows[r0:r0 + n] = raw.reshape(n, line_bytes)
    out, col = {}, 0
    for cname, dt in chans:
        nb = W * dt.itemsize
        out[cname] = np.ascontiguousarray(rows[:, col:col + nb]).view(dt).reshape(H, W).astype(dt.newbyteorder("="))
        col += nb
    return out


def write_exr(path: str | os.PathLike, channels: dict, compression: str = "zip", pixel_type: str = "float") -> str:
    """Write a scanline OpenEXR file (what :func:`read_exr` reads; OpenEXR-conformant).

    Args:
        path: output file (parent folders are created).
        channels: ``{name: (H, W) array}``, all of one shape; stored in sorted name order, as OpenEXR requires.
        compression: ``"zip"`` (16 lines per chunk; OpenCV's default), ``"zips"``, or ``"none"``.
        pixel_type: ``"float"`` (32-bit) or ``"half"`` (16-bit).
    Returns:
        ``path``.
    """
    path = os.fspath(path)
    if compression not in ("zip", "zips", "none"):
        raise ValueError(f"write_exr: compression must be 'zip', 'zips' or 'none', got {compression!r}")
    if pixel_type not in ("float", "half"):
        raise ValueError(f"write_exr: pixel_type must be 'float' or 'half', got {pixel_type!r}")
    if not isinstance(channels, dict) or not channels:
        raise ValueError("write_exr: channels must be a non-empty dict {name: (H, W) array}")
    arrs = {str(k): np.asarray(v) for k, v in channels.items()}
    shapes = {a.shape for a in arrs.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"write_exr: every channel must be a 2-D array of one shape, got shapes {sorted(shapes)}")
    H, W = next(iter(shapes))
    dt = np.dtype("<f4") if pixel_type == "float" else np.dtype("<f2")
    ptype = 2 if pixel_type == "float" else 1
    names = sorted(arrs)
    comp_id = {"none": 0, "zips": 2, "zip": 3}[compression]

    def attr(name: str, typ: str, payload: bytes) -> bytes:
        return name.encode() + b"\x00" + typ.encode() + b"\x00" + struct.pack("<i", len(payload)) + payload

    chl = b"".join(n.encode() + b"\x00" + struct.pack("<iB3xii", ptype, 0, 1, 1) for n in names) + b"\x00"
    header = b"".join([
        attr("channels", "chlist", chl),
        attr("compression", "compression", bytes([comp_id])),
        attr("dataWindow", "box2i", struct.pack("<4i", 0, 0, W - 1, H - 1)),
        attr("displayWindow", "box2i", struct.pack("<4i", 0, 0, W - 1, H - 1)),
        attr("lineOrder", "lineOrder", b"\x00"),
        attr("pixelAspectRatio", "float", struct.pack("<f", 1.0)),
        attr("screenWindowCenter", "v2f", struct.pack("<2f", 0.0, 0.0)),
        attr("screenWindowWidth", "float", struct.pack("<f", 1.0)),
    ]) + b"\x00"
    planes = np.stack([arrs[n].astype(dt) for n in names], 1)           # (H, C, W)
    rows = planes.reshape(H, -1).view(np.uint8).reshape(H, -1)         # per line: channel after channel
    lines = _EXR_LINES[compression]
    chunks = []
    for r0 in range(0, H, lines):
        raw = np.ascontiguousarray(rows[r0:r0 + lines]).reshape(-1)
        data = raw.tobytes()
        if compression != "none":
            packed = zlib.compress(_exr_apply_predictor(raw).tobytes())
            if len(packed) < len(data):
                data = packed
        chunks.append(struct.pack("<ii", r0, len(data)) + data)
    start = 8 + len(header) + 8 * len(chunks)
    offsets, pos = [], start
    for c in chunks:
        offsets.append(pos)
        pos += len(c)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<ii", _EXR_MAGIC, 2))
        fh.write(header)
        fh.write(struct.pack(f"<{len(offsets)}Q", *offsets))
        for c in chunks:
            fh.write(c)
    return path


# ================================================================================================
# MoGe maps, object masks, intrinsics
# ================================================================================================

def intrinsics_from_fov(fov_x_deg: float, fov_y_deg: float, H: int, W: int) -> Tensor:
    """Pixel intrinsics ``(3, 3)`` float64 of MoGe's camera for an ``H × W`` map.

    ``fx = W·0.5/tan(fov_x/2)``, ``fy = H·0.5/tan(fov_y/2)``, ``cx = W/2``, ``cy = H/2`` (principal point
    at the image centre; pixel centres at ``i + 0.5``, see the module docstring).
    """
    for name, v in (("fov_x_deg", fov_x_deg), ("fov_y_deg", fov_y_deg)):
        if not (isinstance(v, (int, float)) and 0 < float(v) < 180):
            raise ValueError(f"intrinsics_from_fov: {name} must be a field of view in (0, 180) degrees, got {v!r}")
    fx = W * 0.5 / math.tan(math.radians(float(fov_x_deg)) / 2)
    fy = H * 0.5 / math.tan(math.radians(float(fov_y_deg)) / 2)
    return torch.tensor([[fx, 0.0, W / 2], [0.0, fy, H / 2], [0.0, 0.0, 1.0]], dtype=torch.float64)


@dataclass
class ImageGeometry:
    """The 3-D data of one training image, at the point map's resolution ``(H, W)`` (usually the original image).

    Attributes:
        points: ``(H, W, 3)`` float32 camera-frame points, clipped to ``±POINT_CLIP`` (invalid → clipped).
        depth: ``(H, W)`` float32 depth (z), clipped to ``≤ POINT_CLIP``.
        valid: ``(H, W)`` bool, finite geometry that MoGe marks valid.
        intrinsics: ``(3, 3)`` float64 pixel intrinsics, or None when unknown.
        object_prob: ``(H, W)`` float32 object-mask values in [0, 1] (OWLv2 + SAM), or None.
    """

    points: Tensor
    depth: Tensor
    valid: Tensor
    intrinsics: Tensor | None = None
    object_prob: Tensor | None = None

    def __post_init__(self):
        if self.points.dim() != 3 or self.points.shape[-1] != 3:
            raise ValueError(f"ImageGeometry: points must have shape (H, W, 3), got {tuple(self.points.shape)}")
        H, W = self.points.shape[:2]
        for name in ("depth", "valid", "object_prob"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (H, W):
                raise ValueError(f"ImageGeometry: {name} must have shape (H, W) = {(H, W)}, got {tuple(t.shape)}")
        if self.intrinsics is not None and tuple(self.intrinsics.shape) != (3, 3):
            raise ValueError(f"ImageGeometry: intrinsics must be (3, 3), got {tuple(self.intrinsics.shape)}")

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the maps."""
        return tuple(self.points.shape[:2])

    def with_object_mask(self, prob) -> "ImageGeometry":
        """A copy with ``object_prob`` set (an (H, W) array/tensor of the maps' size)."""
        p = torch.as_tensor(np.asarray(prob), dtype=torch.float32) if not isinstance(prob, Tensor) else prob.float()
        return ImageGeometry(self.points, self.depth, self.valid, self.intrinsics, p)


def _finite_clip(x: Tensor, lo: float, hi: float) -> Tensor:
    return torch.nan_to_num(x, nan=hi, posinf=hi, neginf=lo).clamp(lo, hi)


def read_moge(path: str | os.PathLike) -> ImageGeometry:
    """Read MoGe's outputs for one image (see the module docstring for the format).

    Args:
        path: a MoGe output folder (``points.exr``, ``depth.exr``, optional ``mask.png`` and
            ``fov.json``) or a ``.npz`` with ``points``, ``depth`` and optional ``mask``, ``intrinsics``
            (normalised, MoGe's API convention).
    Returns:
        :class:`ImageGeometry` (without an object mask). ``valid`` = finite point and depth, and MoGe's
        mask where present. Points and depth are clipped to ``±POINT_CLIP`` as Jamais Vu does.

    Raises:
        FileNotFoundError: a missing folder/file (named, with what was expected).
        ValueError: maps of inconsistent shapes or missing channels (the file is named).
    """
    path = os.fspath(path)
    if path.endswith(".npz"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: not found (expected a .npz with MoGe's points/depth/mask arrays)")
        with np.load(path) as z:
            for k in ("points", "depth"):
                if k not in z:
                    raise ValueError(f"{path}: missing array {k!r} (expected points (H, W, 3) and depth (H, W))")
            points = np.asarray(z["points"], np.float32)
            depth = np.asarray(z["depth"], np.float32)
            mask = np.asarray(z["mask"]).astype(bool) if "mask" in z else None
            K = np.asarray(z["intrinsics"], np.float64) if "intrinsics" in z else None
        if points.ndim != 3 or points.shape[-1] != 3 or depth.shape != points.shape[:2]:
            raise ValueError(f"{path}: points must be (H, W, 3) and depth (H, W); got {points.shape}, {depth.shape}")
        H, W = depth.shape
        intr = None
        if K is not None:
            if K.shape != (3, 3):
                raise ValueError(f"{path}: intrinsics must be (3, 3), got {K.shape}")
            intr = torch.from_numpy(K.copy())
            intr[0] *= W
            intr[1] *= H
    else:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: directory not found (expected a MoGe output folder with points.exr, "
                                    f"depth.exr, mask.png, fov.json)")
        p = read_exr(os.path.join(path, "points.exr"))
        missing = [c for c in "RGB" if c not in p]
        if missing:
            raise ValueError(f"{os.path.join(path, 'points.exr')}: channels {missing} missing (expected R, G, B = x, "
                             f"y, z as MoGe writes them); found {sorted(p)}")
        points = np.stack([p["R"], p["G"], p["B"]], -1).astype(np.float32)
        d = read_exr(os.path.join(path, "depth.exr"))
        if len(d) != 1:
            raise ValueError(f"{os.path.join(path, 'depth.exr')}: expected 1 channel, found {sorted(d)}")
        depth = next(iter(d.values())).astype(np.float32)
        if depth.shape != points.shape[:2]:
            raise ValueError(f"{path}: depth.exr is {depth.shape} but points.exr is {points.shape[:2]}")
        H, W = depth.shape
        mask = None
        mpath = os.path.join(path, "mask.png")
        if os.path.isfile(mpath):
            from PIL import Image
            with Image.open(mpath) as im:
                mask = np.asarray(im.convert("L")) > 127
            if mask.shape != (H, W):
                raise ValueError(f"{mpath}: mask is {mask.shape}, maps are {(H, W)}")
        intr = None
        fpath = os.path.join(path, "fov.json")
        if os.path.isfile(fpath):
            with open(fpath) as fh:
                fov = json.load(fh)
            try:
                intr = intrinsics_from_fov(float(fov["fov_x"]), float(fov["fov_y"]), H, W)
            except (KeyError, TypeError) as exc:
                raise ValueError(f"{fpath}: expected {{'fov_x': deg, 'fov_y': deg}} ({exc})") from None
    pts = torch.from_numpy(points)
    dep = torch.from_numpy(depth)
    valid = torch.isfinite(pts).all(-1) & torch.isfinite(dep) & (dep > 0)
    if mask is not None:
        valid &= torch.from_numpy(mask)
    return ImageGeometry(_finite_clip(pts, -POINT_CLIP, POINT_CLIP), _finite_clip(dep, -POINT_CLIP, POINT_CLIP),
                         valid, intr)


def write_moge(folder: str | os.PathLike, points, depth, mask=None, fov=None) -> str:
    """Write maps in MoGe's ``--maps`` layout (``points.exr``, ``depth.exr``, ``mask.png``, ``fov.json``).

    Used by the synthetic test data. ``points`` (H, W, 3) (x, y, z; ``inf`` where invalid), ``depth``
    (H, W), ``mask`` (H, W) bool or None, ``fov`` ``(fov_x_deg, fov_y_deg)`` or None.
    """
    folder = os.fspath(folder)
    points, depth = np.asarray(points, np.float32), np.asarray(depth, np.float32)
    if points.ndim != 3 or points.shape[-1] != 3 or depth.shape != points.shape[:2]:
        raise ValueError(f"write_moge: points must be (H, W, 3) and depth (H, W), got {points.shape}, {depth.shape}")
    os.makedirs(folder, exist_ok=True)
    write_exr(os.path.join(folder, "points.exr"), {"R": points[..., 0], "G": points[..., 1], "B": points[..., 2]})
    write_exr(os.path.join(folder, "depth.exr"), {"Y": depth})
    if mask is not None:
        from PIL import Image
        Image.fromarray((np.asarray(mask, bool) * 255).astype(np.uint8)).save(os.path.join(folder, "mask.png"))
    if fov is not None:
        with open(os.path.join(folder, "fov.json"), "w") as fh:
            json.dump({"fov_x": round(float(fov[0]), 2), "fov_y": round(float(fov[1]), 2)}, fh)
    return folder


def read_object_mask(path: str | os.PathLike) -> Tensor:
    """An OWLv2 + SAM object mask: a ``.npy`` 2-D (H, W) float/bool array → (H, W) float32 tensor."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (expected an object mask .npy, 2-D (H, W) float or bool)")
    arr = np.load(path)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{path}: object mask must be 2-D (H, W), got shape {arr.shape}")
    return torch.from_numpy(np.asarray(arr, np.float32).copy())


class GeometryStore:
    """Loads the MoGe maps and object masks of training images by (category, image stem).

    Layout (Jamais Vu's, ``root`` = the ``SPair-71k`` folder by default)::

        <maps>/<category>/<stem>/points.exr, depth.exr, [mask.png, fov.json]   (or <stem>.npz)
        <masks>/<category>/<stem>.npy

    Args:
        maps: folder of MoGe outputs (``MoGeMaps``).
        masks: folder of object masks (``owlv2_sam_masks``), or None (then every valid pixel is object).
        cache: keep up to this many loaded images in memory (0: none).
    """

    def __init__(self, maps: str | os.PathLike, masks: str | os.PathLike | None = None, cache: int = 64):
        self.maps = os.fspath(maps)
        if not os.path.isdir(self.maps):
            raise FileNotFoundError(f"{self.maps}: directory not found (expected MoGe maps as "
                                    f"<maps>/<category>/<stem>/points.exr)")
        self.masks = None if masks is None else os.fspath(masks)
        if self.masks is not None and not os.path.isdir(self.masks):
            raise FileNotFoundError(f"{self.masks}: directory not found (expected object masks as "
                                    f"<masks>/<category>/<stem>.npy)")
        self.cache_size = int(cache)
        self._cache: dict = {}

    def __repr__(self) -> str:
        return f"GeometryStore(maps={self.maps!r}, masks={self.masks!r})"

    def load(self, category: str, stem: str) -> ImageGeometry:
        """The :class:`ImageGeometry` of image ``stem`` (file name without extension) of ``category``."""
        key = (category, stem)
        if key in self._cache:
            return self._cache[key]
        folder = os.path.join(self.maps, category, stem)
        geo = read_moge(folder + ".npz" if not os.path.isdir(folder) and os.path.isfile(folder + ".npz") else folder)
        if self.masks is not None:
            m = read_object_mask(os.path.join(self.masks, category, stem + ".npy"))
            if tuple(m.shape) != geo.size:
                raise ValueError(f"{os.path.join(self.masks, category, stem + '.npy')}: mask is {tuple(m.shape)}, "
                                 f"the MoGe maps are {geo.size}")
            geo = geo.with_object_mask(m)
        if self.cache_size > 0:
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = geo
        return geo


# ================================================================================================
# Lifting 2-D keypoints to 3-D
# ================================================================================================

def _check_float(x, name: str, fn: str, last: int | None = None, ndim_min: int = 1) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point torch.Tensor, got "
                        f"{type(x).__name__ if not isinstance(x, Tensor) else x.dtype}")
    if x.dim() < ndim_min or (last is not None and x.shape[-1] != last):
        want = f"(..., {last})" if last is not None else f"at least {ndim_min}-D"
        raise ValueError(f"{fn}: {name} must have shape {want}, got {tuple(x.shape)}")


def backproject(uv: Tensor, depth: Tensor, K: Tensor) -> Tensor:
    """Pinhole back-projection (Jamais Vu Eq. 2): ``depth · K⁻¹ [u, v, 1]ᵀ``.

    Args:
        uv: ``(..., 2)`` pixel positions (corner convention: a pixel centre is ``i + 0.5``).
        depth: ``(...)`` depths z.
        K: ``(3, 3)`` or ``(..., 3, 3)`` pixel intrinsics ``[[fx, s, cx], [0, fy, cy], [0, 0, 1]]``.
    Returns:
        ``(..., 3)`` camera-frame points, in ``uv``'s dtype.
    """
    _check_float(uv, "uv", "backproject", last=2)
    if not isinstance(depth, Tensor) or tuple(depth.shape) != tuple(uv.shape[:-1]):
        raise ValueError(f"backproject: depth must be a tensor of shape {tuple(uv.shape[:-1])}, got "
                         f"{tuple(depth.shape) if isinstance(depth, Tensor) else type(depth).__name__}")
    if not isinstance(K, Tensor) or K.shape[-2:] != (3, 3):
        raise ValueError(f"backproject: K must be a (3, 3) intrinsics tensor, got "
                         f"{tuple(K.shape) if isinstance(K, Tensor) else type(K).__name__}")
    Kd = K.to(torch.float64)
    hom = torch.cat([uv.to(torch.float64), torch.ones_like(uv[..., :1], dtype=torch.float64)], -1)
    rays = torch.linalg.solve(Kd.expand(*hom.shape[:-1], 3, 3), hom.unsqueeze(-1)).squeeze(-1)
    return (rays * depth.to(torch.float64).unsqueeze(-1)).to(uv.dtype)


def _bilinear_map(values: Tensor, ok: Tensor, xy: Tensor) -> tuple[Tensor, Tensor]:
    """Bilinear read of ``values (H, W, C)`` at ``xy (K, 2)`` pixel positions; the four neighbours must be ok."""
    H, W = ok.shape
    g = xy - 0.5                                                 # index coordinates (centres at integers)
    x0 = g[:, 0].floor().clamp(0, W - 1)
    y0 = g[:, 1].floor().clamp(0, H - 1)
    x1 = (x0 + 1).clamp(max=W - 1)
    y1 = (y0 + 1).clamp(max=H - 1)
    fx = (g[:, 0] - x0).clamp(0, 1).unsqueeze(-1)
    fy = (g[:, 1] - y0).clamp(0, 1).unsqueeze(-1)
    x0, x1, y0, y1 = x0.long(), x1.long(), y0.long(), y1.long()
    v = ((1 - fx) * (1 - fy) * values[y0, x0] + fx * (1 - fy) * values[y0, x1]
         + (1 - fx) * fy * values[y1, x0] + fx * fy * values[y1, x1])
    good = ok[y0, x0] & ok[y0, x1] & ok[y1, x0] & ok[y1, x1]
    return v, good


def lift_keypoints(kps: Tensor, valid: Tensor, *, points: Tensor | None = None, depth: Tensor | None = None,
                   intrinsics: Tensor | None = None, ok: Tensor | None = None, mode: str = "nearest"
                   ) -> tuple[Tensor, Tensor]:
    """Lift 2-D keypoints of one image to 3-D camera-frame points.

    Two sources (exactly one must be given):

    * ``points``: a point map (MoGe's ``points.exr``; what Jamais Vu's code reads).
    * ``depth`` + ``intrinsics``: Eq. 2, ``k̄ = Ψ(k) · A⁻¹ [k_x, k_y, 1]ᵀ``, with the depth read at the
      keypoint and the keypoint's own position back-projected.

    Args:
        kps: ``(K, 2)`` float keypoints (x, y) in the maps' pixel frame (corner convention).
        valid: ``(K,)`` bool, the keypoints to lift (visible ones).
        points: ``(H, W, 3)`` float point map.
        depth: ``(H, W)`` float depth map; ``intrinsics``: ``(3, 3)`` pixel intrinsics.
        ok: ``(H, W)`` bool map validity (default: finite values).
        mode: ``"nearest"`` (default; the value of the pixel containing the keypoint — the code's integer
            lookup) or ``"bilinear"`` (interpolated between the four nearest pixel centres where all four
            are valid, nearest elsewhere).
    Returns:
        ``(xyz (K, 3), lifted (K,) bool)``: ``lifted`` = ``valid`` and inside the map and on valid geometry;
        rows that are not lifted hold 0.
    """
    fn = "lift_keypoints"
    _check_float(kps, "kps", fn, last=2)
    if kps.dim() != 2:
        raise ValueError(f"{fn}: kps must have shape (K, 2), got {tuple(kps.shape)}")
    K = kps.shape[0]
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (K,):
        raise ValueError(f"{fn}: valid must be a bool tensor of shape ({K},), got "
                         f"{tuple(valid.shape) if isinstance(valid, Tensor) else type(valid).__name__}")
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"{fn}: mode must be 'nearest' or 'bilinear', got {mode!r}")
    if (points is None) == (depth is None):
        raise ValueError(f"{fn}: pass exactly one of points (H, W, 3) or depth (H, W) + intrinsics (3, 3)")
    if points is not None:
        _check_float(points, "points", fn, last=3)
        if points.dim() != 3:
            raise ValueError(f"{fn}: points must have shape (H, W, 3), got {tuple(points.shape)}")
        vals = points
    else:
        _check_float(depth, "depth", fn)
        if depth.dim() != 2:
            raise ValueError(f"{fn}: depth must have shape (H, W), got {tuple(depth.shape)}")
        if intrinsics is None:
            raise ValueError(f"{fn}: depth needs intrinsics (3, 3) (pixel units)")
        vals = depth.unsqueeze(-1)
    H, W = vals.shape[:2]
    if ok is None:
        ok = torch.isfinite(vals).all(-1)
    elif not isinstance(ok, Tensor) or ok.dtype != torch.bool or tuple(ok.shape) != (H, W):
        raise ValueError(f"{fn}: ok must be a bool tensor of shape {(H, W)}")
    xy = torch.nan_to_num(kps.to(vals.dtype), nan=-1.0)
    inside = valid & (xy[:, 0] >= 0) & (xy[:, 0] < W) & (xy[:, 1] >= 0) & (xy[:, 1] < H)
    xi = xy[:, 0].floor().clamp(0, W - 1).long()
    yi = xy[:, 1].floor().clamp(0, H - 1).long()
    v = vals[yi, xi]
    good = ok[yi, xi]
    if mode == "bilinear":
        vb, gb = _bilinear_map(vals, ok, xy)
        v = torch.where(gb.unsqueeze(-1), vb, v)
    lifted = inside & good
    if points is None:
        v = backproject(xy, v[:, 0], intrinsics)
    v = torch.where(lifted.unsqueeze(-1), v, torch.zeros_like(v))
    return v, lifted


# ================================================================================================
# Object masks: threshold + depth-MAD refinement
# ================================================================================================

def refine_mask_mad(mask: Tensor, depth: Tensor, n_mad: float = 5.0) -> Tensor:
    """Jamais Vu's depth outlier rejection [C ``postprocess_mask_with_depth``].

    Per row b: keep the masked pixels whose depth lies strictly within ``n_mad`` median absolute
    deviations of the masked depths' median, ``|d − med| < n_mad · MAD`` (torch's median: the lower of
    the two middle values). A row where nothing survives (e.g. MAD = 0) keeps its input mask.

    Args:
        mask: ``(B, N)`` bool (any trailing shape flattened by the caller).
        depth: ``(B, N)`` float depths.
        n_mad: threshold in MADs (5 in the code).
    Returns:
        ``(B, N)`` bool refined mask (vectorised over rows; no loop).
    """
    fn = "refine_mask_mad"
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"{fn}: mask must be a bool tensor of shape (B, N), got "
                         f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
    _check_float(depth, "depth", fn)
    if depth.shape != mask.shape:
        raise ValueError(f"{fn}: depth must have the mask's shape {tuple(mask.shape)}, got {tuple(depth.shape)}")
    if not n_mad > 0:
        raise ValueError(f"{fn}: n_mad must be > 0, got {n_mad!r}")
    nan = torch.full_like(depth, float("nan"))
    d = torch.where(mask, depth, nan)
    med = d.nanmedian(dim=1, keepdim=True).values
    mad = (d - med).abs().nanmedian(dim=1, keepdim=True).values
    keep = mask & ((depth - med).abs() < n_mad * mad)
    return torch.where(keep.any(1, keepdim=True), keep, mask)


def object_mask(geo: ImageGeometry, threshold: float = 0.99, n_mad: float | None = 5.0) -> Tensor:
    """The object pixels of one image: ``object_prob ≥ threshold`` (every pixel if there is no object mask),
    on valid geometry, refined by :func:`refine_mask_mad` (skipped with ``n_mad=None``). ``(H, W)`` bool."""
    m = geo.valid.clone()
    if geo.object_prob is not None:
        m &= geo.object_prob >= threshold
    if n_mad is not None and bool(m.any()):
        m = refine_mask_mad(m.reshape(1, -1), geo.depth.reshape(1, -1).float(), n_mad).reshape(m.shape) & geo.valid
    return m


# ================================================================================================
# Farthest-point sampling
# ================================================================================================

def farthest_point_sampling(points: Tensor, n_samples: int, mask: Tensor | None = None, *,
                            start: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Batched farthest-point sampling [C ``masked_farthest_point_sampling``].

    The first index is ``start`` (or drawn uniformly among the masked points with ``generator``), then
    each step adds the masked point farthest (Euclidean) from the chosen set, keeping a running minimum
    distance. Each of the ``n_samples − 1`` sequential steps is a few whole-tensor ops over all B×N
    points (no loop over points). Ties go to the lowest index. Distances are compared squared (the
    same order as the code's norms).

    Args:
        points: ``(B, N, 3)`` float.
        n_samples: number of indices per row (≥ 1). Rows with fewer masked points than ``n_samples``
            repeat already-chosen points once every masked point has been chosen.
        mask: ``(B, N)`` bool of the points that may be chosen (default: all). Every row needs ≥ 1.
        start: ``(B,)`` long first indices (must be masked), or None for a random masked start.
        generator: the random start's generator.
    Returns:
        ``(B, n_samples)`` int64 indices into N.
    """
    fn = "farthest_point_sampling"
    _check_float(points, "points", fn, last=3)
    if points.dim() != 3:
        raise ValueError(f"{fn}: points must have shape (B, N, 3), got {tuple(points.shape)}")
    B, N, _ = points.shape
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"{fn}: n_samples must be an int >= 1, got {n_samples!r}")
    if mask is None:
        mask = torch.ones(B, N, dtype=torch.bool, device=points.device)
    elif not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (B, N):
        raise ValueError(f"{fn}: mask must be a bool tensor of shape (B, N) = {(B, N)}")
    counts = mask.sum(1)
    if N == 0 or bool((counts == 0).any()):
        raise ValueError(f"{fn}: every row needs at least one masked point (mask has an empty row)")
    if start is None:
        start = torch.multinomial(mask.float().cpu(), 1, generator=generator).squeeze(1).to(points.device)
    else:
        if not isinstance(start, Tensor) or start.dtype != torch.int64 or tuple(start.shape) != (B,):
            raise ValueError(f"{fn}: start must be an int64 tensor of shape (B,) = ({B},)")
        if bool(((start < 0) | (start >= N)).any()) or not bool(mask.gather(1, start[:, None].clamp(0, N - 1)).all()):
            raise ValueError(f"{fn}: start indices must be masked points in [0, N)")
    # coordinate planes (B, 3, N): each step is a few contiguous passes over N (a reduction over a
    # trailing dimension of 3 is several times slower on CPU)
    X = points.detach().transpose(1, 2).contiguous()
    out = torch.empty(B, n_samples, dtype=torch.int64, device=X.device)
    out[:, 0] = start
    d = torch.empty(B, N, dtype=X.dtype, device=X.device)
    tmp = torch.empty(B, N, dtype=X.dtype, device=X.device)

    def sq_dist_to(idx: Tensor) -> None:                      # d = ‖X − X[idx]‖² (x, then + y², then + z²)
        c = X.gather(2, idx.view(B, 1, 1).expand(B, 3, 1))     # (B, 3, 1)
        torch.sub(X[:, 0], c[:, 0], out=d)
        d.square_()
        for j in (1, 2):
            torch.sub(X[:, j], c[:, j], out=tmp)
            d.add_(tmp.square_())

    sq_dist_to(start)
    dist = torch.where(mask, d, torch.full_like(d, -1.0))     # unmasked points never win
    for i in range(1, n_samples):
        idx = dist.argmax(1)
        out[:, i] = idx
        sq_dist_to(idx)
        torch.minimum(dist, d, out=dist)
    return out


# ================================================================================================
# Neighbourhoods (kNN and pseudo-geodesic, Algorithm 1)
# ================================================================================================

def pairwise_sq_dists(points: Tensor) -> Tensor:
    """``(B, M, 3)`` → ``(B, M, M)`` squared Euclidean distances, computed from differences (exact,
    symmetric, zero diagonal; no ``|a|² − 2ab + |b|²`` cancellation)."""
    _check_float(points, "points", "pairwise_sq_dists", last=3)
    if points.dim() != 3:
        raise ValueError(f"pairwise_sq_dists: points must have shape (B, M, 3), got {tuple(points.shape)}")
    X = points.detach().transpose(1, 2).contiguous()                    # (B, 3, M) coordinate planes
    d = (X[:, 0, :, None] - X[:, 0, None, :]).square_()
    for c in (1, 2):  # (B, M, M) passes, no (B, M, M, 3) temporary
        d.add_((X[:, c, :, None] - X[:, c, None, :]).square_())
    return d


def _check_k(k, M: int, fn: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= M:
        raise ValueError(f"{fn}: k must be an int in [1, M = {M}], got {k!r}")
    return k


def knn_neighbourhoods(points: Tensor, k: int) -> Tensor:
    """The k nearest neighbours of every point (itself first), ``(B, M, 3)`` → ``(B, M, k)`` int64.

    Brute force: one ``(B, M, M)`` distance matrix and a top-k per row [C ``nn_geom_loss``: ``cdist`` +
    ``topk``]. The seed is forced to the first slot (the code's top-k includes it at distance 0).
    """
    d = pairwise_sq_dists(points)
    k = _check_k(k, d.shape[1], "knn_neighbourhoods")
    d.diagonal(dim1=1, dim2=2).fill_(-1.0)
    return d.topk(k, dim=2, largest=False, sorted=True).indices


def geodesic_neighbourhoods(points: Tensor, k: int, variant: str = "paper") -> Tensor:
    """Pseudo-geodesic neighbourhoods of every point (Jamais Vu Algorithm 1), ``(B, M, 3)`` → ``(B, M, k)``.

    ``variant="paper"`` (default) — Algorithm 1 exactly, for all M seeds at once: seed i's set starts as
    {i}; each of the ``k − 1`` steps adds, for every seed, the unselected point with the smallest
    distance to any point of the set (``D[i, j] = min_{y ∈ B_i} ‖x_j − y‖``; after adding c_i,
    ``D[i, :] ← min(D[i, :], ‖x_{c_i} − x_:‖)``). The set grows along the surface.

    ``variant="code"`` — the released code's ``closest_geodesic_neighbors``, which updates
    ``D[i, j] ← min(D[i, j], ‖x_i − x_{c_j}‖)`` (the transpose: distances from seed i to the points just
    added to *other* seeds' sets). It is neither Algorithm 1 nor kNN (notes ``seed_jamaisvu.md`` §2.7);
    the paper's numbers were produced with it.

    Ties go to the lowest index. Each step is whole-tensor work on the ``(B, M, M)`` distance matrix (an
    arg-min per row, one row gather per image, an element-wise minimum, the selected points masked by
    an additive +inf penalty), no loop over points or seeds.

    Returns:
        ``(B, M, k)`` int64, seed first, then the points in the order they were added.
    """
    if variant not in GEODESIC_VARIANTS:
        raise ValueError(f"geodesic_neighbourhoods: variant must be one of {GEODESIC_VARIANTS}, got {variant!r}")
    dist = pairwise_sq_dists(points)          # squared: the same arg-mins as distances
    B, M, _ = dist.shape
    k = _check_k(k, M, "geodesic_neighbourhoods")
    dev = dist.device
    out = torch.empty(B, M, k, dtype=torch.int64, device=dev)
    out[:, :, 0] = torch.arange(M, device=dev)
    # selected points carry +inf: a penalty matrix added after every update (cheaper than masked_fill)
    penalty = torch.zeros(B, M, M, dtype=dist.dtype, device=dev)
    penalty.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    D = dist + penalty
    for step in range(1, k):
        c = D.argmin(2)                                                  # (B, M): the point added to each set
        out[:, :, step] = c
        if step == k - 1:
            break
        penalty.scatter_(2, c.unsqueeze(2), float("inf"))
        if variant == "paper":                                           # D[i, :] ← min(D[i, :], d(x_{c_i}, ·))
            for b in range(B):
                torch.minimum(D[b], dist[b].index_select(0, c[b]), out=D[b])
        else:                                                            # D[i, j] ← min(D[i, j], d(x_i, x_{c_j}))
            torch.minimum(D, dist.gather(2, c.unsqueeze(1).expand(B, M, M)), out=D)
        D.add_(penalty)
    return out


def neighbourhoods(points: Tensor, k: int, rule: str = "knn", variant: str = "paper") -> Tensor:
    """``rule="knn"``: :func:`knn_neighbourhoods`; ``"geodesic"``: :func:`geodesic_neighbourhoods` (``variant``)."""
    if rule == "knn":
        return knn_neighbourhoods(points, k)
    if rule == "geodesic":
        return geodesic_neighbourhoods(points, k, variant)
    raise ValueError(f"neighbourhoods: rule must be one of {NEIGHBOURHOOD_RULES}, got {rule!r}")


def gather_neighbourhoods(points: Tensor, idx: Tensor, relative: bool = True) -> Tensor:
    """Points of each neighbourhood: ``points (B, M, 3)``, ``idx (B, M, k)`` → ``(B, M, k, 3)``; with
    ``relative`` the offsets from the seed (``points[idx] − points[seed]``, as the code). Differentiable."""
    B, M, k = idx.shape
    g = points.gather(1, idx.reshape(B, M * k, 1).expand(B, M * k, points.shape[-1])).reshape(B, M, k, -1)
    return g - points.unsqueeze(2) if relative else g


# ================================================================================================
# Sampling feature maps at points (never upsampling the map)
# ================================================================================================

def pixels_to_grid(xy: Tensor, image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> Tensor:
    """Pixel positions of an ``H × W`` image → continuous coordinates of an ``(h, w)`` grid covering it
    (cell centres at integers; ``F.interpolate(..., align_corners=False)``'s correspondence):
    ``g = x · w / W − 0.5``. ``xy (..., 2)`` → same shape."""
    H, W = image_hw
    h, w = grid_hw
    scale = xy.new_tensor([w / W, h / H])
    return xy * scale - 0.5


def sample_at_points(feat: Tensor, xy: Tensor) -> Tensor:
    """Bilinear samples of feature maps at points, ``(B, C, h, w)``, ``(B, N, 2)`` → ``(B, N, C)``.

    ``xy`` are continuous grid coordinates (x, y) with cell centres at integers (see
    :func:`pixels_to_grid`); outside the grid the border values are used. For integer pixels this
    equals ``F.interpolate(feat, (H, W), mode="bilinear", align_corners=False)`` indexed there — Jamais
    Vu's upsample-then-gather — in O(N·C) memory instead of O(H·W·C). Differentiable w.r.t. ``feat``.
    """
    fn = "sample_at_points"
    _check_float(feat, "feat", fn)
    if feat.dim() != 4:
        raise ValueError(f"{fn}: feat must have shape (B, C, h, w), got {tuple(feat.shape)}")
    _check_float(xy, "xy", fn, last=2)
    if xy.dim() != 3 or xy.shape[0] != feat.shape[0]:
        raise ValueError(f"{fn}: xy must have shape (B, N, 2) with B = {feat.shape[0]}, got {tuple(xy.shape)}")
    h, w = feat.shape[-2:]
    scale = xy.new_tensor([2.0 / w, 2.0 / h])
    grid = ((xy + 0.5) * scale - 1.0).to(feat.dtype).unsqueeze(1)        # (B, 1, N, 2) in [-1, 1]
    out = F.grid_sample(feat, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, :, 0].transpose(1, 2)
