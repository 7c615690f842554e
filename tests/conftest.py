"""Shared fixtures. ``tiny_model_dir``: a tiny GPT-style base model (Llama layout, as the real one) with the dialogrl chat format, built once per session."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dialogrl.types import Message

if TYPE_CHECKING:
    from dialogrl.agents.ppo_config import PPOConfig

# Tests use tiny models, which run fastest on one thread; on a busy machine more threads can be 10-40x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

NAMES = ["Ana Silva", "Umar Costa", "Li Wei", "Sara Berg", "Tom Reed"]
ITEMS = ["monitor stand", "desk lamp", "usb cable", "phone case"]


def synthetic_corpus(count: int = 60, seed: int = 0) -> list[list[Message]]:
    """Small customer-service conversations with every role and the inline action syntax.

    Made here rather than by the environment so the shared model fixture depends on nothing but the bootstrap.
    """
    rng = random.Random(seed)
    conversations = []
    for _ in range(count):
        order, name, item = f"A{rng.randint(10000, 99999)}", rng.choice(NAMES), rng.choice(ITEMS)
        days = rng.randint(1, 60)
        eligible = "yes" if days <= 30 else "no"
        conversations.append([
            {"role": "system", "content": "You are a support agent. Act with [action key=value]. Refunds within "
                                          "30 days of delivery; verify identity first."},
            {"role": "user", "content": f"Hi, I want a refund for my {item}. The order is {order}."},
            {"role": "assistant", "content": f"Let me check that. [lookup_order order={order}]"},
            {"role": "tool", "content": f"order {order}: delivered ({days} days ago), customer {name}; "
                                        f"refund eligible: {eligible} ({days} of 30 days)"},
            {"role": "assistant", "content": f"[refund order={order}]" if eligible == "yes"
             else "I am sorry, this order is outside the refund window. [escalate reason=window]"},
            {"role": "user", "content": rng.choice(["Thanks!", "Ok, thank you.", "Great, bye."])},
            {"role": "assistant", "content": "Thank you for contacting us, have a great day! [end]"},
        ])
    return conversations


@pytest.fixture(scope="session")
def make_corpus() -> Callable[..., list[list[Message]]]:
    """``synthetic_corpus`` for tests (pytest's importlib mode cannot import conftest by name)."""
    return synthetic_corpus


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local model directory (a Llama-layout GPT, BPE tokenizer, chat template) that builds in a few seconds."""
    from dialogrl.policies.bootstrap import BootstrapConfig, build_base_model

    out = tmp_path_factory.mktemp("tiny_base") / "model"
    return build_base_model(BootstrapConfig.tiny(), synthetic_corpus(), out, progress=False)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2 architecture model (learned positions, Conv1D layers; 256 positions) with the tiny model's tokenizer
    and chat template: what a user's own local HF model looks like, next to our Llama-layout base."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=end, eos_token_id=end, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = end
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = tmp_path_factory.mktemp("tiny_gpt2") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


BREVITY_MODULE = '''
def brevity(t):
    """+1 for an empty reply, falling with every character: a behaviour RL must learn, and candidates of
    different lengths get different returns."""
    return 1.0 - min(len(t.reply), 200) / 100
'''


@pytest.fixture()
def brevity_reward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user's reward function in a module of its own, importable here and in subprocesses (``module:name``)."""
    (tmp_path / "brevity_test_rewards.py").write_text(BREVITY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return "brevity_test_rewards:brevity"


def _small_ppo_config(model: Path, out: Path, reward: str, **overrides: object) -> PPOConfig:
    from dialogrl.agents.ppo_config import PPOConfig

    base = dict(model=str(model), output_dir=str(out), iterations=6, episodes_per_iteration=16,
                minibatch_episodes=8, ppo_epochs=2, rewards=[reward], intents=["order_status"], max_turns=2,
                max_new_tokens=24, learning_rate=2e-3, kl_coef=0.0, eval_episodes=0, checkpoint_every=1,
                env_batch=16)
    base.update(overrides)
    return PPOConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def ppo_config() -> Callable[..., PPOConfig]:
    """A PPO config small enough to train in seconds: ``ppo_config(model, out, reward, **overrides)``."""
    return _small_ppo_config
