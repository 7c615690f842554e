"""The domain corpus the offline base model is pre-trained on: train-split conversations only.

Expert, historical and noisy agents together, so the base model knows the language of the domain (phrasing,
the action syntax, tool messages) without being tuned to the right policy.
"""

from __future__ import annotations

from dialogrl.evaluation import make_env, run_episodes, scenario_seeds, text_policy_act
from dialogrl.types import Message

from .scripted import make_scripted

CORPUS_VERSION = "v7"
"""Part of the base-model cache key: bump it when the corpus recipe or the environment's language changes."""
MIX = {"expert": 0.3, "historical": 0.4, "noisy": 0.3}


def domain_corpus(episodes: int = 3000, seed: int = 0) -> list[list[Message]]:
    """``episodes`` train-split conversations from the policy mix, each a list of HF messages."""
    conversations: list[list[Message]] = []
    for offset, (name, share) in enumerate(MIX.items()):
        count = max(1, round(episodes * share))
        seeds = scenario_seeds(seed * 1000 + 17 + offset, count)
        records = run_episodes(lambda: make_env("dialogrl/CustomerService-v0", split="train"),
                               text_policy_act(make_scripted(name, seed=seed)), seeds, keep_messages=True)
        conversations += [r["messages"] for r in records]
    return conversations
