"""The PPO policy module: a LoRA-adapted causal LM with a value head, its token-level forward, and saving."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dialogrl.agents.lora import lora_config
from dialogrl.rewards.reward_model import ENV_PATHS
from dialogrl.types import DialogRLError

if TYPE_CHECKING:
    from dialogrl.agents.ppo import PPOConfig
    from dialogrl.agents.rollouts import TurnSample

FORWARD_CHUNK = 16
"""Samples per no-grad forward pass (bounds the memory of the logits)."""


class PolicyWithValue(nn.Module):
    """The LoRA policy and a linear value head on its last hidden state (one module, so DDP sees both)."""

    def __init__(self, policy: nn.Module, hidden_size: int, pad_id: int) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.pad_id = pad_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                with_values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=with_values)
        values = self.value_head(out.hidden_states[-1]).squeeze(-1) if with_values else None
        return out.logits, values

    def sampler(self, tokenizer: Any, cfg: PPOConfig) -> Any:
        """An LMPolicy view of the current weights, sampling as configured, for rollouts."""
        from dialogrl.policies.lm import GenerationSettings, LMPolicy

        settings = GenerationSettings(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, do_sample=True)
        return LMPolicy(self.policy, tokenizer, settings, name="ppo")


def forward_samples(module: nn.Module, samples: list[TurnSample], temperature: float, with_values: bool = True,
                    grad: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """Log-probs (at ``temperature``) and values of each sample's reply tokens; also the mean token entropy.

    Sequences are right-padded, so positions match the unpadded sequences for learned position embeddings.
    The value of reply token j is read at the position just before it (the state in which it was chosen).
    """
    pad_id = getattr(module, "pad_id", None) or getattr(getattr(module, "module", None), "pad_id", 0)
    chunk = len(samples) if grad else FORWARD_CHUNK
    logps: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    entropy_sum, tokens = 0.0, 0
    for start in range(0, len(samples), chunk):
        part = samples[start:start + chunk]
        seqs = [s.prompt_ids + s.response_ids for s in part]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(part), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        with torch.set_grad_enabled(grad):
            logits, vals = module(ids, mask, with_values)
            logp_all = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
            token_logp = logp_all.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            for row, s in enumerate(part):
                begin, end = len(s.prompt_ids) - 1, len(s.prompt_ids) + len(s.response_ids) - 1
                logps.append(token_logp[row, begin:end])
                values.append(vals[row, begin:end] if vals is not None else torch.zeros(end - begin))
                if not grad:
                    probs = logp_all[row, begin:end].exp()
                    entropy_sum += float(-(probs * logp_all[row, begin:end]).sum())
                    tokens += end - begin
    if not grad:
        logps = [x.detach() for x in logps]
        values = [x.detach() for x in values]
    return logps, values, entropy_sum / max(tokens, 1)


def resolve_start(cfg: PPOConfig) -> tuple[Path, Path | None]:
    """(base model dir, SFT adapter dir or None) from ``model`` / ``init_adapter`` (a run dir or adapter dir)."""
    adapter: Path | None = None
    base = cfg.model
    if cfg.init_adapter:
        start = Path(cfg.init_adapter)
        if (start / "run.json").is_file():
            run = json.loads((start / "run.json").read_text())
            adapter = start / run.get("adapter", "adapter")
            base = base or str(_resolve(start, run["base_model"]))
        elif (start / "adapter_config.json").is_file():
            adapter = start
        else:
            raise DialogRLError(f"init_adapter '{start}': not a run directory (run.json) nor an adapter directory")
    if not base:
        from dialogrl.policies.bootstrap import default_base_model

        base = str(default_base_model())
    if not Path(base).is_dir():
        raise DialogRLError(f"model '{base}': not a local directory (nothing is downloaded; pass a local path)")
    return Path(base), adapter


def _resolve(run_dir: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else run_dir / p


def prepare_start(cfg: PPOConfig, out: Path) -> Path:
    """The directory of the start weights: the base, or the base with the SFT adapter merged, saved once to
    ``out/base`` so the run is self-contained and a resumed run starts from the very same weights."""
    base_dir, sft_adapter = resolve_start(cfg)
    if sft_adapter is None:
        return base_dir.resolve()
    merged_dir = out / "base"
    if not (merged_dir / "config.json").is_file():
        import shutil

        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
        model = PeftModel.from_pretrained(model, sft_adapter).merge_and_unload()
        tmp = out / "base.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base_dir, local_files_only=True).save_pretrained(tmp)
        tmp.rename(merged_dir)
    return merged_dir


def build_policy(cfg: PPOConfig, start_dir: Path, checkpoint: Path | None) -> tuple[PolicyWithValue, Any]:
    """The start weights (the KL reference) with a fresh or checkpointed LoRA adapter and a value head."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(start_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(start_dir, local_files_only=True)
    for layer in model.modules():  # no dropout in RL: the PPO ratio must be exactly 1 before the first update
        if isinstance(layer, nn.Dropout):
            layer.p = 0.0
    if checkpoint is not None:
        policy = PeftModel.from_pretrained(model, checkpoint / "adapter", is_trainable=True)
    else:
        lora = lora_config(model, cfg.lora_target_modules, r=cfg.lora_r, alpha=cfg.lora_alpha)
        policy = get_peft_model(model, lora)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    module = PolicyWithValue(policy, model.config.hidden_size, pad_id)
    if checkpoint is not None:
        module.value_head.load_state_dict(torch.load(checkpoint / "value_head.pt", weights_only=True))
    return module, tokenizer


def save_run(inner: PolicyWithValue, start_dir: Path, cfg: PPOConfig, state: dict[str, Any], out: Path) -> None:
    """``adapter/``, ``value_head.pt`` and ``run.json`` (whose ``base_model`` is the start weights).

    ``LMPolicy.from_run_dir`` and plain ``PeftModel.from_pretrained(AutoModelForCausalLM(base), adapter)`` load it.
    """
    import dataclasses

    from dialogrl.agents.versions import package_versions

    inner.policy.save_pretrained(out / "adapter")
    torch.save(inner.value_head.state_dict(), out / "value_head.pt")
    base_ref = "base" if start_dir.resolve() == (out / "base").resolve() else str(start_dir)
    run = {"method": cfg.method, "base_model": base_ref, "adapter": "adapter", "seed": cfg.seed,
           "config": dataclasses.asdict(cfg), "history": state["history"], "versions": package_versions()}
    if os.environ.get(ENV_PATHS) and any("reward_model" in str(r) for r in cfg.rewards or []):
        run["reward_model_dirs"] = os.environ[ENV_PATHS]  # what the learned-reward spec resolved to
    (out / "run.json").write_text(json.dumps(run, indent=1))
