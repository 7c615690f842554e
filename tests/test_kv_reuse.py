"""KV reuse across turns: the same replies as re-encoding every turn, fewer tokens encoded, stale caches dropped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dialogrl.evaluation import make_env, run_episodes, scenario_seeds, text_policy_act
from dialogrl.policies.lm import Generation, GenerationSettings, LMPolicy


def _episodes(policy: LMPolicy) -> list[list[dict]]:
    recs = run_episodes(lambda: make_env("dialogrl/CustomerService-v0", split="test", max_turns=4),
                        text_policy_act(policy), scenario_seeds(3, 6), keep_messages=True)
    return [r["messages"] for r in recs]


@pytest.fixture(scope="module")
def policy(tiny_model_dir: Path) -> LMPolicy:
    return LMPolicy.from_pretrained(tiny_model_dir, generation=GenerationSettings(max_new_tokens=16))


def _record_reuse(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[tuple[int, ...], int]]]:
    """Watch ``generate`` lay out its batches: per ``build_batch`` call, (prompt, tokens resumed from the cache) of
    each row. What ``generate`` really reused, after its own ``sync`` and ``match``."""
    from dialogrl.policies import lm

    calls: list[list[tuple[tuple[int, ...], int]]] = []
    build_batch = lm.build_batch

    def recording(prompts: list[list[int]], reuse: list, *args: Any, **kwargs: Any) -> Any:
        calls.append([(tuple(p), c) for p, (c, _) in zip(prompts, reuse, strict=True)])
        return build_batch(prompts, reuse, *args, **kwargs)

    monkeypatch.setattr(lm, "build_batch", recording)
    return calls


def _turns(policy: LMPolicy, conversations: list[list[dict]], turns: int) -> list[list[Generation]]:
    """Several turns of several conversations in one batch, each reply followed by a user line of its own length."""
    convs = [list(c) for c in conversations]
    out = []
    for _ in range(turns):
        gens = policy.generate(convs)
        out.append(gens)
        for i, (conv, gen) in enumerate(zip(convs, gens, strict=True)):
            conv += [{"role": "assistant", "content": gen.text}, {"role": "user", "content": "ok" + " thanks" * i}]
    return out


def test_multi_turn_greedy_replies_are_the_same_with_and_without_reuse(policy: LMPolicy, make_corpus,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    reused, fresh = _episodes(policy), _episodes(policy.with_settings(reuse_kv=False))
    assert reused == fresh
    # The environment's prompts (about 320-440 tokens here) fit the tiny model's 512-token context, so later turns
    # resume from the cache; below, what generate actually reused is checked turn by turn.
    assert max(len(m) for m in reused) > 4
    calls = _record_reuse(monkeypatch)
    conversations = [conv[:cut] for conv, cut in zip(make_corpus(4, seed=8), [2, 4, 6, 2], strict=True)]
    with_reuse = _turns(policy.with_settings(), conversations, turns=4)  # its own, empty prefix store
    resumed = {p: c for call in calls for p, c in call}
    calls.clear()
    without = _turns(policy.with_settings(reuse_kv=False), conversations, turns=4)
    assert all(c == 0 for call in calls for _, c in call)  # reuse_kv=False encodes every prompt in full
    for turn, (gens, alone) in enumerate(zip(with_reuse, without, strict=True)):
        for i, (gen, ref) in enumerate(zip(gens, alone, strict=True)):
            assert gen.prompt_ids == ref.prompt_ids and not gen.truncated_prompt
            assert gen.response_ids == ref.response_ids
            assert gen.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
            # Every later turn resumed from the whole previous prompt (and the reply's tokens that re-tokenize
            # the same); the first turn had nothing to resume from.
            previous = len(with_reuse[turn - 1][i].prompt_ids) if turn else 0
            assert previous <= resumed[tuple(gen.prompt_ids)] < len(gen.prompt_ids)
    assert len(resumed) == sum(len(gens) for gens in with_reuse)  # one entry per prompt: none was shadowed


def test_gpt2_replies_are_the_same_with_and_without_reuse(tiny_gpt2_dir: Path, make_corpus,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's GPT-2 (learned positions): resuming from the cache gives the replies of encoding every prompt in
    full, in the environment and turn by turn. Replies are kept short: the untrained model writes byte soup."""
    gpt2 = LMPolicy.from_pretrained(tiny_gpt2_dir, generation=GenerationSettings(max_new_tokens=4))
    assert _episodes(gpt2) == _episodes(gpt2.with_settings(reuse_kv=False))
    calls = _record_reuse(monkeypatch)
    conversations = [conv[:cut] for conv, cut in zip(make_corpus(3, seed=8), [2, 4, 2], strict=True)]
    with_reuse = _turns(gpt2.with_settings(), conversations, turns=3)
    resumed = [c for call in calls[1:] for _, c in call]
    without = _turns(gpt2.with_settings(reuse_kv=False), conversations, turns=3)
    assert resumed and all(c > 0 for c in resumed)  # every later turn resumed from its cache
    for gens, alone in zip(with_reuse, without, strict=True):
        for gen, ref in zip(gens, alone, strict=True):
            assert gen.prompt_ids == ref.prompt_ids and not gen.truncated_prompt
            assert gen.response_ids == ref.response_ids
            assert gen.logprobs == pytest.approx(ref.logprobs, abs=1e-4)


