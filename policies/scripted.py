"""Scripted agents: ``expert`` (follows policy), ``historical`` (a mixed-quality human stand-in) and ``random``.

They read the conversation through the rule-based tracker (what any agent sees) and the scenario's routing
label (intent and which resolution it needs) from ``info["scenario"]``; they never read the hidden goal.
Stateless between calls: per-episode randomness is derived from (policy seed, scenario seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dialogrl.envs.dialogue_acts import ACTS, DialogueState, outcome_text, render_act
from dialogrl.envs.rng import EpisodeRandom  # the draws of np.random.default_rng, cheaper
from dialogrl.types import DialogRLError, Message


def expert_acts(state: DialogueState, scenario: dict[str, Any], verify: bool = True,
                respect_policy: bool = True) -> list[str]:
    """The next acts of an agent that follows the business policy (the switches let ``historical`` break it)."""
    resolution, target = scenario["resolution"], scenario["target"]
    if state.resolved:
        return ["inform", "end"]
    asks = []
    if target == "order" and not state.order:
        asks.append("ask_order")
    needs_identity = verify and resolution != "none" and scenario["requires_verification"]
    if needs_identity and not state.verified and not (state.phone and state.zip):
        asks.append("ask_identity")
    if target == "product" and not state.product:
        asks.append("ask_product")
    if resolution == "update_address" and not state.address:
        asks.append("ask_address")
    if asks:
        return asks
    acts = []
    if needs_identity and not state.verified:
        acts.append("verify")
    if target == "order" and not state.order_facts:
        return acts + ["lookup_order"]
    if target == "product" and not state.product_facts:
        return acts + ["lookup_product"]
    if resolution == "none":
        return ["inform", "end"]
    if respect_policy and state.eligible.get(resolution) is False:
        return ["escalate"]
    return acts + [resolution]


def join_acts(acts: list[str], state: DialogueState) -> str:
    if acts == ["inform", "end"]:
        return outcome_text(state) + " " + render_act("end", state)
    return " ".join(render_act(a, state) for a in acts)


class ExpertPolicy:
    """Follows the business policy with no wasted turns."""

    name = "expert"

    def act(self, messages: list[Message], info: dict[str, Any]) -> str:
        state = DialogueState().update(messages)
        return join_acts(expert_acts(state, info["scenario"]), state)

    def act_batch(self, conversations: list[list[Message]], infos: list[dict[str, Any]]) -> list[str]:
        return [self.act(m, i) for m, i in zip(conversations, infos, strict=True)]


@dataclass
class HistoricalErrors:
    """Per-episode error rates of the human-like agent behind the 'past conversation logs'."""

    skip_verification: float = 0.3
    """Changes orders/accounts without verifying identity (a policy violation)."""
    ignore_eligibility: float = 0.4
    """Misapplies the refund/return/address window: acts even when the tool says not eligible."""
    forget_outcome: float = 0.2
    """Ends the conversation without telling the customer the outcome."""
    ramble: float = 0.3
    """Opens with small talk that wastes a turn (impatient customers may leave)."""


class HistoricalPolicy:
    """A mixed-quality agent: the expert's flow with per-episode mistakes drawn from ``errors``."""

    name = "historical"

    def __init__(self, errors: HistoricalErrors | None = None, seed: int = 0) -> None:
        self.errors, self.seed = errors or HistoricalErrors(), seed

    def act(self, messages: list[Message], info: dict[str, Any]) -> str:
        scenario = info["scenario"]
        rng = EpisodeRandom([self.seed, int(scenario.get("seed") or 0) % 2**32, 7])
        e = self.errors
        skip, ignore, forget, ramble = (rng.random() < p for p in
                                        (e.skip_verification, e.ignore_eligibility, e.forget_outcome, e.ramble))
        state = DialogueState().update(messages)
        if ramble and state.turns == 0:
            return "Thanks for reaching out! Our systems are a little slow today, so bear with me a moment."
        if state.last_error and not state.resolved:  # a refused change: hand over rather than retry it
            return render_act("escalate", state)
        acts = expert_acts(state, scenario, verify=not skip, respect_policy=not ignore)
        if forget and acts == ["inform", "end"]:
            acts = ["end"]
        return join_acts(acts, state)

    def act_batch(self, conversations: list[list[Message]], infos: list[dict[str, Any]]) -> list[str]:
        return [self.act(m, i) for m, i in zip(conversations, infos, strict=True)]


