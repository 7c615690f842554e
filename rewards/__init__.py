"""Reward functions: one contract (``fn(transition) -> float``), a registry, built-ins and a weighted combiner."""

from dialogrl.rewards import builtin, reward_model  # noqa: F401  (register the built-ins and the learned reward)
from dialogrl.rewards.base import get_reward, list_rewards, parse_reward_spec, register_reward
from dialogrl.rewards.combine import DEFAULT_WEIGHTS, RewardCombiner, RewardComponent, RewardSpec
from dialogrl.types import RewardError, RewardFn, Transition

__all__ = [
    "DEFAULT_WEIGHTS",
    "RewardCombiner",
    "RewardComponent",
    "RewardError",
    "RewardFn",
    "RewardSpec",
    "Transition",
    "get_reward",
    "list_rewards",
    "parse_reward_spec",
    "register_reward",
]
