"""Training configuration: TOML files, ``--set key=value`` overrides and validation.

A config is one TOML file per method × backbone (``configs/<paper>/<method>_<backbone>.toml``); the
schema, with every key's default, is :data:`SCHEMA` (and ``configs/README.md``). Overrides use dotted
keys and TOML values (``train.steps=100``, ``method_args.tau=0.1``, ``optim.betas=[0.9, 0.99]``); a
value that is not valid TOML is taken as a string (``data.root=/data/cub``).

Every error names the offending key (``train.steps``), the file it came from and what was expected.
"""
from __future__ import annotations

import copy
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

__all__ = ["ConfigError", "TrainConfig", "SCHEMA", "load_config", "config_from_dict", "apply_overrides",
           "parse_override", "metric_alpha"]


class ConfigError(ValueError):
    """A training config is malformed; the message names the key and the source."""


# ----------------------------------------------------------------------------------------------
# value checkers: (value, key) -> normalised value, raising ConfigError naming the key
# ----------------------------------------------------------------------------------------------

def _int(minimum: int | None = None) -> Callable:
    def check(v, key):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key} must be an integer, got {v!r}")
        if minimum is not None and v < minimum:
            raise ConfigError(f"{key} must be >= {minimum}, got {v}")
        return v
    check.doc = "int" + (f" >= {minimum}" if minimum is not None else "")
    return check


def _float(minimum: float | None = None, strict: bool = False, maximum: float | None = None) -> Callable:
    def check(v, key):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{key} must be a finite number, got {v!r}")
        v = float(v)
        if minimum is not None and (v <= minimum if strict else v < minimum):
            raise ConfigError(f"{key} must be {'>' if strict else '>='} {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise ConfigError(f"{key} must be <= {maximum}, got {v}")
        return v
    check.doc = "float" + (f" {'>' if strict else '>='} {minimum}" if minimum is not None else "")
    return check


def _choice(*choices: str) -> Callable:
    def check(v, key):
        if v not in choices:
            raise ConfigError(f"{key} must be one of {list(choices)}, got {v!r}")
        return v
    check.doc = " | ".join(repr(c) for c in choices)
    return check


def _bool(v, key):
    if not isinstance(v, bool):
        raise ConfigError(f"{key} must be true or false, got {v!r}")
    return v


_bool.doc = "bool"


def _str(v, key):
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{key} must be a non-empty string, got {v!r}")
    return v


_str.doc = "str"


def _optional(check: Callable) -> Callable:
    def opt(v, key):
        return None if v is None else check(v, key)
    opt.doc = f"{check.doc} (optional)"
    return opt


def _size(v, key):
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v, v]
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v)):
        raise ConfigError(f"{key} must be a positive int or [H, W] of positive ints, got {v!r}")
    return (int(v[0]), int(v[1]))


_size.doc = "int | [H, W]"


def _betas(v, key):
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1 for x in v)):
        raise ConfigError(f"{key} must be [beta1, beta2] with 0 <= beta < 1, got {v!r}")
    return (float(v[0]), float(v[1]))


_betas.doc = "[float, float]"


def _table(v, key):
    if not isinstance(v, dict):
        raise ConfigError(f"{key} must be a table of options, got {v!r}")
    return copy.deepcopy(v)


_table.doc = "table"

_REQUIRED = object()

