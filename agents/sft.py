"""Supervised fine-tuning baseline: LoRA on a local causal LM with TRL's ``SFTTrainer``, on CPU.

The loss covers assistant turns only (``assistant_only_loss``; the chat template marks them with
``{% generation %}``). A validation split drives early stopping on eval loss, and the best checkpoint is kept.
The run directory is written atomically (trained in a temp dir beside it, renamed at the end)::

    output_dir/
      adapter/      PEFT LoRA adapter (+ tokenizer): PeftModel.from_pretrained(base, output_dir / "adapter")
      config.yaml   the resolved SFTConfig
      run.json      seed, method, base model, package versions, training metrics
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dialogrl.agents.lora import check_lora_fields, lora_config, save_adapter
from dialogrl.agents.trl_args import cpu_trainer_args
from dialogrl.agents.versions import package_versions
from dialogrl.config import check_number, check_seeds, config_to_dict, dump_config, load_config
from dialogrl.data import DEFAULT_SYSTEM_PROMPT, filter_success, load_conversations
from dialogrl.outputs import check_output_dir, replace_dir, temp_dir_beside
from dialogrl.policies.lm import model_context
from dialogrl.types import DialogRLError


@dataclass
class SFTConfig:
    """Settings of ``dialogrl sft`` (supervised LoRA fine-tuning on conversation logs)."""

    model: str = ""
    """Local directory of the base causal LM and its tokenizer (with a chat template); empty: the cached bootstrap
    base model (built on first use)."""
    train_file: list[str] | str = "runs/logs/train.jsonl"
    """One JSONL file of conversations in HF messages format, or a list of them."""
    filter_success: bool = False
    """Train only on conversations whose ``success_key`` is true (rejection-sampling fine-tuning)."""
    success_key: str = "success"
    """Row field read by ``filter_success`` (``reward`` for τ-bench trajectories)."""
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    """System prompt given to conversations that have none; null leaves them without one."""
    eval_fraction: float = 0.1
    """Share of conversations held out for validation loss (0 disables validation and early stopping)."""
    early_stopping_patience: int = 3
    """Evaluations without a better eval loss before training stops (0 disables early stopping)."""
    max_steps: int = -1
    """Optimizer steps; -1 trains for ``num_train_epochs`` instead."""
    num_train_epochs: float = 3.0
    """Passes over the training conversations when ``max_steps`` is -1."""
    per_device_train_batch_size: int = 8
    """Conversations per optimizer step."""
    gradient_accumulation_steps: int = 1
    """Batches accumulated per optimizer step."""
    train_sampling_strategy: str = "random"
    """Transformers' training sampler: ``random``, ``group_by_length`` (random groups of 50 batches, each cut from
    its conversations sorted by length: little padding), ``sequential`` or ``batch_rebalance``. On the default
    logs (3 seeds) ``group_by_length`` trained 1.4x faster (134-168 s against 186-218 s; a third of ``random``'s
    batch tokens are padding) to a lower validation loss on every seed, but its held-out success was 0.540
    against 0.568: ``random`` stays the default, the one every benchmark here was measured with."""
    learning_rate: float = 2e-3
    """AdamW learning rate; LoRA on a tiny model wants ~1e-3..5e-3 (TRL's 2e-5 default barely moves it)."""
    lr_scheduler_type: str = "linear"
    """Transformers learning-rate schedule (``linear``, ``cosine``, ``constant``, ...)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    neftune_noise_alpha: float | None = None
    """NEFTune (TRL's ``neftune_noise_alpha``): uniform noise on the input embeddings while training, scaled by
    alpha / sqrt(tokens x width); the NEFTune paper uses 5-15. None: off (every result here was measured off)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_r``)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch."""
    lora_target_modules: list[str] | str = "all-linear"
    """Modules that get LoRA adapters: a list of names, or ``all-linear`` (every linear layer but the output head)."""
    max_length: int = 512
    """Tokens per conversation, at most the model's context; longer ones are cut at the end (ones with no assistant
    token left are dropped)."""
    seed: int = 0
    """Seed for the validation split, LoRA initialisation and data order."""
    output_dir: str = "runs/sft"
    """Run directory to create (``adapter/``, ``config.yaml``, ``run.json``)."""
    overwrite: bool = False
    """Replace an existing ``output_dir`` (only once the new run has finished)."""
    logging_steps: int = 10
    """Steps between training-loss records."""
    eval_steps: int = 50
    """Steps between validation-loss evaluations (and best-checkpoint candidates)."""
    method: str = ""
    """Name in evaluations and reports (runs sharing it pool as training seeds); empty: ``sft``, or
    ``sft-filtered`` with ``filter_success``."""
    torch_threads: int = 0
    """CPU threads for torch during training; 0 keeps the process's setting (torch's default: every core). With
    the default base model on 2 free cores, 2 threads train 1.6x faster than 1; on cores busy with other work,
    one thread can be faster (threads wait on each other)."""

    def __post_init__(self) -> None:
        self.method = self.method or ("sft-filtered" if self.filter_success else "sft")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise DialogRLError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise DialogRLError(f"max_steps must be -1 or positive, got {self.max_steps}")
        if self.torch_threads < 0:
            raise DialogRLError(f"torch_threads must be >= 0, got {self.torch_threads}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
                     "logging_steps", "eval_steps"):
            if getattr(self, name) < 1:
                raise DialogRLError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.early_stopping_patience < 0:
            raise DialogRLError(f"early_stopping_patience must be >= 0, got {self.early_stopping_patience}")
        check_number(self, "learning_rate", above=0)
        check_number(self, "weight_decay", at_least=0)
        check_seeds(self, "seed")
        if not self.train_files or not all(str(f).strip() for f in self.train_files):
            raise DialogRLError(f"train_file={json.dumps(self.train_file)}: name one or more JSONL files")
        if self.neftune_noise_alpha is not None:
            check_number(self, "neftune_noise_alpha", above=0)
        if self.max_steps == -1:  # else max_steps decides and the epochs are not read
            check_number(self, "num_train_epochs", above=0)
        check_lora_fields(self)
        _check_scheduler(self.lr_scheduler_type, self.eval_fraction)
        _check_sampling_strategy(self.train_sampling_strategy)

    @property
    def train_files(self) -> list[str]:
        """``train_file`` as a list."""
        return [self.train_file] if isinstance(self.train_file, str) else list(self.train_file)


SCHEDULERS_NEEDING_KWARGS = ("cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
"""Transformers schedules that need ``lr_scheduler_kwargs``, which this config does not set."""
SCHEDULERS_ON_EVAL_LOSS = ("reduce_lr_on_plateau", "greedy")
"""Transformers schedules that step on the validation loss, so need ``eval_fraction`` > 0."""


def _check_scheduler(name: str, eval_fraction: float) -> None:
    from transformers.trainer_utils import SchedulerType

    known = [s.value for s in SchedulerType]
    if name not in known or name in SCHEDULERS_NEEDING_KWARGS:
        why = ("needs lr_scheduler_kwargs, which dialogrl sft does not set" if name in known
               else "not a transformers SchedulerType")
        usable = ", ".join(n for n in known if n not in SCHEDULERS_NEEDING_KWARGS)
        raise DialogRLError(f"lr_scheduler_type={name}: {why}; use one of {usable}")
    if name in SCHEDULERS_ON_EVAL_LOSS and eval_fraction == 0:
        raise DialogRLError(f"lr_scheduler_type={name}: steps on the validation loss, so needs eval_fraction > 0")


def _check_sampling_strategy(name: str) -> None:
    from transformers import TrainingArguments

    known = TrainingArguments.__dataclass_fields__["train_sampling_strategy"].metadata.get("choices", [])
    if name not in known:
        raise DialogRLError(f"train_sampling_strategy={name}: not a transformers sampling strategy; "
                            f"use one of {', '.join(known)}")


def main_sft(config_path: str | None, overrides: list[str]) -> Path:
    """CLI entry: load the config (YAML file, then ``key=value`` overrides), train, return the run directory."""
    return train_sft(load_config(SFTConfig, config_path, overrides))


def train_sft(config: SFTConfig) -> Path:
    """Train a LoRA adapter on the conversations in ``config.train_file``; return the run directory."""
    target = Path(config.output_dir)
    if config.model:
        _check_model_dir(Path(config.model))
    check_output_dir(target, config.overwrite, config.train_files)
    rows = _load_rows(config)
    if not config.model:  # resolved only once the data has loaded: building the base model takes minutes
        from dialogrl.policies.bootstrap import default_base_model

        config = replace(config, model=str(default_base_model().resolve()))
    train_rows, eval_rows = _split(rows, config.eval_fraction, config.seed)

    tmp = temp_dir_beside(target)
    try:
        metrics = _train(config, train_rows, eval_rows, tmp)
        metrics["loaded_conversations"] = len(rows)
        dump_config(config, tmp / "config.yaml")
        run = {
            "method": config.method,
            "seed": config.seed,
            "base_model": str(Path(config.model).resolve()),
            "train_files": [str(Path(p).resolve()) for p in config.train_files],
            "versions": package_versions(),
            "config": config_to_dict(config),
            "metrics": metrics,
        }
        (tmp / "run.json").write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, target, config.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise DialogRLError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise DialogRLError(f"{path} is not a Hugging Face model directory (no config.json)")


def _load_rows(config: SFTConfig) -> list[dict[str, Any]]:
    if not config.train_files:
        raise DialogRLError("train_file is empty: give at least one JSONL file")
    rows: list[dict[str, Any]] = []
    for path in config.train_files:
        loaded = load_conversations(path, system_prompt=config.system_prompt)
        if config.filter_success:
            loaded = filter_success(loaded, key=config.success_key)
        rows.extend(loaded)
    if not rows:
        raise DialogRLError(f"no conversations with {config.success_key}=true in {', '.join(config.train_files)}")
    return rows


def _split(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded split by conversation; at least one conversation on each side when validating."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = 0 if fraction == 0 else min(max(1, round(fraction * len(rows))), len(rows) - 1)
    if fraction > 0 and n_eval == 0:
        raise DialogRLError(f"eval_fraction={fraction} needs at least 2 conversations, got {len(rows)}")
    eval_idx = set(order[:n_eval])
    train = [rows[i] for i in order if i not in eval_idx]
    held = [rows[i] for i in order[:n_eval]]
    return train, held


def _train(config: SFTConfig, train_rows: list[dict], eval_rows: list[dict], tmp: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, EarlyStoppingCallback
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    model_path = str(Path(config.model).resolve())  # absolute, so adapter_config.json points at the base
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise DialogRLError(f"cannot load a tokenizer from {config.model}: {_first_line(exc)}") from None
    template = _training_template(tokenizer, config.model)
    try:
        context = model_context(AutoConfig.from_pretrained(model_path))
    except (OSError, ValueError) as exc:
        raise DialogRLError(f"cannot load a causal LM from {config.model}: {_first_line(exc)}") from None
    # Never past the model's context (as DPO and the reward model): a model with learned positions (GPT-2) has
    # no embedding beyond it, and TRL does not check.
    max_length = min(config.max_length, context)
    # Conversations longer than that are expected: TRL cuts them at max_length and _fit_to_length drops those
    # left without an assistant token, counting both in run.json. Marked as given, the tokenizer's one-time
    # "will result in indexing errors" warning (a false alarm here) stays quiet.
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    train_msgs, dropped_train, cut_train = _fit_to_length(tokenizer, template, train_rows, max_length)
    eval_msgs, dropped_eval, cut_eval = _fit_to_length(tokenizer, template, eval_rows, max_length)
    if not train_msgs:
        raise DialogRLError(f"no training conversation has an assistant token within max_length={max_length}"
                            + (f" (the model's context; max_length={config.max_length} was asked for)"
                               if max_length < config.max_length else ""))
    validate = bool(eval_msgs)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise DialogRLError(f"cannot load a causal LM from {config.model}: {_first_line(exc)}") from None

    eval_kwargs: dict[str, Any] = {"save_strategy": "no"}
    callbacks = []
    if validate:  # evaluate and checkpoint on the same steps so the best eval loss can be restored at the end
        eval_kwargs = dict(
            eval_strategy="steps", eval_steps=config.eval_steps, save_strategy="steps",
            save_steps=config.eval_steps, save_total_limit=1, save_only_model=True, load_best_model_at_end=True,
            metric_for_best_model="eval_loss", greater_is_better=False,
            per_device_eval_batch_size=config.per_device_train_batch_size,
        )
        if config.early_stopping_patience > 0:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    args = TRLSFTConfig(
        output_dir=str(tmp / "trainer"),
        **cpu_trainer_args(TRLSFTConfig), report_to=[],
        assistant_only_loss=True, max_length=max_length, packing=False,
        max_steps=config.max_steps, num_train_epochs=config.num_train_epochs,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        train_sampling_strategy=config.train_sampling_strategy,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler_type,
        weight_decay=config.weight_decay, neftune_noise_alpha=config.neftune_noise_alpha,
        seed=config.seed, data_seed=config.seed,
        logging_steps=config.logging_steps, logging_first_step=True, disable_tqdm=True,
        dataloader_num_workers=0, **eval_kwargs,
    )
    peft_config = lora_config(model, config.lora_target_modules, r=config.lora_r, alpha=config.lora_alpha,
                              dropout=config.lora_dropout)
    trainer = SFTTrainer(
        model=model, args=args, processing_class=tokenizer, peft_config=peft_config,
        train_dataset=Dataset.from_list([{"messages": m} for m in train_msgs]),
        eval_dataset=Dataset.from_list([{"messages": m} for m in eval_msgs]) if validate else None,
        callbacks=callbacks,
    )
    threads = torch.get_num_threads()
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    start = time.perf_counter()
    try:
        result = trainer.train()
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - start
    history = list(trainer.state.log_history)
    # The validation loss of the weights being saved: shows that the best checkpoint, not the last, was kept.
    saved_eval_loss = trainer.evaluate()["eval_loss"] if validate else None
    save_adapter(trainer.model, tmp / "adapter")
    tokenizer.save_pretrained(str(tmp / "adapter"))
    shutil.rmtree(tmp / "trainer", ignore_errors=True)  # checkpoints: the best one is already loaded and saved

    planned = trainer.state.max_steps
    return {
        "train_loss": [[h["step"], h["loss"]] for h in history if "loss" in h],
        "eval_loss": [[h["step"], h["eval_loss"]] for h in history if "eval_loss" in h],
        "best_eval_loss": trainer.state.best_metric if validate else None,
        "best_step": _step_of(trainer.state.best_model_checkpoint) if validate else None,
        "saved_eval_loss": saved_eval_loss,
        "mean_train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        "planned_steps": planned,
        "stopped_early": trainer.state.global_step < planned,
        "epochs": trainer.state.epoch,
        "wall_time_s": round(wall, 3),
        "train_conversations": len(train_msgs),
        "eval_conversations": len(eval_msgs),
        "dropped_no_assistant_within_max_length": dropped_train + dropped_eval,
        "cut_at_max_length": cut_train + cut_eval,
        "max_length": max_length,
    }


def _training_template(tokenizer: Any, model: str) -> str:
    """The chat template with ``{% generation %}`` markers, TRL's patched one for known models if needed."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if not tokenizer.chat_template:
        raise DialogRLError(f"the tokenizer in {model} has no chat template")
    if has_generation_markers(tokenizer.chat_template):
        return tokenizer.chat_template
    try:
        patched = get_training_chat_template(tokenizer)
    except Exception:  # TRL raises for templates it does not know
        patched = None
    if not patched:
        raise DialogRLError(
            f"the chat template of {model} has no {{% generation %}} markers, needed to train on assistant turns only"
        )
    return patched


def _fit_to_length(tokenizer: Any, template: str, rows: list[dict],
                   max_length: int) -> tuple[list[list[dict]], int, int]:
    """Drop conversations with no assistant token in their first ``max_length`` tokens; count the kept ones
    longer than that (TRL trains on their first ``max_length`` tokens).

    TRL keeps the start of a long conversation; one cut before its first assistant turn would have no loss at all.
    """
    kept: list[list[dict]] = []
    cut = 0
    for row in rows:
        encoded = tokenizer.apply_chat_template(
            row["messages"], chat_template=template, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )
        if 1 in encoded["assistant_masks"][:max_length]:
            kept.append(row["messages"])
            cut += len(encoded["input_ids"]) > max_length
    return kept, len(rows) - len(kept), cut


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _step_of(checkpoint: str | None) -> int | None:
    if not checkpoint:
        return None
    try:
        return int(Path(checkpoint).name.rsplit("-", 1)[-1])
    except ValueError:
        return None
