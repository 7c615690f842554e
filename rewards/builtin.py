"""Built-in reward functions, registered by name. Each docstring states the sign and the scale.

All of them are unweighted: ``RewardCombiner`` applies the weights (see ``combine.DEFAULT_WEIGHTS``).
"""

from __future__ import annotations

import re

from dialogrl.rewards.base import register_reward
from dialogrl.types import Transition


def _count_kind(t: Transition, kind: str) -> int:
    count = 0
    for result in t.actions:  # a plain loop: this runs twice every step
        if result.kind == kind:
            count += 1
    return count


@register_reward("success")
def success(t: Transition) -> float:
    """+1.0 on the turn that ends a solved episode, else 0.0 (success is only known at the end)."""
    return 1.0 if t.success is True else 0.0


@register_reward("violation")
def violation(t: Transition) -> float:
    """-1.0 per action in this reply that the business policy forbids (kind "violation"); 0.0 if none."""
    return -float(_count_kind(t, "violation"))


@register_reward("invalid_action")
def invalid_action(t: Transition) -> float:
    """-1.0 per malformed, unknown or badly-argued action in this reply (kind "invalid"); 0.0 if none."""
    return -float(_count_kind(t, "invalid"))


@register_reward("turn_cost")
def turn_cost(t: Transition) -> float:
    """-1.0 every agent turn, so shorter successful conversations score higher."""
    return -1.0


# Politeness: a small lexical heuristic written by hand (no library scores customer-service courtesy).
# Each category counts once per reply so repeating "please please please" cannot farm reward.
_ACTION = re.compile(r"\[[^\[\]]*\]|\[[^\]]*$")
_GREETING = re.compile(r"\b(hello|hi|hey|good (morning|afternoon|evening)|welcome)\b", re.I)
_COURTESY = re.compile(r"\b(please|thanks?|thank you|appreciate|happy to help|glad to help|my pleasure)\b", re.I)
_EMPATHY = re.compile(
    r"\b(sorry|apologi[sz]e|apologies|i understand|understandable|i hear you|frustrating|that must be)\b", re.I
)
_RUDE = re.compile(
    r"\b(stupid|idiot\w*|dumb|moron|shut up|not my problem|your (own )?fault|calm down|"
    r"deal with it|pathetic|stop whining)\b",
    re.I,
)
_UPSET_WORDS = re.compile(
    r"\b(angry|annoyed|frustrat\w*|furious|upset|ridiculous|unacceptable|terrible|awful|worst|"
    r"disappointed|useless|fed up|still waiting|joke|seriously)\b",
    re.I,
)
_SHOUTING = re.compile(r"!!|\b[A-Z]{4,}\b")

# One scan for all the reply patterns finds nothing in most replies, which then need no separate scans
# (a match of one pattern is a match of their union, so none is missed).
_ANY_POLITENESS = re.compile("|".join(f"(?:{p.pattern})" for p in (_GREETING, _COURTESY, _EMPATHY, _RUDE)), re.I)
# Each re.I pattern also runs case-sensitively on lower-cased text, about twice as fast. For ASCII text the
# matches are the same: the patterns are all lower case, and re.I adds only non-ASCII case pairs ('ſ' ~ 's').
_CASED = {p: re.compile(p.pattern) for p in (_GREETING, _COURTESY, _EMPATHY, _RUDE, _UPSET_WORDS, _ANY_POLITENESS)}
assert all(p.flags & re.I and p.pattern == p.pattern.lower() for p in _CASED)


def _search(pattern: re.Pattern[str], text: str, lower: str | None) -> re.Match[str] | None:
    """``pattern.search(text)``; ``lower`` is ``text.lower()`` when ``text`` is ASCII, else None."""
    return pattern.search(text) if lower is None else _CASED[pattern].search(lower)

GREETING_SCORE = 0.2
COURTESY_SCORE = 0.3
EMPATHY_SCORE = 0.5
RUDE_PENALTY = 0.5


def customer_sounds_upset(text: str) -> bool:
    """True when a customer message has upset wording, repeated '!' or a shouted (all-caps) word."""
    return bool(_search(_UPSET_WORDS, text, text.lower() if text.isascii() else None) or _SHOUTING.search(text))


def _last_customer_message(t: Transition) -> str:
    for message in reversed(t.messages):
        if message.get("role") == "user":
            return str(message.get("content") or "")
    return ""


@register_reward("politeness")
def politeness(t: Transition) -> float:
    """Courtesy of the reply text outside [actions], in [-1, 1] (positive is polite).

    +0.2 for a greeting on the first turn, +0.3 for please/thanks, +0.5 for an apology or empathy when the
    customer's last message sounds upset (unprompted apologies earn nothing), -0.5 per distinct rude phrase.
    """
    text = _ACTION.sub(" ", t.reply) if "[" in t.reply else t.reply
    lower = text.lower() if text.isascii() else None
    if not _search(_ANY_POLITENESS, text, lower):
        return 0.0
    score = 0.0
    if t.turn == 0 and _search(_GREETING, text, lower):
        score += GREETING_SCORE
    if _search(_COURTESY, text, lower):
        score += COURTESY_SCORE
    if _search(_EMPATHY, text, lower) and customer_sounds_upset(_last_customer_message(t)):
        score += EMPATHY_SCORE
    matches = _RUDE.finditer(text) if lower is None else _CASED[_RUDE].finditer(lower)
    rude = {match.group(0).lower() for match in matches}
    score -= RUDE_PENALTY * len(rude)
    return max(-1.0, min(1.0, score))
