"""The training loop shared by every method: seeded data, optimiser, schedule, checkpoints, evaluation, DDP.

``train(config, resume=False)`` runs one config (:mod:`semcorr_fast.train.config`) to ``train.steps``:

* **Determinism.** Python/numpy/torch RNGs are seeded from ``train.seed`` (the model is built under
  ``seed``; the training stream of rank r under ``derive_seed(seed, 2, r)``). A step's batch depends only
  on ``(seed, step)`` (:class:`~semcorr_fast.train.data.BatchStream`), its ``batch["generator"]`` is a
  CPU generator seeded by ``(seed, step, rank)``. On CPU the same config gives bitwise-equal losses.
* **Checkpoints.** ``out_dir/last.pt`` every ``train.ckpt_every`` steps and at the end: the method's
  :meth:`~semcorr_fast.methods.Method.checkpoint_state`, optimiser, scheduler, step, every rank's RNG
  states, the best metric so far, the config; written to ``last.pt.tmp`` then renamed. ``resume=True``
  continues from it (the loss curve equals an uninterrupted run's; metrics.jsonl lines past the
  checkpoint's step are dropped). Without ``resume`` an existing ``last.pt`` is an error.
* **Evaluation** every ``eval.every`` steps (and at the end with ``eval.at_end``) through
  :func:`semcorr_fast.evaluate.evaluate` on ``eval.dataset`` (default: the synthetic ``warps`` pairs with
  a held-out seed). ``best.pt`` (same format as last.pt) is kept by ``eval.metric`` / ``eval.mode``.
  Evaluation runs with the RNG states saved and restored, so it never changes the training stream.
* **Logging.** Rank 0 appends one JSON object per log line to ``out_dir/metrics.jsonl``: ``step``,
  the mean of every loss entry over the steps since the last line (averaged over ranks), ``lr`` (of the
  first param group, used by this step), ``time`` (seconds of training, summed over resumes) and, on
  evaluation steps, ``eval/<key>`` for every overall number and ``eval/seconds``. tqdm shows progress.
* **DDP.** Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised (gloo on CPU, nccl
  on CUDA), each rank takes ``batch_size / world`` items of the global batch, the method's training
  step is wrapped in :class:`torch.nn.parallel.DistributedDataParallel` (when it has trainable
  parameters; the frozen backbone is excluded from DDP's synchronisation), only rank 0 writes files.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .config import ConfigError, TrainConfig, metric_alpha
from .data import BatchStream, DatasetPairs, ImageFolder, ShippedPhotos, derive_seed, training_size

__all__ = ["train", "TrainResult", "build_backbone", "build_source", "build_eval_dataset", "load_checkpoint",
           "load_trained", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "semcorr_fast.train/1"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}

#: config keys that must not change when resuming (the schedule's length only matters for onecycle).
_RESUME_FIXED = ("method", "backbone", "backbone_args", "method_args", "data", "optim", "train.seed",
                 "train.batch_size")


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; ``logs`` only on rank 0)."""

    out_dir: str
    step: int
    logs: list = field(default_factory=list)
    best: dict | None = None
    last_eval: dict | None = None
    method: nn.Module | None = None


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------

def build_backbone(config: TrainConfig, device):
    """``create_backbone(config.backbone, device=device, **config.backbone_args)``; ``backbone_args.dtype``
    may be a string (``"bfloat16"``, ``"float16"``, ``"float32"``)."""
    from ..backbones import create_backbone

    args = dict(config.backbone_args)
    if "device" in args:
        raise ConfigError(f"{config.source}: backbone_args.device is not allowed; use train.device")
    if "dtype" in args:
        if args["dtype"] not in _DTYPES:
            raise ConfigError(f"{config.source}: backbone_args.dtype must be one of {sorted(_DTYPES)}, got {args['dtype']!r}")
        args["dtype"] = _DTYPES[args["dtype"]]
    try:
        return create_backbone(config.backbone, device=device, **args)
    except TypeError as exc:
        raise ConfigError(f"{config.source}: backbone_args: {exc}") from None
    except KeyError as exc:
        raise ConfigError(f"{config.source}: backbone: {exc.args[0] if exc.args else exc}") from None


