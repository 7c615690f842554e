"""A seeded, agenda-based simulated customer.

The customer knows a few slots (phone number, zip, order number, new address, product). It opens with its need,
answers what the agent asks for (recognised by keywords), thanks the agent once told the outcome, and leaves
after more wasted agent turns than its persona's patience allows. Phrasing comes from ``_customer.yaml``, with
disjoint train and test templates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from dialogrl.config import read_yaml

from .rng import Draws
from .scenario import SCENARIO_DIR, Goal, Scenario

# Each slot the agent can ask for, recognised in the agent's text by these keywords.
REQUEST_PATTERNS = {
    "phone": re.compile(r"phone|telephone|mobile"),
    "zip": re.compile(r"\bzip|postal|post ?code"),
    "order": re.compile(r"order (?:number|id|#|no\b)|which order"),
    "address": re.compile(r"new address|which address|what address|address should"),
    "product": re.compile(r"which (?:product|item)|what product|product name"),
}
HELP_PATTERN = re.compile(r"how (?:can|may) i (?:help|assist)|what can i do for you")


class _Blank(dict):
    """Template values; a placeholder with no value becomes empty instead of raising."""

    def __missing__(self, key: str) -> str:
        return ""


@dataclass(frozen=True)
class Persona:
    name: str
    patience: int
    upfront: tuple[str, ...]
    one_slot: bool
    typo_rate: float


@cache
def customer_config(path: str = str(SCENARIO_DIR / "_customer.yaml")) -> dict[str, Any]:
    data = read_yaml(Path(path), "customer file")
    data["personas"] = {
        name: Persona(name, int(p["patience"]), tuple(p["upfront"]), bool(p["one_slot"]), float(p["typo_rate"]))
        for name, p in data["personas"].items()
    }
    return data


def _garble(rng: Draws, text: str, rate: float) -> str:
    """Typo noise on template words only, so slot values (ids, phone numbers) stay exact."""
    if rate <= 0:
        return text
    words = text.split(" ")
    for i, word in enumerate(words):
        if "{" in word or len(word) < 4 or rng.random() >= rate:
            continue
        j = int(rng.integers(1, len(word) - 2))
        if rng.random() < 0.5:
            words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2:]
        else:
            words[i] = word[:j] + word[j + 1:]
    return " ".join(words).lower() if rate >= 0.2 else " ".join(words)


class SimulatedCustomer:
    """One customer for one episode; every random choice comes from the episode's generator."""

    def __init__(self, rng: Draws, scenario: Scenario, goal: Goal, persona: Persona, split: str,
                 drop: tuple[Draws, float] | None = None) -> None:
        """``drop``: (a random stream of its own, a chance) to leave each word of the opening's request template
        out (a training augmentation); its own stream, so the episode's draws are what they are without it."""
        self.rng, self.scenario, self.goal, self.persona = rng, scenario, goal, persona
        self.phrases: dict[str, Any] = customer_config()["phrases"][split]
        self.split = split
        self.given: set[str] = set()
        self.wasted = 0
        self.satisfied = False
        self.left = False
        self.drop = drop

    def _say(self, key: str, **values: str) -> str:
        template = _garble(self.rng, self.phrases[key][int(self.rng.integers(len(self.phrases[key])))],
                           self.persona.typo_rate)
        return template.format(**values)

    def _slot(self, slot: str) -> str:
        self.given.add(slot)
        return self._say(slot, **{slot: self.goal.slots[slot]})

    def opening(self) -> str:
        templates = self.scenario.templates[self.split]
        question = self.phrases["question"].get(self.goal.question, "")
        if isinstance(question, list):  # several phrasings of the question (one string draws nothing)
            question = question[int(self.rng.integers(len(question)))]
        text = _garble(self.rng, templates[int(self.rng.integers(len(templates)))], self.persona.typo_rate)
        if self.drop is not None:  # after the typos, whose draws depend on the words
            rng, rate = self.drop
            words = text.split(" ")
            keep = ["{" in w or rng.random() >= rate for w in words]
            plain = [i for i, w in enumerate(words) if "{" not in w]
            if plain and not any(keep[i] for i in plain):  # never a request of slot values alone: one word stays
                keep[plain[int(rng.integers(len(plain)))]] = True
            text = " ".join(w for w, k in zip(words, keep, strict=True) if k)
        parts = [text.format_map(_Blank(self.goal.slots, question=question))]
        if self.goal.slots.get("product"):
            self.given.add("product")
        if self.persona.name == "angry":
            parts.insert(0, self._say("angry_prefix"))
        parts += [self._slot(s) for s in self.persona.upfront if s in self.goal.slots and s not in self.given]
        return " ".join(parts)

    def respond(self, agent_text: str, progressed: bool, informed: bool) -> str | None:
        """The customer's answer to one agent turn; ``None`` when the agent said nothing to the customer.

        ``progressed``: the turn ran a valid tool action; ``informed``: it told the customer the outcome.
        """
        if informed:
            self.satisfied = True
            return self._say("thanks")
        if not agent_text:  # the agent is working silently: fine while its actions go through
            if not progressed:
                self.wasted += 1
                if self.wasted > self.persona.patience and not self.satisfied:
                    self.left = True
                    return self._say("leave")
            return None
        lower = agent_text.lower()
        asked = sorted((m.start(), slot) for slot, pat in REQUEST_PATTERNS.items() if (m := pat.search(lower)))
        answers: list[str] = []
        new_info = False
        if self.persona.one_slot:  # answers one thing per turn: the first asked that it has not told yet
            fresh = [a for a in asked if a[1] not in self.given]
            asked = fresh[:1] or asked[:1]
        for _, slot in asked:
            if slot in self.goal.slots:
                new_info |= slot not in self.given
                answers.append(self._slot(slot))
            else:
                answers.append(self._say("unknown"))
        if not answers:
            key = "restate" if HELP_PATTERN.search(lower) else "nudge"
            answers.append(self._say(key, summary=self.scenario.summary.format_map(_Blank(self.goal.slots))))
        if not (progressed or new_info):
            self.wasted += 1
            if self.wasted > self.persona.patience and not self.satisfied:
                self.left = True
                return self._say("leave")
        if self.persona.name == "angry" and not new_info and not progressed:
            answers.insert(0, self._say("angry_prefix"))
        return " ".join(answers)
