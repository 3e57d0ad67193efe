"""Automatic pair curation (Universal correspondences, Sec. 3.4): nearest neighbours of class tokens.

The paper trains on pairs (I, J) where J is drawn uniformly from the k nearest neighbours of I under
the ViT class token, with a curriculum on k: **5 for the first 10k iterations, 100 until 30k, 500
afterwards** (its Table 5: every fixed k is worse than the frozen DINO baseline; only the curriculum
beats it). Since the top-5 and top-100 lists are prefixes of the top-500 list, one top-K graph
(K = the schedule's largest k) computed once serves the whole run.

* :func:`curate_pairs` — the top-k graph, streamed through :func:`semcorr_fast.ops.topk_retrieval`
  (no N×N matrix: the database is read in ``chunk_size`` rows, queries in ``query_chunk`` blocks).
* :func:`neighbours_at` — the curriculum's k at a step.
* :class:`PairSampler` — training pairs (i, j) per step, a pure function of ``(seed, step)``.
* :class:`CuratedBatchStream` — :class:`semcorr_fast.train.data.BatchStream` with curated pairs.
* :func:`extract_class_tokens` — the class tokens of a training source (through the Universal
  method's :func:`~semcorr_fast.methods.universal.backbone_outputs`).
* :func:`curation_scaling` — timing of the retrieval vs database size (for ``bench/``).

Where the paper is silent (options name the alternatives; defaults first):

1. Similarity: cosine (``normalize=True``, DINO practice) or raw dot product (``normalize=False``).
2. Self-pairs: I itself is excluded (``exclude_self=True``); exact or near duplicates of I (other
   indices) are *not* filtered, the paper mentions no de-duplication.
3. Direction: J ∈ kNN(I) (directed graph); the anchor I is uniform over the dataset.
4. One top-K graph reused by prefix (exactly what recomputing top-k would give: the lists are sorted,
   ties → lowest index).
5. Steps: the schedule counts optimisation steps from 0; ``neighbours_at(10000) == 100`` (the k=100
   phase starts *at* step 10000) and ``neighbours_at(30000) == 500``.
6. Which class token: ``cls_source`` of :func:`~semcorr_fast.methods.universal.backbone_outputs`
   (default: the class row of the backbone's facet at its block; the final-layer class token of the
   paper's "cls token" needs blocks the descriptor backbone does not run).
7. When a dataset has fewer than k + 1 images, the available neighbours are used (the graph's tail
   holds −1 and is never sampled).
"""
from __future__ import annotations

import time
from numbers import Integral
from typing import Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from . import ops
from .train.data import BatchStream, derive_seed

Tensor = torch.Tensor

__all__ = ["DEFAULT_SCHEDULE", "curate_pairs", "neighbours_at", "check_schedule", "PairSampler",
           "CuratedBatchStream", "extract_class_tokens", "curation_scaling"]

#: the paper's curriculum: (first step, k).
DEFAULT_SCHEDULE = ((0, 5), (10000, 100), (30000, 500))


