"""Iterative (online) DPO on the environment, with TRL's ``DPOTrainer`` and a LoRA adapter, on CPU.

1. The SFT adapter (``init_adapter``) is merged into the base weights (as PPO does), so the DPO reference —
   the model with the LoRA adapter disabled — is the SFT policy.
2. Each round plays ``scenarios_per_round`` train-split conversations with the current policy, samples states
   from them, and ranks ``candidates`` sampled replies per state by the return each leads to under the same
   simulated customer (``agents.preferences``). Pairs whose returns differ by at least ``margin`` are kept.
3. ``DPOTrainer`` trains the adapter on the round's pairs; the next round collects with the updated policy.

``preference_file`` adds an offline round first, on a user's own pairs (validated by
``dialogrl.data.load_preference_pairs``); ``rounds=0`` makes the run purely offline.

The run directory is written atomically (built in a temp dir beside it, renamed at the end)::

    output_dir/
      base/          the start weights with the SFT adapter merged (absent without init_adapter)
      adapter/       the DPO LoRA adapter (+ tokenizer): PeftModel.from_pretrained(base, output_dir / "adapter")
      pairs/         round_<n>.jsonl: every round's pairs, HF conversational preference rows with metadata
      config.yaml    the resolved DPOConfig
      run.json       method "dpo", base_model, adapter, seed, per-round history, package versions
      eval.json, eval_sampled.json   held-out test-split evaluations (greedy, sampled)
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from dialogrl.agents.lora import check_lora_fields, lora_config, save_adapter
from dialogrl.agents.preferences import check_pairs_per_state, collect_pairs, write_pairs
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
from dialogrl.types import DialogRLError, Message

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
              "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
"""The losses of TRL's ``DPOTrainer`` (trl 1.16) that run with this config; TRL's ``exo_pair`` is left out: it
needs ``label_smoothing`` > 0, which this config does not set."""


@dataclass
class DPOConfig(TrainingEnvConfig):
    """Settings of ``dialogrl dpo`` (``configs/dpo.yaml`` holds the defaults)."""

    model: str = ""
    """Local base model directory (empty: the cached bootstrap base model)."""
    init_adapter: str | None = None
    """SFT run directory or adapter directory to start from; merged into the weights, so it is the DPO reference."""
    output_dir: str = "runs/dpo"
    """Run directory to create."""
    overwrite: bool = False
    """Replace an existing ``output_dir`` (only once the new run has finished)."""
    seed: int = 0
    """Seeds scenario draws, state choice, sampling, LoRA initialisation and data order."""
    preference_file: str | None = None
    """A user's preference JSONL (``prompt``/``chosen``/``rejected``), trained on first as an offline round."""
    system_prompt: str | None = None
    """System prompt given to ``preference_file`` prompts that have none (null: leave them as they are). The
    environment's conversations start with its own (``dialogrl.envs.customer_service.SYSTEM_PROMPT``): give
    that to train the file's pairs in the context the policy will act in."""
    rounds: int = 3
    """Online rounds of collect-then-train (0: only ``preference_file``)."""
    scenarios_per_round: int = 32
    """Train-split conversations played with the current policy per round."""
    states_per_episode: int = 2
    """Conversation states (agent turns) sampled per conversation for candidate replies."""
    candidates: int = 4
    """K: replies sampled per state, each scored by the return it leads to."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts and the candidates (and of the sampled evaluation)."""
    continuation: str = "greedy"
    """How the current policy finishes a conversation after a candidate: ``greedy`` or ``sampled``."""
    pairs_per_state: str = "best_worst"
    """Pairs a state's scored candidates make: ``best_worst``, one (its best and worst); ``all``, every two
    whose scores differ by at least ``margin`` (more pairs from the same collection)."""
    margin: float = 0.25
    """Keep a pair only if best and worst candidate returns differ by at least this much (and by more than 0:
    tied candidates never make a pair)."""
    max_new_tokens: int = 64
    """Longest reply in tokens."""
    beta: float = 0.1
    """DPO beta: higher keeps the policy closer to the reference (the SFT policy)."""
    loss_type: str = "sigmoid"
    """TRL DPO loss (``sigmoid`` is the DPO paper's; ``ipo``, ``hinge``, ... also work)."""
    learning_rate: float = 5e-4
    """AdamW learning rate of the LoRA weights (tiny models want far more than TRL's 1e-6 default)."""
    epochs: float = 2.0
    """Passes over each round's pairs."""
    batch_size: int = 8
    """Pairs per optimizer step."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator."""
    lora_target_modules: list[str] | str = "all-linear"
    """Modules that get LoRA adapters: a list of names, or ``all-linear`` (every linear layer but the output head)."""
    max_length: int = 0
    """Tokens per prompt + reply (0: the model's context). Longer prompts lose their oldest turns (system kept)."""
    torch_threads: int = 0
    """CPU threads for torch during the run (0: the process's setting, torch's default being every core)."""
    eval_episodes: int = 200
    """Held-out test-split episodes evaluated at the end, greedy and sampled (0: skip)."""
    eval_seed: int = 0
    """Seed of the held-out scenario draw (same as other methods' evaluations for paired comparison)."""
    method: str = "dpo"
    """Method name of this run in its run.json and evaluations, and so in ``dialogrl compare`` (runs sharing a
    name pool as training seeds of one method: give a variant its own name)."""

    def __post_init__(self) -> None:
        if self.continuation not in ("greedy", "sampled"):
            raise DialogRLError(f"continuation must be greedy or sampled, got '{self.continuation}'")
        if self.rounds < 0 or (self.rounds == 0 and not self.preference_file):
            raise DialogRLError(f"rounds must be >= 1 (or 0 with a preference_file), got {self.rounds}")
        if self.candidates < 2:
            raise DialogRLError(f"candidates must be at least 2, got {self.candidates}")
        check_at_least(self, 1, "scenarios_per_round", "states_per_episode", "max_new_tokens", "max_turns",
                       "env_batch", "batch_size")
        check_number(self, "temperature", "beta", "learning_rate", "epochs", above=0)
        check_number(self, "margin", at_least=0)
        check_pairs_per_state(self.pairs_per_state)
        check_at_least(self, 0, "max_length", "torch_threads", "eval_episodes")
        check_seeds(self, "seed", "eval_seed")
        check_lora_fields(self)
        if self.loss_type not in LOSS_TYPES:
            why = ("needs label_smoothing > 0, which dialogrl dpo does not set" if self.loss_type == "exo_pair"
                   else "not a TRL DPO loss")
            raise DialogRLError(f"loss_type={self.loss_type}: {why}; use one of {', '.join(LOSS_TYPES)}")


