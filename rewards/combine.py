"""Weighted sum of reward components, each reported separately (for ``info`` and evaluation)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dialogrl.rewards.base import get_reward, parse_reward_spec
from dialogrl.types import DialogRLError, Message, RewardError, RewardFn, Transition

DEFAULT_WEIGHTS: dict[str, float] = {
    "success": 1.0,
    "violation": 0.5,
    "invalid_action": 0.25,
    "turn_cost": 0.02,
    "politeness": 0.05,
}
"""The reward used when none is given. A bare built-in name in a spec string also takes its weight from here."""

RewardSpec = str | RewardFn | tuple[str | RewardFn, float] | Mapping[str | RewardFn, float]
"""One item of a reward specification (see ``RewardCombiner.from_specs``)."""


@dataclass(frozen=True)
class RewardComponent:
    """One named, weighted reward function."""

    name: str
    """Registry name, the full import path, or the callable's ``__name__``."""
    fn: RewardFn
    """The reward function."""
    weight: float
    """Multiplier applied to the function's value; 0 keeps the component reported but contributing 0."""


class RewardCombiner:
    """Calls every component on a transition and returns the weighted total and each weighted contribution."""

    def __init__(self, components: Iterable[RewardComponent]) -> None:
        self.components = tuple(components)
        if not self.components:
            raise DialogRLError("reward has no components; give at least one, or None for the defaults")
        seen: set[str] = set()
        for comp in self.components:
            if comp.name in seen:
                raise DialogRLError(f"reward '{comp.name}' is given twice")
            seen.add(comp.name)

    @classmethod
    def from_specs(cls, specs: RewardSpec | Iterable[RewardSpec] | RewardCombiner | None = None) -> RewardCombiner:
        """Build a combiner from what a user passes as ``reward=`` (gym.make, YAML or CLI).

        ``specs`` is None (``DEFAULT_WEIGHTS``), an existing combiner, or one item or a sequence of items, each:
        a string ``NAME_OR_PATH[=WEIGHT]`` (a bare built-in name takes its ``DEFAULT_WEIGHTS`` weight, anything
        else 1.0), a ``(name_or_callable, weight)`` tuple, a dict ``{name_or_callable: weight}``, or a bare
        callable (weight 1.0, named by its ``__name__``).
        """
        if specs is None:
            specs = dict(DEFAULT_WEIGHTS)
        if isinstance(specs, RewardCombiner):
            return specs
        if isinstance(specs, (str, Mapping)) or callable(specs) or _is_pair(specs):
            specs = [specs]  # type: ignore[list-item]
        if not isinstance(specs, Iterable):
            raise DialogRLError(f"bad reward spec {specs!r}: expected a name, a callable, a dict or a list")
        components: list[RewardComponent] = []
        for item in specs:
            components.extend(_components_from(item))
        return cls(components)

    @property
    def names(self) -> list[str]:
        """Component names, in order."""
        return [comp.name for comp in self.components]

    @property
    def weights(self) -> dict[str, float]:
        """Component weights by name."""
        return {comp.name: comp.weight for comp in self.components}

    def __call__(self, t: Transition) -> tuple[float, dict[str, float]]:
        """Score one transition: ``(weighted total, {name: weighted contribution})``; raises RewardError."""
        contributions: dict[str, float] = {}
        for comp in self.components:
            try:
                value = comp.fn(t)
            except (Exception, SystemExit) as exc:  # sys.exit() in a reward would end the run without a word
                raise RewardError(f"reward '{comp.name}' raised {type(exc).__name__}: {exc}") from exc
            if type(value) is not float:  # exact floats (the usual case) skip the slower ABC check
                # bool is rejected too, so a predicate returned by mistake (`return t.success`) fails on every
                # turn, not only on the turns where it happens to be None.
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    raise RewardError(
                        f"reward '{comp.name}' returned {type(value).__name__} {value!r:.40}, expected a float"
                    )
                value = float(value)
            if not math.isfinite(value):
                raise RewardError(f"reward '{comp.name}' returned {value}")
            contributions[comp.name] = comp.weight * value + 0.0  # + 0.0 turns -0.0 into 0.0
        return sum(contributions.values()), contributions

    @property
    def batched(self) -> bool:
        """Whether a component scores many replies at once (a ``prefetch`` attribute, e.g. a reward model)."""
        return any(hasattr(comp.fn, "prefetch") for comp in self.components)

    def prefetch(self, conversations: list[list[dict[str, Any]]]) -> None:
        """Let the batched components score the replies the next ``step`` calls will judge (each conversation
        ends with its reply)."""
        for comp in self.components:
            prefetch = getattr(comp.fn, "prefetch", None)
            if prefetch is not None:
                prefetch(conversations)

    def prefetch_replies(self, histories: Sequence[Sequence[Message]], replies: Sequence[Any],
                         max_chars: int | None = None) -> None:
        """``prefetch`` for the replies about to be stepped, each after its conversation so far; ``max_chars``
        cuts each reply as the environment will (its action space's ``max_length``), so the keys match."""
        if not all(isinstance(r, str) for r in replies):
            return  # act-level environments: nothing to score in batch
        self.prefetch([[*history, {"role": "assistant", "content": reply[:max_chars]}]
                       for history, reply in zip(histories, replies, strict=True)])

    def __repr__(self) -> str:
        inner = ", ".join(f"{comp.name}={comp.weight:g}" for comp in self.components)
        return f"RewardCombiner({inner})"


def batched_reward(env: Any) -> tuple[RewardCombiner | None, int | None]:
    """The env's reward combiner when a component scores in batches (else None), and its reply length limit.

    Rollout loops step many environments per turn; with a batched component they call
    ``prefetch_replies`` first. Environments made from one spec share their components, so one stands for all.
    """
    combiner = getattr(getattr(env, "unwrapped", env), "reward_fn", None)
    if not isinstance(combiner, RewardCombiner) or not combiner.batched:
        return None, None
    return combiner, getattr(env.action_space, "max_length", None)


def _is_pair(item: object) -> bool:
    return (
        isinstance(item, tuple)
        and len(item) == 2
        and (isinstance(item[0], str) or callable(item[0]))
        and isinstance(item[1], numbers.Real)
    )


def _components_from(item: Any) -> list[RewardComponent]:
    if isinstance(item, str):
        name, weight = parse_reward_spec(item)
        if "=" not in item:
            weight = DEFAULT_WEIGHTS.get(name, weight)
        return [_component(name, weight, item)]
    if isinstance(item, Mapping):
        return [_component(key, weight, item) for key, weight in item.items()]
    if isinstance(item, tuple):
        if len(item) != 2:
            raise DialogRLError(f"bad reward spec {item!r}: a tuple must be (name_or_callable, weight)")
        return [_component(item[0], item[1], item)]
    if callable(item):
        return [_component(item, 1.0, item)]
    raise DialogRLError(
        f"bad reward spec {item!r}: expected 'NAME_OR_PATH[=WEIGHT]', (name, weight), {{name: weight}} or a callable"
    )


def _component(key: str | Callable[..., Any], weight: Any, source: object) -> RewardComponent:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(float(weight)):
        raise DialogRLError(f"bad reward spec {source!r}: weight {weight!r} is not a finite number")
    if isinstance(key, str):
        name = key.strip()
        fn = get_reward(name)
    elif callable(key):
        fn = key
        name = getattr(key, "__name__", None) or type(key).__name__
    else:
        raise DialogRLError(f"bad reward spec {source!r}: {key!r} is neither a reward name nor a callable")
    return RewardComponent(name=name, fn=fn, weight=float(weight))
