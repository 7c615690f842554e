"""Learned reward models: training separates a separable pair set, the run plugs into the environment as a reward
(instance and import-path forms), the ensemble arithmetic is mean - λ·std, and errors are one clear line."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from dialogrl.agents.reward_model_train import (
    RewardModelConfig,
    split_pairs,
    train_reward_model,
    wilson_interval,
)
from dialogrl.evaluation import make_env
from dialogrl.rewards import list_rewards
from dialogrl.rewards.reward_model import (
    ENV_PATHS,
    ENV_PENALTY,
    RewardModelReward,
    RewardModelScorer,
    ensemble_score,
    from_env,
    reward_from_env,
    upto_last_reply,
)
from dialogrl.types import DialogRLError, Transition

GOOD = ["Thank you for waiting, happy to help. [end]", "Thanks, glad to help! [end]",
        "Thank you, have a great day. [end]"]
BAD = ["That is not my problem, stupid.", "Stupid question, deal with it.", "Not my problem, idiot."]


def separable_pairs(count: int, seed: int = 0) -> list[dict]:
    """Polite closings preferred over rude ones, after varied customer messages."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        order = f"A{rng.randint(10000, 99999)}"
        prompt = [{"role": "user", "content": rng.choice(["Where is my order", "Refund for", "Status of"])
                   + f" {order}?"}, {"role": "assistant", "content": f"[lookup_order order={order}]"},
                  {"role": "tool", "content": f"order {order}: delivered"}, {"role": "user", "content": "Thanks."}]
        rows.append({"prompt": prompt, "chosen": rng.choice(GOOD), "rejected": rng.choice(BAD), "id": i})
    return rows


class FakeScorer:
    def __init__(self, value: float) -> None:
        self.value = value
        self.seen: list = []

    def score(self, conversations: list) -> list[float]:
        self.seen.extend(conversations)
        return [self.value] * len(conversations)


def _transition(messages: list[dict]) -> Transition:
    return Transition(messages=messages, reply=messages[-1]["content"], actions=[], scenario={}, turn=0,
                      terminated=False, truncated=False, success=None)


def test_ensemble_is_mean_minus_lambda_std(tmp_path: Path) -> None:
    assert ensemble_score([2.5]) == 2.5 and ensemble_score([2.5], penalty=3.0) == 2.5
    assert math.isclose(ensemble_score([1.0, 2.0, 3.0], penalty=0.5), 2.0 - 0.5 * math.sqrt(2 / 3))
    assert math.isclose(ensemble_score([1.0, 3.0], penalty=0.0), 2.0)

    dirs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text("{}")
        dirs.append(tmp_path / name)
    reward = RewardModelReward(dirs, penalty=1.0)
    reward._scorers = [FakeScorer(1.0), FakeScorer(3.0)]  # std 1.0, mean 2.0
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello [end]"},
                {"role": "tool", "content": "conversation ended"}]
    assert math.isclose(reward(_transition(messages)), 2.0 - 1.0)
    # The reply is judged in context, without what came after it.
    assert reward._scorers[0].seen == [messages[:2]]
    assert reward.__name__ == "reward_model"
    assert list_rewards()["reward_model"].startswith("Learned reward model")  # the by-name form


def test_errors_are_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DialogRLError, match="no run.json"):
        RewardModelReward(tmp_path / "missing")
    with pytest.raises(DialogRLError, match="at least one"):
        RewardModelReward([])
    with pytest.raises(DialogRLError, match="penalty"):
        RewardModelReward(tmp_path, penalty=-1.0)
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "run.json").write_text(json.dumps({"method": "dpo", "base_model": "base"}))
    with pytest.raises(DialogRLError, match="not a reward model"):
        RewardModelScorer.from_run_dir(tmp_path / "policy")
    with pytest.raises(DialogRLError, match="no assistant reply"):
        upto_last_reply([{"role": "user", "content": "hi"}])
    monkeypatch.delenv(ENV_PATHS, raising=False)
    with pytest.raises(DialogRLError, match=ENV_PATHS):
        from_env(_transition([{"role": "assistant", "content": "hi"}]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(separable_pairs(1)[0]) + "\n" + json.dumps({"prompt": [], "chosen": "a",
                                                                         "rejected": "b"}) + "\n")
    with pytest.raises(DialogRLError, match=f"{bad} row 2"):
        train_reward_model(RewardModelConfig(model=str(tmp_path), pairs_file=str(bad), collect_episodes=0,
                                             output_dir=str(tmp_path / "rm")))
    assert not (tmp_path / "rm").exists()


@pytest.mark.parametrize(("overrides", "needle"), [
    (["learning_rate=nan"], "learning_rate=nan: must be a finite number > 0"),
    (["learning_rate=.inf"], "learning_rate=inf"),
    (["learning_rate=0"], "learning_rate=0.0"),
    (["lora_r=0"], "lora_r=0: must be at least 1"),
    (["lora_alpha=0"], "lora_alpha=0: must be a finite number > 0"),
    (["margin=nan"], "margin=nan"),
    (["center_rewards_coefficient=-1"], "center_rewards_coefficient=-1.0: must be a finite number >= 0"),
    (["seed=-1"], "seed=-1: must be a seed in [0, 4294967295]"),
    (["behaviour=bogus"], "behaviour=bogus: neither a scripted policy (expert, historical, random, noisy) nor a run "
                          "directory"),  # did not name the key, and came after the model loaded
    (["proposers=[expert,bogus]"], "proposers[1]=bogus: neither a scripted policy"),
    (["continuation=bogus"], "continuation=bogus: neither"),
    (["env_id=dialogrl/CustomerServiceActs-v0"], "env_id=dialogrl/CustomerServiceActs-v0: takes dialogue acts, not "
                                                 "text replies"),  # was a traceback from inside the env
])
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, overrides: list[str], needle: str) -> None:
    from dialogrl.agents.reward_model_train import main_reward_model

    out = tmp_path / "runs" / "rm"
    with pytest.raises(DialogRLError) as err:
        main_reward_model(None, [f"output_dir={out}", *overrides])
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not out.parent.exists()


