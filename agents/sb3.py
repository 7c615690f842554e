"""Stable-baselines3 agents (PPO, DQN) on the dialogue-act environment ``dialogrl/CustomerServiceActs-v0``.

``train_sb3`` trains on the train split, evaluates the trained model deterministically on held-out test scenarios
with ``dialogrl.evaluation`` (the eval-JSON of ``dialogrl eval``) and writes ``model.zip``, ``eval.json``,
``train.json`` and the resolved ``config.yaml`` into one output folder, atomically.
``evaluate_random_acts`` scores uniformly random dialogue acts on the same seeds: the baseline to beat.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from dialogrl.config import check_number, check_seeds
from dialogrl.evaluation import ActFn, evaluate, make_env, write_json
from dialogrl.outputs import check_output_dir, replace_dir, temp_dir_beside
from dialogrl.types import DialogRLError

ENV_ID = "dialogrl/CustomerServiceActs-v0"
ALGOS = ("ppo", "dqn")
DECODING = "deterministic"
"""How the trained model picks acts in evaluation: SB3's ``predict(deterministic=True)`` (the argmax act)."""


RUN_FILES = ("model.zip", "config.yaml")
"""What marks a folder as an earlier sb3 run (the only kind ``overwrite=true`` replaces)."""


@dataclass
class SB3Config:
    """One stable-baselines3 run on the dialogue-act environment (defaults tuned on it; see configs/sb3.yaml)."""

    algo: str = "ppo"
    """The SB3 algorithm: ``ppo`` or ``dqn`` (both with ``MultiInputPolicy`` on the Dict observation)."""
    timesteps: int = 100_000
    """Environment steps (agent turns, summed over the parallel environments) to train for. SB3 collects whole
    rollouts, so it rounds up: to a multiple of ``n_envs * n_steps`` for PPO (512 by default), of
    ``n_envs * train_freq`` for DQN; ``train.json`` and the printed line give the steps taken."""
    time_limit_s: float | None = None
    """Stop training after this many seconds of wall time even before ``timesteps`` (then not reproducible)."""
    seed: int = 0
    """Seeds the training environments, the network initialisation and exploration."""
    n_envs: int = 16
    """Parallel training environments, stepped in-process (``DummyVecEnv``): one env step costs ~0.2 ms."""
    learning_rate: float = 2e-3
    """Adam learning rate."""
    net_arch: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden layer sizes of the policy and value networks (PPO) or the Q-network (DQN)."""
    gamma: float = 0.9
    """Discount factor. Below 0.95 on purpose: a truncated conversation still counts as solved, so a patient
    discount lets PPO stall (silent failing actions do not tire the customer) instead of finishing."""
    train_reward: Any = "success"
    """Reward spec of the training environments (``None``: same as ``reward``). Sparse success by default: with
    the default penalties, escalating at once (no penalty, sometimes a success) is a local optimum PPO keeps."""
    progress_bonus: float = 0.05
    """Training only: shaping ``gamma * phi(s') - phi(s)`` added to the reward, with ``phi`` = this much per
    thing learnt (slots, verified, looked up, resolved, thanked); 0 turns it off. Without it PPO rarely finds
    the 4-6-act paths in a minute."""
    n_steps: int = 32
    """PPO: steps per environment per rollout (a rollout holds ``n_envs * n_steps`` transitions)."""
    batch_size: int = 128
    """Minibatch size (PPO gradient steps; DQN replay samples)."""
    n_epochs: int = 8
    """PPO: passes over each rollout. With ``batch_size`` 128: 32 gradient steps per 512 transitions; fewer
    needed ~60% more environment steps for the same test success (the env, not the update, is the slow part)."""
    gae_lambda: float = 0.95
    """PPO: GAE lambda."""
    clip_range: float = 0.2
    """PPO: policy-ratio clipping."""
    ent_coef: float = 0.05
    """PPO: entropy bonus; keeps trying the 16 acts long enough to find multi-act solutions."""
    buffer_size: int = 50_000
    """DQN: replay buffer size."""
    learning_starts: int = 1_000
    """DQN: steps of pure exploration before learning starts."""
    train_freq: int = 1
    """DQN: steps per environment between updates."""
    gradient_steps: int = 1
    """DQN: gradient steps per update."""
    target_update_interval: int = 1_000
    """DQN: steps between target-network syncs."""
    exploration_fraction: float = 0.3
    """DQN: fraction of training over which epsilon decays."""
    exploration_final_eps: float = 0.05
    """DQN: final epsilon."""
    torch_threads: int = 1
    """Torch CPU threads while training; a 64-wide MLP runs fastest on one."""
    split: str = "train"
    """Scenario split to train on."""
    eval_split: str = "test"
    """Scenario split to evaluate on: held-out customers, phrasings and persona mixes."""
    eval_episodes: int = 500
    """Held-out evaluation episodes."""
    eval_seed: int = 0
    """Seed of the evaluation's scenario seeds; the same seed pairs runs on the same customers."""
    intents: list[str] | None = None
    """Intents to keep (``None``: all)."""
    personas: list[str] | None = None
    """Personas to keep (``None``: the split's mix)."""
    reward: Any = None
    """Reward spec of the evaluation environment (``None``: the env default), so returns compare across policies."""
    max_turns: int = 12
    """Agent turns before an episode is truncated."""
    out: str = "runs/sb3"
    """Output folder: ``model.zip``, ``eval.json``, ``train.json``, ``config.yaml``."""
    overwrite: bool = False
    """Replace ``out`` if it exists; only an earlier sb3 run (``model.zip`` and ``config.yaml``) is ever replaced."""

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise DialogRLError(f"unknown sb3 algo '{self.algo}'; known: {', '.join(ALGOS)}")
        for name in ("timesteps", "n_envs", "n_steps", "batch_size", "n_epochs", "eval_episodes", "max_turns",
                     "buffer_size", "train_freq", "gradient_steps", "target_update_interval", "torch_threads"):
            if getattr(self, name) < 1:
                raise DialogRLError(f"sb3 config: {name} must be at least 1, got {getattr(self, name)}")
        for name in ("learning_rate", "gamma"):
            if not 0 < getattr(self, name) <= (1 if name == "gamma" else float("inf")):
                raise DialogRLError(f"sb3 config: {name} out of range, got {getattr(self, name)}")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise DialogRLError(f"sb3 config: time_limit_s must be positive or null, got {self.time_limit_s}")
        for name in ("split", "eval_split"):
            if getattr(self, name) not in ("train", "test"):
                raise DialogRLError(f"sb3 config: {name} must be 'train' or 'test', got '{getattr(self, name)}'")
        check_seeds(self, "seed", "eval_seed")
        check_number(self, "clip_range", "exploration_fraction", above=0, at_most=1)
        check_number(self, "gae_lambda", "exploration_final_eps", at_least=0, at_most=1)
        check_number(self, "ent_coef", "progress_bonus", at_least=0)
        if not self.net_arch or min(self.net_arch) < 1:
            raise DialogRLError(f"net_arch={self.net_arch}: needs one or more layer sizes, each at least 1")
        if not str(self.out).strip() or Path(self.out).name in ("", ".", ".."):
            raise DialogRLError(f"sb3 config: out must name a folder (e.g. runs/sb3), got {str(self.out)!r}")

    def env_kwargs(self, training: bool = False) -> dict[str, Any]:
        """Environment keyword arguments without the split (the training reward when ``training``)."""
        reward = self.train_reward if training and self.train_reward is not None else self.reward
        kwargs = {"max_turns": self.max_turns, "intents": self.intents, "personas": self.personas, "reward": reward}
        return {k: v for k, v in kwargs.items() if v is not None}


class SlimInfo(gym.Wrapper):
    """Passes on only the info SB3 uses. Its ``DummyVecEnv`` deep-copies every info dict on every step, and the
    text env's info holds the whole conversation (measured: ~20% of training time). ``success`` becomes SB3's
    ``is_success``, so the model's ``ep_success_buffer`` tracks training success."""

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, _ = self.env.reset(**kwargs)
        return obs, {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        slim = {"episode": info["episode"], "is_success": info["success"]} if terminated or truncated else {}
        return obs, reward, terminated, truncated, slim


class ProgressShaping(gym.Wrapper):
    """Adds ``gamma * phi(s') - phi(s)`` to the reward (Ng et al., 1999), ``phi`` counting the acts env's progress
    flags. Hand-written: SB3 and Gymnasium ship no shaping wrapper. Terminal states keep their potential."""

    def __init__(self, env: gym.Env, bonus: float, gamma: float) -> None:
        from dialogrl.envs.acts import STATE_FLAGS

        super().__init__(env)
        # Every state flag is progress except the last action's error.
        self.index = [i for i, f in enumerate(STATE_FLAGS) if f != "last_error"]
        self.bonus, self.gamma, self.phi = bonus, gamma, 0.0

    def _potential(self, obs: dict[str, np.ndarray]) -> float:
        return self.bonus * float(obs["state"][self.index].sum())

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        self.phi = self._potential(obs)
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        phi = self._potential(obs)
        reward, self.phi = float(reward) + self.gamma * phi - self.phi, phi
        return obs, reward, terminated, truncated, info


def _stack(observations: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The live environments' Dict observations as one Dict of batched arrays, for ``model.predict``."""
    return {key: np.stack([o[key] for o in observations]) for key in observations[0]}


def model_act(model: Any, deterministic: bool = True) -> ActFn:
    """``run_episodes`` act function of a trained SB3 model: one batched ``predict`` per turn."""
    def act(observations: list[Any], _infos: list[dict[str, Any]]) -> list[int]:
        actions, _ = model.predict(_stack(observations), deterministic=deterministic)
        return [int(a) for a in np.asarray(actions).reshape(-1)]
    return act


@dataclass
class _Named:
    name: str


def evaluate_model(model: Any, config: SB3Config) -> dict[str, Any]:
    """The trained model, acting deterministically on ``eval_episodes`` held-out scenarios: the eval-JSON dict."""
    name = f"sb3-{config.algo}"
    return evaluate(_Named(name), ENV_ID, split=config.eval_split, episodes=config.eval_episodes,
                    seed=config.eval_seed, env_kwargs=config.env_kwargs(), act=model_act(model), method=name,
                    decoding=DECODING, training_seed=config.seed)


def evaluate_random_acts(episodes: int = 500, seed: int = 0, env_kwargs: dict[str, Any] | None = None,
                         split: str = "test", policy_seed: int = 0) -> dict[str, Any]:
    """Uniformly random dialogue acts on the held-out scenarios of ``seed``: the baseline for ``train_sb3``."""
    from dialogrl.envs.dialogue_acts import ACTS

    # One seeded action space, sampled in run_episodes' fixed order: the same seeds give the same acts.
    space = spaces.Discrete(len(ACTS), seed=policy_seed)
    return evaluate(_Named("random-acts"), ENV_ID, split=split, episodes=episodes, seed=seed, env_kwargs=env_kwargs,
                    act=lambda obs, _infos: [int(space.sample()) for _ in obs], method="random-acts",
                    decoding="sampled")


def _build_model(config: SB3Config, vec_env: Any) -> Any:
    from stable_baselines3 import DQN, PPO

    common = {"learning_rate": config.learning_rate, "gamma": config.gamma, "seed": config.seed, "device": "cpu",
              "verbose": 0, "policy_kwargs": {"net_arch": list(config.net_arch)}, "batch_size": config.batch_size}
    if config.algo == "ppo":
        return PPO("MultiInputPolicy", vec_env, n_steps=config.n_steps, n_epochs=config.n_epochs,
                   gae_lambda=config.gae_lambda, clip_range=config.clip_range, ent_coef=config.ent_coef, **common)
    return DQN("MultiInputPolicy", vec_env, buffer_size=config.buffer_size, learning_starts=config.learning_starts,
               train_freq=config.train_freq, gradient_steps=config.gradient_steps,
               target_update_interval=config.target_update_interval,
               exploration_fraction=config.exploration_fraction,
               exploration_final_eps=config.exploration_final_eps, **common)


def train_model(config: SB3Config) -> tuple[Any, dict[str, Any]]:
    """Train on ``config.split``; returns the model and what training did (steps, seconds, training success)."""
    import torch
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv

    kwargs = {"split": config.split, **config.env_kwargs(training=True)}
    make_env(ENV_ID, **kwargs).close()  # a bad intent or reward fails here, in one line
    make_env(ENV_ID, split=config.eval_split, **config.env_kwargs()).close()  # ... before minutes of training

    class TimeLimit(BaseCallback):
        """Ends ``learn`` within the wall-time budget (SB3 has step and reward limits, no clock). Steps are only
        seen while collecting, so it keeps the last update's duration in reserve: an update never runs past."""

        def __init__(self, seconds: float | None, start: float) -> None:
            super().__init__()
            self.seconds, self.stopped, self.start = seconds, False, start
            self.update_start, self.update_seconds = 0.0, 0.0

        def _on_rollout_end(self) -> None:
            self.update_start = time.perf_counter()

        def _on_rollout_start(self) -> None:
            if self.update_start:
                self.update_seconds = time.perf_counter() - self.update_start

        def _on_step(self) -> bool:
            if self.seconds is not None:
                self.stopped = time.perf_counter() - self.start + self.update_seconds >= self.seconds
            return not self.stopped

    def env_fn() -> gym.Env:
        env = make_env(ENV_ID, **kwargs)
        return ProgressShaping(env, config.progress_bonus, config.gamma) if config.progress_bonus else env

    threads = torch.get_num_threads()
    torch.set_num_threads(config.torch_threads)
    try:
        vec_env = make_vec_env(env_fn, n_envs=config.n_envs, seed=config.seed, wrapper_class=SlimInfo,
                               vec_env_cls=DummyVecEnv)
        model = _build_model(config, vec_env)
        start = time.perf_counter()  # the budget counts learn's own setup too
        callback = TimeLimit(config.time_limit_s, start)
        model.learn(total_timesteps=config.timesteps, callback=callback)
        seconds = time.perf_counter() - start
        vec_env.close()
    finally:
        torch.set_num_threads(threads)
    successes = list(model.ep_success_buffer)
    stats = {
        "algo": config.algo, "timesteps": int(model.num_timesteps), "seconds": round(seconds, 3),
        "steps_per_second": round(model.num_timesteps / max(seconds, 1e-9), 1),
        "stopped_by_time_limit": callback.stopped,
        "train_success_rate_last_100": float(np.mean(successes)) if successes else None,
    }
    return model, stats


def train_sb3(config: SB3Config) -> dict[str, Any]:
    """Train, evaluate on the held-out split, write the output folder; returns ``out``, ``train`` and ``eval``."""
    from dialogrl.config import dump_config

    out = Path(config.out)
    check_output_dir(out, config.overwrite, marker=RUN_FILES, key="out")  # before minutes of training
    model, stats = train_model(config)
    result = evaluate_model(model, config)
    tmp = temp_dir_beside(out)
    try:
        model.save(tmp / "model.zip")
        write_json(result, tmp / "eval.json")
        write_json(stats, tmp / "train.json")
        dump_config(config, tmp / "config.yaml")
        replace_dir(tmp, out, config.overwrite, marker=RUN_FILES, key="out")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "train": stats, "eval": result}



def load_model(out: str | Path) -> Any:
    """The model a ``train_sb3`` run saved, loaded with the algorithm its ``config.yaml`` records."""
    from stable_baselines3 import DQN, PPO

    from dialogrl.config import load_config

    folder = Path(out)
    if not (folder / "model.zip").is_file():
        raise DialogRLError(f"{folder}: no model.zip here (not a dialogrl sb3 output folder)")
    algo = load_config(SB3Config, folder / "config.yaml").algo
    return {"ppo": PPO, "dqn": DQN}[algo].load(folder / "model.zip", device="cpu")


def main_sb3(algo: str | None = None, timesteps: int | None = None, out: str | Path | None = None,
             seed: int | None = None, config_path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """``dialogrl sb3``: config (file or defaults) + flags + ``key=value`` overrides -> train, evaluate, save.

    Also scores random acts on the same test seeds and prints both success rates in one line.
    """
    from dialogrl.config import load_config

    flags = {"algo": algo, "timesteps": timesteps, "out": out, "seed": seed}
    for item in overrides:  # an override after the flag would win silently
        key = item.partition("=")[0].strip()
        if flags.get(key) is not None:
            raise DialogRLError(f"{item}: --{key} already sets {key}; give it once")
    cfg = load_config(SB3Config, config_path, [*(f"{k}={v}" for k, v in flags.items() if v is not None),
                                               *overrides])
    result = train_sb3(cfg)
    random = evaluate_random_acts(cfg.eval_episodes, cfg.eval_seed, cfg.env_kwargs(), cfg.eval_split)
    trained, baseline, stats = result["eval"]["metrics"], random["metrics"], result["train"]
    if stats["timesteps"] > cfg.timesteps:  # SB3 trains whole rollouts: say so rather than let the count surprise
        rollout = cfg.n_envs * (cfg.n_steps if cfg.algo == "ppo" else cfg.train_freq)
        print(f"sb3-{cfg.algo}: timesteps {cfg.timesteps} rounded up to whole rollouts of {rollout} steps")
    print(f"sb3-{cfg.algo}: {stats['timesteps']} steps in {stats['seconds']:.1f}s; test success "
          f"{trained['success_rate']:.3f} vs random acts {baseline['success_rate']:.3f} "
          f"({cfg.eval_episodes} episodes, eval seed {cfg.eval_seed}) -> {cfg.out}")
    result["random_success_rate"] = baseline["success_rate"]
    return result