def test_later_turns_resume_from_the_previous_turn(policy: LMPolicy, make_corpus,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    conv = make_corpus(1, seed=3)[0]
    p = policy.with_settings()
    first = p.generate([conv[:2]])[0]
    follow = [*conv[:2], {"role": "assistant", "content": first.text}, {"role": "user", "content": "ok thanks"}]
    calls = _record_reuse(monkeypatch)
    second = p.generate([follow])[0]  # sync, match and the resumed batch, as every later turn runs them
    [[(prompt, resumed)]] = calls
    assert list(prompt) == second.prompt_ids
    assert len(first.prompt_ids) <= resumed < len(prompt)  # the whole first prompt, and then some
    alone = policy.with_settings(reuse_kv=False).generate([follow])[0]
    assert second.response_ids == alone.response_ids
    assert second.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_a_weight_update_drops_the_cache(policy: LMPolicy, make_corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    def update() -> None:
        with torch.no_grad():
            next(p.model.parameters()).add_(0.0)  # an in-place update, as an optimizer step makes

    conv = make_corpus(1, seed=4)[0][:2]
    p = policy.with_settings()
    p.generate([conv])
    entries = p._prefixes.entries
    assert entries
    p._prefixes.sync(p.model)  # the control: the same weights keep the cache ...
    assert p._prefixes.entries is entries
    calls = _record_reuse(monkeypatch)
    p.generate([conv])  # ... and the next call resumes from it
    assert [[c > 0 for _, c in call] for call in calls] == [[True]]
    update()
    p._prefixes.sync(p.model)
    assert not p._prefixes.entries
    p.generate([conv])
    assert p._prefixes.entries
    update()
    calls.clear()
    p.generate([conv])  # generate syncs first: nothing computed before the update is reused
    assert [[c for _, c in call] for call in calls] == [[0]]


def test_switching_the_adapter_off_drops_the_cache(tiny_model_dir: Path, make_corpus) -> None:
    from peft import LoraConfig, get_peft_model

    p = LMPolicy.from_pretrained(tiny_model_dir, generation=GenerationSettings(max_new_tokens=8))
    p.model = get_peft_model(p.model, LoraConfig(r=2, target_modules="all-linear"))
    p.generate([make_corpus(1, seed=5)[0][:2]])
    assert p._prefixes.entries
    p._prefixes.sync(p.model)  # the control: the adapter still on, the cache stays
    assert p._prefixes.entries
    with p.model.disable_adapter():  # the reference policy: no parameter changes, other outputs
        p._prefixes.sync(p.model)
        assert not p._prefixes.entries


def test_padded_width_past_the_context_raises_no_false_alarm(policy: LMPolicy,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of a long cached conversation and one with a long new turn is wider than the model's context,
    while each row fits: transformers' "exceeded the maximum length" reminder would be a false alarm."""
    import logging

    import torch
    from transformers.utils import logging as hf_logging

    from dialogrl.policies import lm

    widths: list[int] = []
    build_batch = lm.build_batch

    def recording(*args: Any, **kwargs: Any) -> Any:
        batch = build_batch(*args, **kwargs)
        widths.append(batch[0].shape[1])
        return batch

    monkeypatch.setattr(lm, "build_batch", recording)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("transformers.generation.stopping_criteria")
    logger.addHandler(handler)
    hf_logging.warning_once.cache_clear()  # an earlier test may have used up the one-time warning
    fresh = policy.with_settings()
    try:
        scale = policy.context // 256  # lengths made for a 256-token context
        long_talk = [{"role": "user", "content": "where is my order " * 27 * scale}]
        short_talk = [{"role": "user", "content": "hi"}]
        first = fresh.generate([long_talk, short_talk])
        convs = [long_talk + [{"role": "assistant", "content": first[0].text}, {"role": "user", "content": "ok"}],
                 short_talk + [{"role": "assistant", "content": first[1].text},
                               {"role": "user", "content": "my phone is 415 555 0100 " * 10 * scale}]]
        second = fresh.generate(convs)
        # The layout under test: the second call resumed both rows and was wider than the context.
        assert widths[-1] > policy.context and all(not g.truncated_prompt for g in first + second)
        assert max(len(g.prompt_ids) + len(g.response_ids) for g in second) <= policy.context
        # The alarm reaches handlers outside generate (the filter is scoped), and not from it.
        assert not [m for m in seen if "predefined maximum length" in m]
        hf_logging.warning_once.cache_clear()
        from transformers.generation.stopping_criteria import MaxLengthCriteria

        MaxLengthCriteria(10_000, max_position_embeddings=4)(torch.zeros((1, 8), dtype=torch.long), None)
        assert [m for m in seen if "predefined maximum length" in m]
    finally:
        logger.removeHandler(handler)
