"""PPO: it learns a rewarded behaviour, a killed-and-resumed run ends where an uninterrupted one ends, and it
runs under a 2-process torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dialogrl.agents.ppo import KL_ESTIMATORS, PPOConfig, gae, main_ppo, train_ppo
from dialogrl.config import dump_config
from dialogrl.types import DialogRLError

pytestmark = pytest.mark.slow

REWARD_MODULE = '''
def brevity(t):
    """+1 for an empty reply, falling with every character: a behaviour PPO must learn."""
    return 1.0 - min(len(t.reply), 200) / 100
'''


@pytest.fixture()
def brevity_reward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "ppo_test_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return "ppo_test_rewards:brevity"


def _config(model: Path, out: Path, reward: str, **overrides: object) -> PPOConfig:
    base = dict(model=str(model), output_dir=str(out), iterations=6, episodes_per_iteration=16,
                minibatch_episodes=8, ppo_epochs=2, rewards=[reward], intents=["order_status"], max_turns=2,
                max_new_tokens=24, learning_rate=2e-3, kl_coef=0.0, eval_episodes=0, checkpoint_every=1,
                env_batch=16)
    base.update(overrides)
    return PPOConfig(**base)  # type: ignore[arg-type]


def test_gae_matches_hand_computation() -> None:
    rewards, values = np.array([0.0, 0.0, 1.0]), np.array([0.5, 0.6, 0.7])
    adv = gae(rewards, values, gamma=1.0, lam=1.0)  # lam=1: advantage = return - value
    assert np.allclose(adv, [1.0 - 0.5, 1.0 - 0.6, 1.0 - 0.7])
    adv0 = gae(rewards, values, gamma=1.0, lam=0.0)  # lam=0: one-step TD errors
    assert np.allclose(adv0, [0.6 - 0.5, 0.7 - 0.6, 1.0 - 0.7])


def test_kl_estimators_are_unbiased_and_k3_never_negative() -> None:
    p, ref = np.array([0.7, 0.2, 0.1]), np.array([0.5, 0.3, 0.2])
    tokens = np.random.default_rng(0).choice(3, 200_000, p=p)  # sampled from the policy, as in rollouts
    log_ratio = np.log(p[tokens]) - np.log(ref[tokens])
    exact = float((p * np.log(p / ref)).sum())
    for name, estimate in KL_ESTIMATORS.items():
        assert estimate(log_ratio).mean() == pytest.approx(exact, rel=0.02), name
    assert (KL_ESTIMATORS["k1"](log_ratio) < 0).any() and (KL_ESTIMATORS["k3"](log_ratio) >= 0).all()


@pytest.mark.parametrize(("overrides", "needle"), [
    (["minibatch_episodes=0"], "minibatch_episodes=0: must be at least 1"),  # was a ZeroDivisionError
    (["checkpoint_every=0"], "checkpoint_every=0: must be at least 1"),  # ZeroDivisionError after an iteration
    (["env_batch=0"], "env_batch=0: must be at least 1"),  # IndexError
    (["episodes_per_iteration=0"], "episodes_per_iteration=0: must be at least 1"),
    (["ppo_epochs=0"], "ppo_epochs=0: must be at least 1"),  # NaN losses, exit 0
    (["iterations=0"], "iterations=0: must be at least 1"),
    (["max_turns=0"], "max_turns=0: must be at least 1"),
    (["eval_episodes=-1"], "eval_episodes=-1: must be at least 0"),  # failed only after training
    (["max_new_tokens=0"], "max_new_tokens=0: must be at least 1"),  # named max_batch, after the model loaded
    (["temperature=0"], "temperature=0.0: must be a finite number > 0"),
    (["temperature=nan"], "temperature=nan"),
    (["learning_rate=nan"], "learning_rate=nan: must be a finite number > 0"),
    (["learning_rate=.inf"], "learning_rate=inf"),
    (["learning_rate=-1e-3"], "learning_rate=-0.001"),
    (["lora_r=0"], "lora_r=0: must be at least 1"),
    (["lora_alpha=0"], "lora_alpha=0: must be a finite number > 0"),
    (["kl_coef=-0.1"], "kl_coef=-0.1: must be a finite number >= 0"),
    (["kl_coef=nan"], "kl_coef=nan"),
    (["clip_range=-0.2"], "clip_range=-0.2"),
    (["value_clip=.inf"], "value_clip=inf"),
    (["value_clip=0"], "value_clip=0.0: must be a finite number > 0"),
    (["vf_coef=-1"], "vf_coef=-1.0"),
    (["adaptive_kl=true", "target_kl=0"], "target_kl=0.0: must be a finite number > 0"),
    (["kl_estimator=k2"], "kl_estimator=k2: use one of k1, k3"),
    (["max_update_kl=0"], "max_update_kl=0.0: must be a finite number > 0"),
    (["max_grad_norm=0"], "max_grad_norm=0.0"),
    (["gamma=1.5"], "gamma=1.5: must be a finite number in [0, 1]"),
    (["minibatch_episodes=5"], "minibatch_episodes=5: must divide episodes_per_iteration=64"),
    (["keep=first"], "keep=first: use one of last, average, best"),
    (["average_last=0"], "average_last=0: must be at least 1"),
    (["validation_episodes=0"], "validation_episodes=0: must be at least 1"),
    (["validate_every=0"], "validate_every=0: must be at least 1"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, overrides: list[str], needle: str) -> None:
    from dialogrl.agents.ppo import main_ppo

    out = tmp_path / "run"
    with pytest.raises(DialogRLError) as err:
        main_ppo(None, [f"output_dir={out}", *overrides])
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


def _broken_start(tmp_path: Path, model: Path, case: str) -> dict[str, object]:
    """PPOConfig/DPOConfig fields that point the start weights at something broken."""
    bad = tmp_path / case
    bad.mkdir()
    if case == "empty_model":
        return {"model": str(bad)}
    if case == "config_without_model_type":
        (bad / "config.json").write_text("{}")
        return {"model": str(bad)}
    if case == "run_dir_as_model":
        (bad / "run.json").write_text(json.dumps({"method": "sft", "base_model": str(model)}))
        return {"model": str(bad)}
    if case == "bogus_targets":
        return {"model": str(model), "lora_target_modules": ["bogus"]}
    if case == "reply_longer_than_context":
        return {"model": str(model), "max_new_tokens": 10_000}
    run = {"run_json_not_json": "{oops", "run_json_without_base_model": "{}"}.get(
        case, json.dumps({"method": "sft", "base_model": str(model), "adapter": "adapter"}))
    (bad / "run.json").write_text(run)
    if case == "adapter_without_peft_type":
        (bad / "adapter").mkdir()
        (bad / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    return {"model": str(model), "init_adapter": str(bad)}


BROKEN_STARTS = [
    ("empty_model", "no config.json"),
    ("config_without_model_type", "model_type"),
    ("run_dir_as_model", "a run directory, not a base model; start from it with init_adapter="),
    ("run_json_not_json", "run.json: unreadable"),
    ("run_json_without_base_model", "without 'base_model'"),
    ("no_adapter", "/adapter': no such local directory"),
    ("adapter_without_peft_type", "no peft_type"),
    ("bogus_targets", "lora_target_modules=[bogus]: matches no module of the model; its layers include q_proj"),
    ("reply_longer_than_context", "max_new_tokens=10000: leaves no room for the prompt"),
]


@pytest.mark.parametrize(("case", "needle"), BROKEN_STARTS)
def test_broken_start_fails_before_writing(tiny_model_dir: Path, tmp_path: Path, case: str, needle: str) -> None:
    out = tmp_path / "runs" / "ppo"
    cfg = PPOConfig(**{"output_dir": str(out), "eval_episodes": 0, **_broken_start(tmp_path, tiny_model_dir, case)})
    with pytest.raises(DialogRLError) as err:
        train_ppo(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)
    if case.startswith(("run_json", "no_adapter", "adapter")):
        assert str(err.value).startswith(f"init_adapter={cfg.init_adapter}: ")
    assert not out.parent.exists()


def test_start_check_leaves_the_random_state_alone(tiny_model_dir: Path, tmp_path: Path) -> None:
    from dialogrl.agents.ppo_model import check_start

    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    check_start(PPOConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / "run")))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert list(tmp_path.iterdir()) == []


def test_ppo_learns_a_rewarded_behaviour(tiny_model_dir: Path, tmp_path: Path, brevity_reward: str) -> None:
    run = train_ppo(_config(tiny_model_dir, tmp_path / "run", brevity_reward))
    history = json.loads((run / "run.json").read_text())["history"]
    first = history[0]["reply_tokens"]
    last = float(np.mean([h["reply_tokens"] for h in history[-2:]]))
    # An untuned tiny model replies with ~12 tokens; the loss must shorten them markedly (no update: ~12 +- 1).
    assert last < 0.75 * first, [round(h["reply_tokens"], 1) for h in history]
    assert np.mean([h["return"] for h in history[-2:]]) > history[0]["return"]


def test_ppo_trains_a_gpt2_and_its_adapter_reloads(tiny_gpt2_dir: Path, tmp_path: Path, brevity_reward: str) -> None:
    """A user's GPT-2 (learned positions, Conv1D layers that LoRA must treat as fan-in-fan-out) as the start."""
    from dialogrl.policies.lm import LMPolicy

    run = train_ppo(_config(tiny_gpt2_dir, tmp_path / "run", brevity_reward, iterations=2, max_new_tokens=8,
                            kl_coef=0.05))
    history = json.loads((run / "run.json").read_text())["history"]
    assert [h["updates"] for h in history] == [4, 4]
    assert history[1]["kl"] > 0  # the first update moved the policy off its start (the adapter-disabled reference)
    reply = LMPolicy.from_run_dir(run).generate([[{"role": "user", "content": "where is my order?"}]])[0]
    assert 0 < len(reply.response_ids) <= 8


