"""Shared fixtures. ``tiny_model_dir``: a tiny GPT-style base model (Llama layout, as the real one) with the dialogrl chat format, built once per session."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from dialogrl.types import Message

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
