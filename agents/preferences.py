"""Preference pairs ranked by the environment: same state, several candidate replies, scored by what they lead to.

The environment is deterministic given ``reset(seed)`` and the agent's replies, so a conversation state is
``(scenario seed, the replies so far)`` and can be rebuilt at will. For each sampled state:

1. ``proposers`` each suggest a reply (an LM policy listed K times gives K samples, generated in one batch);
2. every candidate is scored by replay: ``reset(seed)``, step the earlier replies, step the candidate, then let
   ``continuation`` finish the conversation; the score is the sum of env rewards from the candidate's turn on;
3. identical candidate texts are merged (their scores averaged); the best and the worst form a pair when their
   scores differ by at least ``margin``.

All conversations (behaviour rollouts, replays) run side by side; a policy answers all live ones in one call.
Pairs are HF conversational preference rows (``prompt`` / ``chosen`` / ``rejected``) plus metadata, written as
JSONL that :func:`dialogrl.data.load_preference_pairs` reads back. Imports no torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from dialogrl.evaluation import run_episodes, text_policy_act
from dialogrl.outputs import write_text_atomic
from dialogrl.rewards.combine import batched_reward
from dialogrl.types import DialogRLError, Message


@dataclass
class Start:
    """A conversation to play: the scenario seed and the replies forced before the policy takes over."""

    seed: int
    forced: list[str]
    score_from: int
    """Rewards of steps with index >= score_from count towards the score."""


@dataclass
class Outcome:
    """How a started conversation ended."""

    score: float
    """Sum of env rewards from ``score_from`` on."""
    success: bool
    turns: int


@dataclass
class PairStats:
    """What a collection saw: behaviour-policy episodes, states, candidates and the pairs kept."""

    episodes: int = 0
    success: float = 0.0
    """Behaviour policy's success rate on the collection episodes."""
    mean_return: float = 0.0
    states: int = 0
    candidates: int = 0
    """Candidate replies scored (all proposers, all states)."""
    distinct_states: int = 0
    """States whose candidates were not all the same text."""
    pairs: int = 0
    margins: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        m = self.margins
        return {"episodes": self.episodes, "on_policy_success": self.success, "on_policy_return": self.mean_return,
                "states": self.states, "candidates": self.candidates, "distinct_states": self.distinct_states,
                "pairs_kept": self.pairs, "margin_mean": float(np.mean(m)) if m else 0.0,
                "margin_min": float(np.min(m)) if m else 0.0, "margin_max": float(np.max(m)) if m else 0.0}


def play_from(env_fn: Callable[[], gym.Env], starts: Sequence[Start], policy: Any,
              batch_size: int = 64) -> list[Outcome]:
    """Replay each start's forced replies, then let ``policy`` finish; ``batch_size`` environments at a time.

    A forced prefix that ends the episode early simply ends it (the rest of the prefix is not played).
    """
    envs = [env_fn() for _ in range(min(batch_size, len(starts)))]
    outcomes: list[Outcome | None] = [None] * len(starts)
    live: dict[int, tuple[int, dict[str, Any], float]] = {}  # slot -> (start index, info, score so far)
    pending = list(range(len(starts)))

    def begin(slot: int) -> None:
        while pending:
            index = pending.pop(0)
            start = starts[index]
            _, info = envs[slot].reset(seed=start.seed)
            score, done, turn = 0.0, False, 0
            for turn, reply in enumerate(start.forced):
                _, reward, terminated, truncated, info = envs[slot].step(reply)
                score += reward if turn >= start.score_from else 0.0
                if terminated or truncated:
                    done = True
                    break
            if not done:
                live[slot] = (index, info, score)
                return
            outcomes[index] = Outcome(score, bool(info["success"]), int(info["turn"]))

    for slot in range(len(envs)):
        begin(slot)
    combiner, max_chars = batched_reward(envs[0]) if envs else (None, None)
    while live:
        slots = sorted(live)
        replies = policy.act_batch([live[s][1]["messages"] for s in slots], [live[s][1] for s in slots])
        if combiner is not None:  # a reward model scores the turn's replies in one batch
            combiner.prefetch_replies([live[s][1]["messages"] for s in slots], replies, max_chars)
        for slot, reply in zip(slots, replies, strict=True):
            index, _, score = live[slot]
            _, reward, terminated, truncated, info = envs[slot].step(reply)
            score += reward if info["turn"] - 1 >= starts[index].score_from else 0.0
            if terminated or truncated:
                outcomes[index] = Outcome(score, bool(info["success"]), int(info["turn"]))
                del live[slot]
                begin(slot)
            else:
                live[slot] = (index, info, score)
    for env in envs:
        env.close()
    done = [o for o in outcomes if o is not None]
    assert len(done) == len(starts), "every start is played to its end"
    return done


def rebuild_states(env_fn: Callable[[], gym.Env],
                   states: Sequence[tuple[int, list[str]]]) -> tuple[list[list[Message]], list[dict[str, Any]]]:
    """The conversation and info at each ``(seed, replies so far)`` state, by replay (no model involved)."""
    env = env_fn()
    conversations, infos = [], []
    try:
        for seed, prefix in states:
            _, info = env.reset(seed=seed)
            for reply in prefix:
                _, _, terminated, truncated, info = env.step(reply)
                if terminated or truncated:
                    raise DialogRLError(f"scenario {seed}: the replayed conversation ended early; the environment "
                                        "is not deterministic given the seed and the replies")
            conversations.append(info["messages"])
            infos.append(info)
    finally:
        env.close()
    return conversations, infos


