"""Config dataclasses from YAML files plus ``key=value`` overrides. Imports no torch.

Every command's settings are a dataclass (one docstring per field). :func:`load_config` fills one from a YAML
file, then applies command-line overrides such as ``learning_rate=1e-3`` or ``lora.r=8`` (dotted keys reach
nested dataclass fields). Values are type-checked against the field annotations, so a typo or a wrong type is
one clear :class:`~dialogrl.types.DialogRLError` line naming the file, key and value, not a deep traceback.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from difflib import get_close_matches
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from dialogrl.types import DialogRLError

T = TypeVar("T")

class _Mismatch(Exception):
    """A value does not fit an annotation; carries a short 'expected X' text."""


DEFAULTS = "<defaults>"
"""How errors name the source of settings when no config file was given."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Build ``cls`` from the YAML file at ``path`` (optional), then apply ``key=value`` overrides.

    Override values are parsed with ``yaml.safe_load`` (``3`` is an int, ``true`` a bool, ``[a, b]`` a list);
    a string field keeps the override text as written, so ``output_dir=2024`` stays a string.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    where = str(path) if path is not None else DEFAULTS
    data: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    raw_overrides: dict[str, str] = {}
    for item in overrides:
        key, value = _split_override(item)
        _set_dotted(data, key, yaml_value(value))
        raw_overrides[key] = value
    return _build(cls, data, prefix="", where=where, raw=raw_overrides)


def dump_config(instance: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically: a temp file renamed into place). Returns the path."""
    from dialogrl.outputs import write_text_atomic

    return write_text_atomic(path, yaml.safe_dump(config_to_dict(instance), sort_keys=False, allow_unicode=True))


def config_to_dict(instance: Any) -> dict[str, Any]:
    """A dataclass instance as plain YAML/JSON-safe data (paths as strings, tuples as lists)."""
    if not dataclasses.is_dataclass(instance) or isinstance(instance, type):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {instance!r}")
    return _plain(dataclasses.asdict(instance))


def yaml_value(text: str) -> Any:
    """Parse one override value as YAML; text that is not valid YAML stays a string."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def check_at_least(cfg: Any, minimum: int, *names: str) -> None:
    """Each named field of ``cfg`` is at least ``minimum``, else one line: ``name=value: must be at least N``."""
    for name in names:
        value = getattr(cfg, name)
        if value < minimum:
            raise DialogRLError(f"{name}={value}: must be at least {minimum}")


MAX_SEED = 2**32 - 1
"""The largest seed numpy's legacy seeding (and so transformers' ``set_seed``) accepts."""


def check_seeds(cfg: Any, *names: str) -> None:
    """Each named field of ``cfg`` is a seed every library here accepts (an integer in [0, 2**32 - 1]), else
    one line naming the key, before any work that the seed would reach late."""
    for name in names:
        value = getattr(cfg, name)
        if not 0 <= value <= MAX_SEED:
            raise DialogRLError(f"{name}={value}: must be a seed in [0, {MAX_SEED}]")


def check_number(cfg: Any, *names: str, above: float | None = None, at_least: float | None = None,
                 below: float | None = None, at_most: float | None = None) -> None:
    """Each named field of ``cfg`` is a finite number within the bounds given (NaN and inf never are), else one
    line naming the key and the value, e.g. ``learning_rate=nan: must be a finite number > 0``."""
    if (above is not None or at_least is not None) and (below is not None or at_most is not None):
        left = f"({above}" if above is not None else f"[{at_least}"
        right = f"{below})" if below is not None else f"{at_most}]"
        bounds = f" in {left}, {right}"
    else:
        bounds = "".join(f" {op} {limit}" for op, limit in ((">", above), (">=", at_least), ("<", below),
                                                             ("<=", at_most)) if limit is not None)
    for name in names:
        value = getattr(cfg, name)
        if not (math.isfinite(value) and (above is None or value > above) and (at_least is None or value >= at_least)
                and (below is None or value < below) and (at_most is None or value <= at_most)):
            raise DialogRLError(f"{name}={value}: must be a finite number{bounds}")


