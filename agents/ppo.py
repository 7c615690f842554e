"""Multi-turn PPO for an LM policy with LoRA, on transformers + PEFT + accelerate.

TRL removed its PPOTrainer in 1.13, so the loop is written here, top to bottom:

1. The SFT adapter (if any) is merged into the base weights; that merged model is the KL reference, reached by
   disabling a fresh LoRA adapter (no second model copy). A linear value head reads the last hidden state.
2. Each iteration plays whole conversations in batched environments (``agents.rollouts.collect``).
3. A forward pass gives old log-probs and values; the adapter-disabled pass gives reference log-probs.
4. Per token reward = -kl_coef * KL estimate (k1: logp - ref_logp), plus the env reward on the turn's last token.
   GAE runs over the episode's reply tokens, across turns, so credit reaches the turn that earned it. With
   ``group_size`` > 1 each customer is played several times and a token's advantage is its reward-to-go minus
   the mean return of the customer's other plays instead (no value estimate).
5. Clipped policy and value losses, minibatch epochs over episodes, gradient clipping.
6. The run saves the weights ``keep`` names: by default the mean of the last 10 iterates (``agents.ppo_checkpoint``).

Runs on one process or under ``torchrun --nproc_per_node 2`` (accelerate, gloo on CPU): each process plays
its share of the episodes, advantages are whitened with global statistics, gradients are averaged.
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dialogrl.agents.ppo_checkpoint import KeptWeights, save_checkpoint
from dialogrl.agents.ppo_config import KL_ESTIMATORS, PPOConfig
from dialogrl.agents.ppo_model import (
    FORWARD_CHUNK,
    PolicyWithValue,
    build_policy,
    check_output,
    check_start,
    comparable_config,
    forward_samples,
    prepare_start,
    save_run,
)
from dialogrl.agents.rollouts import RolloutBatch, TurnSample, collect
from dialogrl.evaluation import scenario_seeds
from dialogrl.types import DialogRLError


def gae(rewards: np.ndarray, values: np.ndarray, gamma: float, lam: float) -> np.ndarray:
    """Generalised advantage estimates over one episode's token sequence (terminal after the last token)."""
    advantages = np.zeros_like(rewards)
    last = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        advantages[t] = last
    return advantages


def leave_one_out(returns: dict[int, float], group_size: int) -> dict[int, float]:
    """Per episode, the mean return of the other episodes of its group (episodes ``g * group_size`` to
    ``(g + 1) * group_size - 1`` played the same customer): RLOO's baseline, which needs no value estimate.
    Written here because TRL's RLOO trainer scores single replies, not conversations."""
    out: dict[int, float] = {}
    for e in returns:
        first = e - e % group_size
        others = [returns[o] for o in range(first, first + group_size) if o != e and o in returns]
        out[e] = float(np.mean(others)) if others else 0.0
    return out


def check_process_split(cfg: PPOConfig, n_proc: int) -> None:
    """Every process must take the same number of minibatch steps (their gradients are all-reduced at each), so
    the minibatches and the customers' groups split evenly over the processes."""
    if cfg.minibatch_episodes % n_proc:
        raise DialogRLError(f"minibatch_episodes={cfg.minibatch_episodes}: must be a multiple of the process "
                            f"count {n_proc}")
    customers = cfg.episodes_per_iteration // cfg.group_size
    if customers % n_proc:
        raise DialogRLError(f"group_size={cfg.group_size}: gives {customers} customers per iteration, which do not "
                            f"split evenly over {n_proc} processes")


