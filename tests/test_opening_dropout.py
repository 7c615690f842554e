"""The training augmentation that leaves words out of the customer's opening request."""

from __future__ import annotations

import re

import gymnasium as gym
import pytest

from dialogrl.agents.rollouts import TrainingEnvConfig
from dialogrl.policies.scripted import make_scripted
from dialogrl.types import DialogRLError


def _episode(dropout: float, seed: int) -> tuple[list[dict[str, str]], dict[str, object]]:
    env = gym.make("dialogrl/CustomerService-v0", split="train", opening_word_dropout=dropout)
    policy = make_scripted("expert")
    _, info = env.reset(seed=seed)
    done = False
    while not done:
        _, _, terminated, truncated, info = env.step(policy.act(info["messages"], info))
        done = terminated or truncated
    return info["messages"], info


def test_only_the_opening_request_loses_words() -> None:
    changed = 0
    for seed in range(30):
        whole, whole_info = _episode(0.0, seed)
        dropped, dropped_info = _episode(0.4, seed)
        # the world, the customer's later draws and the expert's episode are what they are without dropout
        assert dropped[2:] == whole[2:] and dropped_info["success"] == whole_info["success"]
        before, after = whole[1]["content"].split(" "), dropped[1]["content"].split(" ")
        assert len(after) <= len(before) and after  # an ordered subset of the words, never empty
        rest = iter(before)
        assert all(any(word == other for other in rest) for word in after)
        # slot values (order ids, phone numbers, zips) are never dropped
        assert re.findall(r"\d[\d-]+", dropped[1]["content"]) == re.findall(r"\d[\d-]+", whole[1]["content"])
        changed += after != before
    assert changed >= 20


def test_training_envs_get_it_and_the_held_out_evaluation_does_not() -> None:
    cfg = TrainingEnvConfig(opening_word_dropout=0.3)
    assert cfg.env_factory()().unwrapped.opening_word_dropout == 0.3
    assert "opening_word_dropout" not in cfg.held_out_tasks()["env_kwargs"]
    assert TrainingEnvConfig().env_factory()().unwrapped.opening_word_dropout == 0.0
    for bad in (-0.1, 1.0, float("inf")):
        with pytest.raises(DialogRLError, match="opening_word_dropout"):
            TrainingEnvConfig(opening_word_dropout=bad)


def test_a_request_never_loses_every_word() -> None:
    # vague customers tell no slot upfront, so the opening is the request template alone (with any slot in it)
    env = gym.make("dialogrl/CustomerService-v0", split="train", personas=["vague"], opening_word_dropout=0.999)
    whole = gym.make("dialogrl/CustomerService-v0", split="train", personas=["vague"])
    for seed in range(20):
        words = env.reset(seed=seed)[1]["messages"][1]["content"].split(" ")
        full = whole.reset(seed=seed)[1]["messages"][1]["content"].split(" ")
        # nearly every word goes, but one that is not a slot value stays
        assert len(words) < len(full) and [w for w in words if w and not re.search(r"\d", w)]
