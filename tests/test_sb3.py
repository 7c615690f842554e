"""Stable-baselines3 on the dialogue-act env: env check, a real tiny PPO run that must beat random acts,
the output folder (atomic, reloadable), reproducibility and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from stable_baselines3 import DQN, PPO
from stable_baselines3.common.env_checker import check_env

import dialogrl.agents.sb3 as sb3
from dialogrl.agents.sb3 import ENV_ID, SB3Config, evaluate_random_acts, main_sb3, model_act, train_sb3
from dialogrl.config import load_config
from dialogrl.evaluation import make_env, run_episodes, scenario_seeds
from dialogrl.types import DialogRLError

# product_question is the easiest intent: random acts almost never solve it, PPO does within ~4k steps.
LEARN = {"intents": ["product_question"], "timesteps": 4000, "eval_episodes": 100, "seed": 0}
TINY = {"intents": ["product_question"], "timesteps": 64, "n_envs": 2, "batch_size": 64, "eval_episodes": 8}
EVAL_KEYS = {"policy", "method", "env_id", "split", "seed", "episodes", "decoding", "training_seed", "metrics",
             "by_persona", "by_intent", "records"}


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("sb3") / "ppo"
    return train_sb3(SB3Config(out=str(out), **LEARN))


def test_acts_env_passes_sb3_env_checker() -> None:
    env = make_env(ENV_ID, split="train")
    check_env(env, warn=True, skip_render_check=True)
    env.close()


def test_tiny_ppo_beats_random_acts_on_held_out_customers(learned: dict) -> None:
    trained = learned["eval"]["metrics"]["success_rate"]
    random = evaluate_random_acts(LEARN["eval_episodes"], 0, {"intents": LEARN["intents"]})["metrics"]["success_rate"]
    assert learned["train"]["timesteps"] >= LEARN["timesteps"]
    assert trained >= random + 0.5, (trained, random)


def test_output_folder_has_model_eval_and_config_and_reloads(learned: dict) -> None:
    out = Path(learned["out"])
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "eval.json", "model.zip", "train.json"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    saved = json.loads((out / "eval.json").read_text())
    assert EVAL_KEYS <= set(saved)
    assert (saved["policy"], saved["split"], saved["env_id"], saved["decoding"]) == (
        "sb3-ppo", "test", ENV_ID, "deterministic")
    assert saved["episodes"] == len(saved["records"]) == LEARN["eval_episodes"]
    assert [r["scenario_seed"] for r in saved["records"]] == scenario_seeds(0, LEARN["eval_episodes"])
    assert load_config(SB3Config, out / "config.yaml") == SB3Config(out=str(out), **LEARN)

    model = PPO.load(out / "model.zip", device="cpu")
    records = run_episodes(lambda: make_env(ENV_ID, split="test", intents=LEARN["intents"]), model_act(model),
                           scenario_seeds(0, LEARN["eval_episodes"]))
    assert [r["success"] for r in records] == [r["success"] for r in saved["records"]]
    assert isinstance(sb3.load_model(out), PPO)


def test_same_seed_gives_the_same_evaluation(learned: dict, tmp_path: Path) -> None:
    again = train_sb3(SB3Config(out=str(tmp_path / "again"), **LEARN))
    assert again["eval"]["records"] == learned["eval"]["records"]
    assert again["train"]["timesteps"] == learned["train"]["timesteps"]


def test_random_acts_baseline_is_seeded_and_paired() -> None:
    first = evaluate_random_acts(20, 3)
    assert first == evaluate_random_acts(20, 3)
    assert [r["scenario_seed"] for r in first["records"]] == scenario_seeds(3, 20)
    assert first["policy"] == "random-acts" and first["env_id"] == ENV_ID
    assert first["records"] != evaluate_random_acts(20, 3, policy_seed=1)["records"]


def test_dqn_trains_saves_and_reloads(tmp_path: Path) -> None:
    result = train_sb3(SB3Config(algo="dqn", out=str(tmp_path / "dqn"), learning_starts=16, **TINY))
    assert result["eval"]["policy"] == "sb3-dqn"
    model = sb3.load_model(tmp_path / "dqn")
    assert isinstance(model, DQN)
    # The saved model is the one evaluated: replayed on the same seeds it takes the same decisions.
    records = run_episodes(lambda: make_env(ENV_ID, split="test", intents=TINY["intents"]), model_act(model),
                           scenario_seeds(0, TINY["eval_episodes"]))
    assert [r["turns"] for r in records] == [r["turns"] for r in result["eval"]["records"]]
    assert [r["return"] for r in records] == [r["return"] for r in result["eval"]["records"]]


def test_main_sb3_replaces_only_an_earlier_run_and_prints_steps_and_both_rates(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    overrides = [f"{k}={json.dumps(v)}" for k, v in TINY.items() if k != "timesteps"]
    with pytest.raises(DialogRLError, match=re.escape(f"out {out} already exists (set overwrite=true")):
        main_sb3("ppo", 40, out, 1, overrides=overrides)
    with pytest.raises(DialogRLError, match=r"is not a run directory \(no model.zip and config.yaml\); .*so nothing was deleted"):
        main_sb3("ppo", 40, out, 1, overrides=[*overrides, "overwrite=true"])
    assert [p.name for p in out.iterdir()] == ["stale.txt"]
    with pytest.raises(DialogRLError, match=r"^out=elsewhere: --out already sets out; give it once$"):
        main_sb3("ppo", 40, out, 1, overrides=["out=elsewhere"])  # the override would have won silently
    (out / "model.zip").write_text("an earlier run")
    (out / "config.yaml").write_text("algo: ppo\n")
    result = main_sb3("ppo", 40, out, 1, overrides=[*overrides, "overwrite=true"])
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "eval.json", "model.zip", "train.json"]
    assert result["eval"]["training_seed"] == 1 and 0 <= result["random_success_rate"] <= 1
    assert result["train"]["timesteps"] == 64  # one whole rollout of n_envs 2 * n_steps 32, and it says so
    printed = capsys.readouterr().out
    assert "timesteps 40 rounded up to whole rollouts of 64 steps" in printed and "vs random acts" in printed


def test_sb3_command_checks_seed_and_out_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from dialogrl.cli import main

    def never(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("training started before the flags were checked")

    monkeypatch.setattr(sb3, "train_model", never)
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    cases = [(["--seed", "-1", "--out", str(tmp_path / "a")], ["--seed", "zero or positive", "-1"]),
             (["--out", ""], ["--out", "empty path ''"]),
             (["--out", str(tmp_path / "a"), "seed=-2"], ["seed=-2: must be a seed in [0, 4294967295]"]),
             (["--out", str(tmp_path / "a"), "out=."], ["out=.: --out already sets out; give it once"]),
             (["--out", ".", "algo=dqn"], ["out must name a folder", "'.'"]),
             (["--out", str(used)], [f"out {used} already exists", "overwrite=true"]),
             (["--out", str(used), "overwrite=true"], [f"out {used} is not a run directory (no model.zip and config.yaml)"])]
    for argv, needles in cases:
        assert main(["sb3", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("dialogrl: error: "), err
        for needle in needles:
            assert needle in err, (needle, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]
    assert [p.name for p in used.iterdir()] == ["notes.txt"]


def test_unknown_algo_lists_the_known_ones() -> None:
    with pytest.raises(DialogRLError, match="unknown sb3 algo 'a2c'; known: ppo, dqn"):
        SB3Config(algo="a2c")
    with pytest.raises(DialogRLError, match="known: ppo, dqn"):
        load_config(SB3Config, None, ["algo=sac"])


@pytest.mark.parametrize("bad", [{"timesteps": 0}, {"gamma": 1.5}, {"eval_split": "dev"}, {"time_limit_s": -1.0},
                                 {"seed": -1}, {"eval_seed": -3}, {"seed": 2**32}, {"out": ""}, {"out": ".."},
                                 {"net_arch": [0]}, {"net_arch": []}, {"clip_range": -1.0}, {"gae_lambda": 2.0},
                                 {"exploration_fraction": 2.0}, {"ent_coef": -0.1}])
def test_bad_config_values_fail_in_one_line(bad: dict) -> None:
    with pytest.raises(DialogRLError, match=next(iter(bad))) as err:
        SB3Config(**bad)
    assert "\n" not in str(err.value)


def test_nothing_half_written_when_a_run_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    with pytest.raises(DialogRLError, match="unknown intent 'nope'"):
        train_sb3(SB3Config(out=str(out), **{**TINY, "intents": ["nope"]}))
    assert list(tmp_path.iterdir()) == []

    out.mkdir()
    earlier = {"model.zip": "previous model", "config.yaml": "algo: ppo\n", "keep.txt": "previous run"}
    for name, text in earlier.items():
        (out / name).write_text(text)

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sb3, "write_json", broken)
    with pytest.raises(OSError, match="disk full"):
        train_sb3(SB3Config(out=str(out), overwrite=True, **TINY))
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert {p.name: p.read_text() for p in out.iterdir()} == earlier


def test_config_yaml_matches_the_dataclass_defaults() -> None:
    packaged = Path(__file__).parents[1] / "configs" / "sb3.yaml"
    assert dataclasses.asdict(load_config(SB3Config, packaged)) == dataclasses.asdict(SB3Config())


def test_time_limit_stops_training_within_the_budget() -> None:
    config = SB3Config(**{**TINY, "timesteps": 10**7, "time_limit_s": 1.0})
    _, stats = sb3.train_model(config)
    assert stats["stopped_by_time_limit"] and 0 < stats["timesteps"] < 10**7
    assert stats["seconds"] < 2.0
