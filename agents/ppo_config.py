"""``PPOConfig``: the settings of ``dialogrl ppo`` (``agents.ppo``), in their own module as TRL keeps its configs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dialogrl.agents.lora import check_lora_fields
from dialogrl.agents.rollouts import TrainingEnvConfig
from dialogrl.config import check_at_least, check_number, check_seeds
from dialogrl.types import DialogRLError

KEEP = ("last", "average", "best")
"""What ``PPOConfig.keep`` may name (defined here so that reading a config does not import torch)."""

KL_ESTIMATORS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "k1": lambda log_ratio: log_ratio,
    "k3": lambda log_ratio: np.expm1(-log_ratio) + log_ratio,  # r - 1 - log r, r = exp(-log_ratio)
}
"""Per-token estimates of KL(policy || reference) from the sampled tokens' log-ratio log p - log p_ref."""


@dataclass
class PPOConfig(TrainingEnvConfig):
    """Multi-turn PPO settings (``configs/ppo.yaml`` holds the defaults used by ``dialogrl ppo``)."""

    model: str = ""
    """Local base model directory (empty: the cached bootstrap base model)."""
    init_adapter: str | None = None
    """SFT run directory or adapter directory to start from; merged into the weights, so it is the KL reference."""
    output_dir: str = "runs/ppo"
    """Run directory (checkpoints, adapter, merged base, metrics)."""
    seed: int = 0
    """Seeds scenario draws, sampling and minibatch order."""
    iterations: int = 40
    """Collect-then-update cycles (40 since 2026-12-02 with ``group_size`` 4; with GAE, 20: one seed of three
    drifted from SFT over 40)."""
    episodes_per_iteration: int = 64
    """Conversations played per iteration (over all processes)."""
    minibatch_episodes: int = 16
    """Episodes per gradient step (over all processes); must divide episodes_per_iteration."""
    group_size: int = 4
    """Episodes per training customer: each iteration plays ``episodes_per_iteration / group_size`` customers
    that many times each. Above 1, a token's advantage is its reward-to-go minus the mean return of the same
    customer's other episodes (RLOO's leave-one-out baseline; needs gamma=1) and the value loss is left out; 1:
    GAE on the value head's estimates. Under torchrun the customers must split evenly over the processes.
    4 with 40 iterations beat GAE with 20 by +0.055 [+0.023, +0.088] held-out success (3 seeds; docs/results.md)."""
    ppo_epochs: int = 2
    """Passes over each iteration's data."""
    temperature: float = 1.0
    """Sampling temperature during collection (log-probs are computed at this temperature)."""
    max_new_tokens: int = 64
    """Longest reply in tokens."""
    learning_rate: float = 1e-3
    """AdamW learning rate for LoRA and the value head."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator."""
    lora_target_modules: list[str] | str = "all-linear"
    """Modules that get LoRA adapters: a list of names, or ``all-linear`` (every linear layer but the output head)."""
    clip_range: float = 0.2
    """PPO ratio clip."""
    value_clip: float | None = 0.2
    """Value prediction clip around the old value, in return units (null: no clipping, as SB3's
    ``clip_range_vf=None``). An absolute bound: where returns run far above 1 (a learned reward), it lets the
    value head move only this far per iteration; yet with the value head on the policy's LoRA layers (without
    ``value_detach``), PPO on the learned reward collapsed without the clip (docs/results.md)."""
    value_detach: bool = False
    """The value head reads the policy's last hidden state detached, so the value loss trains the value head
    only (false: also the policy's LoRA layers, as a value head on a shared trunk does)."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    kl_coef: float = 0.05
    """Per-token KL penalty to the reference policy (initial value when adaptive)."""
    kl_estimator: str = "k1"
    """Per-token KL estimate in the reward: ``k1`` = logp - ref_logp (negative on tokens the reference likes
    more than the policy does); ``k3`` = r - 1 - log r with r = p_ref / p (never negative; Schulman 2020). Both
    estimate the KL without bias, but only k1 as a reward gives the KL's gradient in expectation: k3's drifts
    from it as the policy leaves the reference."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards target_kl after every iteration: the proportional controller of Ziegler et al.
    (2019), error clipped to +-20%, with gain 1 (theirs, n_steps/horizon, would move it by a fraction of a
    percent per iteration, so not at all within a run of tens of iterations)."""
    target_kl: float = 0.05
    """Target mean per-token KL for the adaptive controller."""
    max_update_kl: float | None = None
    """Stop an iteration's updates once a minibatch's approximate KL from the policy that collected the data
    (mean over its reply tokens of (r - 1) - log r, r the probability ratio) exceeds this; that minibatch's step
    is skipped (SB3's and CleanRL's ``target_kl``). None: every minibatch of every epoch steps."""
    gamma: float = 1.0
    """Discount per token."""
    lam: float = 0.95
    """GAE lambda."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    checkpoint_every: int = 5
    """Save a resumable checkpoint every N iterations (and at the end)."""
    keep: str = "average"
    """The weights the run saves as its adapter (``checkpoint/`` always holds the last iterate, to train on from):
    ``average``, the mean of the last ``average_last`` iterates' trainable weights (LoRA and value head; tail
    averaging, which smooths PPO's iterate-to-iterate swings; each LoRA matrix is averaged on its own, as weight
    averaging averages parameters, so the kept update B·A is the product of the means, near but not equal to
    the mean of the iterates' updates); ``last``; ``best``, of the start and the iterates
    validated every ``validate_every`` iterations, the one with the highest greedy success on
    ``validation_episodes`` train-split customers (ties: the earlier; the test split is never looked at)."""
    average_last: int = 10
    """Iterates averaged by ``keep: average`` (all of them when there are fewer)."""
    validation_episodes: int = 128
    """Train-split customers played by ``keep: best``."""
    validate_every: int = 2
    """Iterations between validations for ``keep: best`` (the last iteration is always validated)."""
    validation_seed: int = 1_000_000
    """Seed of the validation customers' draw (training draws use seed * 7919 + iteration: keep it apart)."""
    eval_episodes: int = 200
    """Held-out test-split episodes evaluated at the end (0: skip)."""
    eval_seed: int = 0
    """Seed of the held-out scenario draw (same as other methods' evaluations for paired comparison)."""
    method: str = "ppo"
    """Method name of this run in its run.json and evaluations, and so in ``dialogrl compare`` (runs sharing a
    name pool as training seeds of one method: give a variant its own name)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, 1, "iterations", "episodes_per_iteration", "minibatch_episodes", "group_size",
                       "ppo_epochs", "max_new_tokens", "checkpoint_every", "validate_every", "average_last",
                       "validation_episodes")
        check_at_least(self, 0, "eval_episodes")
        check_seeds(self, "seed", "eval_seed", "validation_seed")
        check_number(self, "temperature", "learning_rate", "max_grad_norm", "clip_range", above=0)
        check_number(self, "vf_coef", "kl_coef", "target_kl", at_least=0)
        if self.value_clip is not None:  # 0 would freeze the value head at its start
            check_number(self, "value_clip", above=0)
        if self.max_update_kl is not None:
            check_number(self, "max_update_kl", above=0)
        check_number(self, "gamma", "lam", at_least=0, at_most=1)
        check_lora_fields(self)
        if self.kl_estimator not in KL_ESTIMATORS:
            raise DialogRLError(f"kl_estimator={self.kl_estimator}: use one of {', '.join(KL_ESTIMATORS)}")
        if self.adaptive_kl:  # the controller divides by it
            check_number(self, "target_kl", above=0)
        if self.keep not in KEEP:
            raise DialogRLError(f"keep={self.keep}: use one of {', '.join(KEEP)}")
        if self.episodes_per_iteration % self.group_size:
            raise DialogRLError(f"group_size={self.group_size}: must divide "
                                f"episodes_per_iteration={self.episodes_per_iteration}")
        if self.group_size > 1 and self.gamma != 1:  # a late token's discounted return-to-go vs whole returns
            raise DialogRLError(f"gamma={self.gamma}: group_size > 1 compares each token's return-to-go with the "
                                "other plays' whole returns, which needs gamma=1")
        if self.episodes_per_iteration % self.minibatch_episodes:
            raise DialogRLError(f"minibatch_episodes={self.minibatch_episodes}: must divide "
                                f"episodes_per_iteration={self.episodes_per_iteration}")
