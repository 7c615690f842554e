"""Tests for the reward registry, the built-in rewards and the weighted combiner."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dialogrl.rewards import (
    DEFAULT_WEIGHTS,
    RewardCombiner,
    get_reward,
    list_rewards,
    parse_reward_spec,
    register_reward,
)
from dialogrl.rewards import base as reward_base
from dialogrl.rewards.builtin import customer_sounds_upset
from dialogrl.types import ActionResult, DialogRLError, ParsedAction, RewardError, Transition


def make_transition(
    reply: str = "Let me check that.",
    kinds: tuple[str, ...] = (),
    customer: str = "Where is my order?",
    turn: int = 1,
    success: bool | None = None,
    terminated: bool = False,
) -> Transition:
    actions = [
        ActionResult(ParsedAction("lookup_order", {"order": "A1"}, "[lookup_order order=A1]"), kind == "ok", "", kind)
        for kind in kinds
    ]
    messages = [
        {"role": "system", "content": "Policy: verify before refunds."},
        {"role": "user", "content": customer},
        {"role": "assistant", "content": reply},
    ]
    return Transition(
        messages=messages,
        reply=reply,
        actions=actions,
        scenario={"intent": "refund", "persona": "cooperative", "split": "train", "seed": 0},
        turn=turn,
        terminated=terminated,
        truncated=False,
        success=success,
    )


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lets a test register names without leaking them into the global registry."""
    monkeypatch.setattr(reward_base, "_REGISTRY", dict(reward_base._REGISTRY))


# --- built-ins --------------------------------------------------------------------------------------------


def test_success_only_on_solved_terminal_turn() -> None:
    success = get_reward("success")
    assert success(make_transition(success=True, terminated=True)) == 1.0
    assert success(make_transition(success=False, terminated=True)) == 0.0
    assert success(make_transition(success=None)) == 0.0


def test_violation_and_invalid_count_their_own_kind() -> None:
    t = make_transition(kinds=("ok", "violation", "invalid", "violation", "invalid", "invalid"))
    assert get_reward("violation")(t) == -2.0
    assert get_reward("invalid_action")(t) == -3.0
    clean = make_transition(kinds=("ok",))
    assert get_reward("violation")(clean) == 0.0
    assert get_reward("invalid_action")(clean) == 0.0


def test_turn_cost_every_turn() -> None:
    for turn in (0, 5):
        assert get_reward("turn_cost")(make_transition(turn=turn)) == -1.0


def test_politeness_scores_courtesy_empathy_and_rudeness() -> None:
    polite = get_reward("politeness")
    assert polite(make_transition("Let me check. [lookup_order order=A1]")) == 0.0
    assert polite(make_transition("Hello! Happy to help.", turn=0)) == pytest.approx(0.5)
    # A greeting counts on the first turn only.
    assert polite(make_transition("Hello! Happy to help.", turn=3)) == pytest.approx(0.3)
    # Apologies earn reward only when the customer sounds upset.
    calm, upset = "Where is my order?", "This is RIDICULOUS, I am still waiting!!"
    assert polite(make_transition("I'm sorry about that.", customer=calm)) == 0.0
    assert polite(make_transition("I'm sorry about that.", customer=upset)) == pytest.approx(0.5)
    assert polite(make_transition("Calm down, it's not my problem.")) == pytest.approx(-1.0)
    assert polite(make_transition("Please hold on, you idiot.")) == pytest.approx(0.3 - 0.5)
    # Repeating a courtesy word does not farm reward, and the score stays within [-1, 1].
    assert polite(make_transition("please " * 50)) == pytest.approx(0.3)
    maximal = make_transition("Hi, I'm so sorry, thank you for waiting.", customer=upset, turn=0)
    assert polite(maximal) == pytest.approx(1.0)
    rude = make_transition("stupid dumb idiot moron, shut up, deal with it")
    assert polite(rude) == -1.0


def test_politeness_ignores_text_inside_actions() -> None:
    t = make_transition('[escalate reason="customer said thank you please"] One moment.')
    assert get_reward("politeness")(t) == 0.0


def test_customer_sounds_upset() -> None:
    assert customer_sounds_upset("This is unacceptable")
    assert customer_sounds_upset("I need it NOW!!")
    assert customer_sounds_upset("WHERE is my parcel")
    assert not customer_sounds_upset("Hi, can you check order A10420?")


def test_builtins_are_listed_with_documented_docstrings() -> None:
    listed = list_rewards()
    for name in DEFAULT_WEIGHTS:
        assert name in listed
        assert listed[name], f"{name} has no docstring"