def test_your_own_scenario_file_is_trained_and_evaluated_on(tiny_model_dir: Path, tmp_path: Path,
                                                             brevity_reward: str) -> None:
    """``scenario_files`` + ``intents``: PPO plays the user's intent in training, and the run's own held-out
    evaluation plays it on the test split (the training env's tasks, not the built-in mix)."""
    custom = Path(__file__).parent / "fixtures" / "damaged_item.yaml"
    cfg = _config(tiny_model_dir, tmp_path / "run", brevity_reward, iterations=1, scenario_files=[str(custom)],
                  intents=["damaged_item"])
    env = cfg.env_factory()()
    assert env.reset(seed=3)[1]["scenario"]["intent"] == "damaged_item"
    run = main_ppo(str(dump_config(cfg, tmp_path / "ppo.yaml")), ["eval_episodes=3"])
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["split"] == "test" and {r["intent"] for r in evaluation["records"]} == {"damaged_item"}
    assert yaml.safe_load((run / "config.yaml").read_text())["scenario_files"] == [str(custom)]
    with pytest.raises(DialogRLError, match="no-such.yaml"):
        _config(tiny_model_dir, tmp_path / "bad", brevity_reward, scenario_files=["no-such.yaml"]).env_factory()


def test_max_update_kl_stops_an_iterations_updates(tiny_model_dir: Path, tmp_path: Path,
                                                    brevity_reward: str) -> None:
    free = train_ppo(_config(tiny_model_dir, tmp_path / "free", brevity_reward, iterations=2, learning_rate=5e-2))
    free_rows = json.loads((free / "run.json").read_text())["history"]
    assert [r["updates"] for r in free_rows] == [4, 4]  # 2 epochs x 2 minibatches
    # The first minibatch of an iteration is scored by the policy that collected it (approximate KL ~0): it
    # steps; with this learning rate the next one is far from it, so the iteration stops there.
    capped = train_ppo(_config(tiny_model_dir, tmp_path / "capped", brevity_reward, iterations=2,
                               learning_rate=5e-2, max_update_kl=1e-4))
    rows = json.loads((capped / "run.json").read_text())["history"]
    assert [r["updates"] for r in rows] == [1, 1], rows
    assert max(r["approx_kl"] for r in free_rows) > 1e-4  # the cap did bind
    assert rows[0]["return"] == free_rows[0]["return"]  # the same first collection: only the updates differ