def read_yaml(path: Path, what: str = "config file") -> Any:
    """A YAML file's data; a missing, unreadable or malformed file is a one-line error naming it (and the line)."""
    if not path.is_file():
        raise DialogRLError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DialogRLError(f"{what} {path}:{line} invalid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DialogRLError(f"cannot read {what} {path}: {exc}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DialogRLError(f"{path}: expected a mapping of key: value at the top, got {type(data).__name__}")
    return data


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not sep or not key:
        raise DialogRLError(f"override '{item}': expected key=value")
    return key, value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``a.b=v`` sets ``data["a"]["b"]``; checking against the dataclass happens later, in one place."""
    *parents, last = key.split(".")
    node = data
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


def _fields(cls: type) -> tuple[dict[str, dataclasses.Field], dict[str, Any]]:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an unresolvable annotation: skip type checks rather than fail
        hints = {}
    return fields, hints


def _build(cls: type[T], data: Mapping[str, Any], *, prefix: str, where: str, raw: dict[str, str]) -> T:
    fields, hints = _fields(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if not isinstance(key, str) or key not in fields:
            hint = get_close_matches(str(key), list(fields), n=1)
            suggestion = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            given = next((k for k in raw if k == full or k.startswith(f"{full}.")), None)
            source = f"override '{given}={raw[given]}'" if given is not None else where
            raise DialogRLError(f"{source}: unknown key '{full}'{suggestion}")
        annotation = hints.get(key, Any)
        if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
            if not isinstance(value, Mapping):
                raise DialogRLError(f"{where}: key '{full}': expected a mapping, got {_show(value)}")
            kwargs[key] = _build(annotation, value, prefix=f"{full}.", where=where, raw=raw)
            continue
        try:
            kwargs[key] = _check(value, annotation)
        except _Mismatch as exc:
            text = raw.get(full)
            if text is not None and _accepts_str(annotation):
                kwargs[key] = text  # a CLI override for a string field: keep the text as typed
                continue
            dotted = next((k for k in raw if k.startswith(f"{full}.")), None)  # e.g. train_file.x=1
            source = (f"override '{full}={text}'" if text is not None else
                      f"override '{dotted}={raw[dotted]}'" if dotted is not None else f"{where}: key '{full}'")
            raise DialogRLError(f"{source}: expected {exc}, got {_show(value)}") from None
    missing = [name for name, f in fields.items() if name not in kwargs and _no_default(f)]
    if missing:
        raise DialogRLError(f"{where}: missing required key '{prefix}{missing[0]}'")
    # A value check names its key and value itself; a file (not the built-in defaults) is worth naming too.
    head = "" if where == DEFAULTS else f"{where}: "
    try:
        return cls(**kwargs)
    except DialogRLError as exc:
        raise DialogRLError(f"{head}{exc}") from None
    except (TypeError, ValueError) as exc:
        raise DialogRLError(f"{head}invalid {cls.__name__}: {exc}") from None


def _no_default(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _accepts_str(annotation: Any) -> bool:
    if annotation in (str, Any, Path):
        return True
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(annotation))
    return False


def _check(value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to fit ``annotation`` (int->float, str->Path, list->tuple) or raise _Mismatch.

    Hand-written: a small best-effort checker for the annotations configs use, not a general validator.
    """
    if annotation is Any or annotation is object:
        return value
    if annotation is None or annotation is type(None):
        if value is None:
            return None
        raise _Mismatch("null")
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        for option in sorted(args, key=lambda a: a is str):  # try str last so a list stays a list
            try:
                return _check(value, option)
            except _Mismatch:
                continue
        raise _Mismatch(" or ".join(annotation_name(a) for a in args))
    if origin is typing.Literal:
        if value in args:
            return value
        raise _Mismatch("one of " + ", ".join(repr(a) for a in args))
    if origin in (list, tuple, set, frozenset) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(annotation_name(annotation))
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Mismatch(annotation_name(annotation))
            return tuple(_check(v, a) for v, a in zip(value, args, strict=True))
        item = args[0] if args else Any
        items = [_check(v, item) for v in value]
        return (origin or annotation)(items) if (origin or annotation) is not list else items
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch("a mapping")
        key_t, val_t = args if len(args) == 2 else (Any, Any)
        return {_check(k, key_t): _check(v, val_t) for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch("true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1e3 in YAML is a float; an integer value is what the user meant
        raise _Mismatch("an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string; it means a number
                return float(value)
            except ValueError:
                pass
        raise _Mismatch("a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _Mismatch("a string")
    if annotation is Path or (isinstance(annotation, type) and issubclass(annotation, os.PathLike)):
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise _Mismatch("a path")
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise _Mismatch(annotation_name(annotation))
    return value  # an annotation this checker does not know: accept


def annotation_name(annotation: Any) -> str:
    """A type annotation as users write it (``int``, ``list[str] | None``), for errors and ``--help``."""
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(value)
    return value
