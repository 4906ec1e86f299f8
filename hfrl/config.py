"""The one configuration schema: typed dataclasses, a YAML file, `section.key=value` overrides.

Each field is documented by the string literal under it (shown by `hfrl config --describe`).
Loading checks every key and type before anything else happens, so a bad config fails the same way
on every rank before the first collective. Derived values are computed where they are used and
never written back into the config.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROLE_NAMES = ("actor", "critic", "ref", "reward", "cost")


@dataclass
class DistributedConfig:
    backend: str = "auto"
    """Process-group backend: 'auto' (NCCL on CUDA, else gloo), 'gloo' or 'nccl'."""
    timeout_s: float = 600.0
    """Timeout of every collective; a dead peer surfaces as an error after this long."""
    world_size: int | None = None
    """Expected number of ranks; the launcher's world size must match. None accepts any."""


@dataclass
class RoleConfig:
    enabled: bool = True
    """Whether the algorithm uses this role."""
    pool: str | None = None
    """Pool the role runs on, for placement.mode=custom (a key of placement.pools)."""
    pp: int = 1
    """Training pipeline-parallel degree."""
    tp: int = 1
    """Training tensor-parallel degree."""
    dp: int = -1
    """Training data-parallel degree; -1 infers it as pool size / (pp * tp)."""
    pg: int | None = None
    """Generation pipeline-parallel degree (actor only); None means pp."""
    tg: int | None = None
    """Generation tensor-parallel degree (actor only); None means tp. Must divide tp."""
    grouping: str = "hybridflow"
    """Generation grouping: 'hybridflow' (zero redundancy) or 'vanilla' (HybridFlow-V)."""


def _role(enabled: bool = True) -> Any:
    return field(default_factory=lambda: RoleConfig(enabled=enabled))


@dataclass
class RolesConfig:
    actor: RoleConfig = _role()
    """The policy: trains, generates and computes log-probs."""
    critic: RoleConfig = _role()
    """The value model (PPO); disabled by critic-free algorithms."""
    ref: RoleConfig = _role()
    """The frozen reference policy for the KL penalty."""
    reward: RoleConfig = _role()
    """The reward model; disabled when rewards come from rules."""
    cost: RoleConfig = _role(enabled=False)
    """The cost model of Safe-RLHF."""


@dataclass
class PlacementConfig:
    mode: str = "colocate"
    """'colocate' (every role on every rank), 'split' (actor+ref | critic+reward+cost),
    'standalone' (one pool per role) or 'custom' (placement.pools + roles.<role>.pool)."""
    pools: dict[str, int | list[int]] = field(default_factory=dict)
    """Pool sizes or explicit global rank lists. split: keys 'actor' and 'critic'; standalone:
    one key per enabled role; custom: any names. Empty means an even split of the world."""


@dataclass
class Config:
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """How processes find each other."""
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    """Which ranks each role runs on."""
    roles: RolesConfig = field(default_factory=RolesConfig)
    """Each role's parallel layout."""


# ---------------------------------------------------------------------------------------------
# Building typed values from plain data


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert `value` (from YAML) to type `tp`, or raise TypeError naming the key."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"{path}: expected a mapping for section {tp.__name__}, "
                            f"got {type(value).__name__} {value!r}")
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except TypeError as err:
                errors.append(str(err))
        raise TypeError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} "
                        f"{value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise TypeError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(k, key_tp, path): _coerce(v, val_tp, f"{path}.{k}")
                for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-6" (no dot) as a string; users write learning rates that way.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise TypeError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} "
                        f"{value!r}")
    return value


def from_dict(cls: type, data: dict, path: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from a nested dict over `base` (default: `cls()`).

    Sections given partially keep their other defaults; unknown keys get a did-you-mean.
    """
    obj = copy.deepcopy(base) if base is not None else cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{(path + '.' if path else '') + close[0]}'?" if close else ""
            raise ValueError(f"unknown config key '{where}'{hint} (valid keys under "
                             f"'{path or '<root>'}': {', '.join(names)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise TypeError(f"{where}: expected a mapping for section "
                                f"{type(current).__name__}, got {type(value).__name__} {value!r}")
            setattr(obj, key, from_dict(type(current), value, where, base=current))
        else:
            setattr(obj, key, _coerce(value, hints[key], where))
    return obj


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """'roles.actor.tp=2' -> (['roles', 'actor', 'tp'], 2). The value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r}: empty key part")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ValueError(f"override {text!r}: value is not valid YAML ({err})") from None
    return key.split("."), value


def _set_path(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls: type = Config):
    """Defaults <- YAML file <- `section.key=value` overrides, validated against the schema."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise TypeError(f"{path}: expected a mapping at the top level, got "
                            f"{type(data).__name__}")
    for text in overrides:
        keys, value = parse_override(text)
        _set_path(data, keys, value)
    return from_dict(cls, data)


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Field documentation (the string literal under each field)


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass, read from its source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) \
                and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type = Config, prefix: str = "", defaults: Any = None) -> list[str]:
    """One line per leaf key: 'key (type, default): doc'."""
    lines = []
    defaults = cls() if defaults is None else defaults
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{key}: {docs.get(f.name, '')}")
            lines += describe(type(value), key + ".", value)
        else:
            lines.append(f"  {key} ({_type_name(hints[f.name])}, default {value!r}): "
                         f"{docs.get(f.name, '')}")
    return lines
