"""Backbone registry, facet extraction, fused descriptor, DAISY, weights discovery and the feature cache.

Everything runs on tiny random-init configurations of the real code paths (no downloads).
"""
from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semcorr_fast.backbones import (Backbone, FeatureCache, create_backbone, flip_key, list_backbones,
                                    register_backbone)
from semcorr_fast.backbones import _weights as W
from semcorr_fast.data.canvas import Canvas

NAMES = ["daisy", "dino_vits8", "dinov2_vitb14", "resnet50_conv3", "sd15_decoder", "sd_dino"]
_BUILT: dict[str, Backbone] = {}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models are latency-bound: intra-op threads only add contention on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(name: str, **cfg) -> Backbone:
    """A tiny random-init backbone, built once per test session for the default options."""
    if cfg:
        return create_backbone(name, pretrained=False, tiny=True, **cfg)
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = create_backbone(name, pretrained=False, tiny=True)
    return _BUILT[name]


def canvas_side(b: Backbone) -> int:
    s = b.canvas.size
    return s if isinstance(s, int) else s[0]


# ---------------------------------------------------------------------------------------------- registry
def test_registry_lists_all_and_rejects_bad_names_and_options():
    assert set(NAMES) <= set(list_backbones())
    with pytest.raises(KeyError, match="unknown backbone 'nope'"):
        create_backbone("nope")
    with pytest.raises(TypeError, match="unknown option"):
        create_backbone("daisy", colour=True)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("daisy")(lambda **k: None)
    with pytest.raises(ValueError, match="tiny=True"):
        create_backbone("dino_vits8", tiny=True)   # tiny has no published weights


@pytest.mark.parametrize("name", NAMES)
def test_tiny_backbone_shape_stride_and_frozen(name):
    b = tiny(name)
    assert isinstance(b, Backbone) and b.name == name
    assert not b.training and not any(p.requires_grad for p in b.parameters())
    S = canvas_side(b)
    x = torch.rand(2, 3, S, S)
    f = b(x)
    h, w = b.grid(S, S)
    assert f.shape == (2, b.dim, h, w) and f.dtype == torch.float32
    assert torch.isfinite(f).all()
    assert abs(h * b.stride - S) < b.stride and abs(w * b.stride - S) < b.stride
    # the two images differ, so must their features (the network reads its input)
    assert not torch.allclose(f[0], f[1])


@pytest.mark.parametrize("name,hw", [("dino_vits8", (48, 72)), ("dinov2_vitb14", (70, 126)),
                                     ("resnet50_conv3", (50, 77)), ("daisy", (40, 64)),
                                     ("sd15_decoder", (128, 192))])
def test_non_square_inputs_follow_grid(name, hw):
    b = tiny(name)
    f = b(torch.rand(1, 3, *hw))
    assert f.shape[-2:] == b.grid(*hw)


def test_documented_full_size_geometry():
    """Full-size configs: dims, strides, canvases and grids as documented (no heavy forward)."""
    from diffusers import UNet2DConditionModel
    from semcorr_fast.backbones.sd import SD15_UNET_CONFIG, SD15Decoder
    torch.manual_seed(0)
    d = create_backbone("dino_vits8", pretrained=False)
    assert (d.dim, d.stride, d.canvas, d.layer, d.facet) == (384, 8, Canvas.resized(224), 9, "key")
    assert d.grid(224, 224) == (28, 28) and len(d.vit.blocks) == 10
    r = create_backbone("resnet50_conv3", pretrained=False)
    assert (r.dim, r.stride, r.canvas, r.grid(384, 384)) == (1024, 16, Canvas.resized(384), (24, 24))
    assert r(torch.rand(1, 3, 96, 96)).shape == (1, 1024, 6, 6)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    sites = [SD15Decoder._site(unet, k, 3, 3) for k in (2, 5, 8)]
    assert [(c, 8 * s) for _, c, s in sites] == [(1280, 64), (1280, 32), (640, 16)]  # s5, s4, s3
    assert sum(c for _, c, _ in sites) + 768 == 3968
    assert create_backbone("daisy").grid(256, 256) == (32, 32) and create_backbone("daisy").dim == 200


