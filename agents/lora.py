"""The one place LoRA adapters are configured, for every agent (SFT, PPO, DPO, reward models)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dialogrl.config import check_at_least, check_number
from dialogrl.types import DialogRLError

KEY = "lora_target_modules"
"""The config key every agent names its target modules by (used in error messages)."""


def check_lora_fields(cfg: Any) -> None:
    """``lora_r`` >= 1, ``lora_alpha`` > 0 and, where the config has one, ``lora_dropout`` in [0, 1)."""
    check_at_least(cfg, 1, "lora_r")
    check_number(cfg, "lora_alpha", above=0)
    if hasattr(cfg, "lora_dropout"):
        check_number(cfg, "lora_dropout", at_least=0, below=1)


def lora_config(model: Any, targets: list[str] | str, *, r: int, alpha: float, dropout: float = 0.0,
                task_type: str = "CAUSAL_LM") -> Any:
    """A PEFT ``LoraConfig`` for ``model``: ``targets`` is a list of module names or ``"all-linear"``.

    Targets that adapt no layer of ``model`` are one :class:`DialogRLError` line (``check_target_modules``)."""
    from peft import LoraConfig

    config = LoraConfig(task_type=task_type, r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=targets if isinstance(targets, str) else list(targets),
                        # GPT-2 checkpoints store projections as Conv1D (transposed weights); PEFT must be told
                        fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2")
    check_target_modules(model, config)
    return config


def save_adapter(model: Any, path: str | Path) -> None:
    """``model.save_pretrained(path)`` for a PEFT model, with ``target_modules`` in ``adapter_config.json`` sorted:
    PEFT resolves ``all-linear`` to a set and writes it in the process's hash order, so two runs of the same seed
    wrote different files for the same adapter."""
    model.save_pretrained(str(path))
    config_file = Path(path) / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_target_modules(model: Any, config: Any) -> None:
    """PEFT's own matching of ``config.target_modules`` (a ``LoraConfig``) against ``model``'s module names: no
    match, or a match on a module LoRA cannot adapt, is one line naming the key, the value and layers that exist
    (instead of PEFT's traceback once training is set up)."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from torch import nn

    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return
    shown = targets if isinstance(targets, str) else f"[{', '.join(sorted(targets))}]"  # PEFT keeps a set
    adaptable = _adaptable_types()
    matched = [(name, module) for name, module in model.named_modules()
               if name and check_target_module_exists(config, name)]
    found = sorted(((name, module) for name, module in model.named_modules() if isinstance(module, adaptable)),
                   key=lambda item: isinstance(item[1], nn.Embedding))  # projections first, as usually targeted
    layers = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, _ in found))
    some = ", ".join(layers[:8]) + (", ..." if len(layers) > 8 else "")
    if not matched:
        raise DialogRLError(f"{KEY}={shown}: matches no module of the model; its layers include {some} "
                            "(or use all-linear)")
    for name, module in matched:  # a block of layers (attention, MLP) rather than a layer
        if next(module.children(), None) is not None and not isinstance(module, adaptable):
            raise DialogRLError(f"{KEY}={shown}: '{name}' is a {type(module).__name__}, a block rather than a "
                                f"layer LoRA can adapt; name layers such as {some} (or use all-linear)")


def _adaptable_types() -> tuple[type, ...]:
    """Module types PEFT's LoRA wraps (the ones a target module must be)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)
