"""Learned reward models, held-out pairwise accuracy, measured honestly.

1. Environment pairs: states of the historical agent's train-split conversations, one candidate reply each from
   the expert, historical, noisy and random agents, ranked by the return when the expert finishes the
   conversation (margin >= 0.25). Held out by scenario. Target: accuracy >= 0.80.
2. Taskmaster-4 (real data, ../shared/realdata/taskmaster4/reward_pairs_dpo.jsonl): human 0/1 ratings of one
   next agent turn. Held out by prompt, over several seeded splits; reported against chance (0.5) and a
   "prefer the longer reply" baseline, with 95% Wilson intervals. No target: the base model was pre-trained on
   the customer-service domain only, and the held-out sets are small.

    python benchmarks/reward_model.py                # the cached bootstrap base model (built once, minutes)
    python benchmarks/reward_model.py --quick        # fewer episodes and one split: a smoke run

Writes benchmarks/results/reward_model.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from dialogrl.agents.reward_model_train import RewardModelConfig, train_reward_model, wilson_interval
from dialogrl.evaluation import write_json

TASKMASTER = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "taskmaster4" / \
    "reward_pairs_dpo.jsonl"
TARGET = 0.80


def _chars(messages: list[dict[str, Any]]) -> int:
    return sum(len(m["content"]) for m in messages)


def length_checks(run_dir: Path) -> dict[str, Any]:
    """The 'prefer the longer reply' baseline on the held-out pairs, and the reward model's accuracy on the pairs
    where that baseline is wrong or tied (the chosen reply is not the longer one): a learned shortcut on length
    would score poorly there."""
    from dialogrl.agents.reward_model_train import pairwise_accuracy
    from dialogrl.rewards.reward_model import RewardModelScorer

    pairs = [json.loads(line) for line in (run_dir / "pairs" / "eval.jsonl").read_text().splitlines()]
    longer = [1.0 if _chars(p["chosen"]) > _chars(p["rejected"]) else 0.5 if _chars(p["chosen"]) == _chars(
        p["rejected"]) else 0.0 for p in pairs]
    hard = [p for p, won in zip(pairs, longer, strict=True) if won < 1.0]
    scorer = RewardModelScorer.from_run_dir(run_dir)
    return {"length_baseline": sum(longer) / len(pairs), "not_longer_pairs": len(hard),
            "accuracy_on_not_longer": pairwise_accuracy(scorer, hard) if hard else None}


def run_one(cfg: RewardModelConfig) -> dict[str, Any]:
    started = time.perf_counter()
    out = train_reward_model(cfg)
    run = json.loads((out / "run.json").read_text())
    m = run["metrics"]
    return {"seed": cfg.seed, "eval_accuracy": m["eval_accuracy"], "eval_accuracy_ci95": m["eval_accuracy_ci95"],
            "train_accuracy": m["train_accuracy"], "eval_pairs": m["eval_pairs"], "train_pairs": m["train_pairs"],
            **length_checks(out), "eval_accuracy_by_epoch": m["eval_accuracy_by_epoch"],
            "collected": run["data"]["collected"], "train_seconds": m["wall_time_s"],
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="local base model dir (default: the cached bootstrap base)")
    parser.add_argument("--episodes", type=int, default=400, help="conversations whose states give env pairs")
    parser.add_argument("--splits", type=int, default=3, help="seeded Taskmaster-4 train/validation splits")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="100 episodes, one split, one epoch")
    parser.add_argument("--out", default="benchmarks/results/reward_model.json")
    args = parser.parse_args()
    if args.quick:
        args.episodes, args.splits, args.epochs = 100, 1, 1.0
    if not args.model:
        from dialogrl.policies.bootstrap import default_base_model

        args.model = str(default_base_model())
    result: dict[str, Any] = {"model": args.model, "target_env_accuracy": TARGET, "chance": 0.5}
    with tempfile.TemporaryDirectory() as work:
        env = run_one(RewardModelConfig(model=args.model, collect_episodes=args.episodes, epochs=args.epochs,
                                        output_dir=f"{work}/env"))
        env["met"] = env["eval_accuracy"] >= TARGET
        result["environment"] = env
        print(f"environment pairs: held-out accuracy {env['eval_accuracy']:.3f} on {env['eval_pairs']} pairs "
              f"(95% CI {env['eval_accuracy_ci95']}), length baseline {env['length_baseline']:.3f}, accuracy where "
              f"the chosen reply is not the longer {env['accuracy_on_not_longer']} ({env['not_longer_pairs']} pairs), "
              f"target {TARGET} met={env['met']}")
        if TASKMASTER.is_file():
            splits = [run_one(RewardModelConfig(model=args.model, pairs_file=str(TASKMASTER), collect_episodes=0,
                                                epochs=args.epochs, seed=s, output_dir=f"{work}/tm4_{s}"))
                      for s in range(args.splits)]
            n = sum(s["eval_pairs"] for s in splits)
            mean = sum(s["eval_accuracy"] * s["eval_pairs"] for s in splits) / n
            result["taskmaster4"] = {
                "file": str(TASKMASTER), "splits": splits, "mean_eval_accuracy": mean,
                # The splits overlap, so this interval (on the pooled count) is optimistic; each split has its own.
                "pooled_ci95": wilson_interval(mean, n),
                "mean_length_baseline": sum(s["length_baseline"] * s["eval_pairs"] for s in splits) / n,
                "above_chance": all(s["eval_accuracy_ci95"][0] > 0.5 for s in splits),
            }
            tm = result["taskmaster4"]
            print(f"taskmaster-4: held-out accuracy {mean:.3f} over {len(splits)} splits "
                  f"({[round(s['eval_accuracy'], 3) for s in splits]}), chance 0.5, "
                  f"length baseline {tm['mean_length_baseline']:.3f}, every split's CI above chance: "
                  f"{tm['above_chance']}")
        else:
            result["taskmaster4"] = {"skipped": f"{TASKMASTER} not found"}
    write_json(result, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
