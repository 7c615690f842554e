"""The reward-function contract and its registry.

A reward function is any plain callable ``fn(t: Transition) -> float`` that scores one agent turn; the
environment calls it once per step. There are three ways to plug one in:

* register it by name with ``@register_reward("name")`` and refer to it as ``name``;
* refer to it by import path ``pkg.module:function`` (a function or a callable object) in YAML or on the CLI;
* pass the callable itself to ``gym.make(..., reward=...)``.

``get_reward`` resolves the first two forms and fails loudly, naming what is registered, on anything else.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

from dialogrl.types import DialogRLError, RewardFn

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator that registers a reward function under ``name``; registering a name twice is an error."""
    # ':' and '=' would make the name unreadable in the NAME_OR_PATH[=WEIGHT] spec form.
    if not isinstance(name, str) or not name.strip() or any(c in name for c in ":= \t\n"):
        raise DialogRLError(f"invalid reward name {name!r}: use a non-empty name without spaces, ':' or '='")

    def decorator(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise DialogRLError(f"reward '{name}' is not callable (got {type(fn).__name__})")
        if name in _REGISTRY:
            raise DialogRLError(f"reward '{name}' is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_rewards() -> dict[str, str]:
    """Registered reward names, sorted, each with the first line of its docstring ("" if it has none)."""
    out: dict[str, str] = {}
    for name in sorted(_REGISTRY):
        doc = (getattr(_REGISTRY[name], "__doc__", None) or "").strip()
        out[name] = doc.splitlines()[0] if doc else ""
    return out


def get_reward(name_or_path: str) -> RewardFn:
    """Resolve a registered reward name or an import path ``pkg.module:function`` to the callable."""
    spec = name_or_path.strip() if isinstance(name_or_path, str) else name_or_path
    if not isinstance(spec, str) or not spec:
        raise DialogRLError(f"reward must be a name or 'pkg.module:function', got {name_or_path!r}")
    if ":" in spec:
        return _import_reward(spec)
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    hint = " (import paths are written 'pkg.module:function')" if "." in spec else ""
    registered = ", ".join(sorted(_REGISTRY)) or "none"
    raise DialogRLError(f"unknown reward '{spec}'{hint}; registered: {registered}")


def _import_reward(path: str) -> RewardFn:
    module_name, _, attr_path = path.partition(":")
    if not module_name or not attr_path:
        raise DialogRLError(f"cannot import reward '{path}': expected 'pkg.module:function'")
    try:
        obj: object = importlib.import_module(module_name)
        for attr in attr_path.split("."):
            obj = getattr(obj, attr)
    # Any failure while importing user code (ImportError, SyntaxError, an exception at module level) is
    # reported as one line naming the path, not as a traceback.
    except Exception as exc:
        raise DialogRLError(f"cannot import reward '{path}': {exc}") from exc
    if isinstance(obj, type):
        raise DialogRLError(f"reward '{path}' is a class; point to a function or a callable instance")
    if not callable(obj):
        raise DialogRLError(f"reward '{path}' is not callable (got {type(obj).__name__})")
    return obj  # type: ignore[return-value]


def parse_reward_spec(spec: str) -> tuple[str, float]:
    """Split ``NAME_OR_PATH[=WEIGHT]`` into ``(name_or_path, weight)``; the weight defaults to 1.0.

    The weight follows the last ``=`` (import paths contain ``.`` and ``:`` but never ``=``).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DialogRLError(f"bad reward spec {spec!r}: expected NAME_OR_PATH[=WEIGHT]")
    name, sep, weight_text = spec.strip().rpartition("=")
    if not sep:
        return spec.strip(), 1.0
    name, weight_text = name.strip(), weight_text.strip()
    if not name:
        raise DialogRLError(f"bad reward spec '{spec}': missing reward name before '='")
    try:
        weight = float(weight_text)
    except ValueError:
        raise DialogRLError(f"bad reward spec '{spec}': weight '{weight_text}' is not a number") from None
    if not math.isfinite(weight):
        raise DialogRLError(f"bad reward spec '{spec}': weight must be finite")
    return name, weight