def _build_method(config: TrainConfig, backbone):
    from ..methods import build_method

    try:
        return build_method(config.method, backbone, **config.method_args)
    except KeyError as exc:
        raise ConfigError(f"{config.source}: method: {exc.args[0] if exc.args else exc}") from None
    except TypeError as exc:
        if "method_args" in str(exc):
            raise ConfigError(f"{config.source}: {exc}") from None
        raise


def _dataset_class(name: str):
    """The registered class of an evaluation dataset (None if unknown; build_dataset then raises)."""
    from ..data import list_datasets
    from ..data.base import _REGISTRY

    list_datasets()  # imports every loader module
    return _REGISTRY.get(name)


def _accepts(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build_source(config: TrainConfig, canvas, backbone=None):
    """The training source of ``config.data`` for a backbone ``canvas`` (see :mod:`.data`).

    ``source = "features"``: the dataset's pairs with their (original and flipped) features read from the
    feature cache ``data.cache`` (filled from ``backbone`` where missing; GeoAware-SC trains this way).
    """
    d = config.data
    if d.source in ("pairs", "features"):
        from ..data import build_dataset

        kw = {k: d[k] for k in ("root", "split", "pairs", "n_pairs") if d[k] is not None}
        cls = _dataset_class(d.dataset)
        if cls is not None and _accepts(cls.__init__, "canvas"):
            kw["canvas"] = canvas
        ds = build_dataset(d.dataset, **kw)
        if d.source == "pairs":
            return DatasetPairs(ds)
        if backbone is None:
            raise ValueError("build_source: data.source = 'features' needs the backbone (to fill the cache)")
        from ..methods.feature_pairs import build_feature_source
        index = os.path.join(d.cache, f"index-{d.dataset}-{d.split or 'default'}.json")
        return build_feature_source(ds, backbone, d.cache, index_path=index, progress=config.train.progress)
    size = training_size(canvas, d.image_size)
    resample = getattr(canvas, "resample", "bilinear")
    resample = resample if resample in ("bilinear", "bicubic", "lanczos", "nearest") else "bilinear"
    if d.source == "photos":
        return ShippedPhotos(d.n_images, size, seed=config.train.seed, resample=resample)
    fit = d.fit
    if fit == "auto":
        fit = "pad" if getattr(canvas, "kind", "") == "pad_square" else "resize"
    return ImageFolder(d.root, size, fit=fit, resample=resample)


def build_eval_dataset(config: TrainConfig):
    """The evaluation dataset of ``config.eval`` (``warps``: ``n_pairs`` synthetic pairs, ``eval.seed``)."""
    from ..data import build_dataset

    e = config.eval
    if e.dataset == "warps":
        return build_dataset("warps", n_pairs=e.n_pairs or 50, seed=e.seed)
    kw = {k: e[k] for k in ("root", "split", "pairs") if e[k] is not None}
    cls = _dataset_class(e.dataset)
    if e.n_pairs is not None and cls is not None and _accepts(cls.__init__, "n_pairs"):
        kw["n_pairs"] = e.n_pairs
    return build_dataset(e.dataset, **kw)


def _eval_limit(config: TrainConfig, ds) -> int | None:
    e = config.eval
    limit = e.limit
    if e.dataset != "warps" and e.n_pairs is not None:
        cls = _dataset_class(e.dataset)
        if cls is not None and not _accepts(cls.__init__, "n_pairs"):
            limit = e.n_pairs if limit is None else min(limit, e.n_pairs)
    return limit


def _make_stream(config, method, backbone, source, rank, world, device):
    """The batch stream: independent random images, or curated pairs (``data.curation = "knn"``)."""
    t = config.train
    if config.data.curation == "none":
        return BatchStream(source, t.batch_size, t.seed, rank, world)
    from ..curation import DEFAULT_SCHEDULE, CuratedBatchStream, curate_pairs, extract_class_tokens

    schedule = getattr(method, "pair_schedule", DEFAULT_SCHEDULE)
    k_max = min(max(k for _, k in schedule), max(1, len(source) - 1))
    # same on every rank (same seeded source)
    tokens = extract_class_tokens(backbone, source, device=device, progress=rank == 0)
    _, neighbours = curate_pairs(tokens, k_max, exclude_self=True)
    return CuratedBatchStream(source, t.batch_size, t.seed, neighbours, schedule, rank=rank, world=world)


def _make_optimizer(config: TrainConfig, params):
    o = config.optim
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    opt = (torch.optim.Adam if o.name == "adam" else torch.optim.AdamW)(params, **kw)
    sched = None
    if o.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=o.lr, total_steps=config.train.steps, pct_start=o.pct_start,
            anneal_strategy=o.anneal_strategy, cycle_momentum=o.cycle_momentum, div_factor=o.div_factor,
            final_div_factor=o.final_div_factor)
    return opt, sched


