"""Composition of a :class:`~megavid.config.sections.Config`: YAML group files, experiment
``defaults``, dotted overrides, type coercion with one-line errors, and back to plain data
(:func:`to_dict`, :func:`to_yaml`)."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from megavid.config.sections import Config
from megavid.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
GROUPS = ("experiment", "model", "data", "task", "optim", "train", "eval", "pretrain", "retrieval")
RECIPE_GROUPS = ("pretrain", "retrieval")
"""Groups whose files hold whole sections (a recipe: run, task, model, data, train, ...), like
an experiment's own values but without ``defaults:``; merged after the section groups, so
``model=timesformer_base retrieval=msrvtt`` takes the model's sizes, then the recipe's changes
to them (its clip length), as the recipe file named by its path does."""
MOVED_KEYS: dict[str, str] = {f"task.cls.{k}": f"task.ego.{k}"
                              for k in ("relevancy", "relevancy_texts", "relevancy_videos", "egomcq")}
"""Config keys that moved: old dotted name -> new. A config that still sets an old one is told
the new name in one line."""


# --------------------------------------------------------------------------------------------
# Conversion and validation
# --------------------------------------------------------------------------------------------
def to_dict(cfg: Any) -> Any:
    """A plain (YAML-safe) nested dict of a config dataclass."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return list(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _valid_keys(hints[f.name], key + ".")
    return keys


def _unknown_key(key: str, cls: type, path: str) -> ConfigError:
    full = f"{path}{key}"
    if full in MOVED_KEYS:
        return ConfigError(f"config key '{full}' moved to '{MOVED_KEYS[full]}'; rename it")
    candidates = _valid_keys(Config)
    close = difflib.get_close_matches(full, candidates, n=1, cutoff=0.5)
    if not close:
        close = difflib.get_close_matches(key, [c.rsplit(".", 1)[-1] for c in candidates], n=1)
        close = [c for c in candidates if c.endswith("." + close[0]) or c == close[0]][:1] if close else []
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{full}'{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type; raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"config key '{key}' = {value!r} is not one of {', '.join(map(repr, args))}"
            )
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}' expects {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, key) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build a config dataclass from a nested dict, validating keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{path.rstrip('.') or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key(key, cls, path)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = from_dict(tp, data[f.name] or {}, f"{path}{f.name}.")
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, f"{path}{f.name}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - fields are validated above
        raise ConfigError(f"config section '{path.rstrip('.')}': {e}") from e



# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------
def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{p}' is a value, not a section")
    node[parts[-1]] = value


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse YAML {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    return data


def group_file(group: str, name: str, config_dir: Path = CONFIG_DIR) -> Path:
    path = config_dir / group / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (config_dir / group).glob("*.yaml"))
        raise ConfigError(
            f"no config '{name}' in group '{group}' ({config_dir / group}); "
            f"available: {', '.join(available) or 'none'}"
        )
    return path


def _load_group(group: str, name: str, config_dir: Path) -> tuple[dict, dict]:
    """Returns (defaults mapping, values as a top-level tree) of one group file."""
    data = _read_yaml(group_file(group, name, config_dir))
    defaults = data.pop("defaults", {}) or {}
    if group == "experiment":
        return defaults, data
    if defaults:
        raise ConfigError(f"'defaults:' is only allowed in experiment configs ({group}/{name})")
    return {}, data if group in RECIPE_GROUPS else {group: data}


def compose(args: list[str] | tuple[str, ...] = (), config_dir: Path | str = CONFIG_DIR) -> Config:
    """Build a validated :class:`Config` from command-line style tokens.

    Args:
        args: tokens such as ``experiment=demo``, ``model=timesformer_tiny``,
            ``path/to/file.yaml`` and dotted overrides ``train.max_steps=10``.
        config_dir: the folder holding the config groups.
    """
    config_dir = Path(config_dir)
    groups: dict[str, str] = {}
    files: list[Path] = []
    overrides: list[tuple[str, Any]] = []
    for tok in args:
        if "=" not in tok:
            if tok.endswith((".yaml", ".yml")):
                if not os.path.isfile(tok):
                    raise ConfigError(f"config file not found: {tok}")
                files.append(Path(tok))
                continue
            raise ConfigError(
                f"cannot read argument '{tok}': use group=name (groups: {', '.join(GROUPS)}), "
                "key.sub=value, or a .yaml file"
            )
        key, raw = tok.split("=", 1)
        if key in GROUPS:
            groups[key] = raw
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        overrides.append((key, value))

    tree: dict = {}
    exp_values: dict = {}
    chosen: dict[str, str] = {}
    if "experiment" in groups:
        exp_defaults, exp_values = _load_group("experiment", groups["experiment"], config_dir)
        if not isinstance(exp_defaults, dict):
            raise ConfigError("an experiment's 'defaults:' must map group names to config names")
        for g in exp_defaults:
            if g not in GROUPS or g == "experiment":
                raise ConfigError(f"unknown config group '{g}' in experiment defaults")
        chosen.update(exp_defaults)
    for g in GROUPS[1:]:
        if g in chosen and g not in groups:
            tree = deep_merge(tree, _load_group(g, chosen[g], config_dir)[1])
    tree = deep_merge(tree, exp_values)
    for g in GROUPS[1:]:
        if g in groups:
            tree = deep_merge(tree, _load_group(g, groups[g], config_dir)[1])
    for path in files:
        data = _read_yaml(path)
        data.pop("defaults", None)
        tree = deep_merge(tree, data)
    for key, value in overrides:
        _set_dotted(tree, key, value)
    return from_dict(Config, tree)


def load_saved(path: str | Path) -> Config:
    """Load a resolved config saved in a run directory."""
    return from_dict(Config, _read_yaml(Path(path)))