class RandomPolicy:
    """Uniformly random dialogue acts."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def act(self, messages: list[Message], info: dict[str, Any]) -> str:
        rng = EpisodeRandom([self.seed, int(info["scenario"].get("seed") or 0) % 2**32, len(messages)])
        state = DialogueState().update(messages)
        return render_act(ACTS[int(rng.integers(len(ACTS)))], state)

    def act_batch(self, conversations: list[list[Message]], infos: list[dict[str, Any]]) -> list[str]:
        return [self.act(m, i) for m, i in zip(conversations, infos, strict=True)]


class NoisyPolicy:
    """A sloppier historical agent that also takes random acts: language coverage for the base-model corpus."""

    name = "noisy"

    def __init__(self, seed: int = 0, random_act: float = 0.25) -> None:
        self.random_act = random_act
        errors = HistoricalErrors(skip_verification=0.5, ignore_eligibility=0.6, forget_outcome=0.4, ramble=0.4)
        self.historical, self.random = HistoricalPolicy(errors, seed), RandomPolicy(seed)
        self.seed = seed

    def act(self, messages: list[Message], info: dict[str, Any]) -> str:
        rng = EpisodeRandom([self.seed, int(info["scenario"].get("seed") or 0) % 2**32, len(messages), 3])
        policy = self.random if rng.random() < self.random_act else self.historical
        return policy.act(messages, info)

    def act_batch(self, conversations: list[list[Message]], infos: list[dict[str, Any]]) -> list[str]:
        return [self.act(m, i) for m, i in zip(conversations, infos, strict=True)]


SCRIPTED = {"expert": ExpertPolicy, "historical": HistoricalPolicy, "random": RandomPolicy, "noisy": NoisyPolicy}


def historical_errors(rates: dict[str, float] | None = None) -> HistoricalErrors:
    """``HistoricalErrors`` with some rates replaced; an unknown name or a rate outside [0, 1] is an error."""
    known = HistoricalErrors.__dataclass_fields__
    for key, value in (rates or {}).items():
        if key not in known:
            raise DialogRLError(f"unknown historical error rate '{key}'; known: {', '.join(known)}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise DialogRLError(f"historical error rate '{key}' must be a number in [0, 1], got {value!r}")
    return HistoricalErrors(**{k: float(v) for k, v in (rates or {}).items()})


def parse_error_rates(items: list[str]) -> dict[str, float]:
    """``["skip_verification=0.7", ...]`` (command-line ``NAME=RATE`` items) as a dict; names are checked later."""
    rates = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError(item)
            rates[name.strip()] = float(value)
        except ValueError:
            raise DialogRLError(f"error rates are NAME=RATE (e.g. skip_verification=0.7), got '{item}'") from None
    return rates


def make_scripted(name: str, seed: int = 0, errors: dict[str, float] | None = None
                  ) -> ExpertPolicy | HistoricalPolicy | RandomPolicy | NoisyPolicy:
    """A scripted agent by name; ``errors`` replaces some of the historical agent's error rates."""
    if name not in SCRIPTED:
        raise DialogRLError(f"unknown scripted policy '{name}'; known: {', '.join(SCRIPTED)}")
    if errors and name != "historical":
        raise DialogRLError(f"error rates apply to the historical agent only, not '{name}'")
    if name == "historical":
        return HistoricalPolicy(historical_errors(errors), seed=seed)
    return SCRIPTED[name]() if name == "expert" else SCRIPTED[name](seed=seed)