def _resolve_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = f"cuda:{local_rank}"
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device = {spec!r} but CUDA is not available")
        torch.cuda.set_device(dev)
    return dev


# ----------------------------------------------------------------------------------------------
# RNG states (plain Python/torch objects, so checkpoints load with weights_only=True)
# ----------------------------------------------------------------------------------------------

def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    st = {"python": random.getstate(), "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                                                  int(pos), int(has_gauss), float(gauss)],
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    v, internal, gauss = st["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, g = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, g))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------

def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a training checkpoint (``last.pt`` / ``best.pt``) as a dict; errors name the path."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (expected a semcorr_fast training checkpoint, last.pt or best.pt)")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable training checkpoint ({exc})") from exc
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a semcorr_fast training checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    return ck


def load_trained(path: str | os.PathLike, device="cpu"):
    """Rebuild the trained method of a checkpoint (backbone from its registry name and args, then the
    method's saved state) → a :class:`~semcorr_fast.methods.Method` in eval mode, usable with
    :func:`semcorr_fast.evaluate.evaluate`."""
    from .config import config_from_dict

    ck = load_checkpoint(path)
    cfg = config_from_dict(ck["config"], source=f"{os.fspath(path)} (stored config)")
    backbone = build_backbone(cfg, torch.device(device))
    method = _build_method(cfg, backbone).to(device)
    method.load_checkpoint_state(ck["model"])
    return method.eval()


def _config_diff(old: dict, new: dict, keys) -> list[str]:
    """``"key: checkpoint A vs now B"`` for every leaf under ``keys`` that differs between two config dicts."""
    def leaves(d, prefix):
        if isinstance(d, dict):
            out = {}
            for k, v in d.items():
                out.update(leaves(v, f"{prefix}.{k}"))
            return out
        return {prefix: d}

    def get(d, key):
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    out = []
    for k in keys:
        a, b = leaves(get(old, k), k), leaves(get(new, k), k)
        for leaf in sorted(set(a) | set(b)):
            if a.get(leaf) != b.get(leaf):
                out.append(f"{leaf}: checkpoint {a.get(leaf)!r} vs now {b.get(leaf)!r}")
    return out


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------

class _StepModule(nn.Module):
    """What DDP wraps: its forward is the method's training step (DDP's gradient hooks need its forward)."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, batch, step):
        return self.method.training_step(batch, step)


def _dist_setup(device_spec: str):
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    created = False
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        want_cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
        if want_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if want_cuda else "gloo")
        created = True
    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), created
    return None, 0, 1, 0, False


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _check_output(out, method) -> dict:
    if not isinstance(out, dict) or "loss" not in out:
        raise TypeError(f"{type(method).__name__}.training_step must return a dict with a 'loss' entry, got "
                        f"{type(out).__name__}{'' if not isinstance(out, dict) else ' with keys ' + str(sorted(out))}")
    for k, v in out.items():
        if not isinstance(v, torch.Tensor) or v.dim() != 0:
            raise TypeError(f"{type(method).__name__}.training_step: entry {k!r} must be a 0-dim tensor, got "
                            f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
    return out


def train(config: TrainConfig, *, resume: bool = False, out_dir: str | None = None,
          stop_after: int | None = None) -> TrainResult:
    """Train ``config.method`` on ``config.backbone`` as the config says (see the module docstring).

    Args:
        config: a validated :class:`~semcorr_fast.train.config.TrainConfig`.
        resume: continue from ``out_dir/last.pt`` (when there is none, start from step 0).
        out_dir: overrides ``train.out_dir``.
        stop_after: stop once this many steps are done in total, writing last.pt there (a run cut short
            that ``resume=True`` continues); ``None`` runs to ``train.steps``.
    Returns:
        :class:`TrainResult` (``logs``: the metrics.jsonl objects this call wrote, on rank 0).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train: config must be a TrainConfig (semcorr_fast.train.config.load_config), got "
                        f"{type(config).__name__}")
    t = config.train
    if out_dir is not None:
        t["out_dir"] = os.fspath(out_dir)
    out_dir = t.out_dir
    dist, rank, world, local, created = _dist_setup(t.device)
    try:
        return _train(config, dist, rank, world, local, out_dir, resume, stop_after)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _train(config, dist, rank, world, local, out_dir, resume, stop_after):
    from tqdm.auto import tqdm

    t, e = config.train, config.eval
    device = _resolve_device(t.device, local)
    if t.deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if t.batch_size % world:
        raise ConfigError(f"{config.source}: train.batch_size ({t.batch_size}) must be divisible by the world "
                          f"size ({world})")
    last_path, best_path = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "best.pt")
    log_path = os.path.join(out_dir, "metrics.jsonl")
    ck = None
    if os.path.exists(last_path):
        if not resume:
            raise FileExistsError(f"{last_path} exists: pass --resume to continue that run, or choose another "
                                  f"--out directory")
        ck = load_checkpoint(last_path)
        fixed = list(_RESUME_FIXED) + (["train.steps"] if config.optim.schedule == "onecycle" else [])
        diff = _config_diff(ck["config"], config.to_dict(), fixed)
        if diff:
            raise ConfigError(f"{config.source}: cannot resume {last_path} with a different config: " + "; ".join(diff))
    elif resume and rank == 0:
        print(f"semcorr train: no {last_path} yet, starting from step 0")

    # model, under the run's seed (identical on every rank). Resolving the method first imports its
    # module, which may register backbones of its own (e.g. Demystifying's "smallcnn").
    from ..methods import get_method_class
    try:
        get_method_class(config.method)
    except KeyError as exc:
        raise ConfigError(f"{config.source}: method: {exc.args[0] if exc.args else exc}") from None
    _seed_all(t.seed)
    backbone = build_backbone(config, device)
    method = _build_method(config, backbone).to(device)
    source = build_source(config, backbone.canvas, backbone)
    stream = _make_stream(config, method, backbone, source, rank, world, device)
    params = method.trainable_parameters()
    has_params = any(p.requires_grad for g in params for p in (g["params"] if isinstance(g, dict) else [g]))
    # a method without trainable parameters (a fixed or fitted projection) still runs its training steps
    # (e.g. to fit itself on training images); it gets no optimiser, no DDP wrapper, and under DDP its
    # state is broadcast from rank 0 after every step so that every rank evaluates the same model
    opt, sched = _make_optimizer(config, params) if has_params else (None, None)
    eval_ds = build_eval_dataset(config) if (e.every or e.at_end or e.at_start) else None

    start, best, elapsed, sums0, n_acc0 = 0, None, 0.0, {}, 0
    _seed_all(derive_seed(t.seed, 2, rank))
    if ck is not None:
        method.load_checkpoint_state({k: v.to(device) for k, v in ck["model"].items()})
        if opt is not None:
            opt.load_state_dict(ck["optimizer"])
        if sched is not None:
            sched.load_state_dict(ck["scheduler"])
        start, best, elapsed = int(ck["step"]), ck.get("best"), float(ck.get("elapsed", 0.0))
        rngs = ck["rng"]
        if len(rngs) == world:
            _set_rng_state(rngs[rank])
            pending = rngs[rank].get("pending") or {}
            sums0 = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in pending.get("sums", {}).items()}
            n_acc0 = int(pending.get("n", 0))
        else:
            warnings.warn(f"{last_path} was written by {len(rngs)} rank(s), resuming on {world}: the global RNG "
                          f"streams are re-seeded (batches are unaffected)")
            _seed_all(derive_seed(t.seed, 5, start, rank))
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        if ck is not None and os.path.exists(log_path):
            with open(log_path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= start]
            with open(log_path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(log_path + ".tmp", log_path)
        elif ck is None and os.path.exists(log_path):
            os.remove(log_path)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=1)

    runner = None
    if world > 1 and has_params:
        frozen = [n for n, p in method.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in method.named_buffers() if n.startswith(method._frozen_prefixes())] \
            if hasattr(method, "_frozen_prefixes") else []
        step_module = _StepModule(method)
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            step_module, [f"method.{n}" for n in frozen])
        runner = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=t.find_unused_parameters)

    stop = t.steps if stop_after is None else min(t.steps, int(stop_after))
    logs, last_eval = [], None
    # per-rank sums of the loss entries since the last log line (kept in checkpoints, so that a resumed
    # run logs the same means as an uninterrupted one)
    sums: dict[str, torch.Tensor] = sums0
    n_acc = n_acc0
    bar = tqdm(total=t.steps, initial=start, disable=(not t.progress) or rank != 0, desc=f"train {config.method}",
               dynamic_ncols=True)
    if eval_ds is not None and e.at_start and start == 0:  # the untrained model's numbers, logged as step 0
        first = {"step": 0, **{f"eval/{k}": v for k, v in _evaluate(config, method, eval_ds, device).items()}}
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(first) + "\n")
        logs.append(first)
    t0 = time.perf_counter()
    method.train()
    for step, batch in stream.iterate(start, stop, num_workers=config.data.num_workers):
        batch = _to_device(batch, device)
        g0 = (rank * stream.local)
        batch["item_seeds"] = torch.tensor([derive_seed(t.seed, 4, step, g0 + i) for i in range(stream.local)],
                                           dtype=torch.int64, device=device)
        batch["generator"] = torch.Generator().manual_seed(derive_seed(t.seed, 3, step, rank))
        lr_used = float(opt.param_groups[0]["lr"]) if opt is not None else None
        out = _check_output(runner(batch, step) if runner is not None else method.training_step(batch, step), method)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            loss = out["loss"]
            if not loss.requires_grad:
                raise RuntimeError(f"{config.method}: the loss of step {step} does not require grad, but the method "
                                   f"has trainable parameters")
            loss.backward()
            if config.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in method.parameters() if p.requires_grad],
                                               config.optim.grad_clip)
            opt.step()
            if sched is not None:
                sched.step()
        elif dist is not None:
            _broadcast_state(method, dist)
        for k, v in out.items():
            v = v.detach().float()
            sums[k] = sums[k] + v if k in sums else v.clone()
        n_acc += 1
        done = step + 1
        bar.update(1)

        entry = None
        if done % t.log_every == 0 or done == t.steps:
            keys = sorted(sums)
            vec = torch.stack([sums[k] for k in keys]).to(torch.float64) / n_acc
            if dist is not None:
                kk = [None] * world
                dist.all_gather_object(kk, keys)
                if any(x != keys for x in kk):
                    raise RuntimeError(f"{config.method}: ranks returned different loss entries {kk}")
                vec = vec.to(device)
                dist.all_reduce(vec)
                vec = vec / world
            vals = vec.cpu().tolist()
            bad = [k for k, v in zip(keys, vals) if not math.isfinite(v)]
            if bad:
                raise FloatingPointError(f"{config.method}: non-finite loss {bad} between steps {done - n_acc + 1} "
                                         f"and {done} ({dict(zip(keys, vals))})")
            entry = {"step": done, **dict(zip(keys, vals)), "lr": lr_used,
                     "time": elapsed + time.perf_counter() - t0}
            sums, n_acc = {}, 0
            bar.set_postfix(loss=f"{entry['loss']:.4g}")

        if eval_ds is not None and ((e.every and done % e.every == 0) or (e.at_end and done == t.steps)):
            last_eval = _evaluate(config, method, eval_ds, device)
            value = last_eval.get(e.metric)
            if value is None:
                raise KeyError(f"{config.source}: eval.metric {e.metric!r} is not in the evaluation summary; "
                               f"available: {sorted(last_eval)}")
            if not math.isfinite(value):
                better = False
            elif best is None:
                better = True
            else:
                better = value > best["value"] if e.mode == "max" else value < best["value"]
            if entry is None:
                entry = {"step": done, "lr": lr_used, "time": elapsed + time.perf_counter() - t0}
            entry.update({f"eval/{k}": v for k, v in last_eval.items()})
            if better:
                best = {"metric": e.metric, "value": float(value), "step": done}
                ckpt = _checkpoint(config, method, opt, sched, done, best, elapsed + time.perf_counter() - t0,
                                   dist, world)
                if rank == 0:
                    _atomic_save(ckpt, best_path)
            method.train()

        if entry is not None and rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            logs.append(entry)

        if done % t.ckpt_every == 0 or done == stop:
            ckpt = _checkpoint(config, method, opt, sched, done, best, elapsed + time.perf_counter() - t0, dist, world,
                               pending={"sums": {k: float(v) for k, v in sums.items()}, "n": n_acc})
            if rank == 0:
                _atomic_save(ckpt, last_path)
    bar.close()
    if dist is not None:
        dist.barrier()
    return TrainResult(out_dir, max(stop, start), logs, best, last_eval, method)


