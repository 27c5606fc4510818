"""Configs are Python files with a ``get_config()`` returning an ml_collections ConfigDict;
the command line overrides any existing key with ``--config.path.to.key=value``.

    cfg = load_config("configs/digits_teacher.py", ["--config.train.steps=200"])

An override of a key the config does not have is refused with the closest
existing names, so a typo cannot silently train the wrong thing. Values are
parsed as Python literals and must fit the type already there (an int field
takes "3", a float field "3" or "3e-4", a bool field true/false/1/0).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os

import ml_collections

from jdistill.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be applied; says what and why."""


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"jdistill_config_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    cfg = module.get_config(arg) if arg is not None else module.get_config()
    return ml_collections.ConfigDict(cfg)


def sibling_config(here: str, name: str) -> ml_collections.ConfigDict:
    """``get_config()`` of ``NAME.py`` in the folder of the config file ``here`` (pass ``__file__``):
    a config built on another one."""
    return load_config_file(os.path.join(os.path.dirname(os.path.abspath(here)), f"{name}.py"))


def _all_keys(cfg, prefix=""):
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        yield full
        if isinstance(v, ml_collections.ConfigDict):
            yield from _all_keys(v, full + ".")


def _parse(text: str, current, key: str):
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected a bool, got {text!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # bare strings need no quotes
    if current is None or value is None:
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(current)(value)
    if isinstance(current, str) and not isinstance(value, str):
        return text
    if not isinstance(value, type(current)):
        raise ConfigError(f"--config.{key}: expected {type(current).__name__} like {current!r}, got {text!r}")
    return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
    """Apply ``--config.a.b=value`` (or ``a.b=value``) strings to a copy of ``cfg``."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for item in overrides:
        body = item[len("--config."):] if item.startswith("--config.") else item
        if "=" not in body:
            raise ConfigError(f"override {item!r} is not of the form --config.key=value")
        key, text = body.split("=", 1)
        node = cfg
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                close = difflib.get_close_matches(key, list(_all_keys(cfg)), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"unknown config key {key!r}{hint}")
            if i < len(parts) - 1:
                node = node[part]
        last = parts[-1]
        if isinstance(node[last], ml_collections.ConfigDict):
            raise ConfigError(f"config key {key!r} is a section; set one of its fields")
        node[last] = _parse(text, node[last], key)
    return cfg


def load_config(path: str, overrides=(), arg: str | None = None) -> ml_collections.ConfigDict:
    return apply_overrides(load_config_file(path, arg), overrides)


def to_dict(cfg) -> dict:
    """JSON-ready plain dict (tuples become lists)."""
    return ml_collections.ConfigDict(cfg).to_dict() if not isinstance(cfg, dict) else cfg


def from_dict(d: dict) -> ml_collections.ConfigDict:
    """Rebuild a config stored as JSON beside a checkpoint (lists stay lists)."""
    return ml_collections.ConfigDict(d)
