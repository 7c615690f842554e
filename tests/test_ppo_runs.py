"""PPO runs as a whole: a killed-and-resumed run ends where an uninterrupted one ends, checkpoints refuse what
they cannot continue, the kept weights (best, average), and a 2-process torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dialogrl.agents.ppo import PPOConfig, train_ppo
from dialogrl.types import DialogRLError

pytestmark = pytest.mark.slow


def _adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_killed_and_resumed_run_ends_where_an_uninterrupted_run_ends(
        tiny_model_dir: Path, tmp_path: Path, brevity_reward: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], ppo_config: Callable[..., PPOConfig]) -> None:
    import dialogrl.agents.ppo as ppo

    # With validation on, so that the kept iterate must survive the kill too.
    straight = train_ppo(ppo_config(tiny_model_dir, tmp_path / "straight", brevity_reward, iterations=4,
                                 keep="best", validation_episodes=4))

    out = tmp_path / "killed"
    cfg = ppo_config(tiny_model_dir, out, brevity_reward, iterations=4, keep="best", validation_episodes=4)
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


def test_output_dir_is_new_or_a_ppo_run(tiny_model_dir: Path, tmp_path: Path, brevity_reward: str,
        ppo_config: Callable[..., PPOConfig]) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(DialogRLError, match=r"mine is not a PPO run directory \(it holds notes.txt\)"):
        train_ppo(ppo_config(tiny_model_dir, mine, brevity_reward, iterations=1))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    # An SFT run holds only names a PPO run holds too: it was trained over, even when it was PPO's own start.
    sft = tmp_path / "sft"
    (sft / "adapter").mkdir(parents=True)
    (sft / "adapter" / "adapter_model.safetensors").write_text("sft weights")
    (sft / "run.json").write_text(json.dumps({"method": "sft", "base_model": str(tiny_model_dir)}))
    with pytest.raises(DialogRLError, match=r"sft holds a 'sft' run but no PPO checkpoint"):
        train_ppo(ppo_config(tiny_model_dir, sft, brevity_reward, iterations=1))
    with pytest.raises(DialogRLError, match=r"sft is init_adapter, the run PPO starts from"):
        train_ppo(ppo_config(tiny_model_dir, sft, brevity_reward, iterations=1, init_adapter=str(sft)))
    assert (sft / "adapter" / "adapter_model.safetensors").read_text() == "sft weights"
    assert sorted(p.name for p in sft.iterdir()) == ["adapter", "run.json"]
    out = tmp_path / "new"  # a run that fails before its first checkpoint leaves no folder behind
    with pytest.raises(DialogRLError, match="model"):
        train_ppo(ppo_config(tmp_path / "no_such_model", out, brevity_reward, iterations=1))
    assert not out.exists()


def test_a_checkpoint_from_before_a_field_existed_resumes(tmp_path: Path, brevity_reward: str,
        ppo_config: Callable[..., PPOConfig]) -> None:
    from dialogrl.agents.ppo_model import check_output, comparable_config

    cfg = ppo_config(tmp_path / "model", tmp_path / "run", brevity_reward)
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

def test_validation_keeps_the_best_iterate_and_leaves_training_alone(
        tiny_model_dir: Path, tmp_path: Path, brevity_reward: str, monkeypatch: pytest.MonkeyPatch,
        ppo_config: Callable[..., PPOConfig]) -> None:
    import dialogrl.agents.ppo_checkpoint as kept_weights

    plain = train_ppo(ppo_config(tiny_model_dir, tmp_path / "plain", brevity_reward, iterations=3, keep="last"))
    validated = train_ppo(ppo_config(tiny_model_dir, tmp_path / "validated", brevity_reward, iterations=3,
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
    kept = train_ppo(ppo_config(tiny_model_dir, tmp_path / "kept", brevity_reward, iterations=3,
                             keep="best", validation_episodes=4, validate_every=1))
    assert json.loads((kept / "run.json").read_text())["kept_iterate"] == {"iterations": 1, "success": 0.75}
    one = train_ppo(ppo_config(tiny_model_dir, tmp_path / "one", brevity_reward, iterations=1, keep="last"))
    a, b, c = _adapter_weights(kept), _adapter_weights(one), _adapter_weights(kept / "checkpoint")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)  # not the last iterate


def test_average_last_keeps_the_mean_of_the_last_iterates(tiny_model_dir: Path, tmp_path: Path,
                                                          brevity_reward: str,
        ppo_config: Callable[..., PPOConfig]) -> None:
    two = _adapter_weights(train_ppo(ppo_config(tiny_model_dir, tmp_path / "two", brevity_reward, iterations=2,
                                             keep="last")))
    three = _adapter_weights(train_ppo(ppo_config(tiny_model_dir, tmp_path / "three", brevity_reward, iterations=3,
                                               keep="last")))
    out = tmp_path / "mean"
    averaged = train_ppo(ppo_config(tiny_model_dir, out, brevity_reward, iterations=3, keep="average", average_last=2))
    mean, last = _adapter_weights(averaged), _adapter_weights(averaged / "checkpoint")
    for key in mean:  # averaging does not change training: the iterates are the plain runs' ones
        assert torch.allclose(last[key], three[key], atol=1e-6), key
        assert torch.allclose(mean[key], (two[key] + three[key]) / 2, atol=1e-6), key
    assert json.loads((averaged / "run.json").read_text())["averaged"] == [1, 2]
    # Resuming with more iterations would average iterates outside the last two: refused, checkpoint untouched.
    before = (out / "checkpoint" / "state.json").read_text()
    with pytest.raises(DialogRLError, match=r"iterations=5 averages iterations \[\] so far, but this checkpoint "
                                            r"summed \[1, 2\]"):
        train_ppo(ppo_config(tiny_model_dir, out, brevity_reward, iterations=5, keep="average", average_last=2))
    assert (out / "checkpoint" / "state.json").read_text() == before
    # A run that did not average yet may start to: the sum then holds exactly the iterates it names.
    late = train_ppo(ppo_config(tiny_model_dir, tmp_path / "late", brevity_reward, iterations=1, keep="last"))
    with pytest.raises(DialogRLError, match="keep=best: this checkpoint was trained with keep=last"):
        train_ppo(ppo_config(tiny_model_dir, late, brevity_reward, iterations=3, keep="best"))
    train_ppo(ppo_config(tiny_model_dir, late, brevity_reward, iterations=3, keep="average", average_last=2))
    late_mean = _adapter_weights(late)
    assert all(torch.allclose(late_mean[key], mean[key], atol=1e-6) for key in mean)
    # A resume adds to the sum its checkpoint holds: 2 iterations then 1 more = 3 straight, all averaged.
    straight = _adapter_weights(train_ppo(ppo_config(tiny_model_dir, tmp_path / "straight", brevity_reward,
                                                  iterations=3, keep="average", average_last=3)))
    resumed = train_ppo(ppo_config(tiny_model_dir, tmp_path / "resumed", brevity_reward, iterations=2, keep="average",
                                average_last=3))
    resumed_mean = _adapter_weights(train_ppo(ppo_config(tiny_model_dir, resumed, brevity_reward, iterations=3,
                                                      keep="average", average_last=3)))
    assert all(torch.allclose(resumed_mean[key], straight[key], atol=1e-6) for key in straight)
    assert not all(torch.allclose(straight[key], mean[key], atol=1e-6) for key in mean)  # 3 iterates, not 2