def test_input_validation_names_the_problem():
    b = tiny("dino_vits8")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        b(torch.rand(3, 64, 64))
    with pytest.raises(TypeError, match="floating"):
        b(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        b(torch.rand(1, 3, 64, 64) * 255)
    with pytest.raises(ValueError, match="multiples of 64"):
        tiny("sd15_decoder")(torch.rand(1, 3, 100, 128))


# ---------------------------------------------------------------------------------------------- ViT facets
def _hand_key(b, images: torch.Tensor) -> torch.Tensor:
    """Block-``layer`` key facet computed by hand: patchify, positions, earlier blocks, LN, qkv rows."""
    vit = b.vit
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (images - mean) / std
    p = b.patch
    B, _, H, Wd = x.shape
    h, w = H // p, Wd // p
    patches = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)                 # (B, h·w, 3·p·p)
    wproj = vit.patch_embed.proj.weight.reshape(vit.embed_dim, -1)
    tok = patches @ wproj.T + vit.patch_embed.proj.bias
    pe = vit.pos_embed
    M = int(math.isqrt(pe.shape[1] - 1))
    grid = pe[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
    if (h, w) != (M, M):   # DINO's rule: bicubic with scale (n + 0.1) / M
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / M, (w + 0.1) / M), mode="bicubic",
                             align_corners=False, recompute_scale_factor=False)
    pos = torch.cat([pe[:, :1], grid.flatten(2).transpose(1, 2)], 1)
    t = torch.cat([vit.cls_token.expand(B, -1, -1), tok], 1) + pos
    for blk in list(vit.blocks)[: b.layer]:
        t = blk(t)
    blk = vit.blocks[b.layer]
    ln = F.layer_norm(t, (t.shape[-1],), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    D = t.shape[-1]
    k = ln @ blk.attn.qkv.weight[D:2 * D].T + blk.attn.qkv.bias[D:2 * D]         # (B, N, D) head-major
    return k[:, 1:]                                                                 # drop cls


@pytest.mark.parametrize("side", [32, 64])    # native 4×4 position grid, and interpolated 8×8
def test_dino_key_facet_equals_hand_computation(side):
    torch.manual_seed(1)
    b = tiny("dino_vits8", channel_layout="head_major")
    x = torch.rand(2, 3, side, side)
    k = _hand_key(b, x)
    out = b(x)
    h = side // 8
    assert out.shape == (2, 48, h, h)
    torch.testing.assert_close(out.flatten(2).transpose(1, 2), k, rtol=1e-4, atol=1e-5)
    # dino-vit-features layout: channel d·heads + head, the same numbers permuted
    b.channel_layout = "dino_vit_features"
    heads = b.vit.blocks[b.layer].attn.num_heads
    perm = k.reshape(2, h * h, heads, 48 // heads).transpose(-1, -2).reshape(2, h * h, 48)
    torch.testing.assert_close(b(x).flatten(2).transpose(1, 2), perm, rtol=1e-4, atol=1e-5)


def test_vit_runs_only_needed_blocks_and_token_facet_is_block_output():
    b = tiny("dinov2_vitb14")
    assert b.facet == "token" and len(b.vit.blocks) == b.layer + 1
    b1 = tiny("dinov2_vitb14", layer=1)
    b1.load_state_dict({k: v for k, v in b.state_dict().items() if not k.startswith("vit.blocks.2")})
    x = torch.rand(1, 3, 112, 112)
    t, h, w = b.embed(b.normalize(x))
    t = b.vit.blocks[1](b.vit.blocks[0](t))
    torch.testing.assert_close(b1(x), t[:, 1:].transpose(1, 2).reshape(1, -1, h, w))
    assert not torch.allclose(b1(x), b(x))


# ---------------------------------------------------------------------------------------------- SD + fused
def test_sd_block_feature_is_hidden_state_before_skip_concat():
    """ODISE decoder_only: block 8's feature = h entering output block 8 (up_blocks[2].resnets[2]) minus the skip."""
    sd = tiny("sd15_decoder", slide=None)
    x = torch.rand(1, 3, 128, 128)
    z = sd.encode(x)
    zt = sd.sqrt_ac * z + sd.sqrt_one_minus_ac * sd.noise(z.shape[-2:])
    seen = {}

    def grab(_mod, args):
        seen["in"] = args[0]
    h = sd.unet.up_blocks[2].resnets[2].register_forward_pre_hook(grab)
    try:
        maps = sd.unet_maps(zt)
        assert "in" not in seen          # the UNet stopped before output block 8
        cond = sd.prompt_embeds.expand(1, -1, -1)
        sd.unet(zt, torch.tensor([sd.timestep]), encoder_hidden_states=cond)
    finally:
        h.remove()
    c = maps[8].shape[1]
    torch.testing.assert_close(maps[8], seen["in"][:, :c])
    assert seen["in"].shape[1] > c       # the skip connection was concatenated after
    assert [maps[k].shape[-1] for k in (2, 5, 8)] == [2, 4, 8]


def test_sd_sliding_window_stitches_crops_like_odise():
    sd = tiny("sd15_decoder")             # tiny: pad_square(192), slide 128 → crops at 0 and 64, overlapping
    assert sd.slide == 128 and sd.crop_offsets(192, 128) == [0, 64]
    assert sd.crop_offsets(960, 512) == [0, 448]
    torch.manual_seed(3)
    x = torch.rand(1, 3, 192, 192)
    maps = sd.extract_maps(x)
    for name, k in (("s3", 8), ("s5", 2)):
        s = sd.map_strides[k]
        acc = torch.zeros(1, sd.channels[k], 192 // s, 192 // s)
        cnt = torch.zeros(1, 1, 192 // s, 192 // s)
        for y in (0, 64):
            for xo in (0, 64):
                m = sd._maps_single(x[:, :, y:y + 128, xo:xo + 128])[k]
                acc[:, :, y // s:y // s + m.shape[-2], xo // s:xo // s + m.shape[-1]] += m
                cnt[:, :, y // s:y // s + m.shape[-2], xo // s:xo // s + m.shape[-1]] += 1
        torch.testing.assert_close(maps[name], acc / cnt, rtol=1e-4, atol=1e-5)
    f = sd(x)
    torch.testing.assert_close(f[:, :32], maps["s3"])
    up = F.interpolate(maps["s5"], size=(12, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(f[:, 96:], up)


def test_sd_dino_per_half_normalisation():
    from semcorr_fast.backbones.fused import normalize_sd_dino
    m = tiny("sd_dino")
    assert m.mode == "zero_shot" and m.dim == m.sd.dim + m.dino.dim
    torch.manual_seed(4)
    x = torch.rand(2, 3, 192, 192)
    z = m(x)
    m.mode = "raw"
    try:
        raw = m(x)
    finally:
        m.mode = "zero_shot"
    c = m.sd_dim
    assert not torch.allclose(raw.norm(dim=1), torch.ones(()))
    torch.testing.assert_close(z[:, :c].norm(dim=1), torch.full_like(z[:, 0], 0.5 ** 0.5))
    torch.testing.assert_close(z[:, c:].norm(dim=1), torch.full_like(z[:, 0], 0.5 ** 0.5))
    torch.testing.assert_close(z, normalize_sd_dino(raw, c))
    # the fused cosine is the mean of the per-part cosines, whatever the parts' scales
    a, b = raw[0, :, 2, 3], raw[1, :, 7, 5]
    cos = lambda u, v: F.cosine_similarity(u, v, dim=0)
    expect = 0.5 * (cos(a[:c], b[:c]) + cos(a[c:], b[c:]))
    torch.testing.assert_close((z[0, :, 2, 3] * z[1, :, 7, 5]).sum(), expect, rtol=1e-5, atol=1e-6)
    scaled = raw.clone()
    scaled[:, :c] *= 1000.0
    torch.testing.assert_close(normalize_sd_dino(scaled, c), z, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sd_dim"):
        normalize_sd_dino(raw, raw.shape[1])


# ---------------------------------------------------------------------------------------------- weights
@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    hf, th = tmp_path / "hf", tmp_path / "torch"
    monkeypatch.setenv("HF_HUB_CACHE", str(hf))
    monkeypatch.setenv("TORCH_HOME", str(th))
    for k in list(os.environ):
        if k.startswith("SEMCORR_WEIGHTS_") or k == "SEMCORR_SD15_PROMPT_EMBEDS":
            monkeypatch.delenv(k)
    return hf, th


def test_missing_weights_error_names_paths_and_env(empty_caches):
    hf, th = empty_caches
    with pytest.raises(FileNotFoundError) as e:
        create_backbone("dino_vits8")
    msg = str(e.value)
    assert str(hf / "models--timm--vit_small_patch8_224.dino" / "snapshots") in msg and "model.safetensors" in msg
    assert str(th / "hub" / "checkpoints" / "dino_deitsmall8_pretrain.pth") in msg
    assert "SEMCORR_WEIGHTS_DINO_VITS8" in msg and "weights=" in msg
    with pytest.raises(FileNotFoundError, match="models--stable-diffusion-v1-5--stable-diffusion-v1-5"):
        create_backbone("sd15_decoder")
    with pytest.raises(FileNotFoundError, match="resnet50-0676ba61.pth"):
        create_backbone("resnet50_conv3")
    with pytest.raises(FileNotFoundError, match="no/such/file.pth"):
        create_backbone("dinov2_vitb14", weights="/no/such/file.pth")


def test_weights_discovery_and_loading(empty_caches, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    from semcorr_fast.backbones.vit import ViTBackbone, _build_vit
    hf, _ = empty_caches
    torch.manual_seed(5)
    vit = _build_vit(patch=14, dim=48, depth=3, heads=3, img_size=56, init_values=1e-5)
    sd = {k: v.contiguous() for k, v in vit.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, 48)                   # as in the DINOv2 release: ignored
    snap = hf / "models--timm--vit_base_patch14_dinov2.lvd142m" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file(sd, str(snap / "model.safetensors"))
    (hf / "models--timm--vit_base_patch14_dinov2.lvd142m" / "refs").mkdir()
    (hf / "models--timm--vit_base_patch14_dinov2.lvd142m" / "refs" / "main").write_text("abc123")
    cand = W.HFFile("timm/vit_base_patch14_dinov2.lvd142m", "model.safetensors")
    assert W.find_weights("dinov2_vitb14", [cand]) == snap / "model.safetensors"
    # loading the file into the tiny architecture reproduces the source model
    b = create_backbone("dinov2_vitb14", tiny=True, weights=snap / "model.safetensors")
    ref = ViTBackbone("dinov2_vitb14", vit, layer=2, facet="token", canvas=b.canvas).eval()
    x = torch.rand(1, 3, 112, 112)
    torch.testing.assert_close(b(x), ref(x))
    # the env var wins, and a wrong architecture is refused naming the file
    monkeypatch.setenv("SEMCORR_WEIGHTS_DINO_VITS8", str(snap / "model.safetensors"))
    with pytest.raises(ValueError, match="does not match the architecture"):
        create_backbone("dino_vits8")
    monkeypatch.setenv("SEMCORR_WEIGHTS_DINO_VITS8", str(tmp_path / "gone.pth"))
    with pytest.raises(FileNotFoundError, match="gone.pth"):
        create_backbone("dino_vits8")


def test_sd_loads_diffusers_directory_and_prompt_embedding(empty_caches, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    src = tiny("sd15_decoder", slide=None)
    d = tmp_path / "sd15"
    src.unet.save_pretrained(str(d / "unet"))
    from diffusers import AutoencoderKL
    from semcorr_fast.backbones.sd import TINY_VAE_CONFIG
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    vae.encoder.load_state_dict(src.vae_encoder.state_dict())
    vae.quant_conv.load_state_dict(src.quant_conv.state_dict())
    vae.save_pretrained(str(d / "vae"))
    with pytest.raises(FileNotFoundError, match=re.escape(str(d / "empty_prompt_embeds.safetensors"))):
        create_backbone("sd15_decoder", tiny=True, weights=d)
    pe = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(7))
    save_file({"prompt_embeds": pe}, str(d / "empty_prompt_embeds.safetensors"))
    b = create_backbone("sd15_decoder", tiny=True, weights=d, slide=None)
    torch.testing.assert_close(b.prompt_embeds, pe)
    src.prompt_embeds.copy_(pe)
    x = torch.rand(1, 3, 128, 128)
    torch.testing.assert_close(b(x), src(x))
    monkeypatch.setenv("SEMCORR_WEIGHTS_SD15_DECODER", str(d))        # env var instead of weights=
    env_loaded = create_backbone("sd15_decoder")                     # architecture from the directory
    assert env_loaded.dim == src.dim and env_loaded.canvas == Canvas.pad_square(960)
    with pytest.raises(ValueError, match=r"prompt_embeds must have shape \(L, 32\)"):
        create_backbone("sd15_decoder", pretrained=False, tiny=True, prompt_embeds=torch.zeros(77, 16))
    with pytest.raises(FileNotFoundError, match="diffusers-layout"):
        create_backbone("sd15_decoder", weights=d / "unet" / "config.json")


# ---------------------------------------------------------------------------------------------- DAISY
def test_daisy_on_chelsea_matches_shifted_copy_better_than_random():
    from skimage.data import chelsea
    img = torch.from_numpy(chelsea().astype(np.float32) / 255.0).permute(2, 0, 1)   # (3, 300, 451)
    b = create_backbone("daisy")
    a = img[:, 0:128, 0:192]
    s = img[:, 16:144, 24:216]            # shifted by (2, 3) cells
    rnd = torch.rand(3, 128, 192, generator=torch.Generator().manual_seed(0))
    fa, fs, fr = b(torch.stack([a, s, rnd]))
    assert fa.shape == (200, 16, 24) and torch.isfinite(fa).all()
    fa, fs, fr = (F.normalize(t, dim=0) for t in (fa, fs, fr))
    # interior cells of the shifted copy: cell (i, j) of s is cell (i + 2, j + 3) of a
    inner_s = fs[:, 2:10, 2:17]
    inner_a = fa[:, 4:12, 5:20]
    cos_true = (inner_s * inner_a).sum(0)
    cos_rand = (fr[:, 2:10, 2:17] * inner_a).sum(0)
    # DAISY histograms are non-negative, so unrelated cells still have a high cosine: compare distances
    assert cos_true.mean() > 0.99 and (1 - cos_true).mean() < 0.1 * (1 - cos_rand).mean()
    sim = inner_s.flatten(1).T @ fa.flatten(1)                                        # (120, 384)
    ii, jj = torch.meshgrid(torch.arange(4, 12), torch.arange(5, 20), indexing="ij")
    truth = (ii * 24 + jj).flatten()
    assert (sim.argmax(1) == truth).float().mean() > 0.9


# ---------------------------------------------------------------------------------------------- cache
def test_cache_put_get_roundtrip_and_keys(tmp_path):
    c16 = FeatureCache(tmp_path, "daisy", Canvas.resized(64))
    c32 = FeatureCache(tmp_path, "daisy", Canvas.resized(64), dtype=torch.float32)
    t = torch.randn(5, 4, 3)
    key = "cat/2008_000123.jpg"
    assert not c16.has(key)
    c16.put(key, t)
    c32.put(key + "#32", t)
    assert c16.has(key) and not c16.has(flip_key(key))
    torch.testing.assert_close(c16.get(key), t, rtol=1e-3, atol=1e-3)
    assert c16.get(key, dtype=None).dtype == torch.float16
    assert torch.equal(c32.get(key + "#32"), t)
    c16.put(flip_key(key), t.flip(-1))
    assert c16.path(flip_key(key)) != c16.path(key)
    torch.testing.assert_close(c16.get(flip_key(key)), t.flip(-1), rtol=1e-3, atol=1e-3)
    assert c16.path("a/b") != c16.path("a_b")         # sanitising does not merge keys
    with pytest.raises(KeyError, match="no features for key 'missing'"):
        c16.get("missing")
    with pytest.raises(ValueError, match=r"\(C, h, w\)"):
        c16.put("x", torch.randn(2, 5, 4, 3))
    other = FeatureCache(tmp_path, "daisy", Canvas.pad_square(64))
    assert not other.has(key)                          # canvases are kept apart


def test_cache_extract_resume_flip_and_lazy_loading(tmp_path):
    b = create_backbone("daisy", size=64)
    calls = []
    hook = b.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    cache = FeatureCache(tmp_path, "daisy", b.canvas, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    imgs = {f"im{i}": torch.rand(3, 64, 64, generator=g) for i in range(5)}
    loads = []

    def item(k):
        return k, (lambda: loads.append(k) or imgs[k])
    try:
        st = cache.extract(b, [item(k) for k in imgs], flip=True, batch_size=4, progress=False)
        assert st == {"computed": 10, "skipped": 0} and sum(calls) == 10 and len(calls) == 3
        for k, im in imgs.items():
            torch.testing.assert_close(cache.get(k), b(im[None])[0])
            torch.testing.assert_close(cache.get(flip_key(k)), b(im.flip(-1)[None])[0])
        calls.clear(), loads.clear()
        st = cache.extract(b, [item(k) for k in imgs], flip=True, progress=False)
        assert st == {"computed": 0, "skipped": 10} and calls == [] and loads == []
        # a new image and a deleted flip are the only work left
        imgs["im5"] = torch.rand(3, 64, 64, generator=g)
        cache.path(flip_key("im2")).unlink()
        st = cache.extract(b, [item(k) for k in imgs], flip=True, progress=False)
        assert st == {"computed": 3, "skipped": 9} and sum(calls) == 3 and sorted(loads) == ["im2", "im5"]
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="backbone 'daisy'"):
        cache.extract(tiny("dino_vits8"), [], progress=False)
    with pytest.raises(ValueError, match="canvas"):
        FeatureCache(tmp_path, "daisy", Canvas.resized(32)).extract(b, [], progress=False)


def test_cache_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import safetensors.torch as st
    cache = FeatureCache(tmp_path, "daisy", Canvas.resized(64))
    real = st.save_file

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 17)          # a partial write, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.put("k", torch.randn(2, 3, 3))
    assert not cache.has("k")
    assert list(cache.path("k").parent.iterdir()) == []
    monkeypatch.setattr(st, "save_file", real)
    # a temporary file orphaned by a killed process is never read, and clean_tmp removes it
    stray = cache.path("k").with_name("." + cache.path("k").name + ".999.deadbeef.tmp")
    stray.write_bytes(b"\x00" * 17)
    assert not cache.has("k")
    cache.put("k", torch.ones(2, 3, 3))
    assert torch.equal(cache.get("k"), torch.ones(2, 3, 3))
    assert cache.clean_tmp() == 1 and not stray.exists() and cache.has("k")
