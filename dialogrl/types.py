"""Types shared by environments, rewards, policies and evaluation. Imports no torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]
"""One chat turn in Hugging Face messages format: ``{"role": "system|user|assistant|tool", "content": str}``."""


class DialogRLError(ValueError):
    """A user-facing error: the CLI prints its message as one line and exits with code 2."""


class RewardError(DialogRLError):
    """A reward function raised or returned something that is not a finite number."""


@dataclass(frozen=True)
class ParsedAction:
    """One inline action found in an agent reply, e.g. ``[refund order=A10420]``."""

    name: str
    """Action name as written (lower-cased)."""
    args: dict[str, str]
    """Keyword arguments as strings."""
    raw: str
    """The exact bracketed text, for error messages."""


@dataclass
class ActionResult:
    """What the environment did with one action."""

    action: ParsedAction
    ok: bool
    """True when the action was applied to the database."""
    message: str
    """The tool message shown to the agent."""
    kind: str = "ok"
    """``ok``, ``invalid`` (malformed, unknown, bad arguments) or ``violation`` (forbidden by business policy)."""


@dataclass
class Transition:
    """Everything a reward function may look at for one agent turn.

    This is the single reward-function contract: ``reward(transition) -> float``.
    """

    messages: list[Message]
    """The conversation up to and including the agent reply and its tool messages (HF format)."""
    reply: str
    """The agent's reply text for this turn, as received."""
    actions: list[ActionResult]
    """Parsed actions in this reply, in order, with what the environment did with each."""
    scenario: dict[str, Any]
    """The episode's scenario: ``intent``, ``persona``, ``goal`` (expected outcome), ``split``, ``seed``."""
    turn: int
    """Agent turn index, starting at 0."""
    terminated: bool
    """True when this turn ended the episode (agent ended, escalated, or the customer left)."""
    truncated: bool
    """True when the turn limit ended the episode."""
    success: bool | None
    """At the episode's end: whether the task was solved; ``None`` before the end."""
    customer_reply: str | None = None
    """The simulated customer's answer to this reply, if any."""
    info: dict[str, Any] = field(default_factory=dict)
    """Extra facts (``persona_mood``, ``violations_so_far``, ...) for custom rewards."""


RewardFn = Callable[[Transition], float]
"""A reward function: a plain callable scoring one transition."""
