"""PPO: it learns a rewarded behaviour, a killed-and-resumed run ends where an uninterrupted one ends, and it
runs under a 2-process torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dialogrl.agents.ppo import PPOConfig, gae, train_ppo

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


def test_ppo_learns_a_rewarded_behaviour(tiny_model_dir: Path, tmp_path: Path, brevity_reward: str) -> None:
    run = train_ppo(_config(tiny_model_dir, tmp_path / "run", brevity_reward))
    history = json.loads((run / "run.json").read_text())["history"]
    first = history[0]["reply_tokens"]
    last = float(np.mean([h["reply_tokens"] for h in history[-2:]]))
    # An untuned tiny model replies with ~12 tokens; the loss must shorten them markedly (no update: ~12 +- 1).
    assert last < 0.75 * first, [round(h["reply_tokens"], 1) for h in history]
    assert np.mean([h["return"] for h in history[-2:]]) > history[0]["return"]


def _adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_killed_and_resumed_run_ends_where_an_uninterrupted_run_ends(
        tiny_model_dir: Path, tmp_path: Path, brevity_reward: str) -> None:
    straight = train_ppo(_config(tiny_model_dir, tmp_path / "straight", brevity_reward, iterations=4))

    out = tmp_path / "killed"
    cfg = _config(tiny_model_dir, out, brevity_reward, iterations=4)
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
    resumed = train_ppo(cfg)  # same config: picks up the checkpoint

    a, b = _adapter_weights(straight), _adapter_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    hist_a = json.loads((straight / "run.json").read_text())["history"]
    hist_b = json.loads((resumed / "run.json").read_text())["history"]
    assert [h["success"] for h in hist_a] == [h["success"] for h in hist_b]
    assert np.allclose([h["return"] for h in hist_a], [h["return"] for h in hist_b])


def test_torchrun_two_processes(tiny_model_dir: Path, tmp_path: Path, brevity_reward: str) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dialogrl.cli", "ppo",
           f"model={tiny_model_dir}", f"output_dir={out}", "iterations=2", "episodes_per_iteration=8",
           "minibatch_episodes=4", f"rewards=[{brevity_reward}]", "intents=[order_status]", "max_turns=2",
           "max_new_tokens=16", "eval_episodes=0", "env_batch=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert len(run["history"]) == 2
    assert (out / "adapter" / "adapter_config.json").exists()


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
