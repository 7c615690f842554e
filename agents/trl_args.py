"""Trainer arguments every TRL config here shares (SFT, DPO, reward model)."""

from __future__ import annotations

from typing import Any


def cpu_trainer_args(args_cls: type) -> dict[str, Any]:
    """CPU, float32, no activation checkpointing: TRL configs default to bf16 and gradient checkpointing, which
    make these small CPU runs about twice as slow. Transformers 5 renamed gradient checkpointing to activation
    checkpointing; the new name is set when ``args_cls`` has it, so no deprecation warning fires."""
    fields = getattr(args_cls, "__dataclass_fields__", {})
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {"use_cpu": True, "bf16": False, "fp16": False, checkpointing: False}