@pytest.mark.parametrize(("case", "needle"), [
    ("empty_dir", "no config.json"),
    ("config_without_model_type", "cannot load a causal LM and its tokenizer: Unrecognized model"),
    ("no_weights", "cannot load a causal LM and its tokenizer: "),
    ("sft_run_dir", "no config.json"),
    ("bogus_targets", "lora_target_modules=[bogus]: matches no module of the model; its layers include q_proj"),
])
def test_bad_model_or_targets_fail_before_collecting_or_writing(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, needle: str) -> None:
    import dialogrl.agents.reward_model_train as rm_train

    def no_collecting(cfg: object) -> None:
        raise AssertionError("pairs were collected before the model was checked")

    monkeypatch.setattr(rm_train, "collect_env_pairs", no_collecting)
    model = tmp_path / case
    model.mkdir()
    targets: list[str] | str = "all-linear"
    if case == "config_without_model_type":
        (model / "config.json").write_text("{}")
    elif case == "no_weights":
        (model / "config.json").write_text('{"model_type": "gpt2"}')
    elif case == "sft_run_dir":
        (model / "run.json").write_text(json.dumps({"method": "sft", "base_model": str(tiny_model_dir)}))
    elif case == "bogus_targets":
        model, targets = tiny_model_dir, ["bogus"]
    out = tmp_path / "runs" / "rm"
    with pytest.raises(DialogRLError) as err:
        train_reward_model(RewardModelConfig(model=str(model), output_dir=str(out), lora_target_modules=targets))
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not out.parent.exists()


def test_module_imports_no_torch() -> None:
    code = "import sys, dialogrl.rewards.reward_model; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_split_keeps_groups_apart() -> None:
    pairs = [{"prompt": [{"role": "user", "content": f"q{i % 7}"}], "chosen": "a", "rejected": "b"}
             for i in range(28)] + [{"prompt": [], "chosen": "a", "rejected": "b", "scenario_seed": i % 3}
                                    for i in range(9)]
    train, held = split_pairs(pairs, 0.25, seed=0)
    assert len(train) + len(held) == len(pairs) and held and train
    key = lambda p: p.get("scenario_seed", json.dumps(p["prompt"]))  # noqa: E731
    assert not {key(p) for p in train} & {key(p) for p in held}
    assert wilson_interval(0.5, 100) == pytest.approx([0.4038, 0.5962], abs=1e-4)


