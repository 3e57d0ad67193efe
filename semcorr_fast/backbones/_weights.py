"""Finding and loading pretrained weights without any network access.

Order of lookup for a backbone ``name`` (see each builder for its candidates):

1. the ``weights=`` argument of :func:`~semcorr_fast.backbones.create_backbone` (a file, or a
   diffusers-layout directory for Stable Diffusion);
2. the environment variable ``SEMCORR_WEIGHTS_<NAME>`` (``<NAME>`` = the registry name upper-cased);
3. the Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``), in the layout ``models--<org>--<repo>/snapshots/<rev>/<file>``;
4. the torch hub checkpoint folder (``$TORCH_HOME/hub/checkpoints``, default
   ``~/.cache/torch/hub/checkpoints``) under the file name the original release downloads to.

Nothing is downloaded. When nothing is found, :func:`missing_weights_error` builds a
``FileNotFoundError`` that names every path looked at and the exact file to put where.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


def env_var_for(name: str) -> str:
    """``SEMCORR_WEIGHTS_<NAME>``: the environment variable that points at ``name``'s weights."""
    return "SEMCORR_WEIGHTS_" + "".join(c if c.isalnum() else "_" for c in name).upper()


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, resolved from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def torch_hub_checkpoints() -> Path:
    """The torch hub checkpoint folder (``torch.hub.get_dir()/checkpoints``)."""
    return Path(torch.hub.get_dir()).expanduser() / "checkpoints"


@dataclass(frozen=True)
class HFFile:
    """A file of a Hugging Face repository, as the hub cache stores it."""

    repo_id: str
    filename: str

    def repo_dir(self) -> Path:
        return hf_hub_cache() / ("models--" + self.repo_id.replace("/", "--"))

    def expected_path(self) -> str:
        return str(self.repo_dir() / "snapshots" / "<revision>" / self.filename)

    def find(self) -> Path | None:
        """The cached file (the ``refs/main`` snapshot first, then the newest snapshot), or None."""
        snaps = self.repo_dir() / "snapshots"
        if not snaps.is_dir():
            return None
        ref = self.repo_dir() / "refs" / "main"
        order = []
        if ref.is_file():
            order.append(snaps / ref.read_text().strip())
        order += sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
        for snap in order:
            p = snap / self.filename
            if p.exists():
                return p
        return None


@dataclass(frozen=True)
class TorchHubFile:
    """A checkpoint file name in the torch hub checkpoint folder."""

    filename: str

    def expected_path(self) -> str:
        return str(torch_hub_checkpoints() / self.filename)

    def find(self) -> Path | None:
        p = torch_hub_checkpoints() / self.filename
        return p if p.is_file() else None


def find_weights(name: str, candidates: list) -> Path | None:
    """First existing path among ``$SEMCORR_WEIGHTS_<NAME>`` and ``candidates`` (HFFile/TorchHubFile)."""
    env = os.environ.get(env_var_for(name))
    if env:
        p = Path(env).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{name}: ${env_var_for(name)} points at {p}, which does not exist")
        return p
    for c in candidates:
        p = c.find()
        if p is not None:
            return p
    return None


def missing_weights_error(name: str, candidates: list, what: str) -> FileNotFoundError:
    """The error raised when ``pretrained=True`` and no weights were found.

    ``what`` describes the expected file (e.g. "the timm safetensors of DINO ViT-S/8").
    """
    lines = [f"{name}: no pretrained weights found (nothing is downloaded). Expected {what}. Put it at one of:"]
    for c in candidates:
        if isinstance(c, HFFile):
            lines.append(f"  - {c.expected_path()}   (file {c.filename!r} of the Hugging Face repo {c.repo_id!r})")
        else:
            lines.append(f"  - {c.expected_path()}")
    lines.append(f"or pass create_backbone({name!r}, weights=PATH), or set the environment variable "
                 f"{env_var_for(name)}=PATH; use pretrained=False for random initialisation.")
    return FileNotFoundError("\n".join(lines))


def load_state_dict(path: str | os.PathLike, name: str) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or torch-pickled state dict (``weights_only``) onto the CPU.

    Unwraps common containers (``state_dict``, ``model``, ``teacher`` for DINO training checkpoints)
    and strips the prefixes ``module.`` and ``backbone.``.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{name}: weights file {p} does not exist (expected a .safetensors or .pth "
                                f"state dict)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(p), device="cpu")
    else:
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - report which file failed and why
            raise ValueError(f"{name}: could not read {p} as a torch state dict: {e}") from e
    for key in ("state_dict", "model", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{name}: {p} does not hold a state dict of tensors")
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_into(module: torch.nn.Module, sd: dict[str, torch.Tensor], name: str, source: str,
              ignore: tuple[str, ...] = ()) -> None:
    """Load ``sd`` into ``module``: every module key must be present with its shape.

    Keys (of ``sd`` and of the module) starting with a prefix in ``ignore`` (heads) are skipped; any other
    unexpected key is an error, since it means the file is not a checkpoint of this architecture.
    """
    def ignored(k: str) -> bool:
        return any(k == i or k.startswith(i) for i in ignore)
    own = {k: v for k, v in module.state_dict().items() if not ignored(k)}
    sd = {k: v for k, v in sd.items() if not ignored(k)}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise ValueError(f"{name}: {source} does not match the architecture: missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    bad = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items() if sd[k].shape != v.shape]
    if bad:
        raise ValueError(f"{name}: {source} has tensors of the wrong shape (key, file, model): {bad[:8]}")
    module.load_state_dict(sd, strict=not ignore)