def _adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_killed_and_resumed_run_ends_where_an_uninterrupted_run_ends(
        tiny_model_dir: Path, tmp_path: Path, brevity_reward: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import dialogrl.agents.ppo as ppo

    # With validation on, so that the kept iterate must survive the kill too.
    straight = train_ppo(_config(tiny_model_dir, tmp_path / "straight", brevity_reward, iterations=4,
                                 keep="best", validation_episodes=4))

    out = tmp_path / "killed"
    cfg = _config(tiny_model_dir, out, brevity_reward, iterations=4, keep="best", validation_episodes=4)
    args = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in cfg.__dict__.items()
            if k != "lora_target_modules"]
    proc = subprocess.Popen([sys.executable, "-m", "dialogrl.cli", "ppo", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["iteration"] >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "run.json").exists()
    reached = json.loads(state.read_text())["iteration"]
    assert 1 <= reached < cfg.iterations, reached  # killed after a checkpoint and before the end
    with pytest.raises(DialogRLError, match=r"checkpoint trained with learning_rate=0.002, not 0.5"):
        train_ppo(replace(cfg, learning_rate=0.5))
    assert json.loads(state.read_text())["iteration"] == reached  # refused before touching the checkpoint
    # Training is seeded per iteration, so a run that ignored the checkpoint and started over would end in the
    # same place: count the iterations the resumed call plays (one rollout collection and one printed row each).
    collections: list[int] = []

    def counting_collect(*args: object, **kwargs: object) -> object:
        collections.append(1)
        return real_collect(*args, **kwargs)

    real_collect = ppo.collect
    monkeypatch.setattr(ppo, "collect", counting_collect)
    capsys.readouterr()
    resumed = train_ppo(cfg)  # same config: picks up the checkpoint
    printed = capsys.readouterr().out.splitlines()
    assert f"resuming from {out / 'checkpoint'} at iteration {reached}" in printed, printed
    rows = [json.loads(line) for line in printed if line.startswith("{")]
    assert [row["iteration"] for row in rows] == list(range(reached, cfg.iterations)), printed
    assert len(collections) == cfg.iterations - reached

    a, b = _adapter_weights(straight), _adapter_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    run_a, run_b = json.loads((straight / "run.json").read_text()), json.loads((resumed / "run.json").read_text())
    assert run_a["validations"] == run_b["validations"] and run_a["kept_iterate"] == run_b["kept_iterate"]
    hist_a, hist_b = run_a["history"], run_b["history"]
    assert [h["success"] for h in hist_a] == [h["success"] for h in hist_b]
    assert np.allclose([h["return"] for h in hist_a], [h["return"] for h in hist_b])


def test_output_dir_is_new_or_a_ppo_run(tiny_model_dir: Path, tmp_path: Path, brevity_reward: str) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(DialogRLError, match=r"mine is not a PPO run directory \(it holds notes.txt\)"):
        train_ppo(_config(tiny_model_dir, mine, brevity_reward, iterations=1))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    out = tmp_path / "new"  # a run that fails before its first checkpoint leaves no folder behind
    with pytest.raises(DialogRLError, match="model"):
        train_ppo(_config(tmp_path / "no_such_model", out, brevity_reward, iterations=1))
    assert not out.exists()


def test_a_checkpoint_from_before_a_field_existed_resumes(tmp_path: Path, brevity_reward: str) -> None:
    from dialogrl.agents.ppo_model import check_output, comparable_config

    cfg = _config(tmp_path / "model", tmp_path / "run", brevity_reward)
    old = comparable_config(cfg)
    del old["kl_estimator"]  # checkpoints written before the field: they used k1
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint" / "state.json").write_text(json.dumps({"config": old}))
    check_output(cfg, tmp_path / "run")
    with pytest.raises(DialogRLError, match='trained with kl_estimator="k1", not "k3"'):
        check_output(replace(cfg, kl_estimator="k3"), tmp_path / "run")


@pytest.mark.parametrize("keep", ["average", "best"])
def test_torchrun_two_processes(tiny_model_dir: Path, tmp_path: Path, brevity_reward: str, keep: str) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dialogrl.cli", "ppo",
           f"model={tiny_model_dir}", f"output_dir={out}", "iterations=2", "episodes_per_iteration=8",
           "minibatch_episodes=4", f"rewards=[{brevity_reward}]", "intents=[order_status]", "max_turns=2",
           "max_new_tokens=16", "eval_episodes=0", "env_batch=8", f"keep={keep}", "validation_episodes=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert len(run["history"]) == 2
    assert run["num_processes"] == 2  # one data-parallel group of two, not two lone rank-0 runs
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row["iteration"] for row in rows] == [0, 1], result.stdout[-3000:]  # printed by the main process only
    assert (out / "adapter" / "adapter_config.json").exists()
    if keep == "average":
        assert run["averaged"] == [0, 1] and run["validations"] == []
    else:  # 5 customers split 3 + 2 over the processes, their successes pooled (no deadlock on the odd one)
        assert [v["iterations"] for v in run["validations"]] == [0, 2] and run["averaged"] == []


