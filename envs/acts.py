"""The dialogue-act version of the customer-service tasks, for stable-baselines3."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .customer_service import CustomerServiceEnv
from .dialogue_acts import ACTS, RESOLUTION_ACTS, DialogueState, render_act
from .scenario import TARGETS

STATE_FLAGS = ("phone", "zip", "order", "address", "product", "verified", "order_facts", "product_facts",
               "resolved", "last_error", "customer_thanked")


class CustomerServiceActsEnv(gym.Env[dict[str, np.ndarray], int]):
    """The same conversations as ``CustomerService-v0``, acting through dialogue acts.

    ## Action Space
    ``Discrete(16)``: one dialogue act per turn, in ``dialogrl.envs.dialogue_acts.ACTS`` order (greet, ask_identity,
    ask_order, ask_address, ask_product, verify, lookup_order, lookup_product, refund, return, update_address,
    reset_password, cancel_subscription, inform, escalate, end). Slot values (phone, order id, ...) are filled
    from what the customer said, so an act taken too early fails like a bad text action would.

    ## Observation
    A flat ``Dict`` of ``MultiBinary`` spaces: ``target`` (order/account/product) and ``resolution`` (which tool
    the request needs, or none) from the scenario's routing label, ``state`` (what the tracker has learnt:
    known slots, verified, looked up, resolved, last tool error, customer thanked), ``eligible`` (yes/no for
    the needed resolution once looked up), and ``turn`` (one-hot of the turn index).

    ## Rewards, Episode End
    Those of the text environment it wraps (``info`` is the text environment's info).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(self, render_mode: str | None = None, **text_env_kwargs: Any) -> None:
        self.text_env = CustomerServiceEnv(render_mode=render_mode, **text_env_kwargs)
        self.render_mode = render_mode
        self.max_turns = self.text_env.max_turns
        self.action_space = spaces.Discrete(len(ACTS))
        self.observation_space = spaces.Dict({
            "target": spaces.MultiBinary(len(TARGETS)),
            "resolution": spaces.MultiBinary(len(RESOLUTION_ACTS) + 1),
            "state": spaces.MultiBinary(len(STATE_FLAGS)),
            "eligible": spaces.MultiBinary(2),
            "turn": spaces.MultiBinary(self.max_turns + 1),
        })

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        _, info = self.text_env.reset(seed=seed, options=options)
        self.tracker = DialogueState().update(info["messages"])
        self.scenario = info["scenario"]
        return self._observation(), info

    def step(self, action: int) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        act = ACTS[int(action)]
        _, reward, terminated, truncated, info = self.text_env.step(render_act(act, self.tracker))
        self.tracker.update(info["messages"])
        return self._observation(), reward, terminated, truncated, info

    def render(self) -> str | None:
        return self.text_env.render()

    def _observation(self) -> dict[str, np.ndarray]:
        s, scenario = self.tracker, self.scenario
        target = np.zeros(len(TARGETS), dtype=np.int8)
        target[TARGETS.index(scenario["target"])] = 1
        resolution = np.zeros(len(RESOLUTION_ACTS) + 1, dtype=np.int8)
        name = scenario["resolution"]
        resolution[RESOLUTION_ACTS.index(name) + 1 if name in RESOLUTION_ACTS else 0] = 1
        state = np.array([bool(getattr(s, flag)) for flag in STATE_FLAGS], dtype=np.int8)
        eligible = np.zeros(2, dtype=np.int8)
        if name in s.eligible:
            eligible[0 if s.eligible[name] else 1] = 1
        turn = np.zeros(self.max_turns + 1, dtype=np.int8)
        turn[min(self.text_env.turn, self.max_turns)] = 1
        return {"target": target, "resolution": resolution, "state": state, "eligible": eligible, "turn": turn}
