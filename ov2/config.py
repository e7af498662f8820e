"""The one config engine for any dataclass tree (TrainConfig, the bridge config, experiment files).

    cfg = apply_overrides(cfg, ["--model.keep_ratio=0.25", "--stages.0.steps=50", "--seed=3"])
    cfg = apply_tree(cfg, {"model": {"vit": {"width": 64}}, "stages": [{"steps": 5}]})   # YAML, nested
    tree = read_yaml(path)                   # a mapping, or ConfigError (a key twice, alias bombs, not UTF-8)
    exp = build(Experiment, tree)            # a whole dataclass tree from a YAML mapping (defaults for the rest)
    flatten({"model": {"vit": {"width": 64}}})   # -> {"model.vit.width": 64}

A key is a dotted path (`model.vit.width`, `stages.1.lr`) or a leaf name that is unique in the tree (`keep_ratio`).
Values are checked against the field's declared type (bool, int, float, str, optional); non-finite numbers, lists
or mappings given for a number or a string, and unknown keys are ConfigError, which every command prints as one
line and exits 2. A list of dataclasses (stages) is resized from YAML: new items copy the last one. `build` makes a
dataclass from a mapping by its declared types: nested dataclasses, `list[X]`, `dict[str, X]` (e.g. named encoders),
plain `dict` (any mapping, checked later by its reader) and scalars as above.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration; the CLI prints it as one line and exits 2."""


def leaves(obj: Any, prefix: str = "", dicts: bool = False) -> dict[str, Any]:
    """{dotted path: value} for every scalar in the config tree (list items as `.0`, `.1`, ...); with `dicts`,
    mappings are walked too (a saved config read back from YAML)."""
    if dataclasses.is_dataclass(obj):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif dicts and isinstance(obj, dict):
        items = [(str(k), v) for k, v in obj.items()]
    elif isinstance(obj, list):
        items = [(str(i), v) for i, v in enumerate(obj)]
    else:
        return {prefix: obj}
    out = {}
    for name, value in items:
        out.update(leaves(value, f"{prefix}.{name}" if prefix else name, dicts))
    return out


def _declared(parent: Any, name: str) -> Any:
    """The declared type of a field (None when unknown, e.g. a list item of scalars)."""
    if dataclasses.is_dataclass(parent):
        return typing.get_type_hints(type(parent)).get(name)
    return None