def test_one_forward_per_episode_matches_one_per_turn(tiny_model_dir: Path, tmp_path: Path) -> None:
    from dialogrl.agents.ppo_model import build_policy, forward_samples, shared_sequences
    from dialogrl.agents.rollouts import TurnSample

    cfg = PPOConfig(model=str(tiny_model_dir), output_dir=str(tmp_path))
    torch.manual_seed(0)
    module, _ = build_policy(cfg, tiny_model_dir, None)
    torch.nn.init.normal_(module.value_head.weight)  # non-zero values, so their slicing is checked too
    module.eval()
    rng = np.random.default_rng(0)

    def ids(n: int) -> list[int]:
        return rng.integers(10, 300, n).tolist()

    p0, r0 = ids(20), ids(5)
    p1, r1 = p0 + r0 + ids(7), ids(6)
    p2, r2 = ids(30), ids(4)  # a truncated prompt: not an extension of turn 1, so a pass of its own
    samples = [TurnSample(0, 0, p0, r0, 0.0, False), TurnSample(0, 1, p1, r1, 0.0, False),
               TurnSample(0, 2, p2, r2, 1.0, True), TurnSample(1, 0, ids(12), ids(3), 1.0, True)]
    sequences, where = shared_sequences(samples)
    assert len(sequences) == 3 and where[0][0] == where[1][0] != where[2][0]
    shared_logp, shared_v, shared_h = forward_samples(module, samples, 1.0)
    for i, sample in enumerate(samples):
        alone_logp, alone_v, _ = forward_samples(module, [sample], 1.0)
        assert len(shared_logp[i]) == len(sample.response_ids)
        assert torch.allclose(shared_logp[i], alone_logp[0], atol=1e-5)
        assert torch.allclose(shared_v[i], alone_v[0], atol=1e-5)
    grad_logp, _, _ = forward_samples(module, samples, 1.0, grad=True)
    assert all(torch.allclose(g.detach(), s, atol=1e-5) for g, s in zip(grad_logp, shared_logp, strict=True))
    assert shared_h > 0


