"""The :class:`Method` base class every trainable correspondence method derives from.

A method wraps a :mod:`semcorr_fast.backbones` model (frozen unless the method says otherwise) and
adds what it learns (a projection head, an adapter, ...). The trainer (:mod:`semcorr_fast.train`)
only ever calls :meth:`Method.training_step`, :meth:`Method.trainable_parameters` and
:meth:`Method.checkpoint_state`; evaluation calls ``method(images)``, which is
:meth:`Method.descriptor`, so a method can be passed wherever a backbone is
(``semcorr_fast.evaluate.evaluate(dataset, method, matcher)``).
"""
from __future__ import annotations

from typing import Iterable

from torch import Tensor, nn


class Method(nn.Module):
    """Base class of the training methods (register subclasses with
    :func:`semcorr_fast.methods.register_method`).

    Args:
        backbone: a :class:`semcorr_fast.backbones.Backbone` (attributes ``name``, ``dim``, ``stride``,
            ``canvas``; ``forward(images (B, 3, H, W) in [0, 1]) -> (B, C, h, w)`` float32).
        freeze_backbone: keep the backbone frozen (eval mode, ``requires_grad=False``, left out of
            :meth:`checkpoint_state`). Every method of the four papers trains on a frozen backbone.

    Attributes (so a method can stand in for a backbone): ``name`` (``"<method>+<backbone>"``),
    ``canvas`` and ``stride`` (the backbone's), ``dim`` (channels of :meth:`descriptor`; subclasses
    with a projection set it to their output dimension).

    Subclasses implement :meth:`training_step` and usually :meth:`descriptor`.
    """

    #: registry name, set by :func:`semcorr_fast.methods.register_method`.
    method_name: str = "method"

    def __init__(self, backbone: nn.Module, *, freeze_backbone: bool = True):
        super().__init__()
        for attr in ("dim", "stride", "canvas"):
            if not hasattr(backbone, attr):
                raise TypeError(f"{type(self).__name__}: backbone must be a semcorr_fast.backbones model with "
                                f"attributes name, dim, stride and canvas; {type(backbone).__name__} has no {attr!r}")
        if not isinstance(freeze_backbone, bool):
            raise TypeError(f"{type(self).__name__}: freeze_backbone must be a bool, got {freeze_backbone!r}")
        self.backbone = backbone
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            backbone.eval()
            for p in backbone.parameters():
                p.requires_grad_(False)
        self.name = f"{self.method_name}+{getattr(backbone, 'name', type(backbone).__name__)}"
        self.dim = int(backbone.dim)
        self.stride = int(backbone.stride)
        self.canvas = backbone.canvas

    # ------------------------------------------------------------------ what subclasses implement
    def training_step(self, batch: dict, step: int) -> dict[str, Tensor]:
        """One training step's losses.

        Args:
            batch: ``{"src": (B, 3, H, W), "trg": (B, 3, H, W)}`` float32 in [0, 1] on the backbone
                canvas and the training device, ``"generator"`` (a CPU ``torch.Generator`` seeded per
                step and rank: pass it to :mod:`semcorr_fast.warps` with ``device=images.device``),
                ``"item_seeds"`` ((B,) int64, a seed per item of the *global* batch, for randomness that
                must not depend on the number of ranks), and for pair datasets the keypoint entries of
                :class:`semcorr_fast.train.data.DatasetPairs`.
            step: the 0-based index of this optimisation step.
        Returns:
            ``{"loss": 0-dim differentiable tensor, ...}``; every other 0-dim entry is logged.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement training_step(batch, step)")

    def descriptor(self, images: Tensor) -> Tensor:
        """Dense descriptors used for matching: ``(B, 3, H, W)`` float in [0, 1] on :attr:`canvas` →
        ``(B, dim, h, w)``. The base class returns the backbone's features unchanged."""
        return self.backbone(images)

    def forward(self, images: Tensor) -> Tensor:
        """Same as :meth:`descriptor` (so the method can be used as a backbone)."""
        return self.descriptor(images)

    # ------------------------------------------------------------------ trainer hooks
    def trainable_parameters(self) -> list:
        """What the optimiser updates: a list of parameters (or of torch param-group dicts).
        Default: every parameter with ``requires_grad``."""
        return [p for p in self.parameters() if p.requires_grad]

    def grid(self, H: int, W: int) -> tuple[int, int]:
        """The backbone's output grid for an ``H×W`` input (methods that resample override this)."""
        return self.backbone.grid(H, W)

    def _frozen_prefixes(self) -> tuple[str, ...]:
        return ("backbone.",) if self.freeze_backbone else ()

    def checkpoint_state(self) -> dict[str, Tensor]:
        """The state a checkpoint keeps: every trainable parameter and every buffer outside the frozen
        backbone (e.g. running statistics of a head), keyed as in :meth:`state_dict`. The frozen
        backbone is rebuilt from its registry name and weights, so it is never stored."""
        frozen = self._frozen_prefixes()
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().clone() for k, v in self.state_dict().items()
                if k in trainable or not k.startswith(frozen)}

    def load_checkpoint_state(self, state: dict[str, Tensor]) -> None:
        """Load what :meth:`checkpoint_state` returned; missing or unexpected keys are an error naming them."""
        if not isinstance(state, dict):
            raise TypeError(f"{type(self).__name__}.load_checkpoint_state: state must be a dict, got {type(state).__name__}")
        expected = set(self.checkpoint_state())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise KeyError(f"{type(self).__name__}.load_checkpoint_state: checkpoint does not match the method "
                           f"(missing {missing}, unexpected {unexpected})")
        self.load_state_dict(state, strict=False)

    def train(self, mode: bool = True):
        """As :meth:`torch.nn.Module.train`, but a frozen backbone stays in eval mode (BatchNorm and
        dropout of a frozen network must not change with the head's mode)."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, stride={self.stride}, frozen_backbone={self.freeze_backbone}"


def count_parameters(params: Iterable) -> int:
    """Number of scalars in a list of parameters or param-group dicts (as :meth:`Method.trainable_parameters`)."""
    n = 0
    for p in params:
        if isinstance(p, dict):
            n += sum(q.numel() for q in p["params"])
        else:
            n += p.numel()
    return n