def _broadcast_state(method, dist) -> None:
    """Copy rank 0's non-backbone state (parameters and buffers of :meth:`checkpoint_state`) to every rank."""
    sd = method.state_dict(keep_vars=True)
    with torch.no_grad():
        for k in method.checkpoint_state():
            t = sd[k]
            dist.broadcast(t.data if isinstance(t, nn.Parameter) else t, src=0)


def _checkpoint(config, method, opt, sched, step, best, elapsed, dist, world, pending=None) -> dict:
    rng = _rng_state()
    rng["pending"] = pending
    if dist is not None:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    return {"format": CHECKPOINT_FORMAT, "step": int(step), "config": config.to_dict(),
            "method": config.method, "backbone": config.backbone,
            "model": {k: v.detach().cpu() for k, v in method.checkpoint_state().items()},
            "optimizer": opt.state_dict() if opt is not None else None, "scheduler": sched.state_dict() if sched is not None else None,
            "rng": rngs, "best": best, "elapsed": float(elapsed), "world_size": world,
            "torch_version": str(torch.__version__)}


def _evaluate(config, method, ds, device) -> dict:
    """Overall evaluation numbers of ``method`` on ``ds`` (RNG states saved and restored around it)."""
    from .. import evaluate as ev

    e = config.eval
    alphas = list(ev.alphas_for(getattr(ds, "name", "")))
    a = metric_alpha(e.metric)
    if a is not None and a not in alphas:
        alphas.append(a)
    state = _rng_state()
    method.eval()
    try:
        res = ev.evaluate(ds, method, e.matcher, pose=e.pose, device=device, limit=_eval_limit(config, ds),
                          alphas=tuple(sorted(alphas)), progress=False)
    finally:
        _set_rng_state(state)
    out = {k: float(v) for k, v in res.summary.get("overall", {}).items() if isinstance(v, (int, float))}
    out["seconds"] = float(res.seconds)
    return out