def test_validation_keeps_the_best_iterate_and_leaves_training_alone(
        tiny_model_dir: Path, tmp_path: Path, brevity_reward: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import dialogrl.agents.ppo_checkpoint as kept_weights

    plain = train_ppo(_config(tiny_model_dir, tmp_path / "plain", brevity_reward, iterations=3, keep="last"))
    validated = train_ppo(_config(tiny_model_dir, tmp_path / "validated", brevity_reward, iterations=3,
                                  keep="best", validation_episodes=4, validate_every=1))
    run = json.loads((validated / "run.json").read_text())
    assert [v["iterations"] for v in run["validations"]] == [0, 1, 2, 3]  # the start, then every iteration
    first_best = max(run["validations"], key=lambda v: v["success"])  # max() keeps the earliest of ties
    assert run["kept_iterate"] == first_best
    # Greedy validation games do not touch the training stream: same episodes, same last weights.
    keys = ("success", "return", "kl", "reply_tokens")
    plain_history = json.loads((plain / "run.json").read_text())["history"]
    assert [[h[k] for k in keys] for h in run["history"]] == [[h[k] for k in keys] for h in plain_history]
    last, unvalidated = _adapter_weights(validated / "checkpoint"), _adapter_weights(plain)
    assert all(torch.allclose(last[k], unvalidated[k], atol=1e-6) for k in last)

    # Scripted validation scores: the second (after one iteration) is best, a later tie does not replace it,
    # and the run's adapter is then exactly what a one-iteration run ends with.
    scores = iter([0.25, 0.75, 0.5, 0.75])
    monkeypatch.setattr(kept_weights, "validation_success", lambda *args: next(scores))
    kept = train_ppo(_config(tiny_model_dir, tmp_path / "kept", brevity_reward, iterations=3,
                             keep="best", validation_episodes=4, validate_every=1))
    assert json.loads((kept / "run.json").read_text())["kept_iterate"] == {"iterations": 1, "success": 0.75}
    one = train_ppo(_config(tiny_model_dir, tmp_path / "one", brevity_reward, iterations=1, keep="last"))
    a, b, c = _adapter_weights(kept), _adapter_weights(one), _adapter_weights(kept / "checkpoint")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)  # not the last iterate


