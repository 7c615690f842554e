"""Learned reward models as reward components. Imports no torch at module import time (torch, transformers and
peft are imported when a model is first loaded).

A reward-model run directory (written by ``dialogrl reward-model``; ``run.json`` names ``base_model`` and
``adapter``) scores a conversation that ends with an assistant reply: one scalar, higher is better. As a reward
component it scores the agent's latest reply in its context (the conversation up to and including that reply).

Two ways to put one in the environment's reward mix:

* a callable instance, anywhere a reward callable is accepted::

      gym.make("dialogrl/CustomerService-v0",
               reward=[("success", 1.0), (RewardModelReward("runs/rm"), 0.5)])

* by import path, in YAML or on the command line (``rewards: [success, "dialogrl.rewards.reward_model:from_env=0.5"]``),
  with the run directories in an environment variable, so the spec string stays a plain path::

      DIALOGRL_REWARD_MODEL=runs/rm                  # one model
      DIALOGRL_REWARD_MODEL=runs/rm1,runs/rm2,runs/rm3  DIALOGRL_REWARD_MODEL_PENALTY=1.0   # an ensemble

  Importing this module also registers that function under the name ``reward_model`` (spec
  ``reward_model=0.5``), and ``final_from_env`` (``reward_model_final``), which scores only an episode's last
  reply.

An ensemble of k models scores ``mean - penalty * std`` over the k scores (population std, ddof 0): replies the
models disagree on earn less, which makes the learned reward harder to exploit.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dialogrl.policies.lm import model_context
from dialogrl.rewards.base import register_reward
from dialogrl.types import DialogRLError, Message, Transition

ENV_PATHS = "DIALOGRL_REWARD_MODEL"
"""Environment variable read by :func:`from_env`: reward-model run directories, comma-separated."""
ENV_PENALTY = "DIALOGRL_REWARD_MODEL_PENALTY"
"""Environment variable read by :func:`from_env`: the ensemble's disagreement penalty λ (default 0)."""
METHOD = "reward_model"
"""``method`` recorded in a reward-model run's ``run.json``."""


def ensemble_score(scores: Sequence[float], penalty: float = 0.0) -> float:
    """``mean(scores) - penalty * std(scores)`` (population standard deviation; one score: the score itself)."""
    if not scores:
        raise DialogRLError("ensemble_score needs at least one score")
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    return mean - penalty * std