def _unwrap_optional(tp) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), type(None) in typing.get_args(tp)
    return tp, False


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` (a string from the command line or a YAML scalar) as type `tp`, or ConfigError naming `key`."""
    tp, optional = _unwrap_optional(tp)
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))):
        return None
    if isinstance(value, (list, dict)) or value is None:
        raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        if tp is int:
            if number != int(number):
                raise ConfigError(f"{key}: expected int, got {value!r}")
            return int(number)
        return number
    return str(value)


def resolve_key(cfg: Any, key: str) -> str:
    """A dotted path or a unique leaf name -> the dotted path; ConfigError for an unknown or ambiguous key."""
    paths = leaves(cfg)
    if key in paths:
        return key
    matches = [path for path in paths if path.split(".")[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"ambiguous key {key!r}: say one of {', '.join(matches)}")
    raise ConfigError(f"unknown config key {key!r}")


def set_value(cfg: Any, key: str, value: Any) -> None:
    path = resolve_key(cfg, key)
    *parents, last = path.split(".")
    obj = cfg
    for part in parents:
        obj = obj[int(part)] if isinstance(obj, list) else getattr(obj, part)
    old = obj[int(last)] if isinstance(obj, list) else getattr(obj, last)
    tp = _declared(obj, last)
    if tp is None or tp is Any:
        tp = type(old) if old is not None else str
    new = coerce(value, tp, path)
    if isinstance(obj, list):
        obj[int(last)] = new
    else:
        setattr(obj, last, new)


def apply_overrides(cfg: Any, args: list[str]) -> Any:
    """A copy of `cfg` with `--key=value` arguments applied."""
    cfg = copy.deepcopy(cfg)
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"expected --key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        set_value(cfg, key.replace("-", "_"), value)
    return cfg


def _merge(cfg: Any, tree: dict, prefix: str = "") -> None:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        parent = cfg
        for part in prefix.rstrip(".").split(".") if prefix else ():
            parent = parent[int(part)] if isinstance(parent, list) else getattr(parent, part, None)
        current = getattr(parent, str(key), None) if dataclasses.is_dataclass(parent) else None
        if isinstance(current, list) and current and dataclasses.is_dataclass(current[0]):
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{path}: expected a non-empty list of mappings, got {value!r}")
            resized = [copy.deepcopy(current[i] if i < len(current) else current[-1]) for i in range(len(value))]
            setattr(parent, str(key), resized)
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    raise ConfigError(f"{path}.{i}: expected a mapping of keys, got {item!r}")
                _merge(cfg, item, f"{path}.{i}.")
        elif isinstance(value, dict) and dataclasses.is_dataclass(current):
            _merge(cfg, value, f"{path}.")
        else:
            set_value(cfg, path, value)


def apply_tree(cfg: Any, tree: dict) -> Any:
    """A copy of `cfg` with a nested mapping (from YAML) applied."""
    if not isinstance(tree, dict):
        raise ConfigError(f"expected a mapping of config keys, got {type(tree).__name__}")
    cfg = copy.deepcopy(cfg)
    _merge(cfg, tree)
    return cfg


def _at(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def build(tp: Any, data: Any, where: str = "") -> Any:
    """An object of the declared type `tp` from a YAML value; ConfigError naming the place (`where`) otherwise.

    A dataclass comes from a mapping of its fields (unknown keys refused, fields left out keep their defaults);
    `list[X]` from a list, `dict[str, X]` from a mapping (each value built as X; a plain `dict` takes any mapping);
    `X | None` also takes null; scalars go through `coerce`."""
    tp, optional = _unwrap_optional(tp)
    if data is None and optional:
        return None
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if tp is Any:
        return data
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise ConfigError(f"{where or tp.__name__}: expected a mapping, got {data!r}")
        hints = typing.get_type_hints(tp)
        names = sorted(f.name for f in dataclasses.fields(tp) if f.init)
        unknown = sorted(str(k) for k in data if k not in names)
        if unknown:
            raise ConfigError(f"{where + ': ' if where else ''}unknown key {unknown[0]!r}; known: {', '.join(names)}")
        return tp(**{k: build(hints[k], v, _at(where, k)) for k, v in data.items()})
    if origin is list:
        if not isinstance(data, list):
            raise ConfigError(f"{where}: expected a list, got {data!r}")
        return [build(args[0], v, _at(where, i)) if args else v for i, v in enumerate(data)]
    if origin is dict:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {data!r}")
        return {str(k): build(args[1], v, _at(where, k)) if args else v for k, v in data.items()}
    return coerce(data, tp, where)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A mapping of config keys, nested or dotted, as {dotted key: value}; a list value is a ConfigError (give its
    items as `stages.0.steps`, ...), as each value must fit one `--key=value`."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        elif isinstance(value, list):
            raise ConfigError(f"{path}: give list items one by one ({path}.0..., {path}.1...), not a list")
        else:
            out[path] = value
    return out


MAX_YAML_VALUES = 100_000  # a YAML file expanding to more values than this (aliases of aliases) is refused


class _Loader(yaml.SafeLoader):
    """safe_load (no tags are ever run) that refuses a key given twice in one mapping (the last would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                twice = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class says so
                break
            if twice and key != "<<":
                raise ConfigError(f"key {key!r} is given twice (line {key_node.start_mark.line + 1}); "
                                  "each key once")
        return super().construct_mapping(node, deep)


def _expanded(node, memo: dict, open_: set) -> int:
    """How many values `node` stands for once its aliases are expanded (an alias counts its whole anchor)."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in open_:
        raise ConfigError("a YAML alias refers to the value that holds it")
    open_.add(id(node))
    children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else (
        node.value if isinstance(node, yaml.SequenceNode) else [])
    memo[id(node)] = count = 1 + sum(_expanded(c, memo, open_) for c in children)
    open_.discard(id(node))
    if count > MAX_YAML_VALUES:
        raise ConfigError(f"expands to more than {MAX_YAML_VALUES} values through YAML aliases (*name)")
    return count


def load_yaml(text: str):
    """A YAML document as Python values: safe tags only, each mapping key once, at most MAX_YAML_VALUES values
    after alias expansion; ConfigError or yaml.YAMLError otherwise."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded(node, {}, set())
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError("nested too deeply") from None
    finally:
        loader.dispose()


def read_yaml_file(path: str, what: str = "config file"):
    """The YAML value in the file at `path` (UTF-8 text), or ConfigError naming the file in one line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror}") from None
    try:
        return load_yaml(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {err.start})") from None
    except ConfigError as err:
        raise ConfigError(f"{what} {path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(err).splitlines()[0]}") from None


def read_yaml(path: str) -> dict:
    """A YAML file that must hold a mapping (see read_yaml_file)."""
    tree = read_yaml_file(path)
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not a {type(tree).__name__}")
    return tree
