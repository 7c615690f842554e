"""PPO's checkpoints and the weights a run keeps: the last iterate, the mean of the last iterates, or the
iterate with the best greedy success on train-split validation customers.

PPO's last iterate is one draw from a noisy process (training success swings by up to 0.3 between iterations).
Two ways to keep something steadier: average the trainable weights of the last iterates (tail averaging), or,
like SFT's early stopping on eval loss, keep the iterate that plays best on customers it never trained on.
Those customers come from the train split (the held-out test split is never looked at), from a draw of their
own (``validation_seed``), and are played greedily, as evaluations play.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dialogrl.agents.lora import save_adapter
from dialogrl.agents.rollouts import collect
from dialogrl.evaluation import scenario_seeds
from dialogrl.types import DialogRLError

if TYPE_CHECKING:
    from collections.abc import Callable

    import gymnasium as gym

    from dialogrl.agents.ppo_config import PPOConfig
    from dialogrl.agents.ppo_model import PolicyWithValue

SNAPSHOTS = ("best", "weight_sum")
"""Trainable weights a checkpoint may hold besides the current ones: the best validated iterate, and the sum of
the iterates being averaged (``<name>.safetensors``)."""


class KeptWeights:
    """Which weights a run saves as its adapter (``PPOConfig.keep``), and the snapshots that takes (restored on
    resume). ``state`` (the checkpointed loop state) records ``averaged`` (the iterations summed),
    ``validations`` and ``best``."""

    def __init__(self, cfg: PPOConfig, state: dict[str, Any], ckpt: Path | None) -> None:
        from safetensors.torch import load_file

        self.cfg, self.state = cfg, state
        self.snapshots: dict[str, dict[str, torch.Tensor] | None] = {
            name: load_file(ckpt / f"{name}.safetensors") if ckpt and (ckpt / f"{name}.safetensors").exists() else None
            for name in SNAPSHOTS}
        self.tail = cfg.iterations - cfg.average_last if cfg.keep == "average" else cfg.iterations
        """The first iteration (0-based) whose result is averaged."""
        from dialogrl.agents.ppo_model import ADDED_LATER

        was = state["config"].get("keep", ADDED_LATER["keep"]) if "config" in state else cfg.keep  # "config": a resume
        if (was == "best") != (cfg.keep == "best"):  # a validation history cannot be made up or dropped midway
            raise DialogRLError(f"keep={cfg.keep}: this checkpoint was trained with keep={was}; resume with it, or "
                                "choose another output_dir")
        # A resume may change keep, iterations and average_last only where the sum so far stays the one they define.
        summed, needed = state.get("averaged", []), [i for i in range(state["iteration"]) if i >= self.tail]
        if summed != needed:
            raise DialogRLError(f"average_last={cfg.average_last} with iterations={cfg.iterations} averages iterations "
                                f"{needed} so far, but this checkpoint summed {summed}: resume with the settings it "
                                "was trained with, or choose another output_dir")

    def start(self, inner: PolicyWithValue, tokenizer: Any, env_fn: Callable[[], gym.Env], accelerator: Any) -> None:
        if self.cfg.keep == "best" and self.snapshots["best"] is None:  # not yet validated: a fresh run
            success = self._validate(0, inner, tokenizer, env_fn, accelerator)
            accelerator.print(f"validation success of the start: {success:.3f}")

    def after_iteration(self, it: int, inner: PolicyWithValue, tokenizer: Any, env_fn: Callable[[], gym.Env],
                        accelerator: Any) -> dict[str, float]:
        """Sum or validate the weights iteration ``it`` (0-based) ended with; what to add to its log row."""
        row = {}
        if it >= self.tail:
            self.snapshots["weight_sum"] = add_weights(self.snapshots["weight_sum"], inner)
            self.state.setdefault("averaged", []).append(it)
        done = it + 1
        if self.cfg.keep == "best" and (done % self.cfg.validate_every == 0 or done == self.cfg.iterations):
            row["validation_success"] = self._validate(done, inner, tokenizer, env_fn, accelerator)
        return row

    def apply(self, inner: PolicyWithValue) -> None:
        """Load the kept weights into ``inner`` (nothing to do for the last iterate)."""
        if self.cfg.keep == "best":
            load_weights(inner, self.snapshots["best"])
        elif self.cfg.keep == "average":
            load_weights(inner, mean_weights(self.snapshots["weight_sum"], len(self.state["averaged"]), inner))

    def _validate(self, done: int, inner: PolicyWithValue, tokenizer: Any, env_fn: Callable[[], gym.Env],
                  accelerator: Any) -> float:
        success = validation_success(inner, tokenizer, self.cfg, env_fn, accelerator)
        self.state.setdefault("validations", []).append({"iterations": done, "success": success})
        if self.snapshots["best"] is None or success > self.state["best"]["success"]:
            self.snapshots["best"] = trainable_weights(inner)
            self.state["best"] = {"iterations": done, "success": success}
        return success


def validation_success(inner: PolicyWithValue, tokenizer: Any, cfg: PPOConfig, env_fn: Callable[[], gym.Env],
                       accelerator: Any) -> float:
    """Greedy success on the validation customers (each process plays its share; the rates are pooled)."""
    from dialogrl.policies.lm import GenerationSettings, LMPolicy

    rank, n_proc = accelerator.process_index, accelerator.num_processes
    seeds = scenario_seeds(cfg.validation_seed, cfg.validation_episodes)[rank::n_proc]
    greedy = LMPolicy(inner.policy, tokenizer, GenerationSettings(max_new_tokens=cfg.max_new_tokens), name="ppo")
    was_training = inner.training
    inner.eval()
    episodes = collect(greedy, env_fn, seeds, cfg.env_batch).episodes if seeds else []
    inner.train(was_training)
    local = torch.tensor([sum(e["success"] for e in episodes), len(episodes)], dtype=torch.float64)
    total = accelerator.reduce(local, reduction="sum")
    return float(total[0]) / float(total[1])


def trainable_weights(inner: PolicyWithValue) -> dict[str, torch.Tensor]:
    """A copy of what PPO trains (LoRA matrices and the value head): all that differs between iterates."""
    names = {name for name, p in inner.named_parameters() if p.requires_grad}
    return {name: t.detach().clone() for name, t in inner.state_dict().items() if name in names}


def load_weights(inner: PolicyWithValue, weights: dict[str, torch.Tensor]) -> None:
    missing = {name for name, p in inner.named_parameters() if p.requires_grad} - set(weights)
    unexpected = inner.load_state_dict(weights, strict=False).unexpected_keys
    if missing or unexpected:  # a snapshot of another model: never continue with half of it
        raise RuntimeError(f"PPO snapshot does not match the model (missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]})")


def save_checkpoint(inner: PolicyWithValue, optimizer: Any, state: dict[str, Any], ckpt: Path, accelerator: Any,
                    snapshots: dict[str, dict[str, torch.Tensor] | None]) -> None:
    """Adapter, value head, optimizer, loop state and the snapshots, written to a temp dir then swapped in
    (kill-safe)."""
    from safetensors.torch import save_file

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_adapter(inner.policy, tmp / "adapter")
        torch.save(inner.value_head.state_dict(), tmp / "value_head.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        for name, weights in snapshots.items():
            if weights is not None:
                save_file({k: v.contiguous() for k, v in weights.items()}, tmp / f"{name}.safetensors")
        (tmp / "state.json").write_text(json.dumps(state))
        old = ckpt.with_name(ckpt.name + ".old")
        if ckpt.exists():
            ckpt.rename(old)
        tmp.rename(ckpt)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def add_weights(total: dict[str, torch.Tensor] | None, inner: PolicyWithValue) -> dict[str, torch.Tensor]:
    """``total`` plus the current trainable weights (float64, so the mean does not depend on summation order).

    Hand-written: torch's ``swa_utils.AveragedModel`` keeps a copy of the whole model, frozen base included, and
    PEFT's ``add_weighted_adapter`` combines saved adapters; here only the few trainable tensors change, and their
    sum must go into the checkpoint."""
    current = {k: v.double() for k, v in trainable_weights(inner).items()}
    return current if total is None else {k: total[k] + current[k] for k in total}


def mean_weights(total: dict[str, torch.Tensor], count: int, like: PolicyWithValue) -> dict[str, torch.Tensor]:
    dtypes = {name: p.dtype for name, p in like.named_parameters()}
    return {k: (v / count).to(dtypes[k]) for k, v in total.items()}
