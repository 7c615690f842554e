"""The environment contract: API checkers, scripted baselines, determinism, rendering, plug-in rewards and scenarios."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import dialogrl.envs
from dialogrl.envs import CustomerServiceEnv
from dialogrl.envs.acts import CustomerServiceActsEnv
from dialogrl.envs.scenario import SCENARIO_DIR, builtin_scenarios
from dialogrl.envs.simulator import customer_config
from dialogrl.evaluation import evaluate
from dialogrl.policies.scripted import ExpertPolicy, HistoricalPolicy, make_scripted
from dialogrl.types import DialogRLError, RewardError

FIXTURES = Path(__file__).parent / "fixtures"
CUSTOM_SCENARIO = FIXTURES / "damaged_item.yaml"
REGISTERED = sorted(k for k in gym.registry if k.startswith("dialogrl/"))


def play(env: gym.Env, policy: Any, seed: int) -> dict[str, Any]:
    """One full episode of a text policy; returns the last info."""
    _, info = env.reset(seed=seed)
    done = False
    while not done:
        _, _, terminated, truncated, info = env.step(policy.act(info["messages"], info))
        done = terminated or truncated
    return info


def custom_rewards(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(FIXTURES))
    import custom_rewards as module

    return module


# --- API checkers -------------------------------------------------------------------------------------------


def test_registry_matches_env_ids() -> None:
    assert REGISTERED == sorted(dialogrl.envs.ENV_IDS)
    assert len(REGISTERED) >= 3


@pytest.mark.parametrize("render_mode", [None, "ansi"])
@pytest.mark.parametrize("env_id", REGISTERED)
def test_gymnasium_env_checker(env_id: str, render_mode: str | None) -> None:
    env = gym.make(env_id, render_mode=render_mode, disable_env_checker=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checker reports most problems as warnings
        check_env(env.unwrapped)


def test_stable_baselines3_env_checker() -> None:
    import stable_baselines3.common.env_checker as sb3_checker
    env = gym.make("dialogrl/CustomerServiceActs-v0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sb3_checker.check_env(env.unwrapped, warn=True)


@pytest.mark.parametrize("spec", [s for s in dialogrl.envs.ENV_SPECS if s["kwargs"].get("intents")],
                         ids=lambda s: s["id"])
def test_per_intent_ids_only_draw_their_intent(spec: dict[str, Any]) -> None:
    env = gym.make(spec["id"])
    intents = {env.reset(seed=s)[1]["scenario"]["intent"] for s in range(8)}
    assert intents == set(spec["kwargs"]["intents"])


def test_step_before_reset_and_after_end_is_a_clear_error() -> None:
    with pytest.raises(DialogRLError, match="reset"):
        CustomerServiceEnv().step("hello")
    env = CustomerServiceEnv()
    env.reset(seed=0)
    *_, terminated, _, _ = env.step("Goodbye. [end]")
    assert terminated
    with pytest.raises(DialogRLError, match="reset"):
        env.step("hello again")


BAD_ARGUMENTS = [
    ({"split": "dev"}, "dev"), ({"max_turns": 0}, "max_turns"), ({"render_mode": "human"}, "human"),
    ({"intents": ["no_such_intent"]}, "no_such_intent"), ({"personas": ["no_such_persona"]}, "no_such_persona"),
    ({"reward": "no_such_reward"}, "no_such_reward"), ({"intents": []}, "no scenarios"),
    ({"personas": []}, "persona"), ({"obs_chars": 0}, "obs_chars"),
    ({"opening_word_dropout": 1.0}, "opening_word_dropout"), ({"opening_word_dropout": float("nan")}, "nan"),
]


@pytest.mark.parametrize("kwargs,named", BAD_ARGUMENTS)
def test_bad_arguments_are_one_clear_error(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(DialogRLError, match=named):
        CustomerServiceEnv(**kwargs).reset(seed=0)


# --- scripted baselines ---------------------------------------------------------------------------------------


def test_scripted_policies_rank_expert_historical_random() -> None:
    # 100 test-split episodes: the sampling noise of a rate is about +-0.05, the margins are far wider.
    metrics = {name: evaluate(make_scripted(name, seed=0), split="test", episodes=100, seed=11)["metrics"]
               for name in ("expert", "historical", "random")}
    expert, historical, rand = (metrics[n] for n in ("expert", "historical", "random"))
    assert expert["success_rate"] >= 0.9
    assert rand["success_rate"] <= 0.15
    assert rand["success_rate"] + 0.2 <= historical["success_rate"] <= expert["success_rate"] - 0.1
    assert expert["mean_return"] > historical["mean_return"] > rand["mean_return"]
    # The expert follows the business policy; the historical agent skips verification in some episodes.
    assert expert["violation_rate"] == 0.0
    assert expert["invalid_action_rate"] == 0.0
    assert historical["violation_rate"] > 0.0


# --- determinism ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("policy_name", ["expert", "historical"])
def test_same_seed_same_transcript(policy_name: str, split: str) -> None:
    seeds = [0, 1, 2, 12345, 2**31 + 7]
    first = [play(gym.make("dialogrl/CustomerService-v0", split=split), make_scripted(policy_name, seed=4), s)
             for s in seeds]
    # A second env instance, and the same instance replaying the seeds in another order: nothing leaks
    # from one episode into the next.
    again = [play(gym.make("dialogrl/CustomerService-v0", split=split), make_scripted(policy_name, seed=4), s)
             for s in seeds]
    reused_env = gym.make("dialogrl/CustomerService-v0", split=split)
    reversed_run = {s: play(reused_env, make_scripted(policy_name, seed=4), s) for s in reversed(seeds)}
    for seed, a, b in zip(seeds, first, again, strict=True):
        assert a["messages"] == b["messages"] == reversed_run[seed]["messages"]
        assert a["episode"] == b["episode"]
        assert a["scenario"]["seed"] == seed


def test_different_seeds_give_different_conversations() -> None:
    env = gym.make("dialogrl/CustomerService-v0", split="test")
    transcripts = [play(env, ExpertPolicy(), s)["messages"] for s in range(12)]
    as_text = {repr(t) for t in transcripts}
    assert len(as_text) == len(transcripts)
    openings = {t[1]["content"] for t in transcripts}
    assert len(openings) >= 10


def test_acts_env_is_deterministic() -> None:
    def run(seed: int) -> list[Any]:
        env = gym.make("dialogrl/CustomerServiceActs-v0")
        obs, info = env.reset(seed=seed)
        rng = np.random.default_rng(seed)
        trace: list[Any] = [{k: v.tolist() for k, v in obs.items()}]
        done = False
        while not done:
            obs, reward, terminated, truncated, info = env.step(int(rng.integers(env.action_space.n)))
            trace.append(({k: v.tolist() for k, v in obs.items()}, reward))
            done = terminated or truncated
        return trace + [info["messages"]]

    assert run(5) == run(5)
    assert run(5) != run(6)


# --- rendering --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_id", ["dialogrl/CustomerService-v0", "dialogrl/CustomerServiceActs-v0"])
def test_ansi_render_returns_the_transcript(env_id: str) -> None:
    env = gym.make(env_id, render_mode="ansi")
    _, info = env.reset(seed=3)
    first = env.render()
    assert isinstance(first, str) and info["messages"][1]["content"] in first
    action = "Hello! What is your order number? [lookup_order order=A1]" if env_id.endswith("Service-v0") else 0
    _, _, _, _, info = env.step(action)
    text = env.render()
    assert isinstance(text, str)
    position = -1
    for message in info["messages"]:  # every message, in order
        position = text.find(message["content"], position + 1)
        assert position >= 0, message
    plain = gym.make(env_id)
    plain.reset(seed=3)
    assert plain.render() is None


# --- plug-in rewards --------------------------------------------------------------------------------------------


def test_callable_reward_is_its_own_component(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = custom_rewards(monkeypatch)
    env = gym.make("dialogrl/CustomerService-v0", reward=[("success", 1.0), (mod.brevity, 0.1)])
    _, info = env.reset(seed=0)
    reply = "Could you give me your phone number and zip code?"
    _, reward, *_, info = env.step(reply)
    assert set(info["reward_components"]) == {"success", "brevity"}
    assert info["reward_components"]["brevity"] == pytest.approx(-0.1 * len(reply) / 100)
    assert reward == pytest.approx(sum(info["reward_components"].values()))

    bare = gym.make("dialogrl/CustomerService-v0", reward=mod.brevity)
    bare.reset(seed=0)
    _, reward, *_, info = bare.step(reply)
    assert info["reward_components"] == {"brevity": pytest.approx(-len(reply) / 100)}
    assert reward == pytest.approx(-len(reply) / 100)


def test_import_path_reward_through_gym_make(monkeypatch: pytest.MonkeyPatch) -> None:
    custom_rewards(monkeypatch)
    env = gym.make("dialogrl/CustomerService-v0", reward=["success", "custom_rewards:brevity=0.5"])
    info = play(env, ExpertPolicy(), 1)
    assert set(info["episode"]["reward_components"]) == {"success", "custom_rewards:brevity"}
    replies = [m["content"] for m in info["messages"] if m["role"] == "assistant"]
    assert info["episode"]["reward_components"]["custom_rewards:brevity"] == pytest.approx(
        -0.5 * sum(len(r) for r in replies) / 100)


@pytest.mark.parametrize("fn_name,problem", [("exploding", "raised RuntimeError"), ("not_a_number", "nan")])
@pytest.mark.parametrize("by_path", [False, True])
def test_broken_reward_fails_naming_it(monkeypatch: pytest.MonkeyPatch, fn_name: str, problem: str,
                                       by_path: bool) -> None:
    mod = custom_rewards(monkeypatch)
    spec = f"custom_rewards:{fn_name}" if by_path else getattr(mod, fn_name)
    env = gym.make("dialogrl/CustomerService-v0", reward=["success", spec])
    env.reset(seed=0)
    with pytest.raises(RewardError, match=rf"reward '{'custom_rewards:' if by_path else ''}{fn_name}'.*{problem}"):
        env.step("Hello! How can I help you today?")


def test_reward_returning_inf_or_non_number_fails_naming_it() -> None:
    def infinite(t: Any) -> float:
        return math.inf

    def text_reward(t: Any) -> Any:
        return "1.0"

    for fn in (infinite, text_reward):
        env = gym.make("dialogrl/CustomerService-v0", reward=fn)
        env.reset(seed=0)
        with pytest.raises(RewardError, match=f"'{fn.__name__}'"):
            env.step("hi")


# --- user scenario files ----------------------------------------------------------------------------------------


def test_user_scenario_file_is_solved_by_the_expert() -> None:
    assert "damaged_item" not in {s.intent for s in builtin_scenarios()}
    assert not (SCENARIO_DIR / CUSTOM_SCENARIO.name).exists()
    env = gym.make("dialogrl/CustomerService-v0", split="test", scenario_files=str(CUSTOM_SCENARIO),
                   intents=["damaged_item"])
    openings = ["The box was crushed and the item inside is damaged.",
                "What I received is cracked, I need to give it back."]
    successes = []
    for seed in range(20):
        info = play(env, ExpertPolicy(), seed)
        assert info["scenario"]["intent"] == "damaged_item"
        assert env.unwrapped.scenario.source == str(CUSTOM_SCENARIO)
        if customer_config()["personas"][info["scenario"]["persona"]].typo_rate == 0:
            assert any(o in info["messages"][1]["content"] for o in openings), info["messages"][1]
        if info["success"]:
            returned = [o.id for o in env.unwrapped.db.orders.values() if o.returned]
            assert returned == [env.unwrapped.goal.slots["order"]]
        successes.append(info["success"])
    assert np.mean(successes) >= 0.9


def test_user_scenario_sits_beside_the_builtins_and_accepts_a_path_object() -> None:
    env = CustomerServiceEnv(scenario_files=[CUSTOM_SCENARIO])
    assert {s.intent for s in env.scenarios} == {s.intent for s in builtin_scenarios()} | {"damaged_item"}


@pytest.mark.parametrize("name,match", [("malformed.yaml", "invalid YAML"),
                                        ("missing_key.yaml", "missing key 'resolution'"),
                                        ("nowhere.yaml", "not found")])
def test_bad_scenario_file_is_one_clear_error(name: str, match: str) -> None:
    with pytest.raises(DialogRLError, match=match) as err:
        gym.make("dialogrl/CustomerService-v0", scenario_files=str(FIXTURES / name))
    assert name in str(err.value) and "\n" not in str(err.value)


def _scenario_file(tmp_path: Path, name: str = "mine.yaml", **changes: Any) -> Path:
    """The damaged_item fixture with some keys changed (``order__status`` sets ``order.status``)."""
    import yaml

    data = yaml.safe_load(CUSTOM_SCENARIO.read_text())
    for key, value in changes.items():
        node = data
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("changes,needles", [
    ({"order__status": {"delivered": 0}}, ["'order.status'", "positive", "{'delivered': 0}"]),
    ({"order__status": {"delivered": -1, "shipped": 2}}, ["'order.status.delivered'", "non-negative", "-1"]),
    ({"order__status": {"delivered": "abc"}}, ["'order.status.delivered'", "'abc'"]),
    ({"order__status": {"delivered": float("nan")}}, ["'order.status.delivered'", "nan"]),
    ({"order__status": "delivered"}, ["'order.status'", "'delivered'", "processing, shipped, delivered"]),
    ({"order__status": {"bogus": 1}}, ["'order.status'", "'bogus'", "processing, shipped, delivered"]),
    ({"order__refunded_prob": "x"}, ["'order.refunded_prob'", "[0, 1]", "'x'"]),
    ({"order__refunded_prob": 2}, ["'order.refunded_prob'", "[0, 1]", "got 2"]),
    ({"account": {"locked_prob": -0.5}}, ["'account.locked_prob'", "[0, 1]", "-0.5"]),
    ({"account": {"subscription_prob": True}}, ["'account.subscription_prob'", "True"]),
    ({"order__refund_prob": 0.5}, ["unknown key 'order.refund_prob'", "order.refunded_prob"]),
    ({"order__days_since_delivery": [-5, 3]}, ["'order.days_since_delivery'", "[-5, 3]"]),
    ({"requires_verification": "maybe"}, ["'requires_verification'", "true or false", "'maybe'"]),
    ({"intent": 7}, ["'intent'", "string", "7"]),
    ({"intent": ["a", "b"]}, ["'intent'", "['a', 'b']"]),
    ({"inform": ["return label", 5]}, ["'inform'", "list of strings"]),
])
def test_bad_scenario_values_name_file_key_and_value(tmp_path: Path, changes: dict, needles: list[str]) -> None:
    path = _scenario_file(tmp_path, **changes)
    with pytest.raises(DialogRLError) as err:
        CustomerServiceEnv(scenario_files=[path])
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"scenario file {path}:"), line
    for needle in needles:
        assert needle in line, (needle, line)


def test_valid_scenario_draws_are_accepted(tmp_path: Path) -> None:
    path = _scenario_file(tmp_path, order__status={"delivered": 1, "shipped": 0}, order__refunded_prob=0,
                          account={"locked_prob": 1, "subscription_prob": 0.5})
    env = CustomerServiceEnv(scenario_files=[path], intents=["damaged_item"])
    env.reset(seed=0)
    assert env.goal.slots["order"] and env.db.orders[env.goal.slots["order"]].status == "delivered"


def test_user_scenario_may_not_replace_a_builtin_or_another_file(tmp_path: Path) -> None:
    clash = _scenario_file(tmp_path, "my_refund.yaml", intent="refund")
    with pytest.raises(DialogRLError) as err:
        gym.make("dialogrl/CustomerService-v0", scenario_files=[clash])
    line = str(err.value)
    assert "my_refund.yaml" in line and "intent 'refund'" in line and "built-in" in line
    assert str(SCENARIO_DIR / "refund.yaml") in line and "\n" not in line
    twin = _scenario_file(tmp_path, "twin.yaml")
    with pytest.raises(DialogRLError, match="twin.yaml: intent 'damaged_item' is also defined in .*damaged_item.yaml"):
        CustomerServiceEnv(scenario_files=[CUSTOM_SCENARIO, twin])
    with pytest.raises(DialogRLError, match="intent 'damaged_item' is also defined in"):
        CustomerServiceEnv(scenario_files=[CUSTOM_SCENARIO, CUSTOM_SCENARIO])


def test_acts_env_accepts_text_env_arguments() -> None:
    env = CustomerServiceActsEnv(scenario_files=str(CUSTOM_SCENARIO), intents=["damaged_item"], split="test")
    _, info = env.reset(seed=1)
    assert info["scenario"]["intent"] == "damaged_item"
    assert env.observation_space.contains(env.reset(seed=2)[0])


def test_historical_errors_are_per_episode_and_seeded() -> None:
    # The same policy seed gives the same mistakes; another policy seed changes some episodes.
    env = gym.make("dialogrl/CustomerService-v0", split="test")

    def run(policy_seed: int) -> list[Any]:
        return [play(env, HistoricalPolicy(seed=policy_seed), s)["messages"] for s in range(15)]

    first = run(0)
    assert first == run(0)
    assert first != run(1)
