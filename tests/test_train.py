"""The training layer: configs and overrides, training images, the method registry, the trainer
(determinism, checkpoints and resume, evaluation and best.pt, DDP through torchrun) and `semcorr train`.

Everything runs on a stand-in method defined here: a 1×1-conv projection on a frozen random conv
backbone (32×32 images, 8×8 feature grid), trained to make a map and its mirror image match through
``semcorr_fast.ops.expected_cost``. Run as a script (``python tests/test_train.py CONFIG OUT``) this
file trains one config; the torchrun test launches it that way.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from semcorr_fast import ops
from semcorr_fast.backbones import Backbone, register_backbone
from semcorr_fast.data import Canvas, Pair, PairDataset, register_dataset
from semcorr_fast.data.base import _REGISTRY as _DATASETS
from semcorr_fast.methods import Method, build_method, list_methods, register_method
from semcorr_fast.train import (BatchStream, ConfigError, ImageFolder, ShippedPhotos, config_from_dict, load_checkpoint,
                                load_config, load_trained, parse_override, train, training_size)
from semcorr_fast.train.cli import add_train_parser, main as cli_main

# ------------------------------------------------------------------------------------------------
# stand-ins: a frozen random conv backbone, a 1x1 projection method, a tiny evaluation dataset
# ------------------------------------------------------------------------------------------------


class TinyConv(Backbone):
    """Frozen random 4×4/stride-4 conv + tanh: (B, 3, 32, 32) → (B, dim, 8, 8)."""

    def __init__(self, dim: int = 8, size: int = 32):
        super().__init__("tiny_test_conv", dim, 4, Canvas.resized(size), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        g = torch.Generator().manual_seed(1234)  # fixed weights whatever the global seed
        self.conv = nn.Conv2d(3, dim, 4, 4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(dim, generator=g) * 0.1)

    def grid(self, H, W):
        return H // 4, W // 4

    def _features(self, images):
        return torch.tanh(self.conv(self.normalize(images)))


@register_backbone("tiny_test_conv")
def _tiny_conv(*, weights=None, pretrained=True, dim: int = 8, size: int = 32):
    return TinyConv(dim, size)


@register_method("tiny_test_proj")
class TinyProj(Method):
    """ρ = 1×1 conv on the frozen backbone. Loss: expected cost of matching each source cell to its
    mirror cell in the horizontally flipped source, plus 0.1 × the same for the target image. Noise of
    scale ``noise`` is added per item from ``batch["item_seeds"]`` (independent of the world size) and,
    with ``gen_noise``, from ``batch["generator"]`` (per rank)."""

    def __init__(self, backbone, proj_dim: int = 6, tau: float = 0.2, noise: float = 0.05, gen_noise: float = 0.0):
        super().__init__(backbone)
        self.proj = nn.Conv2d(backbone.dim, proj_dim, 1)
        self.dim, self.tau, self.noise, self.gen_noise = proj_dim, tau, noise, gen_noise
        self.seen_generators = []

    def descriptor(self, images):
        return self.proj(self.backbone(images))

    def _flip_cost(self, images):
        f = self.descriptor(images)
        g = self.descriptor(images.flip(-1))
        B, C, h, w = f.shape
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        target = torch.stack(((w - 1 - xs).flatten(), ys.flatten()), -1).float().expand(B, -1, -1).to(f.device)
        return ops.expected_cost(f.flatten(2).transpose(1, 2), g.flatten(2).transpose(1, 2), self.tau,
                                 target.contiguous(), (h, w)).mean()

    def training_step(self, batch, step):
        assert isinstance(batch["generator"], torch.Generator)
        self.seen_generators.append(batch["generator"].initial_seed())
        src, trg = batch["src"], batch["trg"]
        noise = torch.stack([torch.randn(src.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                             for s in batch["item_seeds"]])
        if self.gen_noise:
            noise = noise + self.gen_noise / self.noise * torch.randn(src.shape, generator=batch["generator"])
        src = (src + self.noise * noise).clamp(0, 1)
        main, aux = self._flip_cost(src), self._flip_cost(trg)
        return {"loss": main + 0.1 * aux, "flip_cost": main.detach()}


@register_method("tiny_test_fitted")
class TinyFitted(Method):
    """No trainable parameters: centres the backbone features by a mean fitted on the first batch a
    rank sees (so ranks would disagree without the trainer's broadcast)."""

    def __init__(self, backbone):
        super().__init__(backbone)
        self.register_buffer("mean", torch.zeros(backbone.dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def descriptor(self, images):
        return self.backbone(images) - self.mean[:, None, None]

    def training_step(self, batch, step):
        if not bool(self.fitted):
            self.mean.copy_(self.backbone(batch["src"]).mean((0, 2, 3)))
            self.fitted.fill_(True)
        return {"loss": torch.zeros(()), "fitted": self.fitted.float()}


class MirrorPairs(PairDataset):
    """Evaluation stand-in: a shipped photo and its mirror image, 9 keypoints mirrored."""

    @classmethod
    def default_canvas(cls):
        return Canvas.identity()

    def __init__(self, n_pairs: int = 3, canvas=None):
        super().__init__(canvas)
        self.photos = ShippedPhotos(n_pairs, 32, seed=99)
        self.categories = ["mirror"]

    def __len__(self):
        return len(self.photos)

    def __getitem__(self, i):
        img = self.photos.image(i)
        xy = torch.tensor([[x, y] for y in (6.0, 15.0, 26.0) for x in (5.0, 16.0, 27.0)])
        trg = torch.stack((31 - xy[:, 0], xy[:, 1]), -1)
        return Pair(img, img.flip(-1), xy, trg, torch.ones(9, dtype=torch.bool), 32.0, "mirror", f"m{i}",
                    f"m{i}", f"m{i}f")


if "tiny_test_mirror" not in _DATASETS:
    register_dataset("tiny_test_mirror")(MirrorPairs)


CONFIG = """
method = "tiny_test_proj"
backbone = "tiny_test_conv"
[backbone_args]
pretrained = false
[method_args]
proj_dim = 6
tau = 0.2
[data]
source = "photos"
n_images = 8
[optim]
name = "adamw"
lr = 0.05
weight_decay = 1e-3
schedule = "onecycle"
[train]
steps = 6
batch_size = 4
seed = 3
log_every = 1
ckpt_every = 3
progress = false
[eval]
every = 0
at_end = false
dataset = "tiny_test_mirror"
n_pairs = 3
matcher = "argmax"
"""


def _write_config(tmp_path, text=CONFIG, name="cfg.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _losses(out_dir, keys=("loss", "flip_cost")):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(ln) for ln in f if ln.strip()]
    return [(r["step"],) + tuple(r[k] for k in keys) + (r["lr"],) for r in rows]


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------

def test_config_defaults_overrides_and_roundtrip(tmp_path):
    path = _write_config(tmp_path)
    cfg = load_config(path, ["train.steps=10", "method_args.tau=0.5", "data.root=/some/dir", "optim.betas=[0.8, 0.9]",
                             "method_args.grid.h=4", 'train.device="cpu"'])
    assert cfg.train.steps == 10 and cfg.method_args["tau"] == 0.5 and cfg.data.root == "/some/dir"
    assert cfg.optim.betas == (0.8, 0.9) and cfg.method_args["grid"] == {"h": 4} and cfg.train.device == "cpu"
    assert cfg.optim.eps == 1e-8 and cfg.eval.metric == "pck@0.1/image" and cfg.eval.seed == 4  # train.seed + 1
    assert cfg.train.out_dir == os.path.join("runs", "tiny_test_proj")
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert parse_override("a.b=x y") == ("a.b", "x y") and parse_override("k=true") == ("k", True)


@pytest.mark.parametrize("override, needle", [
    ("train.stepz=3", "train.stepz"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("train.steps=2.5", "train.steps must be an integer"),
    ("optim.name=sgd", "optim.name must be one of"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("data.source=folder", "data.root is required"),
    ("eval.dataset=warps;eval.seed=3", "eval.seed must differ"),
    ("data.image_size=[1, 2, 3]", "data.image_size"),
    ("bogus=1", "unknown top-level key"),
    ("train.steps.x=1", "train.steps is a value"),
    ("train.device=tpu", "train.device"),
])
def test_config_errors_name_the_key(tmp_path, override, needle):
    with pytest.raises(ConfigError, match="cfg.toml") as exc:
        load_config(_write_config(tmp_path), override.split(";"))
    assert needle in str(exc.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write_config(tmp_path, "method = ", "bad.toml"))
    with pytest.raises(ConfigError, match="missing required key 'backbone'"):
        load_config(_write_config(tmp_path, 'method = "x"', "m.toml"))
    with pytest.raises(ConfigError, match="command line names method 'other'"):
        load_config(_write_config(tmp_path), method="other")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.steps")


# ------------------------------------------------------------------------------------------------
# training images and the batch stream
# ------------------------------------------------------------------------------------------------

def test_shipped_photos_are_seeded_and_varied():
    a, b = ShippedPhotos(20, (24, 40), seed=0), ShippedPhotos(20, (24, 40), seed=1)
    x = torch.stack([a.image(i) for i in range(20)])
    assert x.shape == (20, 3, 24, 40) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x[5], ShippedPhotos(20, (24, 40), seed=0).image(5))   # same seed, same image
    assert not torch.equal(x[5], b.image(5))                                  # another seed, another crop
    assert not torch.equal(x[0], x[16])                                       # same photo, another crop
    assert len({round(float(v), 4) for v in x.mean((1, 2, 3))}) == 20         # all distinct
    with pytest.raises(ValueError, match="n_images"):
        ShippedPhotos(0, 32)
    with pytest.raises(ValueError, match="unknown photo"):
        ShippedPhotos(2, 32, photos=["lena"])


def test_batch_stream_shards_one_global_batch():
    src = ShippedPhotos(6, 16, seed=0)
    one = BatchStream(src, 4, seed=7)
    b = one[5]
    assert b["src"].shape == (4, 3, 16, 16) and (b["index"][:, 0] != b["index"][:, 1]).all()
    assert torch.equal(b["src"], one[5]["src"]) and not torch.equal(one[5]["index"], one[6]["index"])
    parts = [BatchStream(src, 4, seed=7, rank=r, world=2)[5] for r in range(2)]
    assert parts[0]["src"].shape[0] == 2
    assert torch.equal(torch.cat([p["src"] for p in parts]), b["src"])
    assert torch.equal(torch.cat([p["index"] for p in parts]), b["index"])
    with pytest.raises(ValueError, match="divisible by the world size"):
        BatchStream(src, 3, seed=0, rank=0, world=2)
    idx = torch.cat([one.global_indices(s) for s in range(200)])
    assert set(idx.flatten().tolist()) == set(range(6))
    workers = list(one.iterate(2, 4, num_workers=1))                  # DataLoader workers: same batches
    assert [s for s, _ in workers] == [2, 3] and torch.equal(workers[1][1]["trg"], one[3]["trg"])


def test_pair_source_visits_every_pair_once_per_epoch():
    from semcorr_fast.train import DatasetPairs

    stream = BatchStream(DatasetPairs(MirrorPairs(3)), 2, seed=0)
    order = torch.cat([stream.global_indices(s) for s in range(6)])       # 12 items = 4 epochs of 3 pairs
    assert all(sorted(order[e * 3:(e + 1) * 3].tolist()) == [0, 1, 2] for e in range(4))
    assert len({tuple(order[e * 3:(e + 1) * 3].tolist()) for e in range(4)}) > 1  # reshuffled per epoch
    b = BatchStream(DatasetPairs(MirrorPairs(3)), 2, seed=0, rank=1, world=2)[1]
    assert b["src"].shape == (1, 3, 32, 32) and b["src_kps"].shape == (1, 9, 2) and b["valid"].all()
    assert b["category"] == ["mirror"] and b["index"].tolist() == [order[3].item()]
    torch.testing.assert_close(b["trg_kps"][0, :, 0], 31 - b["src_kps"][0, :, 0])


def test_image_folder_and_training_size(tmp_path):
    from PIL import Image

    with pytest.raises(FileNotFoundError, match="directory not found"):
        ImageFolder(tmp_path / "missing", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        ImageFolder(tmp_path / "empty", 16)
    d = tmp_path / "imgs" / "sub"
    d.mkdir(parents=True)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(d / "b.png")
    Image.new("RGB", (10, 30), (0, 0, 255)).save(tmp_path / "imgs" / "a.jpg")
    (tmp_path / "imgs" / "notes.txt").write_text("x")
    pad = ImageFolder(tmp_path / "imgs", (16, 16), fit="pad")
    assert len(pad) == 2 and pad.files[0].endswith("a.jpg")
    red = pad.image(1)
    assert red.shape == (3, 16, 16) and red[0, 8, 8] > 0.9 and red[:, 0, 8].abs().max() == 0  # padded rows
    assert ImageFolder(tmp_path / "imgs", (16, 16), fit="crop").image(1)[0].min() > 0.9
    assert training_size(Canvas.resized(24, 32)) == (24, 32) and training_size(Canvas.pad_square(48)) == (48, 48)
    assert training_size(Canvas.max_side(40), [30, 40]) == (30, 40)
    with pytest.raises(ValueError, match="data.image_size"):
        training_size(Canvas.resized(24), 32)
    with pytest.raises(ValueError, match="data.image_size is required"):
        training_size(Canvas.identity())


# ------------------------------------------------------------------------------------------------
# the method registry and base class
# ------------------------------------------------------------------------------------------------

def test_method_registry_and_base():
    assert "tiny_test_proj" in list_methods()
    m = build_method("tiny_test_proj", TinyConv(), proj_dim=5)
    assert (m.name, m.dim, m.stride, m.canvas) == ("tiny_test_proj+tiny_test_conv", 5, 4, Canvas.resized(32))
    x = torch.rand(2, 3, 32, 32)
    assert m(x).shape == (2, 5, 8, 8) and torch.equal(m(x), m.descriptor(x))
    assert sorted(m.checkpoint_state()) == ["proj.bias", "proj.weight"]
    assert [p.shape for p in m.trainable_parameters()] == [m.proj.weight.shape, m.proj.bias.shape]
    m.train()
    assert m.training and not m.backbone.training  # a frozen backbone stays in eval mode
    with pytest.raises(TypeError, match=r"unknown method_args \['bogus'\]"):
        build_method("tiny_test_proj", TinyConv(), bogus=1)
    with pytest.raises(KeyError, match="unknown name 'nope'"):
        build_method("nope", TinyConv())
    with pytest.raises(KeyError, match="missing"):
        m.load_checkpoint_state({"proj.weight": m.proj.weight})


# ------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------

def test_training_is_deterministic_and_learns(tmp_path):
    cfg = _write_config(tmp_path)
    over = ["optim.schedule=constant", "method_args.gen_noise=0.02"]
    r1 = train(load_config(cfg, over), out_dir=str(tmp_path / "a"))
    r2 = train(load_config(cfg, over), out_dir=str(tmp_path / "b"))
    l1, l2 = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [r[0] for r in l1] == list(range(1, 7)) and l1 == l2          # bitwise-equal loss curves
    assert r1.method.seen_generators == r2.method.seen_generators
    assert len(set(r1.method.seen_generators)) == 6                      # a fresh generator seed per step
    assert l1[-1][1] < l1[0][1]                                          # the stand-in loss goes down
    l3 = train(load_config(cfg, over + ["train.seed=5", "train.steps=2"]), out_dir=str(tmp_path / "c"))
    assert _losses(tmp_path / "c")[0] != l1[0] and l3.step == 2
    ck = load_checkpoint(tmp_path / "a" / "last.pt")
    assert ck["step"] == 6 and sorted(ck["model"]) == ["proj.bias", "proj.weight"]
    assert not [f for f in os.listdir(tmp_path / "a") if f.endswith(".tmp")]
    torch.testing.assert_close(ck["model"]["proj.weight"], r1.method.proj.weight.detach(), rtol=0, atol=0)


def test_resume_gives_the_uninterrupted_loss_curve(tmp_path):
    cfg = _write_config(tmp_path)
    # log_every = 2 with a stop at step 3: the resumed run must carry the half-accumulated step-4 mean over
    over = ["method_args.gen_noise=0.02", "train.log_every=2"]
    full = train(load_config(cfg, over), out_dir=str(tmp_path / "full"))
    cut = train(load_config(cfg, over), out_dir=str(tmp_path / "cut"), stop_after=3)
    assert cut.step == 3 and load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 3
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:   # a line the interrupted run wrote after the checkpoint
        f.write(json.dumps({"step": 4, "loss": 123.0, "flip_cost": 0.0, "lr": 0.0}) + "\n")
    with pytest.raises(FileExistsError, match="--resume"):
        train(load_config(cfg, over), out_dir=str(tmp_path / "cut"))
    with pytest.raises(ConfigError, match="optim.lr"):
        train(load_config(cfg, over + ["optim.lr=0.01"]), out_dir=str(tmp_path / "cut"), resume=True)
    res = train(load_config(cfg, over), out_dir=str(tmp_path / "cut"), resume=True)
    assert res.step == 6
    assert [r[0] for r in _losses(tmp_path / "full")] == [2, 4, 6]
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")
    assert full.method.seen_generators[3:] == res.method.seen_generators
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k])


def test_evaluation_best_checkpoint_and_load_trained(tmp_path):
    cfg = _write_config(tmp_path)
    res = train(load_config(cfg, ["eval.every=2", "eval.at_end=true", "train.log_every=3"]),
                out_dir=str(tmp_path / "e"))
    rows = [json.loads(ln) for ln in open(tmp_path / "e" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 3, 4, 6]
    evals = [r for r in rows if "eval/pck@0.1/image" in r]
    assert [r["step"] for r in evals] == [2, 4, 6] and "loss" not in rows[0] and "loss" in rows[1]
    vals = [r["eval/pck@0.1/image"] for r in evals]
    assert all(0 <= v <= 1 for v in vals) and res.best["value"] == max(vals)
    best = load_checkpoint(tmp_path / "e" / "best.pt")
    assert best["step"] == res.best["step"] == [r["step"] for r in evals if r["eval/pck@0.1/image"] == max(vals)][0]
    m = load_trained(tmp_path / "e" / "last.pt")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(m(x), res.method.eval()(x), rtol=0, atol=0)
    with pytest.raises(KeyError, match="eval.metric 'pck@0.1/nope'"):
        train(load_config(cfg, ["eval.every=1", "eval.metric=pck@0.1/nope"]), out_dir=str(tmp_path / "f"))


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(__file__), "..", "semcorr_fast", "data",
                                                    "warps.py")), reason="semcorr_fast.data.warps not written yet")
def test_default_eval_on_warps(tmp_path):
    pytest.importorskip("semcorr_fast.data.warps")
    res = train(load_config(_write_config(tmp_path), ["train.steps=2", "eval.every=2", "eval.dataset=warps",
                                                       "eval.n_pairs=2", "eval.matcher=argmax"]),
                out_dir=str(tmp_path / "w"))
    assert 0 <= res.last_eval["pck@0.1/image"] <= 1 and os.path.exists(tmp_path / "w" / "best.pt")


def test_method_without_trainable_parameters(tmp_path):
    res = train(load_config(_write_config(tmp_path), ["method=tiny_test_fitted", "method_args={}", "train.steps=2",
                                                       "eval.every=2"]), out_dir=str(tmp_path / "fx"))
    rows = [json.loads(ln) for ln in open(tmp_path / "fx" / "metrics.jsonl")]
    assert [r["fitted"] for r in rows] == [1.0, 1.0] and rows[0]["lr"] is None and "eval/pck@0.1/image" in rows[1]
    ck = load_checkpoint(tmp_path / "fx" / "last.pt")
    assert sorted(ck["model"]) == ["fitted", "mean"] and ck["optimizer"] is None
    assert torch.equal(ck["model"]["mean"], res.method.mean) and bool(ck["model"]["fitted"])


def test_cli_train(tmp_path, capsys):
    import argparse

    cfg = _write_config(tmp_path)
    sub = argparse.ArgumentParser().add_subparsers()
    assert add_train_parser(sub).parse_args(["tiny_test_proj", "--config", cfg, "--set", "a=1", "--set", "b=2",
                                             "--resume"]).overrides == ["a=1", "b=2"]
    out = str(tmp_path / "cli")
    assert cli_main(["train", "tiny_test_proj", "--config", cfg, "--set", "train.steps=2", "--out", out]) == 0
    assert "to step 2" in capsys.readouterr().out and os.path.exists(os.path.join(out, "last.pt"))
    assert cli_main(["train", "tiny_test_proj", "--config", cfg, "--set", "train.steps=2", "--out", out]) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli_main(["train", "tiny_test_proj", "--config", cfg, "--set", "train.steps=3", "--set",
                     "optim.schedule=constant", "--out", str(tmp_path / "c2"), "--resume"]) == 0
    assert cli_main(["train", "other", "--config", cfg]) == 2
    assert "command line names method 'other'" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_rank(tmp_path):
    cfg = _write_config(tmp_path)
    one = str(tmp_path / "one")
    train(load_config(cfg), out_dir=one)
    two = str(tmp_path / "two")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.abspath(__file__), cfg, two], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = _losses(one), _losses(two)
    assert [x[0] for x in b] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor([x[1:] for x in b], dtype=torch.float64),
                               torch.tensor([x[1:] for x in a], dtype=torch.float64), rtol=1e-5, atol=1e-7)
    m0, m1 = (torch.load(os.path.join(two, "fitted", f"mean{r}.pt")) for r in range(2))
    assert torch.equal(m0, m1) and m0.abs().sum() > 0  # rank 0's fitted state reached rank 1
    ck1, ck2 = load_checkpoint(os.path.join(one, "last.pt")), load_checkpoint(os.path.join(two, "last.pt"))
    assert ck2["world_size"] == 2 and len(ck2["rng"]) == 2
    torch.testing.assert_close(ck2["model"]["proj.weight"], ck1["model"]["proj.weight"], rtol=1e-5, atol=1e-6)


if __name__ == "__main__":  # torchrun entry: python tests/test_train.py CONFIG OUT_DIR
    import torch.distributed as dist

    dist.init_process_group("gloo")  # one group for both runs below (train() keeps a group it did not create)
    train(load_config(sys.argv[1]), out_dir=sys.argv[2])
    fit = train(load_config(sys.argv[1], ["train.steps=2", "method=tiny_test_fitted", "method_args={}"]),
                out_dir=os.path.join(sys.argv[2], "fitted")).method
    torch.save(fit.mean, os.path.join(sys.argv[2], "fitted", f"mean{dist.get_rank()}.pt"))
    dist.destroy_process_group()
