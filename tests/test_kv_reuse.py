"""KV reuse across turns: the same replies as re-encoding every turn, fewer tokens encoded, stale caches dropped."""

from __future__ import annotations

from pathlib import Path

import pytest

from dialogrl.evaluation import make_env, run_episodes, scenario_seeds, text_policy_act
from dialogrl.policies.lm import GenerationSettings, LMPolicy


def _episodes(policy: LMPolicy) -> list[list[dict]]:
    recs = run_episodes(lambda: make_env("dialogrl/CustomerService-v0", split="test", max_turns=4),
                        text_policy_act(policy), scenario_seeds(3, 6), keep_messages=True)
    return [r["messages"] for r in recs]


@pytest.fixture(scope="module")
def policy(tiny_model_dir: Path) -> LMPolicy:
    return LMPolicy.from_pretrained(tiny_model_dir, generation=GenerationSettings(max_new_tokens=16))


def test_multi_turn_greedy_replies_are_the_same_with_and_without_reuse(policy: LMPolicy) -> None:
    reused, fresh = _episodes(policy), _episodes(policy.with_settings(reuse_kv=False))
    assert reused == fresh
    assert max(len(m) for m in reused) > 4  # several turns, so later turns resumed from a cache


def test_later_turns_resume_from_the_previous_turn(policy: LMPolicy, make_corpus) -> None:
    conv = make_corpus(1, seed=3)[0]
    p = policy.with_settings()
    first = p.generate([conv[:2]])[0]
    follow = [*conv[:2], {"role": "assistant", "content": first.text}, {"role": "user", "content": "ok thanks"}]
    prompt = p.prompt_ids([follow])[0][0]
    reusable, entry = p._prefixes.match(prompt)
    assert entry is not None and reusable >= len(first.prompt_ids)  # the whole first prompt, and then some


def test_a_weight_update_drops_the_cache(policy: LMPolicy, make_corpus) -> None:
    import torch

    p = policy.with_settings()
    p.generate([make_corpus(1, seed=4)[0][:2]])
    assert p._prefixes.entries
    with torch.no_grad():
        next(p.model.parameters()).add_(0.0)  # an in-place update, as an optimizer step makes
    p._prefixes.sync(p.model)
    assert not p._prefixes.entries


def test_switching_the_adapter_off_drops_the_cache(tiny_model_dir: Path, make_corpus) -> None:
    from peft import LoraConfig, get_peft_model

    p = LMPolicy.from_pretrained(tiny_model_dir, generation=GenerationSettings(max_new_tokens=8))
    p.model = get_peft_model(p.model, LoraConfig(r=2, target_modules="all-linear"))
    p.generate([make_corpus(1, seed=5)[0][:2]])
    assert p._prefixes.entries
    with p.model.disable_adapter():  # the reference policy: no parameter changes, other outputs
        p._prefixes.sync(p.model)
        assert not p._prefixes.entries