def upto_last_reply(messages: Sequence[Message]) -> list[Message]:
    """The conversation cut after its last assistant message (tool results and the customer's answer dropped)."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "assistant":
            return [dict(m) for m in messages[:index + 1]]
    raise DialogRLError("no assistant reply to score in the conversation")


def encode_conversation(tokenizer: Any, messages: Sequence[Message], max_length: int | None) -> list[int]:
    """Chat-template token ids of a conversation, cut from the left to the last ``max_length`` tokens.

    Training and scoring both go through here, so a reward model sees the same tokens in both. The left cut keeps
    the reply being judged (the model reads its last token).
    """
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return list(ids[-max_length:]) if max_length and len(ids) > max_length else list(ids)


class RewardModelScorer:
    """A sequence-classification model (one label) that scores conversations in batches."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int | None = None, batch_size: int = 16) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.max_length = max_length or model_context(model.config)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise DialogRLError("the reward model's tokenizer has neither a pad nor an eos token")
        self.pad_id = int(pad)
        if getattr(model.config, "pad_token_id", None) is None:  # the model finds the last token by the pad id
            model.config.pad_token_id = self.pad_id

    @classmethod
    def from_run_dir(cls, run_dir: str | Path) -> RewardModelScorer:
        """Load a reward-model run directory (base model + SEQ_CLS LoRA adapter, merged for speed)."""
        path = Path(run_dir).expanduser()
        run_file = path / "run.json"
        if not run_file.is_file():
            raise DialogRLError(f"reward model '{run_dir}': no run.json (train one with `dialogrl reward-model`)")
        try:
            run = json.loads(run_file.read_text())
            base = Path(run["base_model"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DialogRLError(f"{run_file}: unreadable or without 'base_model' ({exc})") from None
        if run.get("method") != METHOD:
            raise DialogRLError(f"{run_file}: method is {run.get('method')!r}, not a reward model ({METHOD!r})")
        base = base if base.is_absolute() else path / base
        adapter = path / run.get("adapter", "adapter")
        try:
            model, tokenizer = _load(base, adapter)
        except (OSError, ValueError, KeyError) as exc:
            raise DialogRLError(f"cannot load reward model '{run_dir}': {str(exc).splitlines()[0]}") from None
        return cls(model, tokenizer, run.get("max_length"))

    def score(self, conversations: Sequence[Sequence[Message]]) -> list[float]:
        """One score per conversation (each ends with the assistant reply being judged)."""
        import torch

        encoded = [encode_conversation(self.tokenizer, c, self.max_length) for c in conversations]
        scores: list[float] = [0.0] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        try:
            with torch.inference_mode():
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start:start + self.batch_size]
                    width = max(len(encoded[i]) for i in chunk)
                    ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                    mask = torch.zeros((len(chunk), width), dtype=torch.long)
                    for row, i in enumerate(chunk):  # right padding, as in training
                        ids[row, :len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
                        mask[row, :len(encoded[i])] = 1
                    logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                    for row, i in enumerate(chunk):
                        scores[i] = float(logits[row, 0])
        finally:
            self.model.train(was_training)
        return scores


def _load(base: Path, adapter: Path) -> tuple[Any, Any]:
    from safetensors import SafetensorError

    try:
        return _load_unchecked(base, adapter)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:  # SafetensorError: a corrupt weights file
        raise DialogRLError(f"cannot load the reward model {adapter} on {base}: {str(exc).splitlines()[0]}") from None


def _load_unchecked(base: Path, adapter: Path) -> tuple[Any, Any]:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tok_dir = adapter if (adapter / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is "newly initialised" until the adapter's copy is loaded
    try:
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    return model, tokenizer


class RewardModelReward:
    """A reward component: the learned score of the agent's latest reply (an ensemble: mean - penalty * std).

    ``RewardModelReward("runs/rm")`` or ``RewardModelReward(["runs/rm1", "runs/rm2"], penalty=1.0)``. Models load
    on the first call (so building a reward spec costs nothing until an episode runs).
    """

    def __init__(self, run_dirs: str | Path | Sequence[str | Path], penalty: float = 0.0,
                 name: str = "reward_model") -> None:
        paths = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
        if not paths:
            raise DialogRLError("RewardModelReward needs at least one reward-model run directory")
        if not math.isfinite(penalty) or penalty < 0:
            raise DialogRLError(f"RewardModelReward penalty must be a finite number >= 0, got {penalty}")
        for p in paths:
            if not (Path(p).expanduser() / "run.json").is_file():
                raise DialogRLError(f"reward model '{p}': no run.json (train one with `dialogrl reward-model`)")
        self.paths = [Path(p).expanduser() for p in paths]
        self.penalty = float(penalty)
        self.__name__ = name  # the component name RewardCombiner reports
        self._scorers: list[RewardModelScorer] | None = None
        self._prefetched: dict[tuple[tuple[str, str], ...], float] = {}

    @property
    def scorers(self) -> list[RewardModelScorer]:
        if self._scorers is None:
            self._scorers = [RewardModelScorer.from_run_dir(p) for p in self.paths]
        return self._scorers

    def score(self, conversations: Sequence[Sequence[Message]]) -> list[float]:
        """Ensemble scores of many conversations (each ends with the reply to judge), batched per model."""
        per_model = [s.score(conversations) for s in self.scorers]
        return [ensemble_score([m[i] for m in per_model], self.penalty) for i in range(len(conversations))]

    def prefetch(self, conversations: Sequence[Sequence[Message]]) -> None:
        """Score the replies the next steps will judge, as one batch (each conversation ends with its reply).

        An environment scores one transition per ``step``; a rollout that steps many at once calls this first,
        and each step's call then finds its score here. Only the latest batch is kept.
        """
        self._prefetched = dict(zip(map(_key, conversations), self.score(conversations), strict=True))

    def __call__(self, t: Transition) -> float:
        conversation = upto_last_reply(t.messages)
        score = self._prefetched.pop(_key(conversation), None)
        return self.score([conversation])[0] if score is None else score

    def __repr__(self) -> str:
        return f"RewardModelReward({[str(p) for p in self.paths]}, penalty={self.penalty:g})"


def _key(conversation: Sequence[Message]) -> tuple[tuple[str, str], ...]:
    return tuple((str(m.get("role")), str(m.get("content"))) for m in conversation)


_FROM_ENV: dict[tuple[str, str], RewardModelReward] = {}


class _RewardFromEnv:
    """Learned reward model(s) in $DIALOGRL_REWARD_MODEL (run dirs, comma-separated; ensemble: mean - λ·std).

    λ is ``$DIALOGRL_REWARD_MODEL_PENALTY`` (default 0). Refer to it as ``reward_model`` once this module is
    imported, or by the import path ``dialogrl.rewards.reward_model:from_env``. Models load once per process.
    """

    # A callable object rather than a function: it also scores a turn's replies in one batch (``prefetch``).
    def __call__(self, t: Transition) -> float:
        return reward_from_env()(t)

    def prefetch(self, conversations: Sequence[Sequence[Message]]) -> None:
        reward_from_env().prefetch(conversations)


from_env = register_reward("reward_model")(_RewardFromEnv())


@register_reward("reward_model_final")
def final_from_env(t: Transition) -> float:
    """The learned reward (``reward_model``) of the episode's last reply only, 0 on every earlier turn.

    Named ``reward_model_final``, or ``dialogrl.rewards.reward_model:final_from_env``.

    A per-reply learned reward summed over turns pays again for every repetition of a reply the model likes;
    scored once, at the end, a conversation earns what its outcome-bearing last reply earns.
    """
    return reward_from_env()(t) if t.terminated or t.truncated else 0.0


def reward_from_env() -> RewardModelReward:
    """The (cached) :class:`RewardModelReward` configured by the environment variables of :func:`from_env`."""
    paths, penalty = os.environ.get(ENV_PATHS, "").strip(), os.environ.get(ENV_PENALTY, "0").strip() or "0"
    key = (paths, penalty)
    if key not in _FROM_ENV:
        dirs = [p.strip() for p in paths.split(",") if p.strip()]
        if not dirs:
            raise DialogRLError(f"the learned reward (reward_model, reward_model_final) reads its models from {ENV_PATHS}: "
                                "set it to one or more reward-model run directories")
        try:
            value = float(penalty)
        except ValueError:
            raise DialogRLError(f"{ENV_PENALTY}={penalty!r} is not a number") from None
        _FROM_ENV[key] = RewardModelReward(dirs, value)
    return _FROM_ENV[key]