def iteration_seeds(cfg: PPOConfig, it: int, rank: int, n_proc: int) -> list[int]:
    """This process's training customers in iteration ``it``: whole groups of ``group_size`` plays of one
    scenario seed, so a group's baseline never needs another process's episodes."""
    customers = scenario_seeds(cfg.seed * 7919 + it, cfg.episodes_per_iteration // cfg.group_size)
    return [seed for seed in customers[rank::n_proc] for _ in range(cfg.group_size)]


@dataclass
class Prepared:
    """One iteration's training data on this process, token-aligned per sample."""

    samples: list[TurnSample]
    old_logp: list[torch.Tensor]
    old_values: list[torch.Tensor]
    advantages: list[torch.Tensor]
    returns: list[torch.Tensor]
    kl: float
    entropy: float


@torch.no_grad()
def prepare(module: PolicyWithValue, batch: RolloutBatch, cfg: PPOConfig, kl_coef: float, accelerator: Any) -> Prepared:
    """Old log-probs, values, reference log-probs, KL-shaped rewards and whitened advantages (GAE, or
    leave-one-out with ``group_size`` > 1)."""
    module.eval()
    old_logp, values, entropy = forward_samples(module, batch.samples, cfg.temperature)
    with module.policy.disable_adapter():
        ref_logp, _, _ = forward_samples(module, batch.samples, cfg.temperature, with_values=False)
    by_episode: dict[int, list[int]] = {}
    for i, s in enumerate(batch.samples):
        by_episode.setdefault(s.episode, []).append(i)
    advantages: list[np.ndarray] = [np.zeros(0)] * len(batch.samples)
    returns: list[np.ndarray] = [np.zeros(0)] * len(batch.samples)
    kl_sum, tokens = 0.0, 0
    shaped: dict[int, np.ndarray] = {}  # per episode, its reply tokens' rewards across turns
    for episode, indices in by_episode.items():
        indices.sort(key=lambda i: batch.samples[i].turn)
        kl = [KL_ESTIMATORS[cfg.kl_estimator]((old_logp[i] - ref_logp[i]).numpy()) for i in indices]
        rewards = [-kl_coef * k for k in kl]
        for r, i in zip(rewards, indices, strict=True):
            if len(r):
                r[-1] += batch.samples[i].reward
        kl_sum += float(sum(k.sum() for k in kl))
        tokens += sum(len(k) for k in kl)
        shaped[episode] = np.concatenate(rewards)
    to_go: dict[int, np.ndarray] = {}  # with a group baseline: each token's reward-to-go (gamma is 1 then)
    if cfg.group_size > 1:
        to_go = {e: np.cumsum(r[::-1])[::-1].copy() for e, r in shaped.items()}  # copy: torch wants + strides
        baseline = leave_one_out({e: float(g[0]) if len(g) else 0.0 for e, g in to_go.items()}, cfg.group_size)
    for episode, indices in by_episode.items():
        flat_v = np.concatenate([values[i].numpy() for i in indices])
        if to_go:  # the value head's target is then the reward-to-go (its loss is logged, not trained on)
            adv, ret = to_go[episode] - baseline[episode], to_go[episode]
        else:
            adv = gae(shaped[episode], flat_v, cfg.gamma, cfg.lam)
            ret = adv + flat_v
        offset = 0
        for i in indices:
            n = len(batch.samples[i].response_ids)
            advantages[i], returns[i] = adv[offset:offset + n], ret[offset:offset + n]
            offset += n
    # Whiten with statistics over all processes, so 1 and 2 processes train the same way.
    flat = np.concatenate(advantages) if advantages else np.zeros(1)
    stats = torch.tensor([flat.sum(), (flat**2).sum(), flat.size, kl_sum, tokens, entropy * tokens],
                         dtype=torch.float64)
    stats = accelerator.reduce(stats, reduction="sum")
    mean = stats[0] / stats[2]
    std = torch.sqrt(torch.clamp(stats[1] / stats[2] - mean**2, min=1e-8))
    whiten = [torch.tensor((a - float(mean)) / float(std), dtype=torch.float32) for a in advantages]
    return Prepared(batch.samples, old_logp, values, whiten, [torch.tensor(r, dtype=torch.float32) for r in returns],
                    kl=float(stats[3] / max(float(stats[4]), 1.0)), entropy=float(stats[5] / max(float(stats[4]), 1.0)))


def ppo_backward(module: nn.Module, data: Prepared, idx: list[int], cfg: PPOConfig, accelerator: Any
                 ) -> dict[str, float]:
    """Clipped policy loss + clipped value loss over the reply tokens of the samples ``idx``, back-propagated
    ``FORWARD_CHUNK`` episodes at a time (memory) with each part weighted by its share of the tokens, so the
    accumulated gradient is that of the token mean over all of ``idx``.

    Under DDP each process holds part of the minibatch and the gradients are averaged over the processes, so
    each divides by the minibatch's token count over all processes over their number: every token then weighs
    the same as in one process (dividing by a process's own count would favour the one with fewer tokens)."""
    local = torch.tensor(float(sum(len(data.samples[i].response_ids) for i in idx)), dtype=torch.float64)
    total = float(accelerator.reduce(local, reduction="sum")) / accelerator.num_processes
    # Whole episodes per part (their turns share one forward pass), longest last turn last (less padding).
    episodes: dict[int, list[int]] = {}
    for i in idx:
        episodes.setdefault(data.samples[i].episode, []).append(i)
    ranked = sorted(episodes.values(), key=lambda e: max(len(data.samples[i].prompt_ids)
                                                         + len(data.samples[i].response_ids) for i in e))
    chunks = [[i for e in ranked[start:start + FORWARD_CHUNK] for i in e]
              for start in range(0, len(ranked), FORWARD_CHUNK)]
    parts = {"pg_loss": 0.0, "vf_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0}
    for k, chunk in enumerate(chunks):
        # Gradients are all-reduced once, after the last part: DDP decides at the forward pass whether the
        # backward syncs, so both run inside no_sync (which does nothing in one process).
        with accelerator.no_sync(module) if k < len(chunks) - 1 else nullcontext():
            part = _chunk_losses(module, data, chunk, cfg, total)
            # With a group baseline the value head is unused; its loss stays in the graph at weight 0 (DDP
            # expects a gradient for every parameter).
            accelerator.backward(part[0] + (cfg.vf_coef if cfg.group_size == 1 else 0.0) * part[1])
        pg, vf, ratio, new_logp, old_logp = part
        parts["pg_loss"] += pg.item()
        parts["vf_loss"] += vf.item()
        parts["clipfrac"] += float(((ratio - 1).abs() > cfg.clip_range).float().sum()) / total
        log_ratio = (new_logp - old_logp).detach()
        parts["approx_kl"] += float((torch.expm1(log_ratio) - log_ratio).sum()) / total
    return parts


def _chunk_losses(module: nn.Module, data: Prepared, chunk: list[int], cfg: PPOConfig, total: float
                  ) -> tuple[torch.Tensor, ...]:
    """The clipped policy and value losses of the samples ``chunk``, summed over their reply tokens and divided
    by ``total``; with the ratios and log-probs behind them."""
    logp, values, _ = forward_samples(module, [data.samples[i] for i in chunk], cfg.temperature, grad=True)
    old_logp = torch.cat([data.old_logp[i] for i in chunk])
    old_v = torch.cat([data.old_values[i] for i in chunk])
    adv = torch.cat([data.advantages[i] for i in chunk])
    ret = torch.cat([data.returns[i] for i in chunk])
    new_logp, new_v = torch.cat(logp), torch.cat(values)
    ratio = torch.exp(new_logp - old_logp)
    pg = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - cfg.clip_range, 1 + cfg.clip_range)).sum() / total
    vf_each = (new_v - ret) ** 2
    if cfg.value_clip is not None:
        v_clipped = old_v + torch.clamp(new_v - old_v, -cfg.value_clip, cfg.value_clip)
        vf_each = torch.max(vf_each, (v_clipped - ret) ** 2)
    vf = 0.5 * vf_each.sum() / total
    return pg, vf, ratio, new_logp, old_logp