def test_average_last_keeps_the_mean_of_the_last_iterates(tiny_model_dir: Path, tmp_path: Path,
                                                          brevity_reward: str) -> None:
    two = _adapter_weights(train_ppo(_config(tiny_model_dir, tmp_path / "two", brevity_reward, iterations=2,
                                             keep="last")))
    three = _adapter_weights(train_ppo(_config(tiny_model_dir, tmp_path / "three", brevity_reward, iterations=3,
                                               keep="last")))
    out = tmp_path / "mean"
    averaged = train_ppo(_config(tiny_model_dir, out, brevity_reward, iterations=3, keep="average", average_last=2))
    mean, last = _adapter_weights(averaged), _adapter_weights(averaged / "checkpoint")
    for key in mean:  # averaging does not change training: the iterates are the plain runs' ones
        assert torch.allclose(last[key], three[key], atol=1e-6), key
        assert torch.allclose(mean[key], (two[key] + three[key]) / 2, atol=1e-6), key
    assert json.loads((averaged / "run.json").read_text())["averaged"] == [1, 2]
    # Resuming with more iterations would average iterates outside the last two: refused, checkpoint untouched.
    before = (out / "checkpoint" / "state.json").read_text()
    with pytest.raises(DialogRLError, match=r"iterations=5 averages iterations \[\] so far, but this checkpoint "
                                            r"summed \[1, 2\]"):
        train_ppo(_config(tiny_model_dir, out, brevity_reward, iterations=5, keep="average", average_last=2))
    assert (out / "checkpoint" / "state.json").read_text() == before
    # A run that did not average yet may start to: the sum then holds exactly the iterates it names.
    late = train_ppo(_config(tiny_model_dir, tmp_path / "late", brevity_reward, iterations=1, keep="last"))
    with pytest.raises(DialogRLError, match="keep=best: this checkpoint was trained with keep=last"):
        train_ppo(_config(tiny_model_dir, late, brevity_reward, iterations=3, keep="best"))
    train_ppo(_config(tiny_model_dir, late, brevity_reward, iterations=3, keep="average", average_last=2))
    late_mean = _adapter_weights(late)
    assert all(torch.allclose(late_mean[key], mean[key], atol=1e-6) for key in mean)
    # A resume adds to the sum its checkpoint holds: 2 iterations then 1 more = 3 straight, all averaged.
    straight = _adapter_weights(train_ppo(_config(tiny_model_dir, tmp_path / "straight", brevity_reward,
                                                  iterations=3, keep="average", average_last=3)))
    resumed = train_ppo(_config(tiny_model_dir, tmp_path / "resumed", brevity_reward, iterations=2, keep="average",
                                average_last=3))
    resumed_mean = _adapter_weights(train_ppo(_config(tiny_model_dir, resumed, brevity_reward, iterations=3,
                                                      keep="average", average_last=3)))
    assert all(torch.allclose(resumed_mean[key], straight[key], atol=1e-6) for key in straight)
    assert not all(torch.allclose(straight[key], mean[key], atol=1e-6) for key in mean)  # 3 iterates, not 2


class _Ranks:
    """Enough of an ``accelerate.Accelerator`` to play one of ``n`` data-parallel processes in one process: its
    reductions see ``others`` (the other processes' contributions) added, as an all-reduce would."""

    def __init__(self, n: int, others: float = 0.0) -> None:
        self.num_processes, self.others = n, others

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        return tensor + self.others

    def no_sync(self, module: torch.nn.Module) -> object:
        from contextlib import nullcontext

        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()


