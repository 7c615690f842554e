"""Run any policy on many seeded conversations side by side, and summarise the outcome.

Scenario seeds are derived from one seed, so two policies evaluated with the same seed meet the same customers
(paired comparison). Environments step side by side and the policy answers all live conversations in one call.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from dialogrl.outputs import write_text_atomic
from dialogrl.rewards.combine import RewardCombiner, batched_reward
from dialogrl.types import DialogRLError

ActFn = Callable[[list[Any], list[dict[str, Any]]], list[Any]]
"""Maps the observations and infos of the live environments to one action each."""


def scenario_seeds(seed: int, episodes: int) -> list[int]:
    """The held-out scenario seeds for an evaluation: a pure function of ``seed``."""
    if episodes < 0:
        raise DialogRLError(f"episode count must be positive, got {episodes}")
    if seed < 0:
        raise DialogRLError(f"seed must be zero or positive, got {seed}")
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(episodes, dtype=np.uint32)]


def make_env(env_id: str, **kwargs: Any) -> gym.Env:
    """``gym.make`` of a dialogrl id, with one-line errors for unknown or foreign ids and for intents that
    contradict the id (``dialogrl/Refund-v0`` is the refund intent only; ``gym.make`` would let ``intents``
    silently replace it while results still carry the id)."""
    import dialogrl.envs  # noqa: F401  (registers the ids)

    known = ", ".join(sorted(k for k in gym.registry if k.startswith("dialogrl/")))
    if env_id not in gym.registry:
        raise DialogRLError(f"unknown env id '{env_id}'; registered: {known}")
    if not env_id.startswith("dialogrl/"):
        raise DialogRLError(f"env id '{env_id}' is not a dialogrl environment; use one of: {known}")
    fixed, wanted = gym.registry[env_id].kwargs.get("intents"), kwargs.get("intents")
    if fixed is not None and wanted is not None:
        outside = [i for i in ([wanted] if isinstance(wanted, str) else wanted) if i not in fixed]
        if outside:
            raise DialogRLError(f"intent '{outside[0]}' conflicts with env '{env_id}', which is intent "
                                f"{', '.join(repr(i) for i in fixed)} only; choose intents on "
                                "dialogrl/CustomerService-v0 instead")
    return gym.make(env_id, disable_env_checker=True, **kwargs)


def run_episodes(
    env_fn: Callable[[], gym.Env], act: ActFn, seeds: Sequence[int], repeats: int = 1, batch_size: int = 32,
    keep_messages: bool = False,
) -> list[dict[str, Any]]:
    """Play every (seed, repeat) to the end, ``batch_size`` environments at a time; one record per episode."""
    queue = [(s, r) for r in range(repeats) for s in seeds]
    envs = [env_fn() for _ in range(min(batch_size, len(queue)))]
    live: dict[int, tuple[int, int, Any, dict[str, Any], list[int]]] = {}
    records: list[dict[str, Any]] = []
    next_item = 0

    def start(slot: int) -> None:
        nonlocal next_item
        seed, repeat = queue[next_item]
        next_item += 1
        obs, info = envs[slot].reset(seed=seed)
        live[slot] = (seed, repeat, obs, info, [])

    for slot in range(len(envs)):
        start(slot)
    combiner, max_chars = batched_reward(envs[0]) if envs else (None, None)
    while live:
        slots = sorted(live)
        actions = act([live[s][2] for s in slots], [live[s][3] for s in slots])
        if combiner is not None:  # a reward model scores the turn's replies in one batch
            combiner.prefetch_replies([live[s][3]["messages"] for s in slots], actions, max_chars)
        for slot, action in zip(slots, actions, strict=True):
            seed, repeat, _, _, reply_chars = live[slot]
            obs, _, terminated, truncated, info = envs[slot].step(action)
            reply_chars.append(len(info["messages"][-1 - _trailing(info["messages"])]["content"]))
            live[slot] = (seed, repeat, obs, info, reply_chars)
            if terminated or truncated:
                records.append(_record(seed, repeat, info, reply_chars, keep_messages))
                del live[slot]
                if next_item < len(queue):
                    start(slot)
    for env in envs:
        env.close()
    order = {s: i for i, s in enumerate(seeds)}
    records.sort(key=lambda r: (r["repeat"], order[r["scenario_seed"]]))
    return records


def _trailing(messages: list[dict[str, Any]]) -> int:
    """How many messages after the last assistant reply (tool results, the customer's answer)."""
    for back, message in enumerate(reversed(messages)):
        if message["role"] == "assistant":
            return back
    return 0


def _record(seed: int, repeat: int, info: dict[str, Any], reply_chars: list[int], keep: bool) -> dict[str, Any]:
    episode, scenario = info["episode"], info["scenario"]
    record = {
        "scenario_seed": seed, "repeat": repeat, "intent": scenario["intent"], "persona": scenario["persona"],
        "success": bool(episode["success"]), "return": float(episode["return"]), "turns": int(episode["turns"]),
        "violations": len(info["violations"]), "invalid_actions": int(info["invalid_actions"]),
        "reply_chars": float(np.mean(reply_chars)) if reply_chars else 0.0,
        "reward_components": {k: float(v) for k, v in episode["reward_components"].items()},
    }
    if keep:
        record["messages"] = info["messages"]
    return record


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Metrics over episodes, overall and by persona and intent."""
    def block(rs: list[dict[str, Any]]) -> dict[str, Any]:
        turns = sum(r["turns"] for r in rs)
        names = sorted({k for r in rs for k in r["reward_components"]})
        return {
            "episodes": len(rs),
            "success_rate": float(np.mean([r["success"] for r in rs])),
            "mean_return": float(np.mean([r["return"] for r in rs])),
            "mean_turns": float(np.mean([r["turns"] for r in rs])),
            "violation_rate": float(np.mean([r["violations"] > 0 for r in rs])),
            "invalid_action_rate": sum(r["invalid_actions"] for r in rs) / max(turns, 1),
            "mean_reply_chars": float(np.mean([r["reply_chars"] for r in rs])),
            "reward_components": {n: float(np.mean([r["reward_components"].get(n, 0.0) for r in rs])) for n in names},
        }

    if not records:
        raise DialogRLError("no episodes to summarise")
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {"by_persona": {}, "by_intent": {}}
    for r in records:
        groups["by_persona"].setdefault(r["persona"], []).append(r)
        groups["by_intent"].setdefault(r["intent"], []).append(r)
    short = ("episodes", "success_rate", "mean_return")
    return {
        "metrics": block(records),
        **{g: {k: {f: v for f, v in block(rs).items() if f in short} for k, rs in sorted(by.items())}
           for g, by in groups.items()},
    }


def require_text_env(env_id: str, kwargs: dict[str, Any], setting: str | None = None) -> None:
    """Text policies need the text action space; fail with one line otherwise (naming the config ``setting``
    that chose the env, when there is one)."""
    env = make_env(env_id, **kwargs)
    try:
        if not isinstance(env.action_space, gym.spaces.Text):
            which = f"{setting}={env_id}:" if setting else f"env '{env_id}'"
            raise DialogRLError(f"{which} takes dialogue acts, not text replies; use a text env such as "
                                "dialogrl/CustomerService-v0 (or `dialogrl sb3` for the acts env)")
    finally:
        env.close()


def text_policy_act(policy: Any) -> ActFn:
    """Adapt a text policy (``act_batch(conversations, infos)``) to ``run_episodes``."""
    return lambda _obs, infos: policy.act_batch([i["messages"] for i in infos], infos)


def evaluate(
    policy: Any, env_id: str = "dialogrl/CustomerService-v0", *, split: str = "test", episodes: int = 200,
    seed: int = 0, repeats: int = 1, env_kwargs: dict[str, Any] | None = None, act: ActFn | None = None,
    method: str | None = None, decoding: str | None = None, training_seed: int | None = None, batch_size: int = 64,
    keep_messages: bool = False,
) -> dict[str, Any]:
    """Evaluate a policy on ``episodes`` held-out scenarios; returns the eval-JSON dict.

    ``decoding`` labels the evaluation in reports; None: ``greedy`` or ``sampled`` for a policy with generation
    settings (an LM policy), else ``scripted``. ``keep_messages``: every record keeps its conversation
    (``messages``, HF format), e.g. for :func:`dialogrl.data.write_logs`. ``batch_size`` conversations are
    answered per ``generate`` call, which draws one sampling stream for all of them: a sampled evaluation repeats
    exactly for the same seed, episodes and ``batch_size`` (a run's own evaluation uses the default)."""
    if episodes <= 0:
        raise DialogRLError(f"episode count must be positive, got {episodes}")
    if repeats <= 0:
        raise DialogRLError(f"repeats must be positive, got {repeats}")
    kwargs = {"split": split, **(env_kwargs or {})}
    if act is None:
        require_text_env(env_id, kwargs)  # also fails fast on bad ids, rewards or scenario files
    else:
        make_env(env_id, **kwargs).close()
    seeds = scenario_seeds(seed, episodes)
    generation = getattr(policy, "generation", None)
    if decoding is None:
        decoding = "scripted" if generation is None else "sampled" if generation.do_sample else "greedy"
    if act is None and getattr(generation, "do_sample", False) and getattr(generation, "seed", 0) is None:
        # Sampling draws from the evaluation's seed, not from whatever torch's global RNG went through before.
        policy = policy.with_settings(seed=seed)
    # An LM policy with a reference (its adapter disabled) also reports how far it moved: KL on its own replies.
    kl_fn = getattr(policy, "kl_to_reference", None) if act is None else None
    records = run_episodes(lambda: make_env(env_id, **kwargs), act or text_policy_act(policy), seeds,
                           repeats=repeats, batch_size=batch_size, keep_messages=keep_messages or kl_fn is not None)
    summary = summarise(records)
    if kl_fn is not None:
        kl = kl_fn([r["messages"] for r in records])
        if kl is not None:
            summary["metrics"]["kl_to_reference"] = kl
    if not keep_messages:
        for record in records:
            record.pop("messages", None)
    name = getattr(policy, "name", str(policy))
    reward = kwargs.get("reward")  # what ``return`` means (null: the env's default mix)
    return {
        "policy": name, "method": method or name, "env_id": env_id, "split": split, "seed": seed,
        "episodes": episodes, "repeats": repeats, "decoding": decoding, "training_seed": training_seed,
        "reward": None if reward is None else reward_weights(reward), **summary, "records": records,
    }


def reward_weights(spec: Any) -> dict[str, float]:
    """A reward spec as ``{component name: weight}``, sorted: the same rewards give the same record however they
    were written (``success`` or ``success=1``; a callable by its ``__name__``, as its component is named)."""
    return dict(sorted(RewardCombiner.from_specs(spec).weights.items()))


def write_json(data: Any, path: str | Path) -> Path:
    """Write JSON atomically: a temp file in the same folder, then rename."""
    return write_text_atomic(path, json.dumps(data, indent=1))


def evaluate_run(run_dir: Path, episodes: int, seed: int, method: str, training_seed: int | None = None,
                 env_id: str = "dialogrl/CustomerService-v0", env_kwargs: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Greedy (``eval.json``) and sampled (``eval_sampled.json``) test-split evaluations of a run directory."""
    from dialogrl.policies.lm import LMPolicy

    results = {}
    for decoding, name in (("greedy", "eval.json"), ("sampled", "eval_sampled.json")):
        policy = LMPolicy.from_run_dir(run_dir, decoding=decoding)
        result = evaluate(policy, env_id, split="test", episodes=episodes, seed=seed, method=method,
                          decoding=decoding, training_seed=training_seed, env_kwargs=env_kwargs)
        write_json(result, run_dir / name)
        results[decoding] = result
    return results