def _pos_int(v, name: str, fn: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, Integral) or v < minimum:
        raise ValueError(f"{fn}: {name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def check_schedule(schedule, fn: str = "check_schedule") -> tuple[tuple[int, int], ...]:
    """Validate a curriculum: a non-empty sequence of ``(first_step, k)`` with first_step starting at 0
    and strictly increasing, k ≥ 1. Returns it as a tuple of int pairs."""
    try:
        sched = tuple((s, k) for s, k in schedule)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: schedule must be a sequence of (first_step, k) pairs, got {schedule!r}") from None
    for s, k in sched:
        if isinstance(s, bool) or isinstance(k, bool) or not isinstance(s, Integral) or not isinstance(k, Integral):
            raise ValueError(f"{fn}: schedule entries must be (int, int), got {(s, k)!r}")
    if not sched or sched[0][0] != 0:
        raise ValueError(f"{fn}: schedule must be non-empty and start at step 0, got {schedule!r}")
    if any(b[0] <= a[0] for a, b in zip(sched, sched[1:])):
        raise ValueError(f"{fn}: schedule steps must increase strictly, got {schedule!r}")
    if any(k < 1 for _, k in sched):
        raise ValueError(f"{fn}: schedule k values must be >= 1, got {schedule!r}")
    return tuple((int(s), int(k)) for s, k in sched)


def neighbours_at(step: int, schedule: Sequence = DEFAULT_SCHEDULE) -> int:
    """The number of nearest neighbours J is drawn from at ``step`` (0-based optimisation step).

    >>> [neighbours_at(s) for s in (0, 9999, 10000, 29999, 30000)]
    [5, 5, 100, 100, 500]
    """
    fn = "neighbours_at"
    step = _pos_int(step, "step", fn, 0)
    sched = check_schedule(schedule, fn)
    k = sched[0][1]
    for s, kk in sched:
        if step >= s:
            k = kk
        else:
            break
    return k


def curate_pairs(class_tokens: Tensor, k: int, *, exclude_self: bool = True, chunk_size: int = 65536,
                 query_chunk: Optional[int] = None, normalize: bool = True, device=None,
                 index_dtype: torch.dtype = torch.int64, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The k nearest neighbours of every image under its class token (the curation graph).

    Streams the database through :func:`semcorr_fast.ops.topk_retrieval` (memory O(chunk·C + q·k) per
    query block; no N×N matrix). The tokens may stay on the CPU while ``device`` is a GPU.

    Args:
        class_tokens: ``(N, C)`` floating (fp32/fp16/bf16/fp64), one global descriptor per image.
        k: neighbours per image (the schedule's largest k, e.g. 500).
        exclude_self: never return i as a neighbour of i.
        chunk_size: database rows per streamed chunk.
        query_chunk: queries per block (default: all when N ≤ 65536, else 65536).
        normalize: cosine similarity (default) or raw dot product.
        device: compute device (default: the tokens' device).
        index_dtype: ``torch.int64`` (default) or ``torch.int32`` (halves the 6M×500 graph to 12 GB).
    Returns:
        ``(values (N, k) float32, indices (N, k) index_dtype)`` on ``device``, per row sorted by
        decreasing similarity (ties → lowest index); −1 / −inf where fewer than k rows qualify.
    """
    fn = "curate_pairs"
    if not isinstance(class_tokens, torch.Tensor) or not class_tokens.dtype.is_floating_point:
        raise TypeError(f"{fn}: class_tokens must be a floating torch.Tensor of shape (N, C), got "
                        f"{getattr(class_tokens, 'dtype', type(class_tokens).__name__)}")
    if class_tokens.dim() != 2 or class_tokens.shape[1] < 1:
        raise ValueError(f"{fn}: class_tokens must have shape (N, C), got {tuple(class_tokens.shape)}")
    N = class_tokens.shape[0]
    if N < (2 if exclude_self else 1):
        raise ValueError(f"{fn}: class_tokens needs at least {2 if exclude_self else 1} rows, got {N}")
    k = _pos_int(k, "k", fn)
    chunk_size = _pos_int(chunk_size, "chunk_size", fn)
    qc = (N if N <= 65536 else 65536) if query_chunk is None else _pos_int(query_chunk, "query_chunk", fn)
    if index_dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}: index_dtype must be torch.int64 or torch.int32, got {index_dtype}")
    if not isinstance(exclude_self, bool):
        raise TypeError(f"{fn}: exclude_self must be a bool, got {exclude_self!r}")
    dev = torch.device(device) if device is not None else class_tokens.device
    vals, idxs = [], []
    for s in range(0, N, qc):
        q = class_tokens[s:s + qc].to(dev)
        if exclude_self:
            # topk_retrieval's exclude_self assumes query r is database row r: shift by the block start
            v, i = _block_retrieval(q, class_tokens, k, s, chunk_size, normalize, backend)
        else:
            v, i = ops.topk_retrieval(q, class_tokens, k, normalize=normalize, chunk_size=chunk_size, backend=backend)
        vals.append(v.float())
        idxs.append(i.to(index_dtype))
    return torch.cat(vals), torch.cat(idxs)


def _block_retrieval(q: Tensor, db: Tensor, k: int, start: int, chunk_size: int, normalize: bool,
                     backend: str) -> tuple[Tensor, Tensor]:
    """Top-k of query rows ``start..start+len(q)`` against ``db`` with row ``start + r`` excluded for query r."""
    v, i = ops.topk_retrieval(q, db, k + 1, normalize=normalize, chunk_size=chunk_size, backend=backend)
    rows = torch.arange(start, start + q.shape[0], device=i.device)[:, None]
    self_hit = i == rows
    # drop the self entry (at most one per row), keeping the order of the others: entry j moves to its
    # rank among the kept ones; the self entry (and a row's (k+1)-th when it has no self entry) goes to
    # slot k, which is cut off
    keep = ~self_hit
    pos = (keep.cumsum(1) - 1).masked_fill(self_hit, k).clamp_(max=k)
    vo = torch.full((v.shape[0], k + 1), -torch.inf, dtype=v.dtype, device=v.device).scatter_(1, pos, v)
    io = torch.full((i.shape[0], k + 1), -1, dtype=i.dtype, device=i.device).scatter_(1, pos, i)
    vo, io = vo[:, :k], io[:, :k]
    return vo, io.masked_fill(vo == -torch.inf, -1)


class PairSampler:
    """Seeded training pairs from a neighbour graph and a curriculum.

    ``pairs(step, batch_size)`` → ``(B, 2)`` int64 ``(i, j)``: i uniform over the N images, j uniform
    over the first ``neighbours_at(step)`` valid entries of ``neighbours[i]``. A pure function of
    ``(seed, step)`` (resuming needs no state).

    Args:
        neighbours: ``(N, K)`` integer graph from :func:`curate_pairs` (−1 = empty slot, at the tail).
        schedule: the curriculum (default :data:`DEFAULT_SCHEDULE`); K must be ≥ its largest k.
        seed: the run's seed.
    """

    def __init__(self, neighbours: Tensor, schedule: Sequence = DEFAULT_SCHEDULE, seed: int = 0):
        fn = "PairSampler"
        if not isinstance(neighbours, torch.Tensor) or neighbours.dtype not in (torch.int64, torch.int32) \
                or neighbours.dim() != 2:
            raise TypeError(f"{fn}: neighbours must be an int64/int32 tensor of shape (N, K), got "
                            f"{getattr(neighbours, 'shape', type(neighbours).__name__)} "
                            f"{getattr(neighbours, 'dtype', '')}")
        self.schedule = check_schedule(schedule, fn)
        N, K = neighbours.shape
        kmax = max(k for _, k in self.schedule)
        if K < kmax:
            raise ValueError(f"{fn}: neighbours has K = {K} columns but the schedule asks for k = {kmax}; "
                             f"compute curate_pairs(..., k={kmax})")
        nb = neighbours.detach().to("cpu", torch.int64)
        if bool(((nb < -1) | (nb >= N)).any()):
            raise ValueError(f"{fn}: neighbours must hold indices in [0, {N}) or -1")
        valid = nb >= 0
        if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
            raise ValueError(f"{fn}: empty slots (-1) must be at the tail of each row")
        if bool((~valid[:, 0]).any()):
            raise ValueError(f"{fn}: every image needs at least one neighbour (row {int((~valid[:, 0]).nonzero()[0])})")
        self.neighbours = nb
        self.counts = valid.sum(1)
        self.seed = _pos_int(seed, "seed", fn, 0)
        self.N = N

    def k_at(self, step: int) -> int:
        """The curriculum's k at ``step``."""
        return neighbours_at(step, self.schedule)

    def pairs(self, step: int, batch_size: int) -> Tensor:
        """``(batch_size, 2)`` int64 pairs (i, j) of ``step``."""
        fn = "PairSampler.pairs"
        step = _pos_int(step, "step", fn, 0)
        B = _pos_int(batch_size, "batch_size", fn)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, 2, step))
        i = torch.randint(0, self.N, (B,), generator=gen)
        avail = self.counts[i].clamp(max=self.k_at(step))
        r = torch.floor(torch.rand(B, generator=gen, dtype=torch.float64) * avail).long().clamp(max=avail - 1)
        j = self.neighbours[i, r]
        return torch.stack((i, j), 1)

    __call__ = pairs

    def iterate(self, start: int, stop: int, batch_size: int) -> Iterator[tuple[int, Tensor]]:
        """``(step, pairs)`` for ``start <= step < stop``."""
        for s in range(start, stop):
            yield s, self.pairs(s, batch_size)


class CuratedBatchStream(BatchStream):
    """A :class:`~semcorr_fast.train.data.BatchStream` whose (src, trg) items are curated pairs.

    Args:
        source: an image source (``__len__``, ``image(i)``) with N images, N = the graph's rows.
        batch_size, seed, rank, world: as :class:`BatchStream`.
        neighbours, schedule: as :class:`PairSampler` (seeded with ``seed``).
    """

    def __init__(self, source, batch_size: int, seed: int, neighbours: Tensor, schedule: Sequence = DEFAULT_SCHEDULE,
                 rank: int = 0, world: int = 1):
        super().__init__(source, batch_size, seed, rank, world)
        if self.pairs:
            raise TypeError("CuratedBatchStream: source must be an image source (photos / folder), not dataset pairs")
        if len(source) != neighbours.shape[0]:
            raise ValueError(f"CuratedBatchStream: the source has {len(source)} images but neighbours has "
                             f"{neighbours.shape[0]} rows")
        self.sampler = PairSampler(neighbours, schedule, seed)

    def global_indices(self, step: int) -> Tensor:
        """``(B, 2)`` curated (src, trg) indices of the global batch of ``step``."""
        return self.sampler.pairs(step, self.batch_size)


@torch.no_grad()
def extract_class_tokens(backbone, source, *, batch_size: int = 64, cls_source: str = "auto",
                         device=None, progress: bool = False) -> Tensor:
    """Class tokens of every image of a training source, for :func:`curate_pairs`.

    Args:
        backbone: a :mod:`semcorr_fast.backbones` model (moved nowhere; images go to ``device`` or its device).
        source: anything with ``__len__`` and ``image(i) -> (3, H, W)`` in [0, 1] on the backbone canvas.
        batch_size: images per forward pass.
        cls_source: see :func:`~semcorr_fast.methods.universal.backbone_outputs`.
        progress: a tqdm bar over the images.
    Returns:
        ``(N, C)`` float32 on the CPU.
    """
    from .methods.universal import backbone_outputs  # noqa: PLC0415  (that module imports this one lazily)

    fn = "extract_class_tokens"
    batch_size = _pos_int(batch_size, "batch_size", fn)
    if not hasattr(source, "image") or not hasattr(source, "__len__"):
        raise TypeError(f"{fn}: source must have __len__ and image(i), got {type(source).__name__}")
    dev = torch.device(device) if device is not None else getattr(backbone, "device", torch.device("cpu"))
    out = []
    with tqdm(total=len(source), desc="class tokens", unit="img", disable=not progress) as bar:
        for s in range(0, len(source), batch_size):
            imgs = torch.stack([source.image(i) for i in range(s, min(s + batch_size, len(source)))]).to(dev)
            out.append(backbone_outputs(backbone, imgs, cls_source=cls_source).cls.float().cpu())
            bar.update(imgs.shape[0])
    return torch.cat(out)


def curation_scaling(sizes: Sequence[int] = (1000, 4000, 16000), C: int = 384, k: int = 100, *,
                     device="cpu", dtype: torch.dtype = torch.float32, chunk_size: int = 65536, seed: int = 0,
                     repeats: int = 1, backend: str = "auto") -> list[tuple[int, float]]:
    """Seconds to build the full curation graph (every row against all, self excluded) vs N.

    The database is N random unit vectors of dimension C (seeded). One warm-up call on the smallest
    size precedes the timings; CUDA is synchronised. The cost is O(N²·C) compute with O(chunk·C + N·k)
    memory: the paper's 6M ImageNet images at C = 384 are ≈ 2.8e16 FLOP.

    Returns:
        ``[(N, best seconds over repeats), ...]`` in ``sizes`` order.
    """
    fn = "curation_scaling"
    sizes = [_pos_int(n, "sizes[i]", fn, 2) for n in sizes]
    C, k, repeats = _pos_int(C, "C", fn), _pos_int(k, "k", fn), _pos_int(repeats, "repeats", fn)
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def make(n):
        x = torch.randn(n, C, generator=gen)
        return torch.nn.functional.normalize(x, dim=1).to(device=dev, dtype=dtype)

    warm = make(min(sizes))
    curate_pairs(warm, min(k, warm.shape[0] - 1), chunk_size=chunk_size, backend=backend)
    sync()
    out = []
    for n in sizes:
        x = make(n)
        best = float("inf")
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            curate_pairs(x, k, chunk_size=chunk_size, backend=backend)
            sync()
            best = min(best, time.perf_counter() - t0)
        out.append((n, best))
    return out