#: section -> key -> (checker, default). ``None`` as a default means "unset" (see each key's doc in
#: configs/README.md); ``_REQUIRED`` keys must be given.
SCHEMA: dict[str, Any] = {
    "method": (_str, _REQUIRED),
    "backbone": (_str, _REQUIRED),
    "backbone_args": (_table, {}),
    "method_args": (_table, {}),
    "data": {
        "source": (_choice("photos", "folder", "pairs", "features"), "photos"),
        "cache": (_optional(_str), None),   # source = "features": the feature-cache directory (filled if missing)
        "root": (_optional(_str), None),
        "n_images": (_int(1), 1000),
        "image_size": (_optional(_size), None),
        "fit": (_choice("auto", "resize", "pad", "crop"), "auto"),
        "num_workers": (_int(0), 0),
        "dataset": (_optional(_str), None),
        "split": (_optional(_str), None),
        "pairs": (_optional(_str), None),
        "n_pairs": (_optional(_int(1)), None),
        # automatic pair curation (Universal): "knn" pairs each image with its class-token neighbours,
        # widening by the method's pair_schedule; "none" samples two independent images
        "curation": (_choice("none", "knn"), "none"),
    },
    "optim": {
        "name": (_choice("adam", "adamw"), "adam"),
        "lr": (_float(0.0, strict=True), 1e-3),
        "weight_decay": (_float(0.0), 0.0),
        "betas": (_betas, (0.9, 0.999)),
        "eps": (_float(0.0, strict=True), 1e-8),
        "schedule": (_choice("constant", "onecycle"), "constant"),
        "pct_start": (_float(0.0, strict=True, maximum=1.0), 0.3),
        "div_factor": (_float(0.0, strict=True), 25.0),
        "final_div_factor": (_float(0.0, strict=True), 1e4),
        "anneal_strategy": (_choice("cos", "linear"), "cos"),
        "cycle_momentum": (_bool, True),
        "grad_clip": (_float(0.0), 0.0),
    },
    "train": {
        "steps": (_int(1), 1000),
        "batch_size": (_int(1), 8),
        "seed": (_int(0), 0),
        "log_every": (_int(1), 50),
        "ckpt_every": (_int(1), 1000),
        "out_dir": (_optional(_str), None),
        "device": (_str, "auto"),
        "progress": (_bool, True),
        "find_unused_parameters": (_bool, False),
        "deterministic": (_bool, False),
    },
    "eval": {
        "every": (_int(0), 1000),
        "at_end": (_bool, True),
        "at_start": (_bool, False),   # also evaluate the untrained model (logged as step 0)
        "dataset": (_str, "warps"),
        "n_pairs": (_optional(_int(1)), 50),
        "seed": (_optional(_int(0)), None),
        "root": (_optional(_str), None),
        "split": (_optional(_str), None),
        "pairs": (_optional(_str), None),
        "limit": (_optional(_int(1)), None),
        "matcher": (_str, "demystifying"),
        "pose": (_choice("none", "code", "paper"), "none"),
        "metric": (_str, "pck@0.1/image"),
        "mode": (_choice("max", "min"), "max"),
    },
}

_SECTIONS = ("data", "optim", "train", "eval")


class _Section(dict):
    """A validated config section: a dict whose keys also read as attributes (``cfg.train.steps``)."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None


@dataclass
class TrainConfig:
    """A validated training config (see :data:`SCHEMA`). ``source`` is the file it came from."""

    method: str
    backbone: str
    backbone_args: dict
    method_args: dict
    data: _Section
    optim: _Section
    train: _Section
    eval: _Section
    source: str = "<dict>"
    overrides: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain, TOML/JSON-friendly dict (tuples become lists) — what checkpoints store."""
        def plain(v):
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            return v
        d = {"method": self.method, "backbone": self.backbone,
             "backbone_args": plain(self.backbone_args), "method_args": plain(self.method_args)}
        for s in _SECTIONS:
            d[s] = plain(dict(getattr(self, s)))
        return d


def metric_alpha(metric: str) -> float | None:
    """The PCK threshold in a metric name (``"pck@0.1/image"`` → 0.1), or None if it has none."""
    m = re.search(r"@([0-9.eE+-]+)", metric)
    if not m:
        return None
    try:
        return float(m.group(1))
    except ValueError:
        return None