def test_two_processes_weigh_every_token_as_one_process_does(tiny_model_dir: Path, tmp_path: Path) -> None:
    """DDP averages the processes' gradients, so splitting a minibatch over two processes must give one
    process's gradient even when their shares hold different numbers of tokens."""
    from dialogrl.agents.ppo import Prepared, ppo_backward
    from dialogrl.agents.ppo_model import build_policy
    from dialogrl.agents.rollouts import TurnSample

    torch.manual_seed(0)
    cfg = PPOConfig(model=str(tiny_model_dir), output_dir=str(tmp_path))
    module, _ = build_policy(cfg, tiny_model_dir, None)
    torch.nn.init.normal_(module.value_head.weight)
    rng = np.random.default_rng(0)
    lengths = [2, 3, 9, 14]  # reply tokens per episode: rank 0 gets 5, rank 1 gets 23
    samples = [TurnSample(e, 0, rng.integers(10, 300, 12).tolist(), rng.integers(10, 300, n).tolist(), 1.0, True)
               for e, n in enumerate(lengths)]

    def noise(n: int, scale: float) -> torch.Tensor:
        return torch.tensor(rng.normal(0, scale, n), dtype=torch.float32)

    data = Prepared(samples, [noise(n, 1.0) - 3 for n in lengths], [noise(n, 0.5) for n in lengths],
                    [noise(n, 1.0) for n in lengths], [noise(n, 1.0) for n in lengths], kl=0.0, entropy=0.0)

    def gradient(parts: list[tuple[list[int], _Ranks]]) -> torch.Tensor:
        module.zero_grad()
        for idx, ranks in parts:
            ppo_backward(module, data, idx, cfg, ranks)  # type: ignore[arg-type]
        grads = [p.grad.flatten() for p in module.parameters() if p.grad is not None]
        return torch.cat(grads) / parts[0][1].num_processes  # DDP's mean over the processes

    one = gradient([([0, 1, 2, 3], _Ranks(1))])
    two = gradient([([0, 1], _Ranks(2, others=23.0)), ([2, 3], _Ranks(2, others=5.0))])
    assert one.abs().sum() > 0
    assert torch.allclose(one, two, atol=1e-6, rtol=1e-4)


def test_value_clip_null_lets_the_value_head_follow_returns_far_away(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With returns far from the old values, the clipped value loss stops the value head once it has moved
    value_clip from them; value_clip=None never does."""
    from dialogrl.agents.ppo import Prepared, _chunk_losses
    from dialogrl.agents.ppo_model import build_policy, forward_samples
    from dialogrl.agents.rollouts import TurnSample

    torch.manual_seed(0)
    module, _ = build_policy(PPOConfig(model=str(tiny_model_dir), output_dir=str(tmp_path)), tiny_model_dir, None)
    torch.nn.init.normal_(module.value_head.weight)
    module.eval()
    rng = np.random.default_rng(0)
    samples = [TurnSample(0, 0, rng.integers(10, 300, 12).tolist(), rng.integers(10, 300, 6).tolist(), 1.0, True)]
    logp, values, _ = forward_samples(module, samples, 1.0)
    # the old values sit 1 above the current ones and the returns 5 below: past the clip, on the far side
    data = Prepared(samples, logp, [values[0] + 1.0], [torch.zeros(6)], [values[0] - 5.0], kl=0.0, entropy=0.0)
    grads = {}
    for clip in (0.2, None):
        module.zero_grad()
        cfg = PPOConfig(model=str(tiny_model_dir), output_dir=str(tmp_path), value_clip=clip)
        _chunk_losses(module, data, [0], cfg, 6.0)[1].backward()
        grads[clip] = module.value_head.weight.grad.abs().sum()
    assert grads[0.2] == 0 and grads[None] > 0


@pytest.mark.parametrize("detach", [False, True])
def test_value_detach_keeps_the_value_loss_out_of_the_policy(tiny_model_dir: Path, tmp_path: Path,
                                                             detach: bool) -> None:
    from dialogrl.agents.ppo import Prepared, _chunk_losses
    from dialogrl.agents.ppo_model import build_policy
    from dialogrl.agents.rollouts import TurnSample

    torch.manual_seed(0)
    cfg = PPOConfig(model=str(tiny_model_dir), output_dir=str(tmp_path), value_detach=detach)
    module, _ = build_policy(cfg, tiny_model_dir, None)
    torch.nn.init.normal_(module.value_head.weight)
    rng = np.random.default_rng(0)
    samples = [TurnSample(0, 0, rng.integers(10, 300, 12).tolist(), rng.integers(10, 300, 6).tolist(), 1.0, True)]
    data = Prepared(samples, [torch.zeros(6)], [torch.zeros(6)], [torch.zeros(6)], [torch.full((6,), 3.0)],
                    kl=0.0, entropy=0.0)
    _chunk_losses(module, data, [0], cfg, 6.0)[1].backward()  # the value loss alone
    lora = [p.grad for name, p in module.named_parameters() if "lora_" in name]
    assert module.value_head.weight.grad.abs().sum() > 0
    assert all(g is None or not g.any() for g in lora) == detach