def test_reward_model_learns_separable_pairs_and_scores_in_the_env(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Trained once on the pairs and once with every label flipped, it must be right on held-out pairs both times:
    # a head that ignored the labels (or got lucky at initialisation) cannot be.
    runs = {}
    for flipped in (False, True):
        rows = separable_pairs(48)
        if flipped:
            rows = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
        path = tmp_path / f"pairs_{flipped}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs[flipped] = train_reward_model(RewardModelConfig(
            model=str(tiny_model_dir), pairs_file=str(path), collect_episodes=0,
            output_dir=str(tmp_path / f"rm_{flipped}"), eval_fraction=0.25, epochs=4, learning_rate=3e-3))
        run = json.loads((runs[flipped] / "run.json").read_text())
        assert run["method"] == "reward_model" and run["data"]["eval_pairs"] >= 10
        assert run["metrics"]["eval_accuracy"] >= 0.85, (flipped, run["metrics"])
    out = runs[False]
    held = [json.loads(line) for line in (out / "pairs" / "eval.jsonl").read_text().splitlines()]
    assert {r["id"] for r in held}.isdisjoint(
        json.loads(line)["id"] for line in (out / "pairs" / "train.jsonl").read_text().splitlines())

    # As a reward component: an instance, then the import-path form configured by environment variables.
    reward = RewardModelReward(out)
    prompt = separable_pairs(1, seed=99)[0]["prompt"]
    polite, rude = reward.score([prompt + [{"role": "assistant", "content": GOOD[0]}],
                                 prompt + [{"role": "assistant", "content": BAD[0]}]])
    assert polite > rude
    env = make_env("dialogrl/CustomerService-v0", reward=[("success", 1.0), (reward, 0.5)], max_turns=2)
    env.reset(seed=3)
    _, total, *_, info = env.step("Thank you, happy to help. [end]")
    assert set(info["reward_components"]) == {"success", "reward_model"}
    learned = info["reward_components"]["reward_model"]
    assert math.isfinite(learned) and math.isclose(total, learned + info["reward_components"]["success"])
    monkeypatch.setenv(ENV_PATHS, f"{out},{out}")
    monkeypatch.setenv(ENV_PENALTY, "2.0")
    env = make_env("dialogrl/CustomerService-v0", reward=["dialogrl.rewards.reward_model:from_env=0.5"],
                   max_turns=2)
    env.reset(seed=3)
    _, total_env, *_, info = env.step("Thank you, happy to help. [end]")
    # Two copies of one model agree (std 0): the ensemble equals the single model's weighted score.
    assert math.isclose(total_env, info["reward_components"]["dialogrl.rewards.reward_model:from_env"])
    assert math.isclose(total_env, learned, rel_tol=1e-5)
    # A rollout scores each turn's replies as one batch; the environments' step-time calls then only look them up,
    # and pay what scoring one reply at a time pays.
    from types import SimpleNamespace

    from dialogrl.agents.rollouts import collect

    class AskOrder:  # LMPolicy.generate's interface, one fixed reply
        def generate(self, conversations: list) -> list:
            return [SimpleNamespace(text="Could you give me your order number?", prompt_ids=[1], response_ids=[2])
                    for _ in conversations]

    batch_sizes: list[int] = []
    scorer = reward.scorers[0]
    score_batch = scorer.score
    monkeypatch.setattr(scorer, "score", lambda convs: batch_sizes.append(len(convs)) or score_batch(convs))
    batched = collect(AskOrder(), lambda: make_env("dialogrl/CustomerService-v0", reward=[(reward, 1.0)],
                                                   max_turns=2), [3, 4, 5])
    assert batch_sizes == [3, 3] and len(batched.samples) == 6  # two turns of three conversations, two calls
    batch_sizes.clear()
    one_by_one = collect(AskOrder(), lambda: make_env("dialogrl/CustomerService-v0",
                                                      reward=[(lambda t: reward(t), 1.0)], max_turns=2), [3, 4, 5])
    assert batch_sizes == [1] * 6  # a plain callable has no prefetch: one reply per call
    assert [s.reward for s in batched.samples] == pytest.approx([s.reward for s in one_by_one.samples], rel=1e-5)
    # The import-path form prefetches too (here the two-model ensemble configured above).
    batch_sizes.clear()
    first = reward_from_env().scorers[0]
    score_first = first.score
    monkeypatch.setattr(first, "score", lambda convs: batch_sizes.append(len(convs)) or score_first(convs))
    collect(AskOrder(), lambda: make_env("dialogrl/CustomerService-v0", max_turns=2,
                                         reward=["dialogrl.rewards.reward_model:from_env"]), [3, 4, 5])
    assert batch_sizes == [3, 3]
    # Evaluation and DPO's replays batch the same way; a reply longer than the environment keeps is scored as
    # the environment cuts it, so its prefetched score is found (one call per turn, none at step time).
    from dialogrl.agents.preferences import Start, play_from
    from dialogrl.envs.actions import MAX_REPLY_CHARS
    from dialogrl.evaluation import run_episodes

    long_reply = "Could you give me your order number? " * (MAX_REPLY_CHARS // 30)
    assert len(long_reply) > MAX_REPLY_CHARS

    class LongAsk:  # a text policy (act_batch) that always asks at length
        def act_batch(self, conversations: list, infos: list) -> list:
            return [long_reply] * len(conversations)

    def env_fn() -> object:
        return make_env("dialogrl/CustomerService-v0", reward=[(reward, 1.0)], max_turns=2)

    batch_sizes.clear()
    records = run_episodes(env_fn, lambda _obs, infos: LongAsk().act_batch(infos, infos), [3, 4, 5])
    assert batch_sizes == [3, 3] and len(records) == 3
    batch_sizes.clear()
    outcomes = play_from(env_fn, [Start(seed, ["Hello."], 0) for seed in (3, 4, 5)], LongAsk())
    assert batch_sizes == [1, 1, 1, 3] and len(outcomes) == 3  # forced first replies one at a time, then a batch
    # The final-reply form pays nothing before the episode ends, and the same score at its end.
    env = make_env("dialogrl/CustomerService-v0", reward=["dialogrl.rewards.reward_model:final_from_env"],
                   max_turns=2)
    env.reset(seed=3)
    _, first, terminated, truncated, _ = env.step("Could you give me your order number?")
    assert first == 0.0 and not (terminated or truncated)
    _, last, terminated, _, info = env.step("Thank you, happy to help. [end]")
    assert terminated and math.isfinite(last) and last != 0.0
    assert math.isclose(last, reward.score([upto_last_reply(info["messages"])])[0], rel_tol=1e-5)