def update(module: nn.Module, optimizer: Any, data: Prepared, cfg: PPOConfig, rng: np.random.Generator,
           accelerator: Any) -> tuple[list[dict[str, float]], int]:
    """``ppo_epochs`` passes over the iteration's episodes in shuffled minibatches, one optimizer step each,
    stopping early past ``max_update_kl``. The minibatches' loss parts, and the steps taken."""
    episodes = sorted({s.episode for s in data.samples})
    per_step = cfg.minibatch_episodes // accelerator.num_processes
    losses: list[dict[str, float]] = []
    steps = 0
    for _ in range(cfg.ppo_epochs):
        order = rng.permutation(len(episodes))
        for start in range(0, len(order), per_step):
            chosen = {episodes[j] for j in order[start:start + per_step]}
            idx = [i for i, s in enumerate(data.samples) if s.episode in chosen]
            optimizer.zero_grad()
            parts = ppo_backward(module, data, idx, cfg, accelerator)
            # All-reduced, so every process stops at the same minibatch.
            kl = accelerator.reduce(torch.tensor(parts["approx_kl"], dtype=torch.float64), reduction="mean")
            parts["approx_kl"] = float(kl)
            losses.append(parts)
            if cfg.max_update_kl is not None and parts["approx_kl"] > cfg.max_update_kl:
                return losses, steps
            accelerator.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
            optimizer.step()
            steps += 1
    return losses, steps


