"""Multi-turn rollouts of an LM policy in environments stepped side by side.

Every live conversation is answered in one batched ``generate`` call per turn; each agent turn is kept as a
``TurnSample`` (prompt tokens, reply tokens, the env reward for that turn) for PPO.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym

from dialogrl.config import check_at_least, check_number
from dialogrl.evaluation import make_env, require_text_env
from dialogrl.rewards.combine import batched_reward


@dataclass
class TrainingEnvConfig:
    """Where an agent plays its training conversations: the fields the PPO, DPO and reward-model configs share."""

    env_id: str = "dialogrl/CustomerService-v0"
    """Training environment (always its train split)."""
    rewards: list[str] | None = None
    """Reward specs NAME_OR_PATH[=WEIGHT] that define the returns; None: the env's default mix."""
    intents: list[str] | None = None
    """Restrict training to these intents; None: all."""
    scenario_files: list[str] | None = None
    """Your own scenario YAML files (intents; schema in the README), added to the built-in ones; with ``intents``
    naming theirs, training plays them alone."""
    max_turns: int = 12
    """Agent turns per conversation."""
    env_batch: int = 64
    """Environments stepped side by side (conversations answered per generate call; per process under torchrun)."""
    opening_word_dropout: float = 0.0
    """Training augmentation: each word of the customer's opening request is left out with this chance (slot values
    never), so the policy meets requests it cannot read at once; held-out evaluation always plays them whole."""

    def __post_init__(self) -> None:
        check_at_least(self, 1, "max_turns", "env_batch")
        check_number(self, "opening_word_dropout", at_least=0, below=1)

    def env_factory(self) -> Callable[[], gym.Env]:
        """A constructor of the training environment; a bad id, reward spec, intent or scenario file fails here
        (one line, the env is built once), before any work."""
        kwargs = {"split": "train", **self._tasks(), **({"reward": list(self.rewards)} if self.rewards else {}),
                  **({"opening_word_dropout": self.opening_word_dropout} if self.opening_word_dropout else {})}
        require_text_env(self.env_id, kwargs, setting="env_id")  # an LM needs text replies
        return lambda: make_env(self.env_id, **kwargs)

    def held_out_tasks(self) -> dict[str, Any]:
        """What a run's own held-out evaluation plays (``evaluate_run`` keywords): the training env's tasks on the
        test split, with the env's default reward mix as ``dialogrl eval`` reports it."""
        return {"env_id": self.env_id, "env_kwargs": self._tasks()}

    def _tasks(self) -> dict[str, Any]:
        tasks: dict[str, Any] = {"max_turns": self.max_turns}
        if self.intents:
            tasks["intents"] = list(self.intents)
        if self.scenario_files:
            tasks["scenario_files"] = list(self.scenario_files)
        return tasks


@dataclass
class TurnSample:
    """One agent turn: what the model saw, what it said, and what the environment paid for it."""

    episode: int
    turn: int
    prompt_ids: list[int]
    response_ids: list[int]
    reward: float
    done: bool
    """True for the episode's last turn (its value target has no future)."""


@dataclass
class RolloutBatch:
    samples: list[TurnSample]
    episodes: list[dict[str, Any]]
    """Per episode: seed, success, return, turns, violations, reply_chars."""
    generated_tokens: int = 0
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def collect(policy: Any, env_fn: Callable[[], gym.Env], seeds: Sequence[int], batch_size: int = 64) -> RolloutBatch:
    """Play one episode per seed with ``policy.generate`` (sampling settings are the policy's)."""
    start = time.perf_counter()
    envs = [env_fn() for _ in range(min(batch_size, len(seeds)))]
    pending = list(enumerate(seeds))
    live: dict[int, tuple[int, int, dict[str, Any]]] = {}  # slot -> (episode, seed, info)
    turns: dict[int, list[TurnSample]] = {}
    episodes: list[dict[str, Any]] = [{} for _ in seeds]
    tokens = 0

    def start_next(slot: int) -> None:
        episode, seed = pending.pop(0)
        _, info = envs[slot].reset(seed=seed)
        live[slot] = (episode, seed, info)
        turns[episode] = []

    for slot in range(len(envs)):
        start_next(slot)
    # Gymnasium steps score one reply each; a batched reward (a reward model) scores a turn's replies at once
    # before the steps.
    combiner, max_chars = batched_reward(envs[0])
    while live:
        slots = sorted(live)
        generations = policy.generate([live[s][2]["messages"] for s in slots])
        if combiner is not None:
            combiner.prefetch_replies([live[s][2]["messages"] for s in slots], [g.text for g in generations],
                                      max_chars)
        for slot, gen in zip(slots, generations, strict=True):
            episode, seed, _ = live[slot]
            _, reward, terminated, truncated, info = envs[slot].step(gen.text)
            done = terminated or truncated
            tokens += len(gen.response_ids)
            turns[episode].append(TurnSample(episode, len(turns[episode]), list(gen.prompt_ids),
                                             list(gen.response_ids), float(reward), done))
            if done:
                ep = info["episode"]
                replies = turns[episode]
                episodes[episode] = {
                    "seed": seed, "success": bool(ep["success"]), "return": float(ep["return"]),
                    "turns": int(ep["turns"]), "violations": len(info["violations"]),
                    "invalid_actions": int(info["invalid_actions"]), "intent": info["scenario"]["intent"],
                    "persona": info["scenario"]["persona"],
                    "reply_tokens": sum(len(t.response_ids) for t in replies) / len(replies),
                }
                del live[slot]
                if pending:
                    start_next(slot)
            else:
                live[slot] = (episode, seed, info)
    for env in envs:
        env.close()
    samples = [t for e in range(len(seeds)) for t in turns[e]]
    return RolloutBatch(samples, episodes, tokens, time.perf_counter() - start)
