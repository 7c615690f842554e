"""Learned reward models: TRL's ``RewardTrainer`` on preference pairs, a LoRA (SEQ_CLS) on the local base model.

Pairs come from preference files (a user's own, e.g. Taskmaster-4's human-rated turns, or a DPO run's
``pairs/round_*.jsonl``) and/or from the environment: states of ``behaviour``'s conversations, one candidate
reply per ``proposers`` entry, ranked by the return each leads to when ``continuation`` finishes the
conversation (``agents.preferences``). Pairs are split into train and validation by scenario (environment
pairs) or by prompt (file pairs), so no context is on both sides; the held-out pairwise accuracy is reported.

The run directory (written atomically) is what ``dialogrl.rewards.reward_model.RewardModelReward`` loads::

    output_dir/
      adapter/      SEQ_CLS LoRA adapter with the score head (+ tokenizer)
      pairs/        train.jsonl, eval.jsonl: the exact split
      config.yaml   the resolved RewardModelConfig
      run.json      method "reward_model", base_model, adapter, max_length, metrics (eval_accuracy ...)
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dialogrl.agents.lora import check_lora_fields, lora_config, save_adapter
from dialogrl.agents.preferences import collect_pairs, write_pairs
from dialogrl.agents.rollouts import TrainingEnvConfig
from dialogrl.agents.trl_args import cpu_trainer_args
from dialogrl.config import (
    check_at_least,
    check_number,
    check_seeds,
    config_to_dict,
    dump_config,
    load_config,
)
from dialogrl.data import load_preference_pairs
from dialogrl.evaluation import scenario_seeds
from dialogrl.outputs import check_output_dir, replace_dir, temp_dir_beside
from dialogrl.policies.lm import model_context
from dialogrl.rewards.reward_model import METHOD, RewardModelScorer, encode_conversation
from dialogrl.types import DialogRLError


@dataclass
class RewardModelConfig(TrainingEnvConfig):
    """Settings of ``dialogrl reward-model`` (``configs/reward_model.yaml`` holds the defaults)."""

    model: str = ""
    """Local base model directory (empty: the cached bootstrap base model)."""
    output_dir: str = "runs/reward_model"
    """Run directory to create."""
    overwrite: bool = False
    """Replace an existing ``output_dir`` (only once the new run has finished)."""
    seed: int = 0
    """Seeds the scenario draw, the split, the score-head and LoRA initialisation and the data order."""
    pairs_file: list[str] | str | None = None
    """Preference JSONL file(s) (``prompt``/``chosen``/``rejected``) to train on."""
    system_prompt: str | None = None
    """System prompt given to file prompts that have none (null: leave them as they are)."""
    collect_episodes: int = 400
    """Train-split conversations of ``behaviour`` whose states give environment pairs (0: files only; with
    ``pairs_file`` too, both sets are pooled)."""
    behaviour: str = "historical"
    """Policy whose conversations provide the states: a scripted name or an LM run directory."""
    proposers: list[str] = field(default_factory=lambda: ["expert", "historical", "noisy", "random"])
    """One candidate reply per entry at each state: scripted names (each entry its own seed) or LM run dirs
    (sampled; list one several times for several samples)."""
    continuation: str = "expert"
    """Policy that finishes each candidate's conversation (a scripted name or an LM run directory)."""
    states_per_episode: int = 3
    """States sampled per conversation."""
    margin: float = 0.25
    """Keep an environment pair only if best and worst returns differ by at least this much."""
    eval_fraction: float = 0.2
    """Share of pairs (whole scenarios or prompts) held out for the pairwise accuracy."""
    learning_rate: float = 1e-3
    """AdamW learning rate of LoRA and the score head."""
    epochs: float = 3.0
    """Passes over the training pairs."""
    batch_size: int = 8
    """Pairs per optimizer step."""
    center_rewards_coefficient: float = 0.01
    """Pulls scores towards mean zero (TRL), so a reward model's scale stays comparable across runs."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator."""
    lora_target_modules: list[str] | str = "all-linear"
    """Modules that get LoRA adapters (names, or ``all-linear``); the score head is always trained."""
    max_length: int = 0
    """Tokens per scored conversation, cut from the left (0: the model's context)."""
    torch_threads: int = 0
    """CPU threads for torch during the run (0: the process's setting, torch's default being every core)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            raise DialogRLError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        check_at_least(self, 0, "collect_episodes", "max_length", "torch_threads")
        check_number(self, "margin", "center_rewards_coefficient", at_least=0)
        if self.collect_episodes and len(self.proposers) < 2:
            raise DialogRLError(f"proposers needs at least 2 entries, got {self.proposers}")

        check_at_least(self, 1, "batch_size", "states_per_episode", "max_turns", "env_batch")
        check_number(self, "learning_rate", "epochs", above=0)
        check_seeds(self, "seed")
        check_lora_fields(self)

    def check_policies(self) -> None:
        """Each policy named for collecting pairs is a scripted one or an existing run directory (checked when the
        run starts, not with the config: a quickstart may name a run it has yet to train)."""
        from dialogrl.policies.scripted import SCRIPTED

        named = [("behaviour", self.behaviour), *((f"proposers[{i}]", p) for i, p in enumerate(self.proposers)),
                 ("continuation", self.continuation)]
        for key, spec in named:
            if spec not in SCRIPTED and not Path(str(spec)).is_dir():
                raise DialogRLError(f"{key}={spec}: neither a scripted policy ({', '.join(SCRIPTED)}) nor a run "
                                    "directory")

    @property
    def files(self) -> list[str]:
        """``pairs_file`` as a list."""
        if self.pairs_file is None:
            return []
        return [self.pairs_file] if isinstance(self.pairs_file, str) else list(self.pairs_file)


def main_reward_model(config_path: str | None, overrides: list[str]) -> Path:
    """``dialogrl reward-model``: gather pairs, train, report held-out pairwise accuracy; returns the run dir."""
    return train_reward_model(load_config(RewardModelConfig, config_path, overrides))


def train_reward_model(cfg: RewardModelConfig) -> Path:
    """Train a reward model on ``cfg``'s pairs; write the run directory atomically and return it."""
    target = Path(cfg.output_dir)
    check_output_dir(target, cfg.overwrite, cfg.files)
    if cfg.collect_episodes:
        cfg.check_policies()  # before the model loads
    if not cfg.files and not cfg.collect_episodes:
        raise DialogRLError("no pairs: set pairs_file and/or collect_episodes")
    pairs = [p for f in cfg.files for p in load_preference_pairs(f, system_prompt=cfg.system_prompt)]
    base = _base_model(cfg.model)  # after the data checks: the default base model may take minutes to build
    _check_model(cfg, base)  # a model that does not load, or LoRA targets it lacks: one line, before collecting
    collected: dict[str, Any] = {}
    if cfg.collect_episodes:
        env_pairs, stats = collect_env_pairs(cfg)
        pairs += env_pairs
        collected = stats
    if len(pairs) < 4:
        raise DialogRLError(f"only {len(pairs)} preference pairs; need at least 4 to train and validate")
    train, held = split_pairs(pairs, cfg.eval_fraction, cfg.seed)
    import torch

    tmp = temp_dir_beside(target)
    threads = torch.get_num_threads()
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    try:
        write_pairs(train, tmp / "pairs" / "train.jsonl")
        write_pairs(held, tmp / "pairs" / "eval.jsonl")
        metrics, max_length = _train(cfg, base, train, held, tmp)
        dump_config(cfg, tmp / "config.yaml")
        from dialogrl.agents.versions import package_versions

        run = {"method": METHOD, "base_model": str(base), "adapter": "adapter", "max_length": max_length,
               "seed": cfg.seed, "data": {"files": [str(Path(f).resolve()) for f in cfg.files],
                                          "collected": collected, "pairs": len(pairs), "train_pairs": len(train),
                                          "eval_pairs": len(held)},
               "metrics": metrics, "config": config_to_dict(cfg), "versions": package_versions()}
        (tmp / "run.json").write_text(json.dumps(run, indent=1) + "\n", encoding="utf-8")
        replace_dir(tmp, target, cfg.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    return target


def _base_model(model: str) -> Path:
    if not model:
        from dialogrl.policies.bootstrap import default_base_model

        return default_base_model().resolve()
    path = Path(model)
    if not (path / "config.json").is_file():
        raise DialogRLError(f"model '{model}': not a local model directory (no config.json; nothing is downloaded)")
    return path.resolve()


def _load(base: Path) -> tuple[Any, Any]:
    """The tokenizer (padding with eos if it has no pad token) and a one-score sequence classifier on ``base``; a
    directory that holds no loadable causal LM is one clear error."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialised" is the point: it is the head we train
    try:
        AutoConfig.from_pretrained(base, local_files_only=True)  # a bad config.json, said plainly
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DialogRLError(f"model '{base}': cannot load a causal LM and its tokenizer: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def _check_model(cfg: RewardModelConfig, base: Path) -> None:
    """Load ``base`` as training will (torch's random state left as it was) and match the LoRA targets on it."""
    import torch

    with torch.random.fork_rng(devices=[]):
        _, model = _load(base)
    lora_config(model, cfg.lora_target_modules, r=cfg.lora_r, alpha=cfg.lora_alpha, task_type="SEQ_CLS")


def _policy(spec: str, seed: int, cache: dict[str, Any]) -> Any:
    """A scripted policy (its own seed) or an LM run directory (sampled; loaded once per path)."""
    from dialogrl.policies.scripted import SCRIPTED, make_scripted

    if spec in SCRIPTED:
        return make_scripted(spec, seed=seed)
    if spec not in cache:
        if not Path(spec).is_dir():
            raise DialogRLError(f"policy '{spec}': neither a scripted policy ({', '.join(SCRIPTED)}) "
                                "nor a run directory")
        from dialogrl.policies.lm import LMPolicy

        cache[spec] = LMPolicy.from_run_dir(spec, decoding="sampled")
    return cache[spec]


def collect_env_pairs(cfg: RewardModelConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Environment-ranked pairs from ``cfg``'s behaviour, proposers and continuation (train split)."""
    env_fn = cfg.env_factory()
    cache: dict[str, Any] = {}
    behaviour = _policy(cfg.behaviour, cfg.seed, cache)
    proposers = [_policy(p, cfg.seed + 1 + i, cache) for i, p in enumerate(cfg.proposers)]
    continuation = _policy(cfg.continuation, cfg.seed, cache)
    if hasattr(continuation, "with_settings"):  # an LM finishes greedily: the candidate's effect, not sampling noise
        continuation = continuation.with_settings(do_sample=False)
    started = time.perf_counter()
    pairs, stats = collect_pairs(env_fn, scenario_seeds(cfg.seed + 12_345, cfg.collect_episodes),
                                 behaviour, proposers, continuation, states_per_episode=cfg.states_per_episode,
                                 margin=cfg.margin, seed=cfg.seed, batch_size=cfg.env_batch)
    return pairs, {**stats.summary(), "seconds": round(time.perf_counter() - started, 2)}


def split_pairs(pairs: list[dict[str, Any]], eval_fraction: float,
                seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Seeded train/validation split by group: a scenario (``scenario_seed``) or, for file pairs, the prompt."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        key = f"seed:{p['scenario_seed']}" if "scenario_seed" in p else json.dumps(p["prompt"], sort_keys=True)
        groups.setdefault(key, []).append(i)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    want = max(1, round(eval_fraction * len(pairs)))
    held: set[int] = set()
    for key in keys:
        if len(held) >= want or len(held) + len(groups[key]) >= len(pairs):
            break
        held.update(groups[key])
    if not held or len(held) == len(pairs):
        raise DialogRLError("cannot split the pairs into train and validation (too few distinct prompts)")
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def _train(cfg: RewardModelConfig, base: Path, train: list[dict[str, Any]], held: list[dict[str, Any]],
           tmp: Path) -> tuple[dict[str, Any], int]:
    from datasets import Dataset
    from transformers import PrinterCallback, set_seed
    from trl import RewardConfig, RewardTrainer

    set_seed(cfg.seed)  # the score head is initialised here, before the trainer seeds anything
    tokenizer, model = _load(base)
    model.config.pad_token_id = tokenizer.pad_token_id  # the model finds each sequence's last token by the pad id
    max_length = min(cfg.max_length or model_context(model.config), model_context(model.config))

    def encode(rows: list[dict[str, Any]]) -> Any:
        return Dataset.from_list([{"chosen_ids": encode_conversation(tokenizer, r["prompt"] + r["chosen"], max_length),
                                   "rejected_ids": encode_conversation(tokenizer, r["prompt"] + r["rejected"],
                                                                       max_length)} for r in rows])

    args = RewardConfig(
        output_dir=str(tmp / "trainer"), **cpu_trainer_args(RewardConfig),
        report_to=[], save_strategy="no", logging_steps=5, disable_tqdm=True, dataloader_num_workers=0,
        learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, eval_strategy="epoch", max_length=None,
        center_rewards_coefficient=cfg.center_rewards_coefficient or None, seed=cfg.seed, data_seed=cfg.seed,
    )
    lora = lora_config(model, cfg.lora_target_modules, r=cfg.lora_r, alpha=cfg.lora_alpha, task_type="SEQ_CLS")
    trainer = RewardTrainer(model=model, args=args, train_dataset=encode(train), eval_dataset=encode(held),
                            processing_class=tokenizer, peft_config=lora)
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    scorer = RewardModelScorer(trainer.model, tokenizer, max_length)
    held_acc = pairwise_accuracy(scorer, held)
    metrics = {
        "eval_accuracy": held_acc, "eval_accuracy_ci95": wilson_interval(held_acc, len(held)), "chance": 0.5,
        "train_accuracy": pairwise_accuracy(scorer, train), "eval_pairs": len(held), "train_pairs": len(train),
        "eval_accuracy_by_epoch": [[h["epoch"], h["eval_accuracy"]] for h in trainer.state.log_history
                                   if "eval_accuracy" in h],
        "train_loss": [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h],
        "steps": trainer.state.global_step, "wall_time_s": round(wall, 2),
    }
    save_adapter(trainer.model, tmp / "adapter")
    tokenizer.save_pretrained(str(tmp / "adapter"))
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    return metrics, max_length


def pairwise_accuracy(scorer: RewardModelScorer, pairs: list[dict[str, Any]]) -> float:
    """Share of pairs whose chosen reply scores above the rejected one (a tie counts one half)."""
    if not pairs:
        return float("nan")
    chosen = scorer.score([p["prompt"] + p["chosen"] for p in pairs])
    rejected = scorer.score([p["prompt"] + p["rejected"] for p in pairs])
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True))
    return wins / len(pairs)


def wilson_interval(p: float, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion (hand-written: a two-line formula, no library needed)."""
    if n == 0 or math.isnan(p):
        return [float("nan"), float("nan")]
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 4), round(centre + half, 4)]