def train_ppo(cfg: PPOConfig) -> Path:
    """Train, checkpointing every ``checkpoint_every`` iterations; resumes from ``output_dir/checkpoint``."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    if cfg.episodes_per_iteration % cfg.minibatch_episodes:
        raise DialogRLError("minibatch_episodes must divide episodes_per_iteration")
    accelerator = Accelerator(cpu=True)
    n_proc, rank = accelerator.num_processes, accelerator.process_index
    check_process_split(cfg, n_proc)
    out = Path(cfg.output_dir)
    ckpt = out / "checkpoint"
    check_output(cfg, out)  # before anything is written
    created = not out.exists()
    try:
        env_fn = cfg.env_factory()
        check_start(cfg)  # bad start weights or LoRA targets: one line, before output_dir is written
        torch.manual_seed(cfg.seed)
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            prepare_start(cfg, out)
        accelerator.wait_for_everyone()
        start_dir = prepare_start(cfg, out)
        module, tokenizer = build_policy(cfg, start_dir, ckpt if (ckpt / "state.json").exists() else None)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=cfg.learning_rate)
        state = {"iteration": 0, "kl_coef": cfg.kl_coef, "history": []}
        resuming = (ckpt / "state.json").exists()
        if resuming:
            state = json.loads((ckpt / "state.json").read_text())
            optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
            accelerator.print(f"resuming from {ckpt} at iteration {state['iteration']}")
        kept = KeptWeights(cfg, state, ckpt if resuming else None)  # what the run saves: last, mean or best
        state["config"] = comparable_config(cfg)  # what a later resume must match
        module, optimizer = accelerator.prepare(module, optimizer)
        inner: PolicyWithValue = accelerator.unwrap_model(module)
        writer = _tensorboard(out) if accelerator.is_main_process else None

        kept.start(inner, tokenizer, env_fn, accelerator)

        bar = tqdm(range(state["iteration"], cfg.iterations), disable=not accelerator.is_main_process,
                   initial=state["iteration"], total=cfg.iterations, desc="ppo")
        for it in bar:
            torch.manual_seed(cfg.seed * 100_003 + it * 101 + rank)
            seeds = iteration_seeds(cfg, it, rank, n_proc)
            inner.eval()
            batch = collect(inner.sampler(tokenizer, cfg), env_fn, seeds, cfg.env_batch)
            data = prepare(inner, batch, cfg, state["kl_coef"], accelerator)

            module.train()
            losses, steps = update(module, optimizer, data, cfg, np.random.default_rng([cfg.seed, it]), accelerator)

            if cfg.adaptive_kl:  # proportional controller, clipped to +-20% per iteration
                error = float(np.clip(data.kl / cfg.target_kl - 1, -0.2, 0.2))
                state["kl_coef"] *= 1 + error
            row = _iteration_stats(it, batch, data, losses, state["kl_coef"], accelerator)
            row["updates"] = steps
            row.update(kept.after_iteration(it, inner, tokenizer, env_fn, accelerator))
            state["history"].append(row)
            state["iteration"] = it + 1
            bar.set_postfix(success=f"{row['success']:.2f}", ret=f"{row['return']:.2f}", kl=f"{row['kl']:.3f}")
            accelerator.print(json.dumps(row))
            if writer is not None:
                for key, value in row.items():
                    writer.add_scalar(f"ppo/{key}", value, it)
            if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
                save_checkpoint(inner, optimizer, state, ckpt, accelerator, kept.snapshots)
        if writer is not None:
            writer.close()
        kept.apply(inner)  # the run's adapter is the kept weights; the checkpoint keeps the last iterate
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_run(inner, start_dir, cfg, state, out, n_proc)
        accelerator.wait_for_everyone()
        return out
    except BaseException:
        # A run that failed before its first checkpoint leaves nothing behind (there is nothing to resume).
        if created and accelerator.is_main_process and not (ckpt / "state.json").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _iteration_stats(it: int, batch: RolloutBatch, data: Prepared, losses: list[dict[str, float]],
                     kl_coef: float, accelerator: Any) -> dict[str, float]:
    eps = batch.episodes
    local = torch.tensor([sum(e["success"] for e in eps), sum(e["return"] for e in eps), len(eps),
                          sum(e["reply_tokens"] for e in eps), batch.generated_tokens, batch.seconds],
                         dtype=torch.float64)
    total = accelerator.reduce(local, reduction="sum")
    n = float(total[2])
    return {
        "iteration": it, "success": float(total[0]) / n, "return": float(total[1]) / n,
        "kl": data.kl, "kl_coef": kl_coef, "entropy": data.entropy, "reply_tokens": float(total[3]) / n,
        "tokens_per_sec": float(total[4]) / max(float(total[5]) / accelerator.num_processes, 1e-9),
        **{k: float(np.mean([row[k] for row in losses])) for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl")},
    }


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))


def main_ppo(config_path: str | None, overrides: list[str]) -> Path:
    """``dialogrl ppo``: train, then evaluate greedy and sampled replies on the held-out test split."""
    from dialogrl.config import dump_config, load_config
    from dialogrl.evaluation import evaluate_run

    cfg = load_config(PPOConfig, config_path, overrides)
    out = train_ppo(cfg)
    dump_config(cfg, out / "config.yaml")
    if cfg.eval_episodes:
        evaluate_run(out, cfg.eval_episodes, cfg.eval_seed, method=cfg.method, training_seed=cfg.seed,
                     **cfg.held_out_tasks())
    return out