def config_from_dict(raw: dict, source: str = "<dict>", overrides: Iterable[str] = ()) -> TrainConfig:
    """Validate a raw config dict (as read from TOML, overrides applied) into a :class:`TrainConfig`.

    Unknown keys, wrong types, out-of-range values and inconsistent combinations raise
    :class:`ConfigError` naming the key and ``source``.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a table, got {type(raw).__name__}")
    try:
        out: dict[str, Any] = {}
        unknown = sorted(set(raw) - set(SCHEMA))
        if unknown:
            raise ConfigError(f"unknown top-level key(s) {unknown}; known: {sorted(SCHEMA)}")
        for key, spec in SCHEMA.items():
            if isinstance(spec, dict):
                sec = raw.get(key, {})
                if not isinstance(sec, dict):
                    raise ConfigError(f"[{key}] must be a table, got {sec!r}")
                bad = sorted(set(sec) - set(spec))
                if bad:
                    raise ConfigError(f"unknown key(s) {[f'{key}.{b}' for b in bad]}; known in [{key}]: {sorted(spec)}")
                vals = _Section()
                for k, (check, default) in spec.items():
                    vals[k] = check(sec[k], f"{key}.{k}") if k in sec else copy.deepcopy(default)
                out[key] = vals
            else:
                check, default = spec
                if key in raw:
                    out[key] = check(raw[key], key)
                elif default is _REQUIRED:
                    raise ConfigError(f"missing required key {key!r}")
                else:
                    out[key] = copy.deepcopy(default)
        _cross_checks(out)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return TrainConfig(**out, source=source, overrides=list(overrides))


def _cross_checks(c: dict) -> None:
    d, t, e = c["data"], c["train"], c["eval"]
    if d["source"] == "folder" and not d["root"]:
        raise ConfigError("data.root is required with data.source = 'folder' (a directory of training images)")
    if d["source"] == "features" and not d["cache"]:
        raise ConfigError("data.cache is required with data.source = 'features' (a feature-cache directory)")
    if d["source"] in ("pairs", "features"):
        if not d["dataset"]:
            raise ConfigError("data.dataset is required with data.source = 'pairs' (a semcorr_fast.data name)")
    if t["out_dir"] is None:
        t["out_dir"] = os.path.join("runs", c["method"])
    if not (t["device"] in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", t["device"])):
        raise ConfigError(f"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {t['device']!r}")
    if e["seed"] is None:
        e["seed"] = t["seed"] + 1
    if e["dataset"] == "warps" and d["source"] == "photos" and e["seed"] == t["seed"]:
        raise ConfigError(f"eval.seed must differ from train.seed ({t['seed']}) so that the warps evaluation "
                          f"set is held out from the training photos' crops")
    if e["mode"] == "max" and e["metric"].startswith("pck") and metric_alpha(e["metric"]) is None:
        raise ConfigError(f"eval.metric {e['metric']!r} names no PCK threshold; expected e.g. 'pck@0.1/image'")


# ----------------------------------------------------------------------------------------------
# overrides and files
# ----------------------------------------------------------------------------------------------

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z_][A-Za-z0-9_\-]*)*$")


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.steps=100"`` → ``("train.steps", 100)``. The value is parsed as TOML (numbers, booleans,
    quoted strings, arrays, inline tables); anything that is not valid TOML is kept as a string."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. train.steps=100), got {item!r}")
    key, text = item.split("=", 1)
    key = key.strip()
    if not _KEY_RE.match(key):
        raise ConfigError(f"--set {item!r}: {key!r} is not a dotted key like train.steps or method_args.tau")
    text = text.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key, value


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """A copy of ``raw`` with every ``KEY=VALUE`` of ``overrides`` set (later ones win)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, value = parse_override(item)
        parts = key.split(".")
        node = raw
        for i, p in enumerate(parts[:-1]):
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i + 1])} is a value ({nxt!r}), not a table")
            node = nxt
        node[parts[-1]] = value
    return raw


def load_config(path: str | os.PathLike, overrides: Iterable[str] = (), method: str | None = None) -> TrainConfig:
    """Read a TOML training config, apply ``--set`` overrides and validate it.

    Args:
        path: the TOML file.
        overrides: ``"KEY=VALUE"`` strings (:func:`parse_override`).
        method: the method named on the command line; it must agree with the file's ``method`` key
            (or sets it when the file has none).
    Returns:
        :class:`TrainConfig`.
    Raises:
        FileNotFoundError naming the path; :class:`ConfigError` for malformed TOML or values.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (expected a TOML training config, see configs/README.md)")
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    overrides = list(overrides)
    try:
        raw = apply_overrides(raw, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if method is not None:
        if "method" in raw and raw["method"] != method:
            raise ConfigError(f"{path}: the command line names method {method!r} but the config's method key is "
                              f"{raw['method']!r}")
        raw["method"] = method
    return config_from_dict(raw, source=path, overrides=overrides)