PAIRS_PER_STATE = ("best_worst", "all")
"""How many pairs a state's scored candidates make (see :func:`collect_pairs`)."""
MARGIN_TOLERANCE = 1e-9
"""Scores are sums of float rewards, so a gap of exactly the margin (one invalid action's 0.25) can come out a
hair under it (0.7 - 0.45 = 0.24999999999999994): gaps within this of the margin count as reaching it."""


def check_pairs_per_state(value: str) -> None:
    if value not in PAIRS_PER_STATE:
        raise DialogRLError(f"pairs_per_state={value}: use one of {', '.join(PAIRS_PER_STATE)}")


def reaches_margin(best: float, worst: float, margin: float) -> bool:
    """Whether two candidates' scores differ enough to make a pair: by ``margin`` at least, and by more than
    nothing (a tie says neither reply is better, whatever the margin)."""
    gap = best - worst
    return gap > MARGIN_TOLERANCE and gap >= margin - MARGIN_TOLERANCE


def _propose(proposers: Sequence[Any], conversations: list[list[Message]],
             infos: list[dict[str, Any]]) -> list[list[str]]:
    """One reply per proposer per state; a proposer listed k times answers all its k * n requests in one call."""
    groups: dict[int, list[int]] = {}
    for position, proposer in enumerate(proposers):
        groups.setdefault(id(proposer), []).append(position)
    slots: list[list[str]] = [[""] * len(proposers) for _ in conversations]
    for positions in groups.values():
        repeat = len(positions)
        replies = proposers[positions[0]].act_batch([c for c in conversations for _ in positions],
                                                    [i for i in infos for _ in positions])
        for n, reply in enumerate(replies):
            slots[n // repeat][positions[n % repeat]] = str(reply)
    return slots


def collect_pairs(env_fn: Callable[[], gym.Env], seeds: Sequence[int], behaviour: Any, proposers: Sequence[Any],
                  continuation: Any, *, states_per_episode: int = 2, margin: float = 0.25, seed: int = 0,
                  batch_size: int = 64, pairs_per_state: str = "best_worst") -> tuple[list[dict[str, Any]], PairStats]:
    """Preference pairs from episodes of ``behaviour`` on ``seeds`` (see the module docstring).

    ``pairs_per_state``: ``best_worst``, one pair per state, its best and worst candidates; ``all``, every two
    distinct candidates of a state whose scores reach the margin (up to k(k-1)/2 for k candidates, from the same
    scoring).

    Returns the pair rows (``prompt``, ``chosen``, ``rejected``, and metadata: ``scenario_seed``, ``turn``,
    ``intent``, ``persona``, ``chosen_return``, ``rejected_return``, ``return_margin``, ``candidates``) and stats.
    Empty candidate replies never enter a pair (a preference file cannot hold an empty reply).
    """
    if len(proposers) < 2:
        raise DialogRLError(f"need at least 2 candidate replies per state, got {len(proposers)}")
    if states_per_episode < 1:
        raise DialogRLError(f"states_per_episode must be at least 1, got {states_per_episode}")
    check_pairs_per_state(pairs_per_state)
    records = run_episodes(env_fn, text_policy_act(behaviour), list(seeds), batch_size=batch_size,
                           keep_messages=True)
    stats = PairStats(episodes=len(records), success=float(np.mean([r["success"] for r in records])),
                      mean_return=float(np.mean([r["return"] for r in records])))
    rng = np.random.default_rng([seed, 17])
    states: list[tuple[dict[str, Any], int, list[str]]] = []  # (record, turn, replies before it)
    for record in records:
        replies = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        turns = sorted(rng.choice(len(replies), size=min(states_per_episode, len(replies)), replace=False))
        states += [(record, int(t), replies[:t]) for t in turns]
    if not states:
        return [], stats
    conversations, infos = rebuild_states(env_fn, [(r["scenario_seed"], prefix) for r, _, prefix in states])
    candidates = _propose(proposers, conversations, infos)
    starts = [Start(r["scenario_seed"], prefix + [c], len(prefix))
              for (r, _, prefix), cands in zip(states, candidates, strict=True) for c in cands]
    outcomes = play_from(env_fn, starts, continuation, batch_size)
    stats.states, stats.candidates = len(states), len(starts)
    pairs: list[dict[str, Any]] = []
    k = len(proposers)
    for n, ((record, turn, _), cands) in enumerate(zip(states, candidates, strict=True)):
        scores: dict[str, list[float]] = {}
        for c, outcome in zip(cands, outcomes[n * k:(n + 1) * k], strict=True):
            scores.setdefault(c, []).append(outcome.score)
        if len(scores) > 1:
            stats.distinct_states += 1
        ranked = sorted(((float(np.mean(v)), text) for text, v in scores.items() if text.strip()),
                        key=lambda x: x[0])
        if pairs_per_state == "best_worst":
            chosen_pairs = [(ranked[-1], ranked[0])] if len(ranked) > 1 else []
        else:  # every two candidates, the better one chosen
            chosen_pairs = [(ranked[j], ranked[i]) for i in range(len(ranked)) for j in range(i + 1, len(ranked))]
        for (best, chosen), (worst, rejected) in chosen_pairs:
            if not reaches_margin(best, worst, margin):
                continue
            pairs.append({
                "prompt": conversations[n], "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "scenario_seed": record["scenario_seed"], "turn": turn, "intent": record["intent"],
                "persona": record["persona"], "chosen_return": best, "rejected_return": worst,
                "return_margin": best - worst, "candidates": len(scores),
            })
            stats.margins.append(best - worst)
    stats.pairs = len(pairs)
    return pairs, stats


def write_pairs(pairs: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write pair rows as JSONL atomically (a temp file in the same folder, then rename)."""
    return write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in pairs))
