"""Fuzzed agent replies never crash the environment: every step returns a well-formed transition."""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dialogrl.envs  # noqa: F401  (registers the ids)
from dialogrl.envs.actions import ACTION_ARGS, MAX_REPLY_CHARS
from dialogrl.types import DialogRLError


def fuzz(examples: int) -> settings:
    # Each example resets once (with a seed from hypothesis) and is cheap; large strings may be slow to draw.
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
ROLES = {"system", "user", "assistant", "tool"}

CONTROL = st.characters(min_codepoint=0, max_codepoint=0x1F) | st.sampled_from("\x7f\x85\u2028\u2029\u200b\ufeff\u202e")
# Lone surrogates are not valid Unicode scalar values, but a Python str can hold them.
ANY_CHAR = st.characters() | st.characters(categories=["Cs"])
BIG = st.builds(lambda unit, n: (unit * (n // len(unit) + 1))[:n],
                st.text(min_size=1, max_size=12), st.integers(min_value=50_000, max_value=100_000))
TEXT_REPLIES = st.one_of(
    st.just(""),
    st.text(),
    st.text(alphabet=ANY_CHAR, max_size=300),
    st.text(alphabet=CONTROL, max_size=100),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=MAX_REPLY_CHARS + 50),
    BIG,
)

# Cheap value strategies (st.emails and st.from_regex are slow to draw, and the budget is whole-suite seconds).
WRONG_ID = st.integers(min_value=0, max_value=10**7).map(lambda n: f"A{n}") | st.text(max_size=8).map(
    lambda s: s.replace(" ", "_") or "x")
ZIP = st.integers(min_value=0, max_value=99_999).map(lambda n: f"{n:05d}")
PHONE = st.builds(lambda a, b, c: f"{a}-{b}-{c:04d}", st.integers(0, 999), st.integers(0, 999), st.integers(0, 9999)) | \
    st.text("0123456789-", min_size=1, max_size=14)
VALID_LOOKING = st.builds(
    lambda name, ident, phone, zip_code: {
        "verify": f"[verify phone={phone} zip={zip_code}]", "lookup_order": f"[lookup_order order={ident}]",
        "refund": f"[refund order={ident}]", "return": f"[return order={ident}]",
        "update_address": f'[update_address order={ident} address="1 Oak Street, Dover"]',
        "lookup_product": f'[lookup_product name="{ident}"]', "escalate": f"[escalate reason={ident}]",
    }.get(name, f"[{name}]"),
    st.sampled_from(sorted(ACTION_ARGS)), WRONG_ID, PHONE, ZIP,
)
FRAGMENTS = st.sampled_from([
    "[", "]", "[[", "]]", "]]][", "[refund order=", "[verify phone= zip=]", "[verify phone=555-1 zip=]",
    '[verify phone="a b" zip="1', "[end", "[end]", "[escalate]", "[ end ]", "[END]", "[refund]",
    "[refund order=A1 order=A2]", "[refund foo=bar]", "[lookup_product name=]", '[lookup_product name=""]',
    "[reset_password now=yes]", "[cancel_subscription]", "[]", "[ ]", "[=]", "[refund order==A1]", "=", '"',
    " ", "\n", "\t", "\x00", "order=", "phone=", "A55555", "\u202e", "\U0001f4a5", "\u00e9", "{", "}", "{order}",
    "%s", "\\", "[lookup_order order=A5555\u0665]", "[lookup_order order=\uff21\uff15]",
])
BROKEN_SYNTAX = st.lists(st.one_of(FRAGMENTS, VALID_LOOKING, st.text(max_size=6)), max_size=16).map("".join)


def check_step(env: gym.Env, reply: str, out: tuple[Any, ...], invalid_before: int) -> dict[str, Any]:
    """The invariants of one step: typed outputs, observation in space, one tool message per action."""
    obs, reward, terminated, truncated, info = out
    assert env.observation_space.contains(obs)
    assert type(reward) is float and math.isfinite(reward)
    assert type(terminated) is bool and type(truncated) is bool
    assert type(info["success"]) is bool
    messages = info["messages"]
    assert messages[0]["role"] == "system"
    assert all(m["role"] in ROLES and isinstance(m["content"], str) for m in messages)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    assert messages[last]["content"] == reply[:MAX_REPLY_CHARS]
    tools = [m["content"] for m in messages[last + 1:] if m["role"] == "tool"]
    assert tools == [a["message"] for a in info["actions"]]
    assert all(math.isfinite(v) for v in info["reward_components"].values())
    assert reward == pytest.approx(sum(info["reward_components"].values()))
    assert info["invalid_actions"] >= invalid_before
    assert all(isinstance(v, str) for v in info["violations"])
    if terminated or truncated:
        assert info["episode"]["turns"] == info["turn"]
    return info


@pytest.fixture(scope="module")
def env() -> gym.Env:
    return gym.make("dialogrl/CustomerService-v0", split="test")


@fuzz(900)
@given(seed=SEEDS, reply=TEXT_REPLIES)
def test_any_text_is_a_valid_step(env: gym.Env, seed: int, reply: str) -> None:
    env.reset(seed=seed)
    check_step(env, reply, env.step(reply), 0)


@fuzz(700)
@given(seed=SEEDS, reply=BROKEN_SYNTAX)
def test_broken_action_syntax_is_a_valid_step(env: gym.Env, seed: int, reply: str) -> None:
    env.reset(seed=seed)
    info = check_step(env, reply, env.step(reply), 0)
    if "[" in reply[:MAX_REPLY_CHARS] and not info["actions"]:
        pytest.fail(f"a bracket was ignored silently: {reply[:80]!r}")


@fuzz(400)
@given(seed=SEEDS, data=st.data())
def test_multi_turn_fuzz_with_real_ids(env: gym.Env, seed: int, data: st.DataObject) -> None:
    """Several turns per episode, mixing junk with actions on the episode's real ids (other customers'
    orders, the right phone with a wrong zip...), so policy checks and tool errors are reached."""
    _, info = env.reset(seed=seed)
    db = env.unwrapped.db
    real = st.sampled_from(sorted(db.orders))
    phones = st.sampled_from(sorted(c.phone for c in db.customers.values()))
    zips = st.sampled_from(sorted(c.zip for c in db.customers.values())) | ZIP
    actions = st.one_of(
        st.builds(lambda a, o: f"[{a} order={o}]", st.sampled_from(["lookup_order", "refund", "return"]), real),
        st.builds(lambda o: f'[update_address order={o} address="12 Elm Road, Dover"]', real),
        st.builds(lambda p, z: f"[verify phone={p} zip={z}]", phones, zips),
        st.sampled_from(["[reset_password]", "[cancel_subscription]", "[lookup_product name=webcam]", "[end]",
                         "[escalate]", "What is your order number and phone number?"]),
        FRAGMENTS, VALID_LOOKING,
    )
    replies = data.draw(st.lists(st.lists(actions, min_size=1, max_size=4).map(" ".join), min_size=1, max_size=5))
    for reply in replies:
        info = check_step(env, reply, env.step(reply), info.get("invalid_actions", 0))
        if "episode" in info:
            with pytest.raises(DialogRLError):
                env.step(reply)
            break


@fuzz(200)
@given(seed=SEEDS, acts=st.lists(st.integers(min_value=0, max_value=15), min_size=1, max_size=14))
def test_dialogue_act_sequences(seed: int, acts: list[int]) -> None:
    env = gym.make("dialogrl/CustomerServiceActs-v0", disable_env_checker=True)
    obs, _ = env.reset(seed=seed)
    assert env.observation_space.contains(obs)
    for act in acts:
        obs, reward, terminated, truncated, info = env.step(act)
        assert env.observation_space.contains(obs)
        assert type(reward) is float and math.isfinite(reward)
        assert type(terminated) is bool and type(truncated) is bool
        assert info["messages"][0]["role"] == "system"
        if terminated or truncated:
            break
