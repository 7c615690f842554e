"""The one place LoRA adapters are configured, for every agent (SFT, PPO, DPO, reward models)."""

from __future__ import annotations

from typing import Any


def lora_config(model: Any, targets: list[str] | str, *, r: int, alpha: float, dropout: float = 0.0,
                task_type: str = "CAUSAL_LM") -> Any:
    """A PEFT ``LoraConfig`` for ``model``: ``targets`` is a list of module names or ``"all-linear"``."""
    from peft import LoraConfig

    return LoraConfig(task_type=task_type, r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=targets if isinstance(targets, str) else list(targets),
                      # GPT-2 checkpoints store projections as Conv1D (transposed weights); PEFT must be told
                      fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2")
