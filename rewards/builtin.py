"""Built-in reward functions, registered by name. Each docstring states the sign and the scale.

All of them are unweighted: ``RewardCombiner`` applies the weights (see ``combine.DEFAULT_WEIGHTS``).
"""

from __future__ import annotations

import re

from dialogrl.rewards.base import register_reward
from dialogrl.types import Transition


def _count_kind(t: Transition, kind: str) -> int:
    return sum(1 for result in t.actions if result.kind == kind)


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

GREETING_SCORE = 0.2
COURTESY_SCORE = 0.3
EMPATHY_SCORE = 0.5
RUDE_PENALTY = 0.5


def customer_sounds_upset(text: str) -> bool:
    """True when a customer message has upset wording, repeated '!' or a shouted (all-caps) word."""
    return bool(_UPSET_WORDS.search(text) or _SHOUTING.search(text))


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
    text = _ACTION.sub(" ", t.reply)
    score = 0.0
    if t.turn == 0 and _GREETING.search(text):
        score += GREETING_SCORE
    if _COURTESY.search(text):
        score += COURTESY_SCORE
    if _EMPATHY.search(text) and customer_sounds_upset(_last_customer_message(t)):
        score += EMPATHY_SCORE
    rude = {match.group(0).lower() for match in _RUDE.finditer(text)}
    score -= RUDE_PENALTY * len(rude)
    return max(-1.0, min(1.0, score))
