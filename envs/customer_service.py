"""The text customer-service environment."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from dialogrl.types import ActionResult, DialogRLError, Message, ParsedAction, Transition

from .actions import MAX_ACTIONS, MAX_REPLY_CHARS, ParseError, parse_reply
from .database import REFUND_WINDOW_DAYS, RETURN_WINDOW_DAYS
from .rng import EpisodeRandom, weighted_index
from .scenario import SPLITS, Scenario, builtin_scenarios, load_scenario, sample_world
from .simulator import SimulatedCustomer, customer_config

CHARSET = "".join(chr(i) for i in range(32, 127)) + "\n"
_TO_CHARSET = {i: "?" for i in range(32) if i != 10} | {127: "?"}
_OUTSIDE_CHARSET = re.compile(r"[^\n\x20-\x7e]")
SYSTEM_PROMPT = (
    "You are a support agent of an online shop. Act with [action key=value] in your reply. Actions: "
    "verify phone zip | lookup_order order | refund order | return order | update_address order address | "
    "reset_password | cancel_subscription | lookup_product name | escalate reason | end. "
    "Policy: verify identity before any order or account change; refunds within "
    f"{REFUND_WINDOW_DAYS} days of delivery, returns within {RETURN_WINDOW_DAYS}, address changes before "
    "shipping, never twice; escalate requests outside policy; tell the customer the outcome, then end."
)
ROLE_NAMES = {"user": "customer", "assistant": "agent", "tool": "tool"}


def sanitize(text: str) -> str:
    """Map any text into the observation charset (printable ASCII and newline)."""
    if _OUTSIDE_CHARSET.search(text) is None:  # the usual case: nothing to map
        return text
    return text.encode("ascii", "replace").decode("ascii").translate(_TO_CHARSET)


class CustomerServiceEnv(gym.Env[str, str]):
    """A multi-turn customer-service conversation with a simulated customer and a back-office database.

    ## Action Space
    ``Text``: the agent's reply. Actions on the world are written inline, e.g. ``[refund order=A10420]``
    (syntax and tool table in ``dialogrl.envs.actions``). Replies are cut at 2,000 characters; any string is
    accepted: malformed, unknown or forbidden actions become penalised events and tool error messages.

    ## Observation
    ``Text``: the conversation so far (``customer:``, ``agent:``, ``tool:`` lines, printable ASCII), the last
    ``obs_chars`` characters. ``info["messages"]`` holds the same conversation in Hugging Face messages format,
    starting with the system prompt that states the business policy.

    ## Rewards
    A weighted sum of reward functions (``dialogrl.rewards``; default: success, violation, invalid_action,
    turn_cost, politeness), each reported in ``info["reward_components"]``. ``reward=`` takes names,
    ``pkg.module:function`` paths, ``NAME=WEIGHT`` specs, a ``{name: weight}`` dict or callables.

    ## Starting State
    ``reset(seed)`` draws an intent, a persona, a database (3 customers, their orders, the catalogue) and a goal;
    the customer opens the conversation.

    ## Episode End
    Terminated when the agent runs ``[end]`` or ``[escalate]``, or the customer runs out of patience.
    Truncated after ``max_turns`` agent turns. Success (``info["success"]``) is judged at the end: the database
    is in the goal's expected state, the customer was told the outcome, and no policy was violated.

    ## Arguments
    ``split`` ("train" | "test"), ``intents`` (names to keep), ``personas`` (names to keep),
    ``scenario_files`` (extra scenario YAML paths), ``reward``, ``max_turns``, ``obs_chars``, ``render_mode``
    ("ansi" returns the transcript), ``opening_word_dropout`` (a training augmentation, default 0: each word of
    the opening's request template is left out with this chance, slot values never, from a random stream of its
    own, so the world, the customer's later draws and an opening kept whole are what they are without it).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(
        self,
        split: str = "train",
        intents: Sequence[str] | None = None,
        personas: Sequence[str] | None = None,
        scenario_files: str | Path | Sequence[str | Path] | None = None,
        reward: Any = None,
        max_turns: int = 12,
        obs_chars: int = 4096,
        render_mode: str | None = None,
        opening_word_dropout: float = 0.0,
    ) -> None:
        from dialogrl.rewards import RewardCombiner  # rewards import the env's types only

        if split not in ("train", "test"):
            raise DialogRLError(f"unknown split '{split}'; use 'train' or 'test'")
        if render_mode not in (None, "ansi"):
            raise DialogRLError(f"unknown render_mode '{render_mode}'; use 'ansi'")
        if max_turns < 1:
            raise DialogRLError(f"max_turns must be at least 1, got {max_turns}")
        if obs_chars < 1:
            raise DialogRLError(f"obs_chars must be at least 1, got {obs_chars}")
        if not isinstance(opening_word_dropout, int | float) or not 0 <= opening_word_dropout < 1:  # and NaN
            raise DialogRLError(f"opening_word_dropout must be a number in [0, 1), got {opening_word_dropout!r}")
        self.opening_word_dropout = float(opening_word_dropout)
        self.split, self.max_turns, self.obs_chars, self.render_mode = split, max_turns, obs_chars, render_mode
        self.scenarios = _select_scenarios(intents, scenario_files)
        mix = customer_config()["persona_mix"][split]
        if personas is not None:
            unknown = sorted(set(personas) - set(customer_config()["personas"]))
            if unknown:
                raise DialogRLError(
                    f"unknown persona '{unknown[0]}'; known: {', '.join(customer_config()['personas'])}")
            mix = {p: w for p, w in mix.items() if p in personas} or {p: 1.0 for p in personas}
            if not mix:
                raise DialogRLError("no personas selected")
        self.persona_mix = mix
        self.reward_fn = RewardCombiner.from_specs(reward)
        self.observation_space = spaces.Text(max_length=obs_chars, min_length=0, charset=CHARSET)
        self.action_space = spaces.Text(max_length=MAX_REPLY_CHARS, min_length=0, charset=CHARSET)
        self.messages: list[Message] = []
        self._obs_text, self._obs_seen = "", 0

    # --- gym API ---------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        # Mix the split into the draw: the same seed must not give the same world relabelled in both splits.
        # EpisodeRandom: the draws of np.random.default_rng(same seed), several times cheaper per call.
        key = [int(self.np_random.integers(2**63)), SPLITS.index(self.split)]
        rng = EpisodeRandom(key)
        self.scenario: Scenario = self.scenarios[int(rng.integers(len(self.scenarios)))]
        names = list(self.persona_mix)
        persona = customer_config()["personas"][names[weighted_index(rng, tuple(self.persona_mix.values()))]]
        self.db, self.goal, me = sample_world(rng, self.scenario, self.split)
        drop = (EpisodeRandom([*key, 1]), self.opening_word_dropout) if self.opening_word_dropout else None
        self.customer = SimulatedCustomer(rng, self.scenario, self.goal, persona, self.split, drop)
        self.messages = [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": self.customer.opening()}]
        self._obs_text, self._obs_seen = "", 0  # the observation text, extended as messages are added
        self.turn, self.done, self.informed = 0, False, False
        self.violations: list[str] = []
        self.invalid_actions = 0
        self.looked_up: set[str] = set()
        self.episode_return = 0.0
        self.component_sums: dict[str, float] = {}
        self.scenario_info = {
            "intent": self.scenario.intent, "persona": persona.name, "split": self.split, "seed": seed,
            "target": self.scenario.target, "resolution": self.scenario.resolution,
            "requires_verification": self.scenario.requires_verification, "eligible": self.goal.eligible,
            "inform": list(self.goal.inform), "customer": me.name,
        }
        return self._observation(), self._info({}, success=False)

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if not self.messages or self.done:  # messages is empty until the first reset
            raise DialogRLError("the episode is over: call reset() before step()")
        reply = action if isinstance(action, str) else str(action)
        reply = reply[:MAX_REPLY_CHARS]
        parsed, text = parse_reply(reply)
        results = self._run_actions(parsed)
        self.messages.append({"role": "assistant", "content": reply})
        self.messages += [{"role": "tool", "content": r.message} for r in results]
        progressed = ended = False  # a valid tool action ran / the agent ended the conversation
        for r in results:
            if r.ok:
                progressed = True
                ended = ended or r.action.name in ("end", "escalate")
        # Only actions change the database, and they have all run: compare with the goal once.
        goal_state = self.db.state() == self.goal.expected_state
        informed_now = not self.informed and self._tells_outcome(text, goal_state)
        self.informed |= informed_now
        customer_reply = None
        if not ended:
            customer_reply = self.customer.respond(text, progressed, informed_now)
            if customer_reply is not None:
                self.messages.append({"role": "user", "content": customer_reply})
        self.turn += 1
        terminated = ended or self.customer.left
        truncated = not terminated and self.turn >= self.max_turns
        self.done = terminated or truncated
        success = self._judge(goal_state)
        transition = Transition(
            messages=self.messages, reply=reply, actions=results, scenario=self.scenario_info, turn=self.turn - 1,
            terminated=terminated, truncated=truncated, success=success if self.done else None,
            customer_reply=customer_reply,
            info={"violations_so_far": len(self.violations), "persona": self.customer.persona.name,
                  "informed": self.informed},
        )
        reward, components = self.reward_fn(transition)
        self.episode_return += reward
        sums = self.component_sums
        for name, value in components.items():
            sums[name] = sums.get(name, 0.0) + value
        return self._observation(), float(reward), terminated, truncated, self._info(components, success, results)

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages) + "\n"
        return None

    # --- internals -------------------------------------------------------------------------------------------
    def _run_actions(self, parsed: list[ParsedAction | ParseError]) -> list[ActionResult]:
        results: list[ActionResult] = []
        for i, item in enumerate(parsed):
            if isinstance(item, ParseError):
                bad = ParsedAction("invalid", {}, item.raw[:80])
                result = ActionResult(bad, False, f"error: invalid action {item.raw[:80]!r}: {item.reason}", "invalid")
            elif i >= MAX_ACTIONS:
                result = ActionResult(item, False, f"error: more than {MAX_ACTIONS} actions in one reply", "invalid")
            elif results and results[-1].ok and results[-1].action.name in ("end", "escalate"):
                result = ActionResult(item, False, "error: the conversation has already ended", "invalid")
            else:
                result = self.db.apply(item)
                if result.ok and item.name in ("lookup_order", "lookup_product"):
                    self.looked_up.add(next(iter(item.args.values())).lower())
            if result.kind == "violation":
                self.violations.append(result.message)
            elif result.kind == "invalid":
                self.invalid_actions += 1
            results.append(result)
        return results

    def _tells_outcome(self, text: str, goal_state: bool) -> bool:
        """The reply states every fact the customer must hear, after the goal state was reached (``goal_state``)."""
        if not self.goal.inform or not goal_state:
            return False
        if self.scenario.resolution == "none":  # read-only intents: the fact must come from a lookup, not a guess
            target = self.goal.slots.get("order") or self.goal.slots.get("product", "")
            if target.lower() not in self.looked_up:
                return False
        lower = text.lower()
        return all(fact.lower() in lower for fact in self.goal.inform)

    def _judge(self, goal_state: bool) -> bool:
        if not self.goal.eligible and self.goal.slots.get("order", "").lower() not in self.looked_up:
            return False  # an escalation is only right once the agent has seen why: blind escalation is no solve
        return not self.violations and goal_state and (self.informed or not self.goal.inform)

    def _observation(self) -> str:
        # Messages are only appended, so only the new ones are rendered. Sanitizing maps character to
        # character, hence sanitize(all)[-n:] == sanitize(all[-n:]).
        lines = [f"{ROLE_NAMES[m['role']]}: {m['content']}" for m in self.messages[self._obs_seen:]
                 if m["role"] != "system"]
        if lines:
            new = sanitize("\n".join(lines))
            self._obs_text = f"{self._obs_text}\n{new}" if self._obs_text else new
        self._obs_seen = len(self.messages)
        return self._obs_text[-self.obs_chars:]

    def _info(self, components: dict[str, float], success: bool, results: list[ActionResult] = ()) -> dict[str, Any]:
        info: dict[str, Any] = {
            "messages": [m.copy() for m in self.messages],  # the caller's copies: the env's stay intact
            "success": bool(success),
            "violations": list(self.violations),
            "invalid_actions": self.invalid_actions,
            "reward_components": dict(components),
            "scenario": dict(self.scenario_info),
            "turn": self.turn,
            "actions": [{"name": r.action.name, "ok": r.ok, "kind": r.kind, "message": r.message} for r in results],
        }
        if self.done:
            info["episode"] = {"return": self.episode_return, "turns": self.turn, "success": bool(success),
                               "reward_components": dict(self.component_sums)}
        return info


def _select_scenarios(intents: Sequence[str] | None, scenario_files: Any) -> list[Scenario]:
    scenarios = builtin_scenarios()
    if scenario_files:
        files = [scenario_files] if isinstance(scenario_files, str | Path) else list(scenario_files)
        extra = [load_scenario(f) for f in files]
        builtin = {s.intent for s in scenarios}
        taken = {s.intent: s for s in scenarios}
        for s in extra:  # a user file never silently replaces a built-in intent or another file's intent
            if s.intent in taken:
                what = "a built-in intent, from" if s.intent in builtin else "also defined in"
                raise DialogRLError(f"scenario file {s.source}: intent '{s.intent}' is {what} "
                                    f"{taken[s.intent].source}; give the scenario its own intent name")
            taken[s.intent] = s
        scenarios = scenarios + extra
    if intents is not None:
        if isinstance(intents, str):
            intents = [intents]
        by_name = {s.intent: s for s in scenarios}
        unknown = [i for i in intents if i not in by_name]
        if unknown:
            raise DialogRLError(f"unknown intent '{unknown[0]}'; known: {', '.join(sorted(by_name))}")
        scenarios = [by_name[i] for i in intents]
    if not scenarios:
        raise DialogRLError("no scenarios selected")
    return scenarios