def main_dpo(config_path: str | None, overrides: list[str]) -> Path:
    """``dialogrl dpo``: train, then evaluate greedy and sampled replies on the held-out test split."""
    from dialogrl.evaluation import evaluate_run

    cfg = load_config(DPOConfig, config_path, overrides)
    out = train_dpo(cfg)
    if cfg.eval_episodes:
        evaluate_run(out, cfg.eval_episodes, cfg.eval_seed, method=cfg.method, training_seed=cfg.seed,
                     **cfg.held_out_tasks())
    return out


def train_dpo(cfg: DPOConfig) -> Path:
    """Run every round; write the run directory atomically and return it."""
    import torch

    from dialogrl.agents.ppo_model import check_start, prepare_start

    target = Path(cfg.output_dir)
    check_output_dir(target, cfg.overwrite, [cfg.preference_file, cfg.init_adapter])
    file_pairs = (load_preference_pairs(cfg.preference_file, system_prompt=cfg.system_prompt)
                  if cfg.preference_file else None)
    env_fn = cfg.env_factory()
    check_start(cfg)  # bad start weights or LoRA targets: one line, before anything is written

    tmp = temp_dir_beside(target)
    threads = torch.get_num_threads()
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    try:
        start_dir = prepare_start(cfg, tmp)  # type: ignore[arg-type]  (reads model and init_adapter only)
        history, trainer = _rounds(cfg, start_dir, tmp, file_pairs, env_fn)
        _save(cfg, trainer, start_dir, tmp, target, history)
        replace_dir(tmp, target, cfg.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    return target


def _rounds(cfg: DPOConfig, start_dir: Path, tmp: Path, file_pairs: list[dict[str, Any]] | None,
            env_fn: Callable[[], gym.Env]) -> tuple[list[dict[str, Any]], Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dialogrl.policies.lm import GenerationSettings, LMPolicy

    tokenizer = AutoTokenizer.from_pretrained(start_dir, local_files_only=True)
    policy_model = AutoModelForCausalLM.from_pretrained(start_dir, local_files_only=True)
    trainer, adapter_state = None, None
    history: list[dict[str, Any]] = []
    if file_pairs is not None:
        started = time.perf_counter()
        trainer, used = _train_round(cfg, start_dir, tokenizer, file_pairs, None, tmp, round_index=0)
        if trainer is None:
            raise DialogRLError(f"{cfg.preference_file}: no pair fits max_length={cfg.max_length or 'the context'}")
        adapter_state = _adapter_state(trainer)
        policy_model = trainer.model
        history.append({"round": "file", "source": str(Path(cfg.preference_file or "").resolve()),
                        "pairs_kept": len(file_pairs), "pairs_trained": used, **_train_stats(trainer),
                        "seconds": round(time.perf_counter() - started, 2)})
    for r in range(cfg.rounds):
        started = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_003 + r)
        settings = GenerationSettings(do_sample=True, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
        sampler = LMPolicy(policy_model, tokenizer, settings, name="dpo")
        finisher = sampler if cfg.continuation == "sampled" else sampler.with_settings(do_sample=False)
        seeds = scenario_seeds(cfg.seed * 7919 + r, cfg.scenarios_per_round)
        pairs, stats = collect_pairs(env_fn, seeds, sampler, [sampler] * cfg.candidates, finisher,
                                     states_per_episode=cfg.states_per_episode, margin=cfg.margin,
                                     pairs_per_state=cfg.pairs_per_state,
                                     seed=cfg.seed * 101 + r, batch_size=cfg.env_batch)
        row: dict[str, Any] = {"round": r, **stats.summary(), "pairs_trained": 0,
                               "collect_seconds": round(time.perf_counter() - started, 2)}
        if pairs:
            path = write_pairs([{**p, "round": r} for p in pairs], tmp / "pairs" / f"round_{r}.jsonl")
            rows = load_preference_pairs(path, system_prompt=None)  # train on exactly what the file holds
            trained, used = _train_round(cfg, start_dir, tokenizer, rows, adapter_state, tmp, round_index=r + 1)
            row["pairs_trained"] = used
            if trained is not None:
                trainer, adapter_state, policy_model = trained, _adapter_state(trained), trained.model
                row.update(_train_stats(trainer))
        row["seconds"] = round(time.perf_counter() - started, 2)
        history.append(row)
        print(json.dumps(row), flush=True)
    if trainer is None:
        raise DialogRLError(f"no preference pair reached margin={cfg.margin} in {cfg.rounds} round(s); lower the "
                            "margin, or raise candidates, scenarios_per_round or temperature")
    return history, trainer


def _adapter_state(trainer: Any) -> dict[str, Any]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}


def _train_round(cfg: DPOConfig, start_dir: Path, tokenizer: Any, rows: list[dict[str, Any]],
                 adapter_state: dict[str, Any] | None, tmp: Path, round_index: int) -> tuple[Any | None, int]:
    """A fresh DPOTrainer on the start weights (a new LoRA adapter, so the reference is the start policy),
    continuing from the previous round's adapter weights. Returns it trained (None if no pair fits
    ``max_length``) and the number of pairs it trained on."""
    from datasets import Dataset
    from peft import set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(start_dir, local_files_only=True)
    context = model_context(model.config)
    max_length = min(cfg.max_length or context, context)
    data = []
    for r in rows:
        prompt = fit_prompt(tokenizer, r["prompt"], [r["chosen"], r["rejected"]], max_length)
        if prompt is not None:
            data.append({"prompt": prompt, "chosen": r["chosen"], "rejected": r["rejected"]})
    if not data:
        return None, 0
    args = TRLDPOConfig(
        output_dir=str(tmp / "trainer"), **cpu_trainer_args(TRLDPOConfig),
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        beta=cfg.beta, loss_type=[cfg.loss_type], learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size, max_length=max_length, lr_scheduler_type="constant",
        # Modulo: the largest allowed seed plus a round would pass what transformers' set_seed accepts.
        seed=(cfg.seed + round_index) % 2**32, data_seed=(cfg.seed + round_index) % 2**32,
    )
    lora = lora_config(model, cfg.lora_target_modules, r=cfg.lora_r, alpha=cfg.lora_alpha)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tokenizer,
                         peft_config=lora)
    trainer.remove_callback(PrinterCallback)  # one summary line per round is printed instead of every step
    if adapter_state is not None:
        set_peft_model_state_dict(trainer.model, adapter_state)
    trainer.train()
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    return trainer, len(data)