# --- registry ---------------------------------------------------------------------------------------------


def test_register_decorator_and_duplicate(isolated_registry: None) -> None:
    @register_reward("brevity_test")
    def brevity(t: Transition) -> float:
        """Shorter replies score higher."""
        return -len(t.reply) / 100

    assert get_reward("brevity_test") is brevity
    assert list_rewards()["brevity_test"] == "Shorter replies score higher."
    with pytest.raises(DialogRLError, match="'brevity_test' is already registered"):
        register_reward("brevity_test")(lambda t: 0.0)
    with pytest.raises(DialogRLError, match="invalid reward name"):
        register_reward("a=b")


def test_unknown_name_lists_registered() -> None:
    with pytest.raises(DialogRLError, match=r"unknown reward 'sucess'; registered: .*success.*turn_cost"):
        get_reward("sucess")
    with pytest.raises(DialogRLError, match="pkg.module:function"):
        get_reward("mypkg.rewards.brevity")


def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_import_path_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(
        tmp_path,
        monkeypatch,
        "my_rewards_mod",
        """
        def brevity(t):
            return -len(t.reply) / 100

        class Scaled:
            def __call__(self, t):
                return 2.0

        scaled = Scaled()
        NOT_CALLABLE = 3
        """,
    )
    fn = get_reward("my_rewards_mod:brevity")
    assert fn(make_transition("x" * 50)) == -0.5
    assert get_reward("my_rewards_mod:scaled")(make_transition()) == 2.0
    with pytest.raises(DialogRLError, match="cannot import reward 'nopkg_xyz.mod:fn': No module named 'nopkg_xyz'"):
        get_reward("nopkg_xyz.mod:fn")
    with pytest.raises(DialogRLError, match="cannot import reward 'my_rewards_mod:missing'.*has no attribute"):
        get_reward("my_rewards_mod:missing")
    with pytest.raises(DialogRLError, match="not callable"):
        get_reward("my_rewards_mod:NOT_CALLABLE")
    with pytest.raises(DialogRLError, match="is a class"):
        get_reward("my_rewards_mod:Scaled")


def test_import_error_inside_user_module_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, monkeypatch, "broken_rewards_mod", "raise RuntimeError('boom at import')\n")
    with pytest.raises(DialogRLError, match="cannot import reward 'broken_rewards_mod:fn': boom at import"):
        get_reward("broken_rewards_mod:fn")


# --- spec parsing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("success", ("success", 1.0)),
        ("success=2", ("success", 2.0)),
        (" turn_cost = 0.1 ", ("turn_cost", 0.1)),
        ("pkg.mod:fn=0.5", ("pkg.mod:fn", 0.5)),
        ("pkg.mod:fn", ("pkg.mod:fn", 1.0)),
        ("violation=-1e-1", ("violation", -0.1)),
    ],
)
def test_parse_reward_spec(spec: str, expected: tuple[str, float]) -> None:
    assert parse_reward_spec(spec) == expected


@pytest.mark.parametrize("spec", ["pkg.mod:fn=abc", "success=", "=0.5", "success=nan", ""])
def test_parse_reward_spec_errors(spec: str) -> None:
    with pytest.raises(DialogRLError, match="bad reward spec"):
        parse_reward_spec(spec)


def test_bad_weight_names_the_spec() -> None:
    with pytest.raises(DialogRLError, match=r"'pkg.mod:fn=abc': weight 'abc' is not a number"):
        parse_reward_spec("pkg.mod:fn=abc")


# --- combiner ---------------------------------------------------------------------------------------------


def test_default_combiner_total_is_sum_of_weighted_components() -> None:
    combiner = RewardCombiner.from_specs(None)
    assert combiner.names == list(DEFAULT_WEIGHTS)
    t = make_transition("Thanks! [refund order=A1] [bad", kinds=("violation", "invalid"), success=True)
    total, parts = combiner(t)
    assert parts == pytest.approx(
        {"success": 1.0, "violation": -0.5, "invalid_action": -0.25, "turn_cost": -0.02, "politeness": 0.015}
    )
    assert total == pytest.approx(sum(parts.values()))
    assert total == pytest.approx(1.0 - 0.5 - 0.25 - 0.02 + 0.015)


def test_from_specs_accepts_every_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, monkeypatch, "spec_rewards_mod", "def brevity(t):\n    return -len(t.reply) / 10\n")

    def always_one(t: Transition) -> float:
        return 1

    combiner = RewardCombiner.from_specs(
        ["success=2", "turn_cost", ("violation", 3.0), {"spec_rewards_mod:brevity": 0.5}, always_one]
    )
    # A bare built-in name takes its default weight; a bare callable weight 1.0.
    assert combiner.weights == {
        "success": 2.0,
        "turn_cost": DEFAULT_WEIGHTS["turn_cost"],
        "violation": 3.0,
        "spec_rewards_mod:brevity": 0.5,
        "always_one": 1.0,
    }
    total, parts = combiner(make_transition("x" * 20, kinds=("violation",), success=True))
    assert parts == pytest.approx(
        {"success": 2.0, "turn_cost": -0.02, "violation": -3.0, "spec_rewards_mod:brevity": -1.0, "always_one": 1.0}
    )
    assert total == pytest.approx(sum(parts.values()))
    # Single items need no list; an existing combiner passes through.
    assert RewardCombiner.from_specs("success=0.5").weights == {"success": 0.5}
    assert RewardCombiner.from_specs(("success", 0.5)).weights == {"success": 0.5}
    assert RewardCombiner.from_specs(always_one).names == ["always_one"]
    assert RewardCombiner.from_specs(combiner) is combiner


def test_zero_weight_is_reported_but_contributes_nothing() -> None:
    total, parts = RewardCombiner.from_specs({"turn_cost": 0.0, "success": 1.0})(make_transition(success=True))
    assert parts == {"turn_cost": 0.0, "success": 1.0}
    assert math.copysign(1.0, parts["turn_cost"]) == 1.0  # not -0.0
    assert total == 1.0


def test_numpy_and_int_values_are_accepted() -> None:
    combiner = RewardCombiner.from_specs(
        [lambda_named("np_reward", lambda t: np.float32(0.5)), lambda_named("int_reward", lambda t: 2)]
    )
    total, parts = combiner(make_transition())
    assert parts == {"np_reward": 0.5, "int_reward": 2.0}
    assert all(type(v) is float for v in parts.values())
    assert total == 2.5


def lambda_named(name: str, fn: Callable[[Transition], object]) -> Callable[[Transition], object]:
    """Gives a lambda a component name (a bare callable is named by its ``__name__``)."""
    fn.__name__ = name
    return fn


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (lambda t: 1 / 0, "reward 'bad' raised ZeroDivisionError: division by zero"),
        (lambda t: sys.exit(5), "reward 'bad' raised SystemExit: 5"),
        (lambda t: float("nan"), "reward 'bad' returned nan"),
        (lambda t: float("-inf"), "reward 'bad' returned -inf"),
        (lambda t: np.float64("inf"), "reward 'bad' returned inf"),
        (lambda t: "1.0", "reward 'bad' returned str '1.0'"),
        (lambda t: None, "reward 'bad' returned NoneType"),
        (lambda t: [1.0], "reward 'bad' returned list"),
        (lambda t: t.success, "reward 'bad' returned NoneType"),
        (lambda t: True, "reward 'bad' returned bool"),
    ],
)
def test_bad_reward_values_raise_reward_error_naming_it(fn, message: str) -> None:  # type: ignore[no-untyped-def]
    combiner = RewardCombiner.from_specs([("success", 1.0), (lambda_named("bad", fn), 0.0)])
    with pytest.raises(RewardError, match=message.replace("(", r"\(")):
        combiner(make_transition())


def test_import_path_reward_error_is_named_by_its_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, monkeypatch, "nan_rewards_mod", "def bad(t):\n    return float('nan')\n")
    combiner = RewardCombiner.from_specs(["nan_rewards_mod:bad=0.5"])
    with pytest.raises(RewardError, match="reward 'nan_rewards_mod:bad' returned nan"):
        combiner(make_transition())


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ([], "no components"),
        (["success", "success=2"], "'success' is given twice"),
        ([("success", "high")], "is not a finite number"),
        ([("success", float("inf"))], "is not a finite number"),
        ({"success": True}, "is not a finite number"),
        ([42], "bad reward spec 42"),
        (["sucess"], "unknown reward 'sucess'"),
        ([("success", 1.0, 2.0)], "must be \\(name_or_callable, weight\\)"),
    ],
)
def test_bad_specs_raise_dialogrl_error(specs: object, message: str) -> None:
    with pytest.raises(DialogRLError, match=message):
        RewardCombiner.from_specs(specs)  # type: ignore[arg-type]


def test_rewards_package_does_not_import_torch() -> None:
    code = "import sys, dialogrl.rewards; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