def fit_prompt(tokenizer: Any, prompt: list[Message], answers: list[list[Message]],
               max_length: int) -> list[Message] | None:
    """The prompt cut so that it plus the longest answer fit ``max_length`` tokens; None if even the last turn
    alone does not fit.

    TRL cuts over-long sequences at the end, which would cut the very reply being judged. Here the oldest turns
    go first, then the system prompt, as ``LMPolicy`` keeps the recent end of a long conversation.
    """
    def fits(messages: list[Message]) -> bool:
        return all(len(_encode(tokenizer, messages + a)) <= max_length for a in answers)

    prompt = list(prompt)
    while not fits(prompt) and len(prompt) > 1:
        system = prompt[0]["role"] == "system"
        del prompt[1 if system and len(prompt) > 2 else 0]
    return prompt if fits(prompt) and any(m["role"] != "system" for m in prompt) else None


def _encode(tokenizer: Any, messages: list[Message]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _train_stats(trainer: Any) -> dict[str, Any]:
    logs = [h for h in trainer.state.log_history if "loss" in h and "rewards/accuracies" in h]
    if not logs:
        return {"dpo_steps": trainer.state.global_step}
    tail = logs[-max(1, len(logs) // 4):]  # the last quarter of the steps: where the round ended up
    return {
        "dpo_steps": trainer.state.global_step,
        "dpo_loss_first": logs[0]["loss"], "dpo_loss_last": float(np.mean([h["loss"] for h in tail])),
        "dpo_accuracy_first": logs[0]["rewards/accuracies"],
        "dpo_accuracy_last": float(np.mean([h["rewards/accuracies"] for h in tail])),
        "dpo_reward_margin_last": float(np.mean([h.get("rewards/margins", 0.0) for h in tail])),
    }


def _save(cfg: DPOConfig, trainer: Any, start_dir: Path, tmp: Path, target: Path,
          history: list[dict[str, Any]]) -> None:
    from dialogrl.agents.versions import package_versions

    save_adapter(trainer.model, tmp / "adapter")
    trainer.processing_class.save_pretrained(str(tmp / "adapter"))
    merged = start_dir.resolve() == (tmp / "base").resolve()
    base_ref = "base" if merged else str(start_dir.resolve())
    # The adapter was trained on tmp/base; point its config at where the base will live after the rename.
    adapter_cfg = tmp / "adapter" / "adapter_config.json"
    data = json.loads(adapter_cfg.read_text())
    data["base_model_name_or_path"] = str((target / "base").resolve()) if merged else base_ref
    adapter_cfg.write_text(json.dumps(data, indent=2))
    dump_config(cfg, tmp / "config.yaml")
    run = {"method": cfg.method, "base_model": base_ref, "adapter": "adapter", "seed": cfg.seed,
           "init_adapter": cfg.init_adapter, "preference_file": cfg.preference_file,
           "pairs_files": sorted(str(p.relative_to(tmp)) for p in (tmp / "pairs").glob("*.jsonl")),
           "config": config_to_dict(cfg), "history": history, "versions": package_versions()}
    (tmp / "run.json").write_text(json.dumps(run, indent=1) + "\n", encoding="utf-8")
